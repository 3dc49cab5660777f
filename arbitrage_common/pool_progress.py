"""Whether a pool answers: per pool, when each call out to it now was sent, and when it last
answered one. A request's missed deadline is the pool's fault (retry later) rather than the
client's (raise the deadline) only when the pool has answered nothing for a while although a
call was out to it: a hung replica. Time a call spent queued before it left (a merge lane, a
call slot, a backoff) and a slow step of a pool that keeps answering others do not count."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable

# A call the caller cut (the deadline cancels the calls it waited on, before the request looks
# for a pool to blame) still tells how long the pool had been silent, for this long after.
CUT_FRESH_S = 1.0


class PoolProgress:
    """``sent(role)`` when a call leaves for a pool, ``ended(role, token, answered)`` when it
    ends: ``answered`` when the pool replied (a result or its error), not when the caller
    cancelled it. ``stalled_s(role)``: how long the pool has answered nothing while a call was
    out to it (a call cut within ``CUT_FRESH_S`` counts as out until it was cut); 0 if none."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = itertools.count()
        self._out: dict[str, dict[int, float]] = {}  # role -> token -> when that call was sent
        self._answered: dict[str, float] = {}  # role -> the pool's last answer
        self._cut: dict[str, tuple[float, float]] = {}  # role -> (silent seconds, when) of a call cut

    def sent(self, role: str) -> int:
        token = next(self._tokens)
        self._out.setdefault(role, {})[token] = self._clock()
        return token

    def ended(self, role: str, token: int, answered: bool) -> None:
        sent = self._out.get(role, {}).pop(token, None)
        now = self._clock()
        if answered:
            self._answered[role] = now
            self._cut.pop(role, None)
        elif sent is not None:
            silent = now - max(sent, self._answered.get(role, float("-inf")))
            if silent > self._fresh_cut(role, now):
                self._cut[role] = (silent, now)

    def stalled_s(self, role: str) -> float:
        now = self._clock()
        out = self._out.get(role)
        silent = 0.0
        if out:
            silent = now - max(min(out.values()), self._answered.get(role, float("-inf")))
        return max(silent, self._fresh_cut(role, now))

    def _fresh_cut(self, role: str, now: float) -> float:
        cut = self._cut.get(role)
        return cut[0] if cut is not None and now - cut[1] <= CUT_FRESH_S else 0.0
