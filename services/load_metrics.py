"""Gauges of one coordinator replica: the load controller's state
(``arbitrage_common.threshold_control``) and the pool-call rows it holds back
(``RowsWaitingGauge``). The coordinator exports the controller's at every admission, at every
health probe and on a clock (``services.gauge_clock``), so they (and the offset itself, which
the probe's refresh lets decay) move after traffic stops and stay exported while it idles;
the rows waiting on the clock only. Unknown values (no update yet, latency forgotten while
idle) read 0."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.serve.metrics import Gauge

# snapshot key -> (metric name, description); no labels: one series per coordinator replica.
LOAD_GAUGES: dict[str, tuple[str, str]] = {
    "offset": ("arbitrage_threshold_offset",
               "Load-aware threshold offset toward fewer target calls (this coordinator replica)."),
    "error": ("arbitrage_load_control_error",
              "Load controller's last error: max(latency / budget, in flight / budget) - 1, in [-1, 1]."),
    "latency_ewma_ms": ("arbitrage_load_control_latency_ewma_ms",
                        "EWMA of this replica's target-call wall latency, ms (0 once idle)."),
    "in_flight": ("arbitrage_load_control_target_in_flight", "Target calls this replica has in flight."),
    "request_s": ("arbitrage_load_control_request_s",
                  "EWMA of controlled requests' duration, s (the loop delay that scales gain and decay)."),
    "max_offset": ("arbitrage_threshold_offset_max",
                   "Most the offset may reach (policy.load_control.max_offset); at it, no room is left."),
    "can_scale": ("arbitrage_load_control_target_can_scale",
                  "1 while the target pool can still add replicas (the offset then only falls), else 0."),
}


class LoadGauges:
    """One gauge per ``LOAD_GAUGES`` entry; ``gauge`` builds one (Ray Serve's by default)."""

    def __init__(self, gauge: Callable[..., Any] = Gauge) -> None:
        self.gauges = {key: gauge(name, description=text) for key, (name, text) in LOAD_GAUGES.items()}

    def export(self, snapshot: dict[str, float | int | None]) -> None:
        for key, gauge in self.gauges.items():
            value = snapshot.get(key)
            gauge.set(0.0 if value is None else float(value))


ROWS_WAITING = ("arbitrage_pool_rows_waiting",
                ("Pool-call rows queued in this coordinator replica, by pool, not sent yet: waiting for "
                 "their lane's merged call or a call slot (Serve's queue metrics cannot see them)."))


class RowsWaitingGauge:
    """``ROWS_WAITING``, one series per pool with merged calls."""

    def __init__(self, gauge: Callable[..., Any] = Gauge) -> None:
        self.gauge = gauge(ROWS_WAITING[0], description=ROWS_WAITING[1], tag_keys=("role",))

    def export(self, waiting: dict[str, int]) -> None:
        for role, rows in waiting.items():
            self.gauge.set(float(rows), tags={"role": role})
