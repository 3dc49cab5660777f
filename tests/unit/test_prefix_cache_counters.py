"""The generator pools export their prefix cache as two token counters (hits, queries), not a
hit rate since start: a regression after hours of uptime must show in rate(hits) / rate(queries).
The export logic runs here without Ray (``CounterDeltas`` and the pool's method on a fake)."""
from __future__ import annotations

import json
from pathlib import Path

from arbitrage_common.counter_deltas import CounterDeltas
from services import pools

ROOT = Path(__file__).resolve().parents[2]


class _Counter:
    """Ray's Counter as the pool uses it: ``inc`` refuses 0 or less, like Ray's."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0

    def inc(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self.total += value
        self.calls += 1


class _Pool:
    _export_prefix_cache = pools.GeneratorPool._export_prefix_cache

    def __init__(self) -> None:
        self._prefix_seen = CounterDeltas()
        self._prefix_tokens = {"hits": _Counter(), "queries": _Counter()}


def test_deltas_are_the_growth_since_the_last_call():
    deltas = CounterDeltas()
    assert deltas.since_last({"hits": 0, "queries": 40}) == {"queries": 40}  # 0: nothing to add
    assert deltas.since_last({"hits": 30, "queries": 100}) == {"hits": 30, "queries": 60}
    assert deltas.since_last({"hits": 30, "queries": 100}) == {}  # no growth, no increment
    assert deltas.since_last({"hits": 5, "queries": 8}) == {"hits": 5, "queries": 8}  # the backend restarted


def test_the_counters_end_at_the_caches_totals():
    pool = _Pool()
    totals = [(0, 0), (0, 12), (7, 30), (7, 30), (19, 55)]
    for hits, queries in totals:
        pool._export_prefix_cache(hits, queries)
    assert (pool._prefix_tokens["hits"].total, pool._prefix_tokens["queries"].total) == (19, 55)
    assert pool._prefix_tokens["hits"].calls == 2  # only passes that reused something


def test_a_regression_after_long_uptime_shows_in_the_window():
    """Hours at a 90 % hit rate, then a window with none: the since-start ratio still reads
    about 90 %; the counters' increments over the window read 0."""
    pool = _Pool()
    pool._export_prefix_cache(900_000, 1_000_000)
    before = {name: c.total for name, c in pool._prefix_tokens.items()}
    pool._export_prefix_cache(900_000, 1_010_000)  # 10k tokens looked up, none reused
    window = {name: c.total - before[name] for name, c in pool._prefix_tokens.items()}
    assert window == {"hits": 0, "queries": 10_000}
    assert 900_000 / 1_010_000 > 0.89  # what the old gauge would still show


def test_no_hit_rate_gauge_is_left_and_the_dashboard_plots_the_counters_rates():
    source = (ROOT / "services" / "pools.py").read_text()
    assert "arbitrage_pool_prefix_cache_hit_rate" not in source
    assert '"arbitrage_pool_prefix_cache_hit_tokens_total"' in source
    assert '"arbitrage_pool_prefix_cache_query_tokens_total"' in source
    panels = json.loads((ROOT / "k8s" / "monitoring" / "grafana-dashboard.json").read_text())["panels"]
    (panel,) = [p for p in panels if p["title"].startswith("Prefix-cache hit rate")]
    (target,) = panel["targets"]
    numerator, slash, denominator = target["expr"].partition(" / ")
    assert slash and "rate(ray_arbitrage_pool_prefix_cache_hit_tokens_total" in numerator
    assert "rate(ray_arbitrage_pool_prefix_cache_query_tokens_total" in denominator
    assert "since start" not in panel["description"]
