"""The capacity planner's model against queueing theory, its search, and its input checks."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from arbitrage_common.planning.model import Pool, ServiceCurve, Workload, simulate
from arbitrage_common.planning.planner import Profile, check_inputs, plan


def test_service_curve_fit_recovers_a_line():
    c = ServiceCurve.fit([1, 2, 4, 8, 16], [12.0, 14.0, 18.0, 26.0, 42.0])
    assert c.base_ms == pytest.approx(10.0) and c.per_item_ms == pytest.approx(2.0)
    assert ServiceCurve.fit([4], [8.0]).ms(4) == pytest.approx(8.0)


def _one_pool(ms: float, batch: int = 1, replicas: int = 1) -> dict[str, Pool]:
    return {"target": Pool(ServiceCurve(ms, 0.0), replicas=replicas, max_batch=batch)}


def test_single_pool_matches_m_d_1_queueing_theory():
    """One-step requests to one unbatched server with deterministic 100 ms service at rho = 0.5:
    Pollaczek-Khinchine gives a mean wait of rho / (2 mu (1 - rho)) = 50 ms."""
    w = Workload("target", (1,), 1.0)
    r = simulate(_one_pool(100.0), w, rate=5.0, n_requests=20000, seed=1)
    assert statistics.mean(r.latencies_ms) == pytest.approx(150.0, rel=0.06)
    assert r.utilization["target"] == pytest.approx(0.5, rel=0.05) and r.stable


def test_overload_is_reported_unstable_and_batching_restores_capacity():
    w = Workload("target", (1,), 1.0)
    unbatched = simulate({"target": Pool(ServiceCurve(50.0, 10.0), max_batch=1)}, w, rate=30.0, n_requests=3000)
    batched = simulate({"target": Pool(ServiceCurve(50.0, 10.0), max_batch=16)}, w, rate=30.0, n_requests=3000)
    assert not unbatched.stable  # 60 ms per call: 16.7 calls/s at most
    assert batched.stable and batched.p(95) < 1000


def test_cores_are_shared_between_busy_pools():
    w = Workload("arbitrage", (1,), 0.0)  # draft then router, one step
    pools = {"draft": Pool(ServiceCurve(100.0, 0.0)), "router": Pool(ServiceCurve(100.0, 0.0))}
    alone = simulate(pools, w, rate=0.01, n_requests=50, cores=1.0)
    assert statistics.median(alone.latencies_ms) == pytest.approx(200.0, rel=0.01)  # never concurrent: no sharing
    # two requests at once on one core: both pools busy, each runs at half speed
    busy = simulate(pools, w, rate=8.0, n_requests=400, cores=1.0, seed=3)
    free = simulate(pools, w, rate=8.0, n_requests=400, cores=None, seed=3)
    assert busy.p(95) > free.p(95)


def test_target_fraction_routes_that_share_of_steps():
    w = Workload("arbitrage", (10,), 0.3)
    pools = {p: Pool(ServiceCurve(1.0, 0.0), replicas=4) for p in ("draft", "router", "target")}
    r = simulate(pools, w, rate=1.0, n_requests=400, seed=2)
    per_req = statistics.mean(r.latencies_ms)  # 10 draft + 10 router + ~3 target calls of 1 ms
    assert per_req == pytest.approx(23.0, rel=0.08)


def _profile(**kw) -> Profile:
    curves = {"draft": ServiceCurve(5, 1), "router": ServiceCurve(8, 0.5), "prm": ServiceCurve(8, 0.5),
              "target": ServiceCurve(40, 4)}
    base = {"curves": curves, "max_batch": dict.fromkeys(curves, 16), "hop_ms": 2.0, "request_overhead_ms": 5.0,
            "steps": (5, 6, 7), "cores": None, "measured": {}}
    return Profile(**{**base, **kw})


def test_plan_adds_target_replicas_as_the_rate_grows_and_rsd_needs_more_at_a_higher_fraction():
    prof = _profile()
    low = plan(prof, "arbitrage", 0.25, rate=2.0, slo_ms=2000)
    high = plan(prof, "arbitrage", 0.25, rate=200.0, slo_ms=2000)
    assert high["replicas"]["target"] > low["replicas"]["target"] and high["predicted_p95_ms"] <= 2000
    rsd = plan(prof, "rsd", 0.6, rate=200.0, slo_ms=2000)
    assert rsd["replicas"]["target"] >= high["replicas"]["target"]


@pytest.mark.parametrize("kw,needle", [
    ({"rate": 0}, "--rate: arrivals per second must be > 0"),
    ({"target_fraction": 1.5}, "--target-fraction: must lie in [0, 1], got 1.5"),
    ({"slo_ms": 3.0}, "--slo-ms: 3 ms is below the service time of one step"),
])
def test_impossible_inputs_are_named(kw, needle):
    args = {"rate": 1.0, "slo_ms": 1000.0, "target_fraction": 0.3, **kw}
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_inputs(args["rate"], args["slo_ms"], args["target_fraction"], _profile(), "arbitrage")


def test_percentile_matches_numpy():
    from loadtests.report import percentile

    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (50, 95, 99):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    from loadtests.settings import poisson_arrivals

    a = poisson_arrivals(5.0, 400.0, seed=7)
    assert a == poisson_arrivals(5.0, 400.0, seed=7) and a != poisson_arrivals(5.0, 400.0, seed=8)
    assert len(a) / 400.0 == pytest.approx(5.0, rel=0.05)


def test_replica_tracker_remembers_a_replica_between_health_checks_then_forgets_it():
    from loadtests.service_metrics import ReplicaTracker, parse

    text = ('ray_serve_deployment_replica_healthy{application="a",deployment="target",replica="r1"} 1.0\n'
            'ray_serve_deployment_replica_healthy{application="a",deployment="target",replica="r2"} 1.0\n'
            'ray_serve_deployment_replica_healthy{application="b",deployment="target",replica="x"} 1.0\n')
    t = ReplicaTracker(ttl_s=15)
    assert t.update(parse(text), "a", now=0.0) == {"target": 2}
    assert t.update(parse(text.splitlines()[0]), "a", now=10.0) == {"target": 2}   # r2 not in this export
    assert t.update(parse(text.splitlines()[0]), "a", now=20.0) == {"target": 1}   # r2 gone for 20 s


def test_a_pool_not_yet_seen_is_unknown_for_one_health_check_period_then_counts_zero():
    from loadtests.service_metrics import ReplicaTracker, interval_figures, parse

    text = 'ray_serve_deployment_replica_healthy{application="a",deployment="target",replica="r1"} 1.0\n'
    snap = {"draft": {"queued": 0.0}, "target": {"queued": 0.0}}   # both pools export other metrics
    t = ReplicaTracker(ttl_s=15)
    for now, draft in ((100.0, None), (114.0, None), (115.0, 0)):
        replicas = t.update(parse(text), "a", now=now)
        pools, _ = interval_figures({k: dict(v) for k, v in snap.items()}, replicas, {}, t.unseen_count(now))
        assert (pools["draft"]["replicas"], pools["target"]["replicas"]) == (draft, 1), now


def test_load_settings_reject_bad_fields():
    from loadtests.settings import LoadSettings, Mix

    with pytest.raises(ValueError, match="--hard-prob"):
        Mix(hard_prob=2.0)
    with pytest.raises(ValueError, match="--transport"):
        LoadSettings(transport="smtp")
    with pytest.raises(ValueError, match="--rate"):
        LoadSettings(rate=-1.0)
    s = LoadSettings(mix=Mix(policy="rsd", seed=3), rate=2.0)
    import os

    os.environ["ARBITRAGE_LOAD"] = s.to_env()
    try:
        assert LoadSettings.from_env() == s
    finally:
        del os.environ["ARBITRAGE_LOAD"]


def test_calibration_scales_every_time_and_the_cpu_per_request():
    prof = _profile()
    # steps mean 6: per step draft 6 + router 8.5 + 2 hops of 2, plus 0.5 x (target 44 + hop 2); + 5 overhead
    assert prof.cpu_ms_per_request("arbitrage", 0.5) == pytest.approx(6 * (6 + 8.5 + 4 + 0.5 * 46) + 5)
    doubled = prof.scaled(2.0)
    assert doubled.cpu_ms_per_request("arbitrage", 0.5) == pytest.approx(2 * prof.cpu_ms_per_request("arbitrage", 0.5))
    assert doubled.measured["scaled_by"] == 2.0


def test_variable_service_times_keep_their_mean_and_lengthen_the_tail():
    rng = __import__("random").Random(0)
    c = ServiceCurve(100.0, 0.0, cv=0.5)
    draws = [c.sample_ms(1, rng) for _ in range(20000)]
    assert statistics.mean(draws) == pytest.approx(100.0, rel=0.02)
    assert statistics.pstdev(draws) / statistics.mean(draws) == pytest.approx(0.5, rel=0.05)
    w = Workload("target", (1,), 1.0)
    fixed = simulate({"target": Pool(ServiceCurve(100.0, 0.0), max_batch=1)}, w, rate=5.0, n_requests=20000, seed=4)
    varied = simulate({"target": Pool(c, max_batch=1)}, w, rate=5.0, n_requests=20000, seed=4)
    # M/G/1: the mean wait grows with (1 + cv^2) / 2 (Pollaczek-Khinchine): 50 ms -> 62.5 ms
    assert statistics.mean(varied.latencies_ms) == pytest.approx(162.5, rel=0.06)
    assert varied.p(95) > fixed.p(95)


def test_plan_cli_sets_rsd_beside_arbitrage_for_a_preset(tmp_path, capsys):
    import json
    from pathlib import Path

    from arbitrage_common.cli.main import main

    root = Path(__file__).resolve().parents[2]
    point = {"threshold": 0.5, "accuracy": 0.61, "acceptance_rate": 0.7, "latency_s_mean": 1.0, "n": 150}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"matched": {"rsd": {**point, "policy": "rsd", "target_step_fraction": 0.38},
                                             "arbitrage": {**point, "policy": "arbitrage",
                                                           "target_step_fraction": 0.18}}}))
    profile = root / "docs" / "examples" / "gpu-profile-llama-1b-8b.assumed.json"
    assert main(["plan", "--profile", str(profile), "--rate", "20", "--slo-ms", "20000", "--bench", str(bench),
                 "--preset", "llama-1b-8b", "--json"]) == 0
    rsd, arb = json.loads(capsys.readouterr().out)
    assert (rsd["policy"], arb["policy"]) == ("rsd", "arbitrage")
    assert rsd["replicas"]["target"] > arb["replicas"]["target"]  # 0.38 vs 0.18 of the steps on the target
    assert rsd["gpus_per_pool"]["target"] == rsd["replicas"]["target"]  # one whole GPU per target replica
    assert arb["worker_groups"]["target"]["pods"] == arb["replicas"]["target"]
    assert rsd["predicted_p95_ms"] <= 20000 and arb["predicted_p95_ms"] <= 20000
    assert main(["plan", "--profile", str(profile), "--rate", "-1", "--slo-ms", "100", "--target-fraction", "0.2"]) \
        == 1
    assert "--rate: arrivals per second must be > 0" in capsys.readouterr().err
