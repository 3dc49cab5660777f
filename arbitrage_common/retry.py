"""Retry arithmetic for pool calls: full-jitter exponential backoff bounded by a deadline.

Pure (no Ray): ``services.handles`` decides which failures are retriable and calls this.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

MAX_BACKOFF_S = 1.0
# A retry needs at least this much time left after its backoff to be worth starting.
MIN_ATTEMPT_S = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` extra attempts; backoff ``base_s * 2**attempt`` with full jitter, capped."""

    retries: int = 8
    base_s: float = 0.05
    cap_s: float = MAX_BACKOFF_S

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Sleep before retry ``attempt`` (0-based): uniform in [0, min(cap, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * (2 ** attempt)))

    def next_delay(self, attempt: int, remaining_s: float | None, rng: random.Random) -> float | None:
        """The backoff before retry ``attempt``, or None when no retry is left or the deadline
        (``remaining_s``, None = no deadline) would pass before the retry could finish."""
        if attempt >= self.retries:
            return None
        delay = self.backoff_s(attempt, rng)
        if remaining_s is not None and remaining_s - delay < MIN_ATTEMPT_S:
            return None
        return delay
