"""Gauges set on a clock. Ray drops a gauge that is not set again within two of its export
intervals (2 s at the shortest, ``arbitrage serve --metrics-interval-s 1``), so gauges set
only as traffic passes, or by a slower loop, vanish from the metrics while a replica idles."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Seconds between exports: under half of Ray's shortest export interval (1 s).
GAUGE_EXPORT_S = 0.5


class GaugeClock:
    """Calls ``export`` every ``seconds`` on the running event loop, from ``start`` on."""

    def __init__(self, export: Callable[[], None], seconds: float = GAUGE_EXPORT_S) -> None:
        self.export, self.seconds = export, seconds
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the clock once; later calls do nothing."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.export()
            except Exception:  # one failed export must not stop the metrics for good
                logger.exception("gauge export failed")
            await asyncio.sleep(self.seconds)
