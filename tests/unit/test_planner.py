"""The capacity planner's model against queueing theory, its search, and its input checks."""
from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np
import pytest

from arbitrage_common.planning.model import Pool, ServiceCurve, SimResult, Workload, core_load, simulate
from arbitrage_common.planning.planner import (
    Profile,
    Unreachable,
    calibrate,
    check_inputs,
    gpus_and_pods,
    no_load_p95,
    plan,
    predict,
    queued_ms_per_request,
)


def test_service_curve_fit_recovers_a_line():
    c = ServiceCurve.fit([1, 2, 4, 8, 16], [12.0, 14.0, 18.0, 26.0, 42.0])
    assert c.base_ms == pytest.approx(10.0) and c.per_item_ms == pytest.approx(2.0)
    assert ServiceCurve.fit([4], [8.0]).ms(4) == pytest.approx(8.0)


def test_service_curve_fit_clamps_a_falling_profile_to_a_flat_line():
    """Larger batches profiled faster (noise) must not give a negative per-item cost: the
    slope is clamped to 0 and the base is then the mean, 20 ms."""
    c = ServiceCurve.fit([1, 2, 4], [30.0, 20.0, 10.0])
    assert c.per_item_ms == 0.0 and c.base_ms == pytest.approx(20.0)
    assert c.ms(100) == pytest.approx(20.0)


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


def _gpu_like_pools(replicas: int = 1) -> dict[str, Pool]:
    """The assumed GPU profile's shapes: full batches serve draft 260, router 381, target 82 calls/s."""
    return {"draft": Pool(ServiceCurve(150.0, 1.5), replicas, 64), "router": Pool(ServiceCurve(20.0, 2.0), replicas, 32),
            "target": Pool(ServiceCurve(520.0, 4.0), replicas, 64)}


def test_an_overloaded_multi_step_workload_is_unstable_however_its_latencies_look():
    """20 steps a request: every in-flight request slows together and a finite run drains, so the
    latencies show no trend; the offered load at max batch does (draft: 26 x 20 / 260 = 2)."""
    w = Workload("arbitrage", (20,), 0.3)
    over = simulate(_gpu_like_pools(), w, rate=26.0, n_requests=600)
    assert not over.stable
    assert over.load_at_max_batch["draft"] == pytest.approx(26 * 20 / (64 / 246 * 1000))
    assert over.load_at_max_batch["target"] == pytest.approx(26 * 6 / (64 / 776 * 1000))


def test_a_comfortably_loaded_multi_step_workload_is_stable():
    r = simulate(_gpu_like_pools(), Workload("arbitrage", (20,), 0.3), rate=5.0, n_requests=600)
    assert r.stable and max(r.load_at_max_batch.values()) < 0.5 and r.core_load is None


def test_cores_that_cannot_carry_the_work_make_it_unstable():
    w = Workload("target", (1,), 1.0, hop_ms=5.0, request_overhead_ms=10.0)
    pools = {"target": Pool(ServiceCurve(0.0, 10.0), replicas=8, max_batch=1)}  # 800 calls/s on 8 replicas
    r = simulate(pools, w, rate=50.0, n_requests=300, cores=1.0)  # 50 x (10 + 5 + 10) ms = 1.25 cores
    assert r.load_at_max_batch["target"] < 0.1 and r.core_load == pytest.approx(1.25) and not r.stable


def test_plan_adds_replicas_to_the_pool_over_capacity_until_stable():
    curves = {"draft": ServiceCurve(150.0, 1.5), "router": ServiceCurve(20.0, 2.0), "target": ServiceCurve(520.0, 4.0)}
    prof = Profile(curves, {"draft": 64, "router": 32, "target": 64}, 3.0, 10.0, (20,), None, {})
    out = plan(prof, "arbitrage", 0.3, rate=30.0, slo_ms=1e9)  # an SLO that any drained run meets
    # loads at one replica: draft 2.31, router 1.58, target 2.18: the fewest replicas below 1 each
    assert out["replicas"] == {"draft": 3, "router": 2, "target": 3}
    assert max(out["load_at_max_batch"].values()) < 1


def test_plan_refuses_a_rate_the_cores_cannot_carry_at_once():
    prof = _profile(cores=2.0)
    with pytest.raises(ValueError, match=r"--rate: 400 req/s needs [\d.]+ cores .* the profile has 2 "):
        plan(prof, "arbitrage", 0.25, rate=400.0, slo_ms=5000)
    assert "core_load" in plan(prof, "arbitrage", 0.25, rate=2.0, slo_ms=5000)


def _profile(**kw) -> Profile:
    curves = {"draft": ServiceCurve(5, 1), "router": ServiceCurve(8, 0.5), "prm": ServiceCurve(8, 0.5),
              "target": ServiceCurve(40, 4)}
    base = {"curves": curves, "max_batch": dict.fromkeys(curves, 16), "hop_ms": 2.0, "request_overhead_ms": 5.0,
            "steps": (5, 6, 7), "cores": None, "measured": {}}
    return Profile(**{**base, **kw})


def test_the_replica_goes_where_a_request_queues_longest_not_to_the_busiest_pool():
    # the target's passes keep it busy (0.99) but a request meets it once and waits 5 ms; the
    # draft, half as busy, is met 10 times and holds each call 30 ms
    result = SimResult([1.0], {"target": 0.99, "draft": 0.5}, {"target": 5.0, "draft": 30.0}, stable=True)
    queued = queued_ms_per_request(result, {"target": 1.0, "draft": 10.0})
    assert queued == {"target": 5.0, "draft": 300.0}


def test_an_slo_under_the_no_load_p95_is_refused_up_front_naming_the_floor():
    prof = _profile()  # 5-7 steps of >= 13 ms each: no replica count gets p95 under 60 ms
    floor, _ = no_load_p95(prof, "arbitrage", 0.25)
    with pytest.raises(ValueError, match=rf"--slo-ms: p95 60 ms is not reachable at any replica count: with no load "
                                         rf".* the p95 is already {floor:.0f} ms"):
        plan(prof, "arbitrage", 0.25, rate=1.0, slo_ms=60.0)
    assert plan(prof, "arbitrage", 0.25, rate=1.0, slo_ms=floor + 20)["no_load_p95_ms"] == round(floor, 1)


def test_an_slo_just_above_the_no_load_p95_is_planned_not_refused():
    """The old rule stopped once no pool queued a request for 1 % of the SLO, though more
    replicas still took the p95 under it; the search goes on while the queueing and batching of
    the slowest requests is at least what the p95 misses by."""
    curves = {"draft": ServiceCurve(150.0, 1.5), "router": ServiceCurve(20.0, 2.0), "target": ServiceCurve(520.0, 4.0)}
    prof = Profile(curves, {"draft": 64, "router": 32, "target": 64}, 3.0, 10.0, (4,), None, {})
    floor, _ = no_load_p95(prof, "arbitrage", 0.3)
    out = plan(prof, "arbitrage", 0.3, rate=2.0, slo_ms=floor + 10)
    assert out["predicted_p95_ms"] <= floor + 10 and out["replicas"]["draft"] > 1


