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
    for key in ("curves", "max_batch"):
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
