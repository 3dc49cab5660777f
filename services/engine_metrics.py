"""A vLLM pool's engine state as Ray Serve metrics, tagged with the pool's role (Serve adds the
application, deployment and replica): requests running and waiting in the engine and the
share of its KV-cache blocks in use at its last scheduler step, and requests it preempted
(a full KV cache makes vLLM stop a running request and recompute it later). vLLM's own
``RayPrometheusStatLogger`` tags its metrics with the replica id only, so the dashboard's
application filter could not select them. The pool exports on a clock
(``services.gauge_clock``): one set as each call ends would read the engine as its batch ends,
often empty."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.serve.metrics import Counter, Gauge

from arbitrage_common.counter_deltas import CounterDeltas

# EngineStats.snapshot key -> (metric name, description)
ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "running_requests": ("arbitrage_pool_engine_running_requests",
                         "Requests the pool replica's vLLM engine ran at its last scheduler step."),
    "waiting_requests": ("arbitrage_pool_engine_waiting_requests",
                         ("Requests waiting in the pool replica's vLLM engine at its last scheduler step "
                          "(no KV-cache room or max_num_seqs reached).")),
    "kv_cache_usage": ("arbitrage_pool_engine_kv_cache_usage",
                       "Share of the pool replica's vLLM KV-cache blocks in use at its last scheduler step (0-1)."),
}
PREEMPTIONS = ("arbitrage_pool_engine_preempted_requests_total",
               "Requests the pool replica's vLLM engine preempted (its KV cache full) to recompute later.")


class EngineMetrics:
    """``ENGINE_GAUGES`` and the preemption counter of one pool replica; ``gauge`` and
    ``counter`` build a metric (Ray Serve's by default)."""

    def __init__(self, role: str, gauge: Callable[..., Any] = Gauge, counter: Callable[..., Any] = Counter) -> None:
        self.gauges = {key: gauge(name, description=text, tag_keys=("role",))
                       for key, (name, text) in ENGINE_GAUGES.items()}
        self.preempted = counter(PREEMPTIONS[0], description=PREEMPTIONS[1], tag_keys=("role",))
        for metric in (*self.gauges.values(), self.preempted):
            metric.set_default_tags({"role": role})
        self._seen = CounterDeltas()

    def export(self, stats: dict[str, float]) -> None:
        """``stats``: the engine's ``EngineStats.snapshot()``."""
        for key, gauge in self.gauges.items():
            gauge.set(float(stats[key]))
        grown = self._seen.since_last({"preempted": stats["preempted_requests"]})
        if grown:
            self.preempted.inc(grown["preempted"])