def test_a_profile_without_a_pool_the_policy_calls_is_refused_naming_profile_and_policy():
    prof = _profile()
    no_prm = replace(prof, curves={k: v for k, v in prof.curves.items() if k != "prm"})
    with pytest.raises(ValueError, match=r"--profile: it has no service curve for pool\(s\) prm, which policy 'rsd'"):
        check_inputs(1.0, 5000.0, 0.3, no_prm, "rsd")
    with pytest.raises(ValueError, match="--profile: .* prm"):
        plan(no_prm, "rsd", 0.3, rate=1.0, slo_ms=5000.0)
    assert plan(no_prm, "arbitrage", 0.3, rate=1.0, slo_ms=5000.0)["replicas"]["router"] == 1


@pytest.mark.parametrize("kw,needle", [({"rate": float("nan")}, "--rate"), ({"rate": float("inf")}, "--rate"),
                                       ({"slo_ms": float("nan")}, "--slo-ms"), ({"slo_ms": float("inf")}, "--slo-ms")])
def test_non_finite_rates_and_slos_are_named(kw, needle):
    args = {"rate": 1.0, "slo_ms": 1000.0, **kw}
    with pytest.raises(ValueError, match=f"{needle}: .*finite"):
        plan(_profile(), "arbitrage", 0.3, rate=args["rate"], slo_ms=args["slo_ms"])


def test_calibration_makes_the_model_saturate_the_cores_at_the_measured_capacity():
    prof = _profile(cores=2.0)
    calibrated = calibrate(prof, "arbitrage", 0.25, capacity_rps=5.0)
    w = Workload("arbitrage", calibrated.steps, 0.25, calibrated.hop_ms, calibrated.request_overhead_ms)
    pools = {p: Pool(calibrated.curves[p], 1, calibrated.max_batch[p]) for p in w.pools()}
    assert core_load(pools, w, 5.0, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="--rate: 5 req/s needs 2.00 cores"):
        plan(calibrated, "arbitrage", 0.25, rate=5.0, slo_ms=1e9)


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
    args = {"rate": 1.0, "slo_ms": 1000.0, "target_fraction": 0.3, "policy": "arbitrage", **kw}
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_inputs(args["rate"], args["slo_ms"], args["target_fraction"], _profile(), args["policy"])


def test_a_policy_the_planner_does_not_model_is_named():
    with pytest.raises(ValueError, match="--policy: the planner models draft, target, arbitrage, rsd, got 'oracle'"):
        plan(_profile(), "oracle", 0.3, rate=1.0, slo_ms=1000.0)


def test_a_target_timed_on_rewrites_is_refused_for_policy_target_and_the_reverse():
    rewrites = _profile(measured={"target_steps": "rewrites, the draft's step proposed"})
    every_step = _profile(measured={"target_steps": "every step"})
    with pytest.raises(ValueError, match="--profile: its target was timed on rewrites.*policy 'target'"):
        plan(rewrites, "target", 1.0, rate=1.0, slo_ms=5000.0)
    with pytest.raises(ValueError, match="--profile: its target was timed on every step.*policy 'rsd'"):
        plan(every_step, "rsd", 0.3, rate=1.0, slo_ms=5000.0)
    assert plan(every_step, "target", 1.0, rate=1.0, slo_ms=5000.0)["replicas"] == {"target": 1}
    assert plan(rewrites, "draft", 0.0, rate=1.0, slo_ms=5000.0)["replicas"] == {"draft": 1}  # no target call


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
    assert max(rsd["load_at_max_batch"].values()) < 1 and max(arb["load_at_max_batch"].values()) < 1
    assert main(["plan", "--profile", str(profile), "--rate", "20", "--slo-ms", "20000", "--bench", str(bench),
                 "--preset", "llama-1b-8b"]) == 0
    text = capsys.readouterr().out
    assert "load at max batch" in text and f"the Pods provision {arb['gpus_provisioned']} GPUs" in text
    with pytest.raises(SystemExit):
        main(["plan", "--profile", str(profile), "--rate", "-1", "--slo-ms", "100", "--target-fraction", "0.2"])
    assert "argument --rate: must be a finite number > 0" in capsys.readouterr().err


