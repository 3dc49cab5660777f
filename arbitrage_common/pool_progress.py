"""Whether a pool answers: per pool, when each call out to it now was sent, and when it last
answered one. A request's missed deadline is the pool's fault (retry later) rather than the
client's (raise the deadline) only when the pool has answered nothing for a while although a
call was out to it: a hung replica. Time a call spent queued before it left (a merge lane, a
call slot, a backoff) and a slow step of a pool that keeps answering others do not count.
A merged call's lane is tracked on its own too (``role/lane``): affinity sends a lane to one
replica, so a lane silent while others answer is one hung replica of a pool that has several."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable

# A call the caller cut (the deadline cancels the calls it waited on, before the request looks
# for a pool to blame) still tells how long the pool had been silent, for this long after.
CUT_FRESH_S = 1.0


class PoolProgress:
    """``sent(key)`` when a call leaves for a pool (``key``: the pool, or ``pool/lane``),
    ``ended(key, token, answered)`` when it ends: ``answered`` when the pool replied (a result
    or its error), not when the caller cancelled it. ``stalled_s(role)``: the longest a pool or
    one of its lanes has answered nothing while a call was out to it (a call cut within
    ``CUT_FRESH_S`` counts as out until it was cut); 0 if none."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = itertools.count()
        self._out: dict[str, dict[int, float]] = {}  # role -> token -> when that call was sent
        self._answered: dict[str, float] = {}  # role -> the pool's last answer
        self._cut: dict[str, tuple[float, float]] = {}  # role -> (silent seconds, when) of a call cut

    def sent(self, key: str) -> int:
        token = next(self._tokens)
        self._out.setdefault(key, {})[token] = self._clock()
        return token

    def ended(self, key: str, token: int, answered: bool) -> None:
        sent = self._out.get(key, {}).pop(token, None)
        now = self._clock()
        if answered:
            self._answered[key] = now
            self._cut.pop(key, None)
        elif sent is not None:
            silent = now - max(sent, self._answered.get(key, float("-inf")))
            if silent > self._fresh_cut(key, now):
                self._cut[key] = (silent, now)

    def stalled_s(self, role: str) -> float:
        now = self._clock()
        keys = {key for key in (*self._out, *self._cut) if key == role or key.startswith(f"{role}/")}
        return max((self._silent(key, now) for key in keys), default=0.0)

    def _silent(self, key: str, now: float) -> float:
        out = self._out.get(key)
        silent = now - max(min(out.values()), self._answered.get(key, float("-inf"))) if out else 0.0
        return max(silent, self._fresh_cut(key, now))

    def _fresh_cut(self, key: str, now: float) -> float:
        cut = self._cut.get(key)
        return cut[0] if cut is not None and now - cut[1] <= CUT_FRESH_S else 0.0
