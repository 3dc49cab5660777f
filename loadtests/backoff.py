"""The closed loop's wait after a failed request. A real client backs off from a service that is
down or overloaded; a closed-loop user that sent its next request at once turned a dead proxy
into a storm (8 users, ~40,000 refused requests in 35 s) that swamped the run's counts and slowed
the service's recovery. Pure logic: ``locustfile.ArbitrageUser`` sleeps what ``Backoff.after``
says as its locust ``wait_time`` (no request, so nothing counted); the open loop never asks,
its arrivals are independent of the replies by design."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# A failure the service (or what is in front of it) says to retry later: gRPC's and the API's
# error codes, a proxy's own page, or no connection at all. A missed deadline, bad input or a
# bug is not: retrying those sooner or later changes nothing, so they keep the closed loop's pace.
RETRIABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "HTTP_502", "HTTP_503", "HTTP_504", "HTTP_429",
                       "CONNECTION_ERROR"})
INITIAL_S = 0.5          # the first wait's ceiling, doubling per retriable failure in a row
CAP_S = 5.0              # the ceiling's ceiling
RETRY_AFTER_CAP_S = 30.0  # a server's Retry-After beyond this would idle the user for the rest of a run
RETRY_AFTER_JITTER = 0.1  # up to 10 % over Retry-After (never under), so users do not return in step


@dataclass(frozen=True)
class Outcome:
    """How one request ended: its record's status, and the server's Retry-After in seconds if it sent one."""

    status: str
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """An HTTP ``Retry-After`` (delay seconds or an HTTP-date) in seconds from ``now``; None when
    absent, unparseable, or not in the future (no hint: the backoff decides)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


class Backoff:
    """One user's waits: after a retriable failure the server's Retry-After (capped at
    ``retry_after_cap_s``) when it sent one, else a ceiling of ``initial_s`` doubling per
    retriable failure in a row up to ``cap_s``, jittered to between half of it and all of it;
    reset by a success. No wait after a success or a non-retriable failure. Seeded, so a run's
    waits repeat with its ``--seed``."""

    def __init__(self, seed: int | str, initial_s: float = INITIAL_S, cap_s: float = CAP_S,
                 retry_after_cap_s: float = RETRY_AFTER_CAP_S):
        self.rng = random.Random(seed)
        self.initial_s, self.cap_s, self.retry_after_cap_s = initial_s, cap_s, retry_after_cap_s
        self.failures = 0  # retriable failures since the last success

    @classmethod
    def for_user(cls, run_seed: int, user: int) -> Backoff:
        """User ``user``'s (0, 1, ... in start order) of a run seeded ``run_seed``: users jitter apart."""
        return cls(f"backoff:{run_seed}:{user}")  # a str seed hashes the same in every process

    def after(self, outcome: Outcome) -> float:
        """Seconds to wait before the next request."""
        if outcome.status == "OK":
            self.failures = 0
            return 0.0
        if outcome.status not in RETRIABLE:
            return 0.0
        self.failures += 1
        if outcome.retry_after_s is not None and outcome.retry_after_s > 0:
            return min(self.retry_after_cap_s, outcome.retry_after_s * (1 + RETRY_AFTER_JITTER * self.rng.random()))
        ceiling = min(self.cap_s, self.initial_s * 2.0 ** min(self.failures - 1, 64))  # the exponent bounded: no overflow
        return ceiling * self.rng.uniform(0.5, 1.0)