def test_plan_cli_takes_the_profiles_fraction_only_if_measured_with_the_same_policy(tmp_path, capsys):
    import json

    from arbitrage_common.cli.main import main

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile(measured={"policy": "rsd", "target_fraction": 0.5}).as_dict()))
    base = ["plan", "--profile", str(path), "--rate", "1", "--slo-ms", "5000"]
    assert main(base) == 1  # --policy arbitrage by default
    err = capsys.readouterr().err
    assert "measured with policy 'rsd', not --policy 'arbitrage'" in err and "--target-fraction" in err
    assert main([*base, "--policy", "rsd", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["target_fraction"] == 0.5
    assert main([*base, "--target-fraction", "0.2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["target_fraction"] == 0.2
    assert main([*base, "--policy", "draft", "--json"]) == 0  # no routed calls: no fraction needed
    capsys.readouterr()
    assert main([*base, "--policy", "oracle"]) == 1
    assert "--policy: the planner models" in capsys.readouterr().err


def test_gpus_and_pods_count_the_gpus_the_pods_hold_and_the_coordinator_group():
    from arbitrage_common.kuberay.sizing import group_sizes, replica_bounds
    from arbitrage_common.kuberay.targets import target_config

    cfg = target_config("llama-1b-8b")
    out = gpus_and_pods({"draft": 3, "router": 2, "target": 6}, cfg)
    # draft replicas take half a GPU each: 1.5 GPUs requested, held by two one-GPU Pods
    assert out["gpus_per_pool"]["draft"] == 1.5 and out["worker_groups"]["draft"]["pods"] == 2
    # the preset still deploys the PRM (RSD's scorer; initial 1, a quarter GPU) beside the router
    assert out["unplanned_replicas"] == {"prm": 1} and out["gpus_per_pool"]["prm"] == 0.25
    assert out["gpus_requested"] == 8.25 and out["gpus_provisioned"] == 9
    assert out["gpus_provisioned"] == sum(g["pods"] * g["gpus_per_pod"] for g in out["worker_groups"].values())
    assert out["coordinator_replicas"] == replica_bounds(cfg.coordinator).initial
    assert out["worker_groups"]["coordinator"]["pods"] >= 1
    # the coordinator's required replicas each get a Pod, as `k8s render` sizes the group
    sizes = {size.name: size for size in group_sizes(cfg)}
    assert replica_bounds(cfg.coordinator).min >= 2
    assert out["worker_groups"]["coordinator"]["pods"] == sizes["coordinator"].initial_pods


def test_the_unplanned_scorer_takes_its_place_in_the_scorer_pods():
    """Four router replicas fill one scorer Pod (a quarter GPU each); the PRM the preset still
    deploys needs a second: the review's case, which counted 1 Pod and 3 GPUs."""
    from arbitrage_common.kuberay.targets import target_config

    out = gpus_and_pods({"draft": 2, "router": 4, "target": 1}, target_config("llama-1b-8b"))
    assert out["worker_groups"]["scorers"]["pods"] == 2
    assert out["gpus_provisioned"] == 1 + 1 + 2  # draft (two halves), target, scorers


def _profile_dict(**kw) -> dict:
    return {**_profile().as_dict(), **kw}


@pytest.mark.parametrize("change,needle", [
    ({"max_batch": {"draft": 16, "router": 16, "prm": 16, "target": 0}},
     "max_batch.target must be a positive integer up to 100000, got 0"),  # hung the simulation: empty batches forever
    ({"max_batch": {"draft": 16, "router": 16, "prm": 16, "target": 16.5}},
     "max_batch.target must be a positive integer up to 100000, got 16.5"),
    ({"max_batch": {"draft": 16, "router": 16, "prm": 16}},
     "max_batch.target is missing"),  # was a silent default of 16
    ({"cores": 0}, "cores must be a finite number > 0, got 0"),  # was a ZeroDivisionError
    ({"cores": -2}, "cores must be a finite number > 0, got -2"),
    ({"hop_ms": -1}, "hop_ms must be a finite number >= 0, got -1"),
    ({"request_overhead_ms": float("inf")}, "request_overhead_ms must be a finite number >= 0, got inf"),
    ({"curves": {"target": {"base_ms": -600, "per_item_ms": 4}}}, "curves.target.base_ms must be a finite number >= 0"),
    ({"curves": {"target": {"base_ms": float("nan"), "per_item_ms": 4}}}, "curves.target.base_ms must be a finite"),
    ({"curves": {"target": {"base_ms": 40}}}, "curves.target.per_item_ms is missing"),
    ({"curves": {"target": {"base_ms": 40, "per_item_ms": 4, "slope": 1}}}, "curves.target: unknown field(s) slope"),
    ({"steps": [20.5]}, "steps[0] must be a positive integer up to 100000, got 20.5"),
    ({"steps": [5, 0]}, "steps[1] must be a positive integer up to 100000, got 0"),
    ({"steps": [10**9]}, "steps[0] must be a positive integer up to 100000, got 1000000000"),  # hours of simulation
    ({"hop_ms": 10**400}, "hop_ms must be a finite number >= 0, got 10000000000000000000... (401 characters)"),
    ({"steps": []}, "steps must be a non-empty list"),
    ({"measured": {"target_fraction": 1.5}}, "measured.target_fraction must lie in [0, 1], got 1.5"),
    ({"sesion_affinity": False}, "unknown field(s) sesion_affinity (a profile has batching, cores,"),  # was ignored
])
def test_a_hand_written_profile_is_checked_field_by_field(change, needle):
    with pytest.raises(ValueError) as exc:
        Profile.from_dict(_profile_dict(**change))
    assert needle in str(exc.value)


def test_a_profile_missing_a_top_level_field_names_it():
    d = _profile_dict()
    del d["hop_ms"]
    with pytest.raises(ValueError, match="^hop_ms is missing$"):
        Profile.from_dict(d)


def test_a_valid_profile_round_trips_through_its_json_form():
    assert Profile.from_dict(_profile_dict()) == _profile()


def test_a_pool_that_takes_no_call_is_refused_rather_than_simulated_forever():
    with pytest.raises(ValueError, match="max_batch >= 1"):
        Pool(ServiceCurve(10, 1), max_batch=0)


def _one_pool_profile(cores: float | None = None) -> Profile:
    """Policy draft, one call of 100 ms a request, one call a pass: 10 calls/s a replica."""
    return Profile({"draft": ServiceCurve(100, 0)}, {"draft": 1}, 0.0, 0.0, (1,), cores, {})


def test_a_plan_above_the_headroom_load_is_returned_with_a_warning_naming_the_pool():
    planned = plan(_one_pool_profile(), "draft", 0.0, rate=9.7, slo_ms=1e6)  # load 0.97 on one replica
    assert planned["replicas"] == {"draft": 1}
    assert planned["headroom_warning"].startswith("no headroom: pool draft is at load 0.970 (above 0.95)")
    assert plan(_one_pool_profile(), "draft", 0.0, rate=5.0, slo_ms=1e6)["headroom_warning"] is None


def test_with_cores_the_search_stops_at_64_replicas_in_all():
    prof = _one_pool_profile(cores=1000.0)  # cores never the limit: only the replica cap
    assert plan(prof, "draft", 0.0, rate=630.0, slo_ms=1e6)["replicas"] == {"draft": 64}
    with pytest.raises(Unreachable, match="overloads pool draft even with 64 replicas"):  # was planned with 65
        plan(prof, "draft", 0.0, rate=640.0, slo_ms=1e6)


def test_an_unreachable_slo_says_the_best_p95_the_search_saw():
    prof = _profile()
    floor, _ = no_load_p95(prof, "arbitrage", 0.25)
    with pytest.raises(Unreachable) as exc:
        plan(prof, "arbitrage", 0.25, rate=1.0, slo_ms=floor - 1)
    assert exc.value.best_p95_ms == floor


# --- continuous batching (vLLM pools) ---------------------------------------------------------

def _cont(curve: ServiceCurve, replicas: int = 1, batch: int = 1000, **kw) -> dict[str, Pool]:
    return {"target": Pool(curve, replicas, batch, "continuous", **kw)}


def test_a_continuous_pool_lets_a_call_join_the_running_batch():
    """A flat curve (a pass costs 100 ms at any batch): on a continuous pool every call is served
    in 100 ms, whoever else runs (an infinite-server queue); on a static one a call that arrives
    during a pass waits for it to end."""
    w = Workload("target", (1,), 1.0)
    cont = simulate(_cont(ServiceCurve(100.0, 0.0)), w, rate=8.0, n_requests=3000, seed=1)
    static = simulate({"target": Pool(ServiceCurve(100.0, 0.0), max_batch=1000)}, w, rate=8.0, n_requests=3000,
                      seed=1)
    assert max(cont.latencies_ms) == pytest.approx(100.0) and cont.mean_wait_ms["target"] == pytest.approx(0.0)
    assert statistics.mean(static.latencies_ms) > 130.0


def test_a_continuous_pool_is_processor_sharing_and_matches_its_mean_response_time():
    """ms(b) = 100 b: each of b calls gets 1/b of the replica, egalitarian processor sharing. Its
    mean response time is E[S] / (1 - rho) whatever the service distribution: 200 ms at rho 0.5."""
    w = Workload("target", (1,), 1.0)
    r = simulate(_cont(ServiceCurve(0.0, 100.0)), w, rate=5.0, n_requests=20000, seed=2)
    assert statistics.mean(r.latencies_ms) == pytest.approx(200.0, rel=0.06)
    assert r.utilization["target"] == pytest.approx(0.5, rel=0.05)


def test_a_continuous_pool_queues_calls_beyond_max_batch():
    """max_batch 1 (max_num_seqs 1): one call at a time, the rest queue: M/D/1, as a static pool."""
    w = Workload("target", (1,), 1.0)
    r = simulate(_cont(ServiceCurve(100.0, 0.0), batch=1), w, rate=5.0, n_requests=20000, seed=1)
    assert statistics.mean(r.latencies_ms) == pytest.approx(150.0, rel=0.06)
    assert r.mean_wait_ms["target"] == pytest.approx(50.0, rel=0.15)


def test_continuous_work_varies_call_to_call_with_the_curves_cv():
    w = Workload("target", (1,), 1.0)
    fixed = simulate(_cont(ServiceCurve(100.0, 0.0)), w, rate=2.0, n_requests=4000, seed=3)
    varied = simulate(_cont(ServiceCurve(100.0, 0.0, cv=0.5)), w, rate=2.0, n_requests=4000, seed=3)
    assert statistics.mean(varied.latencies_ms) == pytest.approx(100.0, rel=0.05)
    assert varied.p(95) > fixed.p(95) == pytest.approx(100.0)


def test_without_affinity_a_continuous_call_goes_to_the_least_busy_replica():
    """ms(b) = 100 b on two replicas sharing one queue: calls spread over both (each runs at
    most rho/2 loaded), so the mean is lower than one replica at the same rate."""
    w = Workload("target", (1,), 1.0)
    one = simulate(_cont(ServiceCurve(0.0, 100.0)), w, rate=8.0, n_requests=6000, seed=4)
    two = simulate(_cont(ServiceCurve(0.0, 100.0), replicas=2), w, rate=8.0, n_requests=6000, seed=4,
                   affinity=False)
    pinned = simulate(_cont(ServiceCurve(0.0, 100.0), replicas=2), w, rate=8.0, n_requests=6000, seed=4)
    assert statistics.mean(two.latencies_ms) < 0.5 * statistics.mean(one.latencies_ms)
    # a random split (each request pinned at random) shares less well than the least busy one
    assert statistics.mean(two.latencies_ms) < 0.85 * statistics.mean(pinned.latencies_ms)
    assert two.utilization["target"] == pytest.approx(0.4, abs=0.06)


# How the llama-1b-8b preset packs its replicas (num_gpus 0.5, 0.25, 1); the example keeps one GPU a replica.
PRESET_PACKING = {"draft": 2, "target": 1, "router": 4, "prm": 4}


def _example_profile(**kw) -> Profile:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "gpu-profile-llama-1b-8b.assumed.json"
    return replace(Profile.load(path), **kw)


def test_the_example_gpu_profile_batches_its_vllm_pools_continuously():
    prof = _example_profile()
    assert prof.batching == {"draft": "continuous", "target": "continuous", "router": "static", "prm": "static"}
    ones = {"draft": 1, "router": 1, "target": 1}
    cont = predict(prof, "arbitrage", 0.3, 5.0, ones, n_requests=600)
    static = predict(replace(prof, batching={}), "arbitrage", 0.3, 5.0, ones, n_requests=600)
    # the review's case: static batches made every call wait for the running 520 ms target pass
    assert cont.p(95) < 0.75 * static.p(95)


def test_the_reviews_case_plans_two_replicas_not_eight():
    out = plan(_example_profile(), "arbitrage", 0.3, rate=5.0, slo_ms=12000)
    assert out["replicas"]["draft"] <= 2 and out["replicas"]["target"] <= 2  # static batches planned 8 and 8
    assert out["predicted_p95_ms"] <= 12000


@pytest.mark.parametrize("change,needle", [
    ({"batching": {"target": "dynamic"}}, "batching.target must be one of 'static', 'continuous'"),
    ({"batching": {"draft_v2": "static"}}, "batching.draft_v2: no pool 'draft_v2' in curves"),
    ({"batching": ["static"]}, "batching must be a JSON object"),
    ({"replicas_per_device": {"draft": 0}}, "replicas_per_device.draft must be a positive integer up to 100000, got 0"),
    ({"replicas_per_device": {"draft": 0.5}}, "replicas_per_device.draft must be a positive integer up to 100000, got 0.5"),
    ({"session_affinity": "yes"}, "session_affinity must be true or false, got 'yes'"),
    ({"cores": 2, "replicas_per_device": {"draft": 2}}, "replicas_per_device: for GPU profiles only"),
])
def test_the_serving_fields_of_a_profile_are_checked(change, needle):
    with pytest.raises(ValueError) as exc:
        Profile.from_dict(_profile_dict(**change))
    assert needle in str(exc.value)


def test_a_profile_without_the_serving_fields_keeps_its_meaning():
    d = _profile_dict()
    for key in ("batching", "replicas_per_device", "session_affinity"):
        del d[key]
    prof = Profile.from_dict(d)
    assert (prof.batching, prof.replicas_per_device, prof.session_affinity) == ({}, {}, True)
    full = _profile(batching={"target": "continuous"}, replicas_per_device={"draft": 2}, session_affinity=False)
    assert Profile.from_dict(full.as_dict()) == full


# --- session affinity -------------------------------------------------------------------------

def _md(replicas: int) -> dict[str, Pool]:
    return {"target": Pool(ServiceCurve(100.0, 0.0), replicas=replicas, max_batch=1)}


def test_affinity_queues_each_request_at_its_replica_so_two_replicas_queue_longer_than_one_queue():
    """Two 100 ms servers at 70 % load: one shared queue (M/D/2) against each request pinned to a
    replica at random (two M/D/1 queues at half the rate): pinning loses the pooling."""
    w = Workload("target", (1,), 1.0)
    pinned = simulate(_md(2), w, rate=14.0, n_requests=20000, seed=5)
    shared = simulate(_md(2), w, rate=14.0, n_requests=20000, seed=5, affinity=False)
    assert pinned.p(95) > 1.3 * shared.p(95)
    # M/D/1 at rho 0.7 (Pollaczek-Khinchine): mean wait 0.7 / (2 x 10/s x 0.3) = 117 ms
    assert pinned.mean_wait_ms["target"] == pytest.approx(117.0, rel=0.1)


def test_affinity_changes_nothing_with_one_replica():
    w = Workload("arbitrage", (5, 6, 7), 0.3, hop_ms=2.0, request_overhead_ms=5.0)
    pools = {p: Pool(ServiceCurve(40.0, 4.0, cv=0.3), 1, 16, mode)
             for p, mode in (("draft", "continuous"), ("router", "static"), ("target", "continuous"))}
    for cores in (None, 2.0):
        pinned = simulate(pools, w, rate=3.0, n_requests=800, seed=6, cores=cores)
        shared = simulate(pools, w, rate=3.0, n_requests=800, seed=6, cores=cores, affinity=False)
        assert pinned.latencies_ms == shared.latencies_ms


def test_a_profile_can_switch_affinity_off_for_the_plan():
    prof = _one_pool_profile()
    pinned = predict(prof, "draft", 0.0, 14.0, {"draft": 2}, n_requests=6000)
    shared = predict(replace(prof, session_affinity=False), "draft", 0.0, 14.0, {"draft": 2}, n_requests=6000)
    assert pinned.p(95) > shared.p(95)


# --- replicas sharing a GPU -------------------------------------------------------------------

def test_replicas_on_one_device_share_it():
    """Two 100 ms replicas packed on one GPU serve what one does: the capacity is one device's,
    and each call is slower whenever the other replica is busy too."""
    w = Workload("target", (1,), 1.0)
    own = {"target": Pool(ServiceCurve(100.0, 0.0), 2, 1)}
    packed = {"target": Pool(ServiceCurve(100.0, 0.0), 2, 1, replicas_per_device=2)}
    assert packed["target"].devices == 1 and own["target"].devices == 2
    a = simulate(own, w, rate=6.0, n_requests=6000, seed=7)
    b = simulate(packed, w, rate=6.0, n_requests=6000, seed=7)
    assert b.load_at_max_batch["target"] == pytest.approx(2 * a.load_at_max_batch["target"]) == pytest.approx(0.6)
    assert statistics.mean(b.latencies_ms) > 1.5 * statistics.mean(a.latencies_ms)
    # alone on the device (rate so low calls never meet) a replica runs at full speed
    alone = simulate(packed, w, rate=0.01, n_requests=50, seed=7)
    assert max(alone.latencies_ms) == pytest.approx(100.0)


def test_a_continuous_replica_shares_its_device_too():
    w = Workload("target", (1,), 1.0)
    own = simulate(_cont(ServiceCurve(100.0, 0.0), replicas=2), w, rate=6.0, n_requests=4000, seed=8)
    packed = simulate(_cont(ServiceCurve(100.0, 0.0), replicas=2, replicas_per_device=2), w, rate=6.0,
                      n_requests=4000, seed=8)
    assert max(own.latencies_ms) == pytest.approx(100.0) and packed.p(95) > 150.0


@pytest.mark.parametrize("affinity,capacity", [(True, 1.5), (False, 2.0)])
def test_the_capacity_of_packed_replicas_counts_devices(affinity, capacity):
    """Three replicas two a GPU take two GPUs. Pinned requests give each replica a third of the
    calls, so the GPU holding two saturates first (1.5 GPUs' worth); one shared queue uses both."""
    from arbitrage_common.planning.model import calls_per_s_at_max_batch

    one = calls_per_s_at_max_batch(Pool(ServiceCurve(100.0, 0.0), 1, 4))
    assert calls_per_s_at_max_batch(Pool(ServiceCurve(100.0, 0.0), 3, 4, replicas_per_device=2),
                                     affinity) == pytest.approx(capacity * one)


def test_a_preset_that_packs_replicas_otherwise_than_the_profile_is_flagged():
    from arbitrage_common.kuberay.targets import target_config
    from arbitrage_common.planning.planner import packing_warning

    cfg = target_config("llama-1b-8b")  # draft num_gpus 0.5, router and prm 0.25, target 1
    packed = {"draft": 2, "router": 4, "prm": 4, "target": 1}
    assert packing_warning(_example_profile(replicas_per_device=packed), cfg, "llama-1b-8b") is None
    warning = packing_warning(_example_profile(replicas_per_device={**packed, "draft": 1}), cfg, "llama-1b-8b")
    assert "replicas_per_device.draft is 1, but --preset llama-1b-8b gives each draft replica 0.5 GPU (2 a GPU)" \
        in warning and "router" not in warning
    # A CPU profile simulates no devices, but its pools share its cores while the Pods hold their own.
    warning = packing_warning(_profile(cores=2.0), target_config("cpu-demo"), "cpu-demo")
    assert warning.startswith("the profile's pools share its 2 cores") and "--preset cpu-demo runs them in Pods" \
        in warning and "scorers 2" in warning


def test_the_replica_picks_do_not_depend_on_the_order_the_pools_come_in():
    """The planner's pools come from a set, whose order changes run to run: the seeded run must not."""
    w = Workload("arbitrage", (5, 6, 7), 0.3)
    pools = {p: Pool(ServiceCurve(40.0, 4.0), 2, 16, "continuous") for p in ("draft", "router", "target")}
    forward = simulate(pools, w, rate=6.0, n_requests=500, seed=9)
    backward = simulate(dict(reversed(pools.items())), w, rate=6.0, n_requests=500, seed=9)
    assert forward.latencies_ms == backward.latencies_ms


def test_the_full_batch_capacity_of_packed_replicas_follows_their_placement():
    """Six replicas four to a GPU sit 3 and 3 on two GPUs (round robin): with affinity each
    replica takes a sixth of the calls, so either GPU saturates at twice one replica's rate."""
    from arbitrage_common.planning.model import calls_per_s_at_max_batch

    curve = ServiceCurve(100.0, 5.0)
    one = calls_per_s_at_max_batch(Pool(curve, 1, 16))
    packed = Pool(curve, 6, 16, replicas_per_device=4)
    assert packed.devices == 2 and [packed.device_of(i) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert calls_per_s_at_max_batch(packed) == pytest.approx(2 * one)  # was 1.5x: the formula assumed 4 on one
    assert calls_per_s_at_max_batch(packed, affinity=False) == pytest.approx(2 * one)



# --- the search over packed pools -------------------------------------------------------------

def _devices(prof: Profile, replicas: dict[str, int]) -> int:
    """GPUs a plan occupies as the profile packs it (``Pool.devices``)."""
    return sum(Pool(prof.curves[p], n, replicas_per_device=prof.replicas_per_device.get(p, 1)).devices
               for p, n in replicas.items())


def _simulations(monkeypatch, most: int) -> list[dict[str, int]]:
    """The replica counts the planner simulates, in order; more than ``most`` fails the test at
    once (a search that keeps buying replicas would otherwise run for minutes)."""
    from arbitrage_common.planning import planner

    seen: list[dict[str, int]] = []
    real = planner.predict

    def counted(*args, **kw):
        seen.append(dict(args[4]))
        assert len(seen) <= most, f"over {most} simulations, the last with {args[4]}: the search does not stop"
        return real(*args, **kw)

    monkeypatch.setattr(planner, "predict", counted)
    return seen


def test_a_packed_pool_grows_a_gpu_at_a_time_filling_the_gpus_it_has():
    """A GPU serves the same calls however many replicas share it, so an overloaded pool packed
    two a GPU needs the GPUs the unpacked pool needs, each filled: 3 GPUs at 21 calls/s of
    10 a GPU. (One replica at a time left 5 replicas, one GPU half used: 2/5 of the calls on each
    full GPU, load 0.84, where 6 spread them 0.7 a GPU.)"""
    from arbitrage_common.planning.planner import replicas_step

    assert [replicas_step(n, 2) for n in (1, 2, 3, 4)] == [2, 4, 4, 6]
    assert [replicas_step(n, 4) for n in (1, 4, 5)] == [4, 8, 8] and replicas_step(3, 1) == 4
    unpacked = plan(_one_pool_profile(), "draft", 0.0, rate=21.0, slo_ms=1e6)
    packed_prof = replace(_one_pool_profile(), replicas_per_device={"draft": 2})
    packed = plan(packed_prof, "draft", 0.0, rate=21.0, slo_ms=1e6)
    assert unpacked["replicas"] == {"draft": 3} and packed["replicas"] == {"draft": 6}
    assert _devices(packed_prof, packed["replicas"]) == 3
    assert packed["load_at_max_batch"]["draft"] == pytest.approx(0.7)


def test_the_reviews_packed_case_keeps_the_draft_that_sharing_a_gpu_slows_and_meets_the_slo(monkeypatch):
    """The example packed as the llama-1b-8b preset packs: drafts two a GPU. Its one draft engine is
    always busy: a second on the same GPU halves both engines' speed and pays its own pass, so
    the p95 rises (12.5 s to 17 s), and it stays above the single replica's for a long way (the
    search used to climb to 115 replicas, 58 GPUs). The plan keeps one draft replica, says so, and
    meets the SLO on the other pools, with no more GPUs than the plan that gives every replica a
    GPU of its own (which can spend its second draft GPU well: 5 against 5 here)."""
    prof = _example_profile(replicas_per_device=PRESET_PACKING)
    seen = _simulations(monkeypatch, most=24)  # 20 the searches, then the trim and the two seeds checked
    out = plan(prof, "arbitrage", 0.3, rate=5.0, slo_ms=12000)
    assert out["predicted_p95_ms"] <= 12000 and out["replicas"]["draft"] == 1
    draft = out["stalled_pools"]["draft"]
    assert [t["replicas"] for t in draft["tried"]] == [2, 4]  # fill its GPU, then a second GPU's worth
    assert min(t["p95_ms"] for t in draft["tried"]) > draft["p95_ms"]
    assert all(s.get("draft", 1) in (1, 2, 4) for s in seen)  # never more draft replicas simulated
    unpacked_prof = _example_profile()
    assert set(unpacked_prof.replicas_per_device.values()) == {1}
    unpacked = plan(unpacked_prof, "arbitrage", 0.3, rate=5.0, slo_ms=12000)
    assert _devices(prof, out["replicas"]) <= _devices(unpacked_prof, unpacked["replicas"])


def _packed_small_profile() -> Profile:
    """Pools of a few ms, the draft two a GPU and the router four, as the GPU presets pack them."""
    curves = {"draft": ServiceCurve(5, 1), "router": ServiceCurve(8, 0.5), "target": ServiceCurve(40, 4)}
    return Profile(curves, dict.fromkeys(curves, 16), 2.0, 5.0, (5, 6, 7), None, {},
                   batching={"draft": "continuous", "target": "continuous"},
                   replicas_per_device={"draft": 2, "router": 4})


def test_the_search_keeps_a_packed_step_only_where_it_lowers_p95():
    """At 130 req/s the draft needs two GPUs (four replicas) for capacity, and then each GPU
    more lowers p95; the router's second replica on its GPU (or a second GPU of four) raises it.
    (At 500 ms a third target replica meets the SLO before the router is the pool where a request
    queues the most, and a pool is stalled only then.)"""
    from arbitrage_common.planning.planner import search_replicas

    prof = _packed_small_profile()
    found = search_replicas(prof, "arbitrage", 0.25, rate=130.0, slo_ms=450.0)
    assert found.result.p(95) <= 450.0
    packed_steps = 0
    for (before, p95_before), (after, p95_after) in zip(found.path, found.path[1:]):
        grown = [p for p in after if after[p] != before[p]]
        assert len(grown) == 1 and after[grown[0]] > before[grown[0]]
        if prof.replicas_per_device.get(grown[0], 1) > 1:
            packed_steps += 1
            assert p95_after < p95_before, f"{grown[0]} grew to {after[grown[0]]} at a p95 of {p95_after:.0f} ms"
            assert after[grown[0]] % prof.replicas_per_device[grown[0]] == 0  # whole GPUs
    assert packed_steps >= 2
    router = found.stalled["router"]
    assert found.replicas["router"] == router["replicas"] == 1
    assert [t["replicas"] for t in router["tried"]] == [4, 8]
    assert min(t["p95_ms"] for t in router["tried"]) > router["p95_ms"]


def test_the_plan_and_its_text_name_a_stalled_pool(tmp_path, capsys):
    import json

    from arbitrage_common.cli.main import main

    path = tmp_path / "packed.json"
    path.write_text(json.dumps(_packed_small_profile().as_dict()))
    base = ["plan", "--profile", str(path), "--rate", "130", "--slo-ms", "450", "--target-fraction", "0.25"]
    assert main([*base, "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)[0]["stalled_pools"]) == ["router"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "more replicas did not lower p95: pool router kept at 1 replica (p95 " in out
    assert "; tried 4: " in out and "its replicas share a GPU 4 at a time" in out


def test_a_pool_that_sharing_a_gpu_only_slows_is_refused_naming_it_not_grown_without_end(monkeypatch):
    """One vLLM-like pool, 100 ms a pass whatever its batch, always busy at 20 req/s of 10 steps:
    a replica of its own GPU each, three meet 1150 ms; two a GPU, the second engine on the GPU
    halves both (p95 1.3 s to 2.7 s) and more GPUs of two stay above one replica alone, so no
    step is bought and the refusal names the pool and the packing."""
    prof = Profile({"draft": ServiceCurve(100, 1)}, {"draft": 64}, 0.0, 0.0, (10,), None, {},
                   batching={"draft": "continuous"})
    assert plan(prof, "draft", 0.0, rate=20.0, slo_ms=1150)["replicas"] == {"draft": 3}
    seen = _simulations(monkeypatch, most=6)
    with pytest.raises(Unreachable) as exc:
        plan(replace(prof, replicas_per_device={"draft": 2}), "draft", 0.0, rate=20.0, slo_ms=1150)
    message = str(exc.value)
    assert "no pool's next replicas lower it" in message and "pool draft kept at 1 replica" in message
    assert "with replicas_per_device.draft 1 (num_gpus 1) each replica gets a GPU of its own" in message
    assert exc.value.best_p95_ms == pytest.approx(1319.6, abs=0.1)
    assert [s["draft"] for s in seen[1:]] == [1, 2, 4]  # after the no-load run: its plan, then two steps


def test_what_replicas_can_remove_is_split_by_pool():
    w = Workload("arbitrage", (5, 6, 7), 0.3, hop_ms=2.0)
    pools = {p: Pool(ServiceCurve(40.0, 4.0), 1, 16, mode)
             for p, mode in (("draft", "continuous"), ("router", "static"), ("target", "continuous"))}
    r = simulate(pools, w, rate=6.0, n_requests=400, seed=10)
    assert r.tail_removable_ms(95, set(pools)) == pytest.approx(r.tail_removable_ms(95))
    parts = [r.tail_removable_ms(95, {p}) for p in pools]
    assert sum(parts) == pytest.approx(r.tail_removable_ms(95)) and min(parts) > 0


def test_a_packed_pool_whose_next_gpu_passes_the_cap_stalls_and_the_search_goes_on(monkeypatch):
    """Under a cap of 3 a pool, the router (four a GPU) cannot take its next GPU's worth (4): it is
    stalled with nothing tried, and the target's third replica meets the SLO, where the search
    used to refuse it as unreachable within the cap."""
    from arbitrage_common.planning import planner

    monkeypatch.setattr(planner, "MAX_REPLICAS", 3)
    found = planner.search_replicas(_packed_small_profile(), "arbitrage", 0.25, rate=80.0, slo_ms=420.0)
    assert found.result.p(95) <= 420.0 and found.replicas == {"draft": 1, "router": 1, "target": 3}
    assert found.stalled["router"]["tried"] == []
    assert "pool router kept at 1 replica (p95 " in planner.stalled_note(found.stalled, {"router": 4, "draft": 2})
    assert "passes the cap of 3 a pool" in planner.stalled_note(found.stalled, {"router": 4, "draft": 2})


# --- the step that lowers p95 the most per GPU ------------------------------------------------

def _rare_target_profile() -> Profile:
    """Ten steps a request through a draft and a router that batch 4 and 16 calls; the target,
    100 ms a pass of up to 4, writes one step in twenty."""
    curves = {"draft": ServiceCurve(10, 1), "router": ServiceCurve(5, 0.5), "target": ServiceCurve(100, 10)}
    return Profile(curves, {"draft": 4, "router": 16, "target": 4}, 1.0, 0.0, (10,), None, {})


def test_the_search_buys_the_replica_that_lowers_p95_the_most_not_the_most_queued_pools():
    """At 15 req/s with two draft replicas a request queues longest at the draft (ten calls a
    request), but the slowest requests are the ones that met the target, so a second target
    replica takes more off the p95 (34 ms) than a third draft (13 ms). Growing the most-queued
    pool (the search before) bought draft and router replicas: {draft: 5, router: 2, target: 1},
    8 GPUs at p95 527 ms; the search now meets the SLO with 5."""
    prof = _rare_target_profile()
    at = {"draft": 2, "router": 1, "target": 1}
    result = predict(prof, "arbitrage", 0.05, 15.0, at)
    queued = queued_ms_per_request(result, {"draft": 10.0, "router": 10.0, "target": 0.5})
    gain = {p: result.p(95) - predict(prof, "arbitrage", 0.05, 15.0, {**at, p: at[p] + 1}).p(95) for p in at}
    assert max(queued, key=queued.get) == "draft" and max(gain, key=gain.get) == "target"
    out = plan(prof, "arbitrage", 0.05, rate=15.0, slo_ms=530.0)
    assert out["predicted_p95_ms"] <= 530.0
    most_queued_plan = {"draft": 5, "router": 2, "target": 1}  # what growing the most-queued pool planned
    assert _devices(prof, out["replicas"]) == 5 < _devices(prof, most_queued_plan) == 8


def test_a_step_that_fills_a_packed_gpu_costs_its_share_of_the_gpu():
    """Growing a router packed four a GPU from 1 to 4 replicas uses 3/4 of the GPU it has; from 4
    to 8 a whole new one."""
    from arbitrage_common.planning.planner import _next_step, _Simulations

    prof, above_any = _packed_small_profile(), float("inf")  # the first count tried lowers it: one step
    sim = _Simulations(prof, "arbitrage", 0.25, 80.0, 0)
    assert _next_step(sim, prof, {"draft": 1, "router": 1, "target": 3}, "router", above_any).gpus == 0.75
    assert _next_step(sim, prof, {"draft": 1, "router": 4, "target": 3}, "router", above_any).gpus == 1.0
    assert _next_step(sim, prof, {"draft": 1, "router": 4, "target": 3}, "target", above_any).gpus == 1.0


def test_the_plan_keeps_the_cheaper_of_the_two_rules_and_the_most_queued_refusal(monkeypatch):
    """The search that weighs every pool is greedy on noisy p95s, so ``plan`` runs the most-queued
    rule first and the other only up to that plan's GPUs, and keeps the plan with fewer GPUs
    (then the lower p95); where the most-queued rule refuses, its refusal stands, as before."""
    from arbitrage_common.planning import planner

    weighed, queued = planner.GAIN_PER_GPU, planner.MOST_QUEUED

    def found(replicas: dict[str, int], p95: float) -> planner.Search:
        return planner.Search(replicas, SimResult([p95], {}, {}, True), [], {})

    def runs(per_rule: dict) -> list:
        calls = []

        def search(*args, rule, most_gpus=None, sim=None):
            calls.append((rule, most_gpus))
            if isinstance(per_rule[rule], Exception):
                raise per_rule[rule]
            return per_rule[rule]

        monkeypatch.setattr(planner, "search_replicas", search)
        monkeypatch.setattr(planner, "_trim", lambda sim, profile, found, slo_ms: found)  # the choice alone
        return calls

    args = (_profile(), "arbitrage", 0.25, 10.0, 500.0)
    calls = runs({weighed: found({"draft": 1, "target": 2}, 480.0), queued: found({"draft": 2, "target": 2}, 450.0)})
    assert planner.cheapest_search(*args).replicas == {"draft": 1, "target": 2}
    assert calls == [(queued, None), (weighed, 4)]  # stopped past the most-queued plan's 4 GPUs
    runs({weighed: found({"draft": 1, "target": 2}, 480.0), queued: found({"draft": 2, "target": 1}, 450.0)})
    assert planner.cheapest_search(*args).result.p(95) == 450.0  # as many GPUs: the lower p95
    for failed in (planner._PastTheBudget(), planner.Unreachable("weighed")):
        runs({weighed: failed, queued: found({"draft": 2, "target": 1}, 450.0)})
        assert planner.cheapest_search(*args).replicas == {"draft": 2, "target": 1}
    calls = runs({weighed: found({"draft": 1, "target": 2}, 480.0), queued: planner.Unreachable("queued")})
    with pytest.raises(planner.Unreachable, match="queued"):
        planner.cheapest_search(*args)
    assert calls == [(queued, None)]


def test_the_second_search_runs_at_most_twice_the_first_searchs_simulations(monkeypatch):
    """``plan`` takes at most about three times as long as the most-queued search alone: the
    simulations it shares count, and a new one past the budget ends the second search, whose
    plan then is the first's."""
    from arbitrage_common.planning import planner

    sim = planner._Simulations(_rare_target_profile(), "arbitrage", 0.05, 15.0, 0)
    sim.most = 2
    first, second = {"draft": 2, "router": 1, "target": 1}, {"draft": 3, "router": 1, "target": 1}
    assert sim(first) is sim(first) and sim(second) is not None  # a simulation seen again is not run again
    with pytest.raises(planner._PastTheBudget):
        sim({"draft": 2, "router": 1, "target": 2})
    assert sim(first) is not None  # still answered: it was seen

    budgets = []
    search = planner.search_replicas

    def watched(*args, rule, most_gpus=None, sim=None):
        found = search(*args, rule=rule, most_gpus=most_gpus, sim=sim)
        budgets.append((rule, len(sim.seen), sim.most))
        return found

    monkeypatch.setattr(planner, "search_replicas", watched)
    planner.cheapest_search(_rare_target_profile(), "arbitrage", 0.05, 15.0, 530.0)
    (rule1, ran1, most1), (rule2, ran2, most2) = budgets
    assert (rule1, most1) == (planner.MOST_QUEUED, None) and rule2 == planner.GAIN_PER_GPU
    assert most2 == 3 * ran1 and ran1 < ran2 <= most2


# --- shared cores, the best p95 of a refusal, trimming, seeds ----------------------------------

def _shared_cores(cores: float) -> Profile:
    """A review's CPU profile: pools on shared cores, where a second draft or target replica
    slows every pass (p95 2440 ms with one replica each at 5 req/s of rsd; 3547 with two drafts)."""
    curves = {"draft": ServiceCurve(40.0, 10.0, 0.3), "target": ServiceCurve(120.0, 30.0, 0.3),
              "router": ServiceCurve(5.0, 1.0, 0.1), "prm": ServiceCurve(8.0, 2.0, 0.1)}
    return _profile(curves=curves, max_batch={"draft": 8, "target": 8, "router": 16, "prm": 16}, hop_ms=4.0,
                    request_overhead_ms=20.0, steps=(3, 4, 4, 5, 4, 3, 6), cores=cores)


def test_on_shared_cores_a_refusal_names_the_lowest_p95_the_search_held():
    """The search takes the most-queued pool's step even where p95 rose (on a GPU of its own a
    replica slows no call; on shared cores it can): it ended at {draft 2, prm 1, target 2} with
    4218 ms, and reported that as the best p95 reached, where one replica a pool gave 2440."""
    prof = _shared_cores(2.0)
    one_each = {"draft": 1, "prm": 1, "target": 1}
    with pytest.raises(Unreachable) as exc:
        plan(prof, "rsd", 0.4, rate=5.0, slo_ms=2000.0)
    assert exc.value.best_p95_ms == pytest.approx(predict(prof, "rsd", 0.4, 5.0, one_each).p(95))
    assert f"the lowest p95 it reached was 2440 ms, with {one_each}" in str(exc.value)


def test_a_refusal_after_steps_that_raised_p95_names_the_lowest_p95_and_its_replicas():
    from arbitrage_common.planning.planner import _with_best

    path = [({"draft": 1}, 900.0), ({"draft": 2}, 1200.0)]
    better = _with_best(Unreachable("no", 1200.0), path)
    assert better.best_p95_ms == 900.0 and "lowest p95 it reached was 900 ms, with {'draft': 1}" in str(better)
    kept = Unreachable("no", 800.0)
    assert _with_best(kept, path) is kept


def test_the_plan_drops_replicas_it_can_spare(monkeypatch):
    """A greedy search buys steps whose gains are within the sampling noise: given a plan with
    replicas to spare, ``cheapest_search`` trims them while the SLO holds, and never a replica
    the SLO needs."""
    from arbitrage_common.planning import planner

    prof, slo = _shared_cores(8.0), 1500.0
    generous = {"draft": 6, "router": 3, "target": 5}
    monkeypatch.setattr(planner, "search_replicas", lambda *a, rule, most_gpus=None, sim=None: planner.Search(
        dict(generous), sim(generous), [], {}))
    trimmed = planner.cheapest_search(prof, "arbitrage", 0.25, 20.0, slo)
    assert sum(trimmed.replicas.values()) < sum(generous.values()) and trimmed.result.p(95) <= slo
    for pool, n in trimmed.replicas.items():  # each replica left is needed at this seed
        if n > 1:
            fewer = predict(prof, "arbitrage", 0.25, 20.0, {**trimmed.replicas, pool: n - 1})
            assert not (fewer.stable and fewer.p(95) <= slo)


def test_a_packed_pool_is_trimmed_a_gpu_at_a_time(monkeypatch):
    """One replica fewer on a shared GPU frees nothing: a packed pool drops its last GPU's replicas."""
    from arbitrage_common.planning import planner

    prof = replace(_one_pool_profile(), replicas_per_device={"draft": 2})
    stalled = {"draft": {"replicas": 10, "p95_ms": 100.0, "tried": []}}
    monkeypatch.setattr(planner, "search_replicas", lambda *a, rule, most_gpus=None, sim=None: planner.Search(
        {"draft": 10}, sim({"draft": 10}), [], stalled))
    trimmed = planner.cheapest_search(prof, "draft", 0.0, 21.0, 1e6)
    assert trimmed.replicas == {"draft": 6}  # 3 GPUs, full: 2 GPUs cannot carry 21 calls/s of 10 a GPU
    assert trimmed.stalled == {}  # it stalled at 10 replicas, which the plan no longer holds


def test_a_plan_that_meets_the_slo_at_its_seed_only_is_flagged():
    from arbitrage_common.planning.planner import sampling_warning

    assert sampling_warning(1000.0, 0, [990.0, 1000.0]) is None
    warning = sampling_warning(1000.0, 3, [990.0, 1012.4])
    assert "1012 ms at seed 5" in warning and "990 ms at seed 4" in warning
    out = plan(_profile(), "arbitrage", 0.25, rate=10.0, slo_ms=500.0)
    assert len(out["p95_other_seeds_ms"]) == 2 and out["p95_other_seeds_ms"] != [out["predicted_p95_ms"]] * 2


def test_on_idle_cores_a_pool_is_not_stopped_by_a_rise_of_the_size_of_the_noise():
    """A rule that stalled every CPU pool whose one next replica raised p95 refused this (16 % of
    32 cores busy), where the plan below exists."""
    out = plan(_shared_cores(32.0), "arbitrage", 0.25, rate=30.0, slo_ms=1300.0)
    assert out["predicted_p95_ms"] <= 1300.0 and out["core_load"] < 0.5
