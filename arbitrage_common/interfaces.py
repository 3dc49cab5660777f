"""The two small interfaces the step loop runs over, and the values that cross them.

Pure Python: no Ray, no torch. Steps travel as text, so draft and target may use
different tokenizers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

Source = Literal["draft", "target"]
# Why a step ended: "delimiter" (the step delimiter, not included in the text), "eos"
# (end-of-sequence), "length" (its token budget or the model's context ran out), or
# "context": the prefix leaves no room in the model's context, so nothing was generated
# (Generation(text="", tokens=0, finish_reason="context")).
FinishReason = Literal["delimiter", "eos", "length", "context"]


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call decoding options. temperature 0 means greedy.

    ``proposal``: a guess of the output (the draft's step when the target rewrites it). A
    backend that can verify it (the transformers one) runs it in the prefill and keeps the
    tokens it would have generated anyway, so the output is the same, in fewer decode steps.
    Backends that cannot ignore it."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    proposal: str = ""


def row_options(options: GenerationOptions | Sequence[GenerationOptions], n: int) -> list[GenerationOptions]:
    """One ``GenerationOptions`` per row of an ``n``-row batch.

    A sequence is taken as it is (one per row). One options object for the whole batch
    gives row ``i`` the seed ``(seed or 0) + i`` when sampling, so equal prefixes in one
    call still draw different samples; a row's output depends only on its own options.
    """
    if isinstance(options, GenerationOptions):
        if options.temperature <= 0:
            return [options] * n
        base = options.seed or 0
        return [replace(options, seed=base + i) for i in range(n)]
    rows = list(options)
    if len(rows) != n:
        raise ValueError(f"options: {len(rows)} for {n} prefixes (one per prefix, or one for all)")
    return rows


@dataclass(frozen=True)
class Generation:
    """One generated step: text without the delimiter, its token count, why it stopped
    (``FinishReason``), and the wall seconds of the call that produced it (shared by a batch)."""

    text: str
    tokens: int
    finish_reason: FinishReason
    seconds: float


class Generator(Protocol):
    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        """Continue each prefix up to the step delimiter, end-of-sequence or the token limit."""
        ...


@dataclass(frozen=True)
class ScoreItem:
    """A candidate step in context: the problem, the kept steps with their sources, the step."""

    problem: str
    history: tuple[tuple[str, Source], ...]
    candidate: str


class Scorer(Protocol):
    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """One float per item (PRM: P(step correct); router: predicted target advantage)."""
        ...
