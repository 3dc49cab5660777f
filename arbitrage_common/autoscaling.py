"""Pool autoscaling on the rows a replica holds, not the Serve calls it runs.

Why: with merged calls (``arbitrage_common.coalesce``, on by default) one Serve call to a pool
carries up to 64 rows (the steps of many requests), and each coordinator replica has at most one
call out per lane. Ray Serve's default policy counts ongoing *calls* (``desired = calls /
target_ongoing_requests``), so a pool could never pass ``coordinators x lanes / target`` replicas
however many steps waited (a preset's draft pool, 16 lanes and a target of 64, needed 5
coordinator replicas for a second replica and 13 for its 4). Here ``target_ongoing_requests``
counts rows (request steps):

- each pool replica reports, through Serve's ``record_autoscaling_stats`` hook, the rows and the
  calls it held (running, batching or queued inside it), averaged over the time since its last
  report (``HeldRows``);
- ``rows_policy`` (the pool's ``autoscaling_config.policy``) asks for ``rows / target`` replicas,
  where rows are the reported rows plus the calls still queued at callers' handles times the
  rows per call, and never fewer than the calls Serve counts. With no row report yet (a cold
  start, a replica without the hook) it is Serve's own call-count policy. Serve wraps it with
  the bounds, the up/downscale delays and the scaling factors of the pool's config.

The coordinator autoscales on its requests, Serve's own count, less its open health ``Watch``
streams (``requests_policy``): a watch is a request to Serve for as long as the client keeps it
open, and idle watchers would otherwise hold coordinator replicas up (measured: four watches
on a coordinator with ``target_ongoing_requests: 2`` kept a second replica running with no
traffic). Each coordinator replica reports the watches open when Serve samples its load
(``WATCHES_METRIC``), as Serve counts its ongoing requests at that moment.

Pure logic: no Ray import. Serve pickles this module by value into its controller, so
the policies only use the standard library and this module's own names.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Metric names a pool replica reports (``_Pool.record_autoscaling_stats``).
ROWS_METRIC = "arbitrage_rows"
CALLS_METRIC = "arbitrage_calls"
# ``autoscaling_config.policy.policy_function`` of a pool that autoscales on rows.
POLICY_FUNCTION = "arbitrage_common.autoscaling:rows_policy"
# The coordinator's: its open health watches (``Coordinator.record_autoscaling_stats``) are no load.
WATCHES_METRIC = "arbitrage_health_watches"
REQUESTS_POLICY_FUNCTION = "arbitrage_common.autoscaling:requests_policy"


def _target(ctx: Any) -> float:
    """The deployment's ``target_ongoing_requests`` (a method on newer Serve configs)."""
    config = ctx.config
    getter = getattr(config, "get_target_ongoing_requests", None)
    return float(getter() if getter is not None else config.target_ongoing_requests)


def requests_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired coordinator replicas: Serve's request count (running and queued) less the open
    health watches the replicas report, over the target per replica; Serve's default policy
    while none reported. Serve applies bounds, delays and factors to the result."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}  # Serve's own answer; its cold-start path scales up from 0
    requests = float(ctx.total_num_requests or 0.0)
    watches = float(sum(((ctx.aggregated_metrics or {}).get(WATCHES_METRIC) or {}).values()))
    return max(requests - watches, 0.0) / _target(ctx), {}


def rows_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired replicas for a Ray Serve ``AutoscalingContext``: rows held / target per replica.

    ``ctx.aggregated_metrics[name][replica_id]`` is each replica's report averaged over
    ``look_back_period_s``; a replica that has not reported yet is absent. Serve applies
    min/max replicas, delays and factors to the result (a float: it rounds up)."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}  # Serve's own answer; its cold-start path scales up from 0
    target = _target(ctx)
    calls = float(ctx.total_num_requests or 0.0)  # Serve's count: calls running and queued at handles
    metrics = ctx.aggregated_metrics or {}
    held = metrics.get(ROWS_METRIC) or {}
    if not held:  # no replica reported rows yet: Serve's default policy
        return calls / target, {}
    rows = float(sum(held.values()))
    held_calls = float(sum((metrics.get(CALLS_METRIC) or {}).values()))
    # Calls queued at callers' handles (every replica full) carry rows too: as many per call
    # as the calls the replicas hold (at least one).
    queued = float(ctx.total_queued_requests or 0.0)
    rows += queued * max(rows / held_calls if held_calls > 0 else 1.0, 1.0)
    # Every call holds at least a row: a replica that reports nothing (it just started, or it
    # runs code without the hook) still counts by its calls.
    return max(rows, calls) / target, {}


class HeldRows:
    """The rows and calls one replica holds, as means over the time between ``sample()``s.

    A mean rather than the value at the moment Serve samples: merged calls come and go within
    a sampling interval, so a point sample would often land between two calls and read 0.
    Single-threaded: use it from the replica's event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.rows = 0
        self.calls = 0
        self._last = self._since = clock()
        self._row_seconds = 0.0
        self._call_seconds = 0.0

    def _advance(self) -> float:
        now = self._clock()
        elapsed = now - self._last
        self._row_seconds += self.rows * elapsed
        self._call_seconds += self.calls * elapsed
        self._last = now
        return now

    @contextmanager
    def hold(self, rows: int) -> Iterator[None]:
        """Count one call carrying ``rows`` rows for as long as the block runs."""
        self._advance()
        self.rows += rows
        self.calls += 1
        try:
            yield
        finally:
            self._advance()
            self.rows -= rows
            self.calls -= 1

    def sample(self) -> dict[str, float]:
        """Mean rows and calls held since the last sample (now, if no time passed), then restart."""
        now = self._advance()
        span = now - self._since
        if span > 0:
            out = {ROWS_METRIC: self._row_seconds / span, CALLS_METRIC: self._call_seconds / span}
        else:
            out = {ROWS_METRIC: float(self.rows), CALLS_METRIC: float(self.calls)}
        self._since, self._row_seconds, self._call_seconds = now, 0.0, 0.0
        return out
