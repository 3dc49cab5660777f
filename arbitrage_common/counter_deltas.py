"""Since-start totals -> Prometheus counter increments.

A backend keeps its own running totals (a prefix cache's token lookups and hits); a metrics
counter wants only what was added since the last export, and Ray's ``Counter.inc`` refuses
0 or less. ``CounterDeltas`` remembers the last totals it saw and hands back the positive
growth of each. Pure: no Ray, so the pools' export logic is tested without a cluster.
"""
from __future__ import annotations

from collections.abc import Mapping


class CounterDeltas:
    """What each named total grew by since the previous call."""

    def __init__(self, totals: Mapping[str, float] | None = None) -> None:
        self._seen: dict[str, float] = dict(totals or {})

    def since_last(self, totals: Mapping[str, float]) -> dict[str, float]:
        """The positive increments of ``totals`` over the last ones seen (names that did not
        grow are left out). A total below the last one means the backend restarted its count
        (Prometheus' counter-reset rule): all of it is new."""
        out = {}
        for name, total in totals.items():
            seen = self._seen.get(name, 0)
            grown = total - seen if total >= seen else total
            if grown > 0:
                out[name] = grown
        self._seen.update(totals)
        return out
