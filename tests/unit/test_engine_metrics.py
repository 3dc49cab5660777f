"""A vLLM pool's engine state as metrics: the scheduler's per-step reports kept by
``EngineStats`` (totals since start, the state at the last step, peaks) and exported by
``services.engine_metrics`` as gauges and a preemption counter tagged with the pool's role.
Ray's metric classes are replaced by fakes here; tests/vllm runs the real engine."""
from __future__ import annotations

from arbitrage_common.backends.vllm_generator import EngineStats
from services import engine_metrics


class _Metric:
    """Ray Serve's Gauge / Counter as the export uses them (``inc`` refuses 0 or less, like Ray's)."""

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        self.name, self.tag_keys, self.tags, self.value = name, tag_keys, {}, 0.0

    def set_default_tags(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self.value += value


def _metrics() -> engine_metrics.EngineMetrics:
    return engine_metrics.EngineMetrics("draft", gauge=_Metric, counter=_Metric)


def test_engine_stats_keep_totals_the_last_state_and_the_peaks():
    stats = EngineStats()
    stats.add(2, 40, 10, running=2, waiting=3, kv_cache_usage=0.5, preempted=1)
    stats.add(1, 20, 20, running=1, waiting=0, kv_cache_usage=0.25, preempted=0)
    got = stats.snapshot()
    assert (got["prefix_cache_requests"], got["prefix_cache_queries"], got["prefix_cache_hits"]) == (3, 60, 30)
    assert got["prefix_cache_hit_rate"] == 0.5 and got["preempted_requests"] == 1
    assert (got["running_requests"], got["waiting_requests"], got["kv_cache_usage"]) == (1, 0, 0.25)  # the last step
    assert (got["max_running_requests"], got["peak_kv_cache_usage"]) == (2, 0.5)


def test_the_export_sets_the_gauges_to_the_last_step_and_counts_preemptions_once():
    metrics, stats = _metrics(), EngineStats()
    stats.add(1, 10, 0, running=4, waiting=2, kv_cache_usage=0.9, preempted=3)
    metrics.export(stats.snapshot())
    metrics.export(stats.snapshot())  # exported again (a poll between steps): nothing counted twice
    values = {m.name: m.value for m in (*metrics.gauges.values(), metrics.preempted)}
    assert values == {"arbitrage_pool_engine_running_requests": 4, "arbitrage_pool_engine_waiting_requests": 2,
                      "arbitrage_pool_engine_kv_cache_usage": 0.9,
                      "arbitrage_pool_engine_preempted_requests_total": 3}
    stats.add(0, 0, 0, running=0, waiting=0, kv_cache_usage=0.0, preempted=2)
    metrics.export(stats.snapshot())  # traffic stopped: the gauges fall back, the counter keeps its total
    assert [g.value for g in metrics.gauges.values()] == [0.0, 0.0, 0.0] and metrics.preempted.value == 5
    assert all(m.tags == {"role": "draft"} and m.tag_keys == ("role",)
               for m in (*metrics.gauges.values(), metrics.preempted))


def test_the_pool_sets_the_gauges_on_a_clock_started_once_by_its_health_check():
    """Set as calls end they would read the engine as its batch ends (often empty); on the
    clock they follow the engine, and Ray keeps them (it drops a gauge not set again)."""
    import asyncio

    from arbitrage_common.counter_deltas import CounterDeltas
    from services import pools
    from services.gauge_clock import GAUGE_EXPORT_S, GaugeClock
    running = iter([3, 7, 0, 0, 0, 0, 0, 0, 0, 0])

    class Backend:
        async def check_health(self):
            pass

        def stats(self):
            stats = EngineStats()
            stats.add(0, 0, 0, running=next(running))
            return stats.snapshot()

    class Pool(pools.GeneratorPool):
        def __init__(self):  # no model: the backend and metrics are fakes
            self.backend, self._prefix_seen = Backend(), CounterDeltas()
            self._engine_export = GaugeClock(self._export_engine)
            self._prefix_tokens = {"hits": _Metric("h"), "queries": _Metric("q")}
            self._engine_metrics = _metrics()
            self.seen = []
            gauge = self._engine_metrics.gauges["running_requests"]
            gauge.set = lambda value: self.seen.append(value)

    async def run():
        pool = Pool()
        await pool.check_health()
        started = pool._engine_export.task
        await pool.check_health()
        assert pool._engine_export.task is started  # one clock per replica
        await asyncio.sleep(3.5 * GAUGE_EXPORT_S)
        started.cancel()
        return pool.seen

    seen = asyncio.run(run())
    assert seen[:3] == [3.0, 7.0, 0.0] and len(seen) >= 3
