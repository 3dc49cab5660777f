"""``plan check``'s predictions and calibration, with the service, the profiling and the locust
runs faked: what it predicts for, and what the calibrated profile says of the capacity."""
from __future__ import annotations

import json

import pytest

from arbitrage_common.planning.model import Pool, ServiceCurve, Workload, core_load
from arbitrage_common.planning.planner import Profile


class _Service:
    name = "app"

    def __init__(self, *a, **kw):
        self.endpoints = {"host_grpc": "127.0.0.1:1", "host_http": "http://127.0.0.1:2", "app": "app"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _profile() -> Profile:
    curves = {"draft": ServiceCurve(5, 1), "router": ServiceCurve(8, 0.5), "prm": ServiceCurve(8, 0.5),
              "target": ServiceCurve(40, 4)}
    return Profile(curves, dict.fromkeys(curves, 16), 2.0, 5.0, (5, 6, 7), 2.0, {"target_fraction": 0.15})


def test_plan_check_predicts_the_configured_replicas_and_saturates_the_cores_at_the_measured_capacity(
        monkeypatch, tmp_path):
    from arbitrage_common import config
    from arbitrage_common.planning import planner, profile
    from loadtests import plan_check

    data = config.default_config().model_dump(mode="json")
    data["pools"]["draft"]["num_replicas"] = 2
    monkeypatch.setattr(config, "load_config", lambda path: config.AppConfig.model_validate(data))
    monkeypatch.setattr(plan_check, "LocalService", _Service)
    monkeypatch.setattr(profile, "build_profile", lambda *a, **kw: _profile())
    capacity = 6.0

    def fake_locust(settings, out, urls, progress):
        if settings.rate is None:
            return {"requests_per_s": capacity, "target_step_fraction": 0.25}
        return {"requests": 10, "failures_by_status": {"DEADLINE_EXCEEDED": 1}, "e2e_ms": {"p50": 100.0, "p95": 200.0}}

    monkeypatch.setattr(plan_check, "run_locust", fake_locust)
    seen = []
    real_predict = planner.predict

    def predict(prof, policy, fraction, rate, replicas, **kw):
        seen.append(dict(replicas))
        return real_predict(prof, policy, fraction, rate, replicas, n_requests=200, **kw)

    monkeypatch.setattr(planner, "predict", predict)
    table = plan_check.run_plan_check("cfg.yaml", "arbitrage", [0.5], 10.0, 0, tmp_path)
    assert seen and all(r == {"draft": 2, "target": 1, "router": 1, "prm": 1} for r in seen)
    calibrated = Profile.load(tmp_path / "profile-calibrated.json")
    w = Workload("arbitrage", calibrated.steps, 0.25, calibrated.hop_ms, calibrated.request_overhead_ms)
    pools = {p: Pool(calibrated.curves[p], 1, calibrated.max_batch[p]) for p in w.pools()}
    assert core_load(pools, w, capacity, calibrated.cores) == pytest.approx(1.0)
    assert table["calibration_k"] == round(calibrated.measured["scaled_by"], 3)
    # planned from at the capacity, the calibrated profile's own fraction saturates the cores too
    assert calibrated.measured["target_fraction"] == 0.25
    assert calibrated.measured["target_fraction_one_at_a_time"] == 0.15
    assert json.loads((tmp_path / "plan_check.json").read_text())["replicas"]["draft"] == 2
    (row,) = table["rows"]
    assert row["failed_share"] == 0.1  # beside a p95 of the successes only
    assert table["p95_error_tolerance"] == 0.5 and table["max_failed_share"] == 0.01
    assert row["within_tolerance"] is False  # 10 % failed: whatever its p95 error


def _table(*errors) -> dict:
    rows = [{"share_of_capacity": share, "rate_per_s": round(share * 13.6, 3), "p95_error": err,
             "predicted_p95_ms": 1000.0, "measured_p95_ms": 500.0} for share, err in zip((0.3, 0.6, 0.85), errors)]
    return {"p95_error_tolerance": 0.5, "rows": rows}


def test_the_verdict_names_the_rows_outside_the_tolerance():
    from loadtests.plan_check import verdict, within_tolerance

    assert [within_tolerance(e) for e in (0.3, -0.5, 3.61, None)] == [True, True, False, None]
    line = verdict(_table(0.30, 0.35, 3.61))  # the planner's walk-through
    assert line.startswith("warning: p95_error outside +-0.5 at 0.85 of capacity (11.56 req/s): +3.61")
    assert "0.3 of capacity" not in line and "plans near these loads on this machine are rough" in line
    assert "no measured p95" in verdict(_table(0.1, None))
    assert verdict(_table(0.30, -0.2)).startswith("every row's predicted p95 is within 0.5")


def test_plan_check_prints_its_verdict_on_stderr_and_exits_0(monkeypatch, capsys, tmp_path):
    from arbitrage_common.cli.main import main
    from loadtests import plan_check

    monkeypatch.setattr(plan_check, "run_plan_check", lambda *a, **kw: _table(0.30, 0.35, 3.61))
    assert main(["plan", "check", "--out", str(tmp_path)]) == 0  # a measurement, not a gate
    out, err = capsys.readouterr()
    assert json.loads(out)["rows"][2]["p95_error"] == 3.61
    assert "arbitrage plan check: warning: p95_error outside +-0.5 at 0.85 of capacity" in err


def test_a_row_where_requests_failed_is_not_within_tolerance_and_the_verdict_says_failures():
    """Was "within tolerance": half the requests failed, and the p95 of the rest agreed."""
    from loadtests.plan_check import MAX_FAILED_SHARE, verdict, within_tolerance

    assert MAX_FAILED_SHARE == 0.01
    assert within_tolerance(0.1, failed_share=0.5) is False
    assert within_tolerance(None, failed_share=0.5) is False
    assert within_tolerance(0.1, failed_share=0.01) is True  # at the bound: agrees
    table = _table(0.1, 0.2)
    table["rows"][1].update(failed_share=0.5, failures={"DEADLINE_EXCEEDED": 120})
    line = verdict(table)
    assert line.startswith("warning: more than 1% of the requests failed at 0.6 of capacity (8.16 req/s): "
                           "50.0% failed (DEADLINE_EXCEEDED 120)")
    assert "p95_error outside" not in line and "0.3 of capacity" not in line
    table["rows"][0].update(p95_error=3.0)
    assert "; and p95_error outside +-0.5 at 0.3 of capacity (4.08 req/s): +3.00" in verdict(table)
