"""The two small interfaces the step loop runs over, and the values that cross them.

Pure Python: no Ray, no torch. Steps travel as text, so draft and target may use
different tokenizers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Source = Literal["draft", "target"]
FinishReason = Literal["delimiter", "eos", "length"]


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call decoding options. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    """One generated step: text without the delimiter, its token count, why it stopped,
    and the wall seconds of the call that produced it (shared by a batch)."""

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
