"""``services.gauge_clock``: exports on a clock, started once, and one failed export does not stop it."""
from __future__ import annotations

import asyncio

from services import gauge_clock


def test_the_clock_starts_once_and_outlives_a_failed_export():
    calls = []

    def export():
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("metrics agent away")

    async def run():
        clock = gauge_clock.GaugeClock(export, seconds=0.01)
        clock.start()
        first = clock.task
        clock.start()
        await asyncio.sleep(0.2)
        first.cancel()
        return first is clock.task

    assert asyncio.run(run()) and len(calls) >= 5
