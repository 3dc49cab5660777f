"""``arbitrage plan`` / ``plan profile`` / ``plan check`` on the command line: what is refused
before any work, and what the text output says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arbitrage_common.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
GPU_PROFILE = ROOT / "docs" / "examples" / "gpu-profile-llama-1b-8b.assumed.json"


def _bench(tmp_path: Path) -> Path:
    point = {"threshold": 0.5, "accuracy": 0.61, "acceptance_rate": 0.7, "latency_s_mean": 1.0, "n": 150}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"matched": {"rsd": {**point, "policy": "rsd", "target_step_fraction": 0.38},
                                             "arbitrage": {**point, "policy": "arbitrage",
                                                           "target_step_fraction": 0.18}}}))
    return bench


@pytest.mark.parametrize("flag,value", [("--rate", "nan"), ("--rate", "inf"), ("--slo-ms", "nan"),
                                        ("--slo-ms", "inf")])
def test_non_finite_rates_and_slos_are_refused_naming_the_flag(capsys, flag, value):
    args = {"--rate": "2", "--slo-ms": "20000", flag: value}
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--profile", str(GPU_PROFILE), "--target-fraction", "0.3", *[x for kv in args.items() for x in kv]])
    assert exc.value.code == 2
    assert f"argument {flag}: must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("policy,fraction", [("draft", "0.7"), ("target", "0.3")])
def test_a_target_fraction_the_policy_cannot_have_is_refused(capsys, policy, fraction):
    assert main(["plan", "--profile", str(GPU_PROFILE), "--rate", "1", "--slo-ms", "20000", "--policy", policy,
                 "--target-fraction", fraction]) == 1
    assert f"--target-fraction: policy '{policy}'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--policy", "rsd"], ["--target-fraction", "0.2"]])
def test_bench_refuses_a_policy_or_fraction_it_would_ignore(tmp_path, capsys, extra):
    assert main(["plan", "--profile", str(GPU_PROFILE), "--rate", "1", "--slo-ms", "20000",
                 "--bench", str(_bench(tmp_path)), *extra]) == 1
    err = capsys.readouterr().err
    assert "--bench:" in err and extra[0] in err


def test_a_profile_without_the_prm_is_refused_for_bench_naming_profile_and_policy(tmp_path, capsys):
    data = json.loads(GPU_PROFILE.read_text())
    for key in ("curves", "max_batch", "batching", "replicas_per_device"):
        data[key].pop("prm")
    profile = tmp_path / "no-prm.json"
    profile.write_text(json.dumps(data))
    assert main(["plan", "--profile", str(profile), "--rate", "1", "--slo-ms", "20000",
                 "--bench", str(_bench(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "--profile: it has no service curve for pool(s) prm, which policy 'rsd' calls" in err


def test_the_text_output_repeats_the_rate_slo_profile_and_where_the_fraction_came_from(tmp_path, capsys):
    assert main(["plan", "--profile", str(GPU_PROFILE), "--rate", "2", "--slo-ms", "20000",
                 "--target-fraction", "0.3"]) == 0
    out = capsys.readouterr().out
    assert f"plan for 2 req/s at a p95 SLO of 20000 ms, profile {GPU_PROFILE}" in out
    assert "target fraction 0.300 (from --target-fraction)" in out
    assert main(["plan", "--profile", str(GPU_PROFILE), "--rate", "2", "--slo-ms", "20000", "--policy", "draft"]) == 0
    assert "target fraction 0.000 (from policy 'draft', which never calls the target)" in capsys.readouterr().out
    bench = _bench(tmp_path)
    assert main(["plan", "--profile", str(GPU_PROFILE), "--rate", "2", "--slo-ms", "20000", "--bench", str(bench),
                 "--json"]) == 0
    rsd, arb = json.loads(capsys.readouterr().out)
    assert rsd["target_fraction_source"] == arb["target_fraction_source"] == f"--bench {bench} (matched accuracy)"
    assert rsd["profile"] == str(GPU_PROFILE)


def test_plan_profile_checks_the_policy_before_loading_any_model(monkeypatch, capsys, tmp_path):
    from arbitrage_common.planning import profile

    called = []
    monkeypatch.setattr(profile, "build_profile", lambda *a, **kw: called.append(a))
    assert main(["plan", "profile", "--policy", "oracle", "--out", str(tmp_path / "p.json")]) == 1
    assert "--policy: the planner models draft, target, arbitrage, rsd, got 'oracle'" in capsys.readouterr().err
    assert not called


def test_plan_check_checks_the_policy_before_starting_the_service(monkeypatch, capsys, tmp_path):
    from loadtests import plan_check

    called = []
    monkeypatch.setattr(plan_check, "run_plan_check", lambda *a, **kw: called.append(a) or {})
    monkeypatch.setattr(plan_check, "LocalService", lambda *a, **kw: called.append(a))
    assert main(["plan", "check", "--policy", "oracle", "--out", str(tmp_path)]) == 1
    assert "--policy: the planner models" in capsys.readouterr().err
    assert not called


def _small_profile(tmp_path: Path, **change) -> Path:
    """Pool times of a few ms: RSD at the bench's 0.9 has a no-load p95 near 460 ms, arbitrage
    at 0.1 near 230 ms, so an SLO of 300 ms is reachable for arbitrage only."""
    curves = {"draft": {"base_ms": 5, "per_item_ms": 1}, "router": {"base_ms": 8, "per_item_ms": 0.5},
              "prm": {"base_ms": 8, "per_item_ms": 0.5}, "target": {"base_ms": 40, "per_item_ms": 4}}
    data = {"curves": curves, "max_batch": dict.fromkeys(curves, 16), "hop_ms": 2.0, "request_overhead_ms": 5.0,
            "steps": [5, 6, 7], "cores": None, "measured": {}, **change}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def _bench_at(tmp_path: Path, rsd, arbitrage) -> Path:
    bench = tmp_path / "bench-fractions.json"
    matched = {p: {"threshold": 0.5} if f is None else {"threshold": 0.5, "target_step_fraction": f}
               for p, f in (("rsd", rsd), ("arbitrage", arbitrage))}
    bench.write_text(json.dumps({"matched": matched}))
    return bench


def test_a_bad_profile_field_is_named_with_the_file_and_nothing_hangs(tmp_path, capsys):
    profile = _small_profile(tmp_path, max_batch={"draft": 16, "router": 16, "prm": 16, "target": 0})
    assert main(["plan", "--profile", str(profile), "--rate", "5", "--slo-ms", "30000",
                 "--target-fraction", "0.3"]) == 1
    assert f"--profile: {profile}: max_batch.target must be a positive integer up to 100000, got 0" in capsys.readouterr().err


def test_bench_plans_each_policy_on_its_own_and_names_the_one_that_cannot_meet_the_slo(tmp_path, capsys):
    args = ["plan", "--profile", str(_small_profile(tmp_path)), "--rate", "2", "--slo-ms", "300",
            "--bench", str(_bench_at(tmp_path, 0.9, 0.1))]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rsd        target fraction 0.900" in out and "cannot be planned (best p95 reached 45" in out
    assert "arbitrage  target fraction 0.100" in out and "replicas {'draft': 1, 'router': 1, 'target': 1}" in out
    assert main([*args, "--json"]) == 0
    rsd, arb = json.loads(capsys.readouterr().out)
    assert rsd["unreachable"].startswith("--slo-ms: p95 300 ms is not reachable") and rsd["best_p95_ms"] > 300
    assert "replicas" not in rsd and arb["replicas"] == {"draft": 1, "router": 1, "target": 1}


def test_bench_fails_only_when_no_policy_can_be_planned(tmp_path, capsys):
    assert main(["plan", "--profile", str(_small_profile(tmp_path)), "--rate", "2", "--slo-ms", "100",
                 "--bench", str(_bench_at(tmp_path, 0.9, 0.1))]) == 1
    err = capsys.readouterr().err
    assert "no policy can be planned: rsd: --slo-ms:" in err and "; arbitrage: --slo-ms:" in err


@pytest.mark.parametrize("rsd,needle", [
    (None, "matched.rsd.target_step_fraction is missing"),  # was a KeyError traceback
    ("0.4", "matched.rsd.target_step_fraction must be a number in [0, 1], got '0.4'"),
    (1.5, "matched.rsd.target_step_fraction must be a number in [0, 1], got 1.5"),
])
def test_a_bench_point_without_a_usable_fraction_is_named_with_the_file(tmp_path, capsys, rsd, needle):
    bench = _bench_at(tmp_path, rsd, 0.1)
    assert main(["plan", "--profile", str(_small_profile(tmp_path)), "--rate", "2", "--slo-ms", "300",
                 "--bench", str(bench)]) == 1
    assert f"--bench: {bench}: {needle}" in capsys.readouterr().err


def test_a_plan_without_headroom_is_flagged_in_text_and_json(tmp_path, capsys):
    profile = _small_profile(tmp_path, curves={"draft": {"base_ms": 100, "per_item_ms": 0}}, max_batch={"draft": 1},
                             hop_ms=0.0, request_overhead_ms=0.0, steps=[1])
    args = ["plan", "--profile", str(profile), "--rate", "9.7", "--slo-ms", "1000000", "--policy", "draft"]
    assert main(args) == 0
    assert "warning: no headroom: pool draft is at load 0.970 (above 0.95)" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["headroom_warning"].startswith("no headroom: pool draft")
    assert main([*args[:4], "5", *args[5:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["headroom_warning"] is None


def test_plan_profile_records_whether_the_request_shape_was_measured_or_assumed(monkeypatch):
    from arbitrage_common.config import default_config
    from arbitrage_common.planning import profile
    from arbitrage_common.planning.model import ServiceCurve

    curves = {p: ServiceCurve(10, 1) for p in ("draft", "router", "target")}
    monkeypatch.setattr(profile, "profile_pools", lambda *a, **kw: (curves, {}))
    cfg = default_config()
    assumed = profile.build_profile(cfg, None, None, "arbitrage", 2, 0, None)
    assert assumed.steps == (cfg.limits.default_max_steps,)
    assert assumed.measured["request_shape"].startswith(f"assumed: {cfg.limits.default_max_steps} steps a request")
    shape = {"steps": [4, 5], "target_fraction": 0.25, "calls_per_request": 10.0, "wall_ms_mean": 200.0,
             "stage_ms_mean": 150.0}
    monkeypatch.setattr(profile, "measure_service", lambda *a, **kw: shape)
    measured = profile.build_profile(cfg, "127.0.0.1:9000", None, "arbitrage", 2, 0, None)
    assert measured.steps == (4, 5) and measured.measured["request_shape"] == "measured: 2 requests to 127.0.0.1:9000"


def test_an_uncalibrated_cpu_profile_is_flagged_in_text_and_json(tmp_path, capsys):
    """A CPU profile timed in process planned 1 replica a pool at a rate the service could not carry."""
    args = ["--rate", "2", "--slo-ms", "20000", "--target-fraction", "0.3"]
    raw = _small_profile(tmp_path, cores=2.0, measured={"request_shape": "measured: 20 requests to h:9000"})
    assert main(["plan", "--profile", str(raw), *args]) == 0
    out = capsys.readouterr().out
    assert f"warning: {raw} is an uncalibrated CPU profile" in out and "optimistic under load" in out
    assert "`arbitrage plan check` writes profile-calibrated.json" in out
    assert main(["plan", "--profile", str(raw), *args, "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["profile_warning"].startswith(f"{raw} is an uncalibrated CPU profile")
    assert r["request_shape"] == "measured: 20 requests to h:9000"
    calibrated = _small_profile(tmp_path, cores=2.0, measured={"scaled_by": 1.7})
    for profile in (calibrated, GPU_PROFILE):  # calibrated by `plan check`; a GPU profile has no cores
        assert main(["plan", "--profile", str(profile), *args, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["profile_warning"] is None


def test_the_profiles_fraction_says_how_it_was_measured(tmp_path, capsys):
    """plan profile's fraction is a few requests one at a time; a calibrated one, its capacity run's."""
    args = ["--rate", "2", "--slo-ms", "20000", "--json"]
    raw = _small_profile(tmp_path, measured={"target_fraction": 0.15, "policy": "arbitrage"})
    assert main(["plan", "--profile", str(raw), *args]) == 0
    source = json.loads(capsys.readouterr().out)[0]["target_fraction_source"]
    assert source == "the profile (measured with policy 'arbitrage' in 3 requests one at a time)"
    calibrated = _small_profile(tmp_path, measured={"target_fraction": 0.27, "policy": "arbitrage",
                                                    "target_fraction_source": "the capacity run (16 users)"})
    assert main(["plan", "--profile", str(calibrated), *args]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert (r["target_fraction"], r["target_fraction_source"]) == (
        0.27, "the profile (measured with policy 'arbitrage' in the capacity run (16 users))")


def test_an_assumed_request_shape_is_echoed(tmp_path, capsys):
    shape = "assumed: 16 steps a request (limits.default_max_steps), no hop or request overhead; measure it with --grpc"
    profile = _small_profile(tmp_path, measured={"request_shape": shape})
    args = ["plan", "--profile", str(profile), "--rate", "2", "--slo-ms", "20000", "--target-fraction", "0.3"]
    assert main(args) == 0
    assert f"warning: the profile's request shape was assumed, not measured by `plan profile --grpc` ({shape})" in \
        capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["request_shape"] == shape


@pytest.mark.parametrize("matched,needle", [
    ({}, "no matched rsd point (its matched section is missing or empty)"),
    ({"rsd": None, "arbitrage": {"target_step_fraction": 0.1}},
     "no matched rsd point (matched.rsd is None: no rsd point reached the matched accuracy)"),
])
def test_a_bench_without_a_matched_point_names_the_file(tmp_path, capsys, matched, needle):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"matched": matched}))
    assert main(["plan", "--profile", str(_small_profile(tmp_path)), "--rate", "2", "--slo-ms", "300",
                 "--bench", str(bench)]) == 1
    assert f"--bench: {bench}: {needle}" in capsys.readouterr().err


def test_plan_profile_names_grpc_before_timing_any_pool(monkeypatch, capsys, tmp_path):
    import socket

    from arbitrage_common.planning import profile

    timed = []
    monkeypatch.setattr(profile, "profile_pools", lambda *a, **kw: timed.append(a))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["plan", "profile", "--grpc", f"127.0.0.1:{port}", "--out", str(tmp_path / "p.json")]) == 1
    assert f"--grpc: 127.0.0.1:{port}: the gRPC health check did not answer" in capsys.readouterr().err
    assert not timed  # was ~15 s of timing every pool first


@pytest.mark.parametrize("command", [["plan", "profile"], ["plan", "check"], ["loadtest"]])
def test_a_missing_config_is_named_with_its_flag(monkeypatch, capsys, tmp_path, command):
    from arbitrage_common.planning import profile
    from loadtests import plan_check, runner

    started = []
    for module, name in ((profile, "build_profile"), (plan_check, "run_plan_check"), (runner, "run_local")):
        monkeypatch.setattr(module, name, lambda *a, **kw: started.append(a))
    missing = tmp_path / "nonexistent.yaml"
    assert main([*command, "--config", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert f"--config: {missing} does not exist" in capsys.readouterr().err and not started


def _parse(argv: list[str]):
    from arbitrage_common.cli.main import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", ["profile", "check"])
@pytest.mark.parametrize("argv,policy,seed", [
    (["--policy", "rsd", "--seed", "7", "{}"], "rsd", 7),  # was arbitrage and 0: the subcommand's defaults won
    (["{}", "--policy", "rsd", "--seed", "7"], "rsd", 7),
    (["--policy", "rsd", "{}", "--seed", "7"], "rsd", 7),
    (["--policy", "rsd", "--seed", "7", "{}", "--policy", "rsd", "--seed", "7"], "rsd", 7),  # the same twice
    (["{}"], "arbitrage", 0),
])
def test_a_flag_given_to_plan_before_its_subcommand_applies_to_it(command, argv, policy, seed):
    args = _parse(["plan", *[a.format(command) for a in argv]])
    assert (args.plan_cmd, args.policy, args.seed) == (command, policy, seed)


def test_plan_check_checks_the_policy_given_before_it(monkeypatch, tmp_path):
    from loadtests import plan_check

    called = []
    monkeypatch.setattr(plan_check, "run_plan_check", lambda *a, **kw: called.append(a) or {})
    monkeypatch.setattr(plan_check, "verdict", lambda table: "")
    assert main(["plan", "--policy", "rsd", "--seed", "7", "check", "--out", str(tmp_path)]) == 0
    ((_config, policy, _fractions, _duration, seed, _out),) = called
    assert (policy, seed) == ("rsd", 7)  # was arbitrage and 0: the wrong policy checked


@pytest.mark.parametrize("command", ["profile", "check"])
@pytest.mark.parametrize("flag,before,after", [("--policy", "rsd", "target"), ("--seed", "7", "5"),
                                               ("--seed", "0", "5")])  # 0, the default, given all the same
def test_a_flag_given_to_plan_and_its_subcommand_with_two_values_is_refused(capsys, command, flag, before, after):
    with pytest.raises(SystemExit) as exc:
        _parse(["plan", flag, before, command, flag, after])
    assert exc.value.code == 2
    assert (f"{flag}: {before} given to `plan` and {after} to `plan {command}`; give it once"
            in capsys.readouterr().err)


@pytest.mark.parametrize("command", ["profile", "check"])
@pytest.mark.parametrize("given", [["--rate", "3"], ["--slo-ms", "300"], ["--json"], ["--preset", "cpu-demo"],
                                   ["--profile", "p.json"], ["--target-fraction", "0.3"], ["--bench", "b.json"]])
def test_a_plan_flag_its_subcommand_does_not_take_is_refused_naming_it(capsys, command, given):
    """Was accepted and ignored: `plan --rate 3 check` ran the check as if --rate were not there."""
    with pytest.raises(SystemExit) as exc:
        _parse(["plan", "--policy", "rsd", *given, command])
    assert exc.value.code == 2
    assert f"{given[0]}: a `plan` flag; `plan {command}` does not take it" in capsys.readouterr().err


def test_plan_without_profile_or_seed_plans_from_the_default_profile_at_seed_0(monkeypatch, tmp_path):
    from arbitrage_common.cli import plan_cmd
    from arbitrage_common.planning import planner

    loaded, seeds = [], []
    real_load, real_plan, profile = plan_cmd.load_profile, planner.plan, str(_small_profile(tmp_path))
    monkeypatch.setattr(plan_cmd, "load_profile", lambda path: loaded.append(path) or real_load(profile))
    monkeypatch.setattr(planner, "plan", lambda *a: seeds.append(a[-1]) or real_plan(*a))
    assert main(["plan", "--rate", "2", "--slo-ms", "20000", "--target-fraction", "0.3"]) == 0
    assert (loaded, seeds) == ([plan_cmd.DEFAULT_PROFILE], [0])


def _fake_build_profile(monkeypatch) -> list:
    """`plan profile` with the pools' timing faked: the ``cores`` it was built with, kept."""
    from arbitrage_common.planning import profile
    from arbitrage_common.planning.model import ServiceCurve
    from arbitrage_common.planning.planner import Profile

    seen = []

    def build(cfg, endpoint, app, policy, n, seed, cores, *a, **kw):
        seen.append(cores)
        curves = {p: ServiceCurve(10, 1) for p in ("draft", "router", "target")}
        return Profile(curves, dict.fromkeys(curves, 16), 0.0, 0.0, (4,), cores, {})

    monkeypatch.setattr(profile, "build_profile", build)
    return seen


def test_plan_profile_defaults_cores_to_the_cpus_it_timed_the_pools_on(monkeypatch, tmp_path, capsys):
    """Was null without --cores: `plan` then gave every replica its own GPU, with no core-load
    refusal, from pools timed on this machine's CPUs."""
    import os

    seen = _fake_build_profile(monkeypatch)
    out = tmp_path / "p.json"
    assert main(["plan", "profile", "--out", str(out)]) == 0
    assert seen == [float(len(os.sched_getaffinity(0)))]
    assert json.loads(out.read_text())["cores"] == seen[0]
    assert f"the replicas share {seen[0]:g} cores" in capsys.readouterr().out
    assert main(["plan", "profile", "--cores", "3", "--out", str(out)]) == 0 and seen[-1] == 3.0
    assert main(["plan", "profile", "--cores", "none", "--out", str(out)]) == 0  # the explicit way to null
    assert seen[-1] is None and json.loads(out.read_text())["cores"] is None
    with pytest.raises(SystemExit):
        main(["plan", "profile", "--cores", "0", "--out", str(out)])
    assert "argument --cores: must be a finite number > 0, got 0 (or 'none')" in capsys.readouterr().err
