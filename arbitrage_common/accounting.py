"""Per-request accounting: token and call counts, stage times, decided steps, the result.

Token counts come from each model's own ``Generation.tokens``: draft and target may use
different tokenizers, so draft and target totals are in different units.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .interfaces import FinishReason, Source
from .steps import join_steps

Stage = Literal["draft", "target", "router", "prm"]
STAGES: tuple[Stage, ...] = ("draft", "target", "router", "prm")
LoopFinishReason = Literal["eos", "max_steps", "length", "deadline"]


def _zero_stages() -> dict[str, float]:
    return {stage: 0.0 for stage in STAGES}


@dataclass
class Usage:
    """What one request spent.

    ``target_tokens`` counts every target token generated, also oracle steps not kept;
    ``prm_calls``/``router_calls`` count items scored; ``stage_seconds`` is wall time
    awaited per stage.

    Step pipelining (``LoopRequest.pipeline``): while the scorer reads draft step k, the
    draft already writes step k+1 as if step k were kept. ``speculative_drafts_used``
    counts such early drafts that became step k+1's draft (their tokens are then booked
    like any draft step's, kept or discarded); ``speculative_drafts_discarded`` counts
    those thrown away (step k went to the target, or the request ended first: also one
    still unclaimed when the deadline passed, where the plain loop would make no step k+1
    call; one the loop had begun waiting for as step k+1's draft stays used even if the
    deadline then cancels it, as it would the plain loop's call), and
    ``speculative_draft_tokens_discarded`` their tokens, for those that had finished when
    dropped (a call cancelled in flight reports none). These tokens are in neither
    ``draft_tokens_kept`` nor ``draft_tokens_discarded``, so ``acceptance_rate`` is that
    of the plain loop. The draft's wall time that overlapped the scorer is not awaited and
    is not in ``stage_seconds``: a used early draft books only the time the loop still
    waited for it after the scorer answered.

    Draft lookahead (``LoopRequest.lookahead``) books its steps drafted ahead the same way:
    used when a stashed step became that step's draft, discarded (with its tokens) when the
    step before it went to the target or the request ended first. The scorer counts include
    the items scored ahead and dropped; a step taken from the stash books no stage time.
    """

    draft_tokens_kept: int = 0
    draft_tokens_discarded: int = 0
    target_tokens: int = 0
    steps_by_source: dict[str, int] = field(default_factory=lambda: {"draft": 0, "target": 0})
    router_calls: int = 0
    prm_calls: int = 0
    stage_seconds: dict[str, float] = field(default_factory=_zero_stages)
    # Step pipelining (after the older fields, so positional construction still works).
    speculative_drafts_used: int = 0
    speculative_drafts_discarded: int = 0
    speculative_draft_tokens_discarded: int = 0

    @property
    def draft_tokens(self) -> int:
        return self.draft_tokens_kept + self.draft_tokens_discarded

    @property
    def acceptance_rate(self) -> float:
        """Kept draft tokens / all draft tokens (the paper's code's definition); 0.0 if none."""
        total = self.draft_tokens
        return self.draft_tokens_kept / total if total else 0.0

    @property
    def target_step_fraction(self) -> float:
        """Fraction of kept steps written by the target; 0.0 if no steps."""
        total = sum(self.steps_by_source.values())
        return self.steps_by_source["target"] / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(draft_tokens=self.draft_tokens, acceptance_rate=self.acceptance_rate,
                   target_step_fraction=self.target_step_fraction)
        return out


@dataclass
class StepRecord:
    """One decided step. ``score`` is the score the policy read (for oracle the advantage
    PRM(target) - PRM(draft); None for policies without a scorer). ``tokens`` and
    ``finish_reason`` are those of the kept step, in its writer's tokenizer. ``stage_ms`` is
    the wall ms this step awaited per stage; with step pipelining its draft, written while
    the previous step was scored, books only the time still waited for it (often ~0)."""

    index: int
    text: str
    source: Source
    score: float | None
    draft_discarded: bool
    discarded_draft_text: str | None
    tokens: int
    finish_reason: FinishReason
    stage_ms: dict[str, float] = field(default_factory=dict)
    draft_score: float | None = None  # the PRM's score of the draft step (rsd, oracle)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopResult:
    """A finished (or, inside ``DeadlineExceeded``, partial) request."""

    prompt: str
    steps: list[StepRecord]
    finish_reason: LoopFinishReason
    usage: Usage
    total_seconds: float

    @property
    def text(self) -> str:
        """The kept steps joined by the step delimiter."""
        return join_steps([step.text for step in self.steps])

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "steps": [step.to_dict() for step in self.steps],
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "total_seconds": self.total_seconds,
        }
