"""``arbitrage loadtest``'s run and settings without a service: the locust process is faked."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from loadtests import runner
from loadtests.records import Record
from loadtests.settings import ENV, LoadSettings, poisson_arrivals


def test_closed_loop_requests_per_s_is_over_the_records_window_not_the_locust_process(monkeypatch, tmp_path):
    """40 requests in 10 s of records; the locust process took 10.6 s with its start-up."""
    recs = [Record("grpc", 1.0 + 0.25 * i, 250.0, "OK", steps=4) for i in range(40)]  # 1.0 s .. 11.0 s

    def fake_locust(cmd, env, **_kw):
        settings = json.loads(env["ARBITRAGE_LOAD"])
        with open(settings["records"], "w") as f:
            f.writelines(json.dumps(r.__dict__) + "\n" for r in recs)
        return SimpleNamespace(returncode=0)

    clock = iter([100.0, 110.6])
    monkeypatch.setattr(runner, "check_up", lambda settings: None)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust)
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    summary = runner.run_locust(LoadSettings(users=4, duration_s=10.0), tmp_path, [], False)
    assert summary["duration_s"] == 10.0 and summary["requests_per_s"] == 4.0
    assert summary["locust_wall_s"] == 10.6 and summary["locust_exit_code"] == 0


@pytest.mark.parametrize("field", ["rate", "duration_s", "timeout_s", "slo_ms", "spawn_rate"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_load_settings_refuse_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        LoadSettings(**{field: value})


def test_poisson_arrivals_refuse_an_infinite_rate_rather_than_loop_forever():
    with pytest.raises(ValueError, match="finite"):
        poisson_arrivals(float("inf"), 10.0, seed=0)


@pytest.mark.parametrize("flag", ["--rate", "--duration", "--timeout", "--slo-ms", "--spawn-rate"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_loadtest_cli_refuses_non_finite_numbers_naming_the_flag(monkeypatch, capsys, flag, value):
    from arbitrage_common.cli.main import main

    def no_run(*a, **kw):  # never start a service or locust from a unit test, whatever the parser lets by
        raise AssertionError(f"{flag} {value} was let through to a run")

    monkeypatch.setattr(runner, "run_local", no_run)
    monkeypatch.setattr(runner, "run_locust", no_run)
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: must be a finite number > 0" in capsys.readouterr().err


def test_a_spawn_rate_below_one_is_given_to_locust_as_it_is():
    import subprocess
    import sys

    # In a child process: importing locust gevent-patches the process that imports it.
    code = ("from loadtests.shapes import SteadyShape; s = SteadyShape(); s.get_run_time = lambda: 1.0; "
            "print(s.tick())")
    env = {**os.environ, ENV: LoadSettings(users=3, spawn_rate=0.5, duration_s=10.0).to_env()}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "(3, 0.5)"  # was raised to 1 user/s


def _captured_settings(monkeypatch) -> list:
    seen = []

    def fake_run(settings, *_a, **_kw):
        seen.append(settings)
        return {k: {} for k in ("requests", "succeeded", "failures_by_status", "requests_per_s", "e2e_ms", "ttfs_ms",
                                "time_per_step_ms", "target_step_fraction", "proposal_tokens_kept", "goodput")}

    monkeypatch.setattr(runner, "run_locust", fake_run)
    monkeypatch.setattr(runner, "run_local", fake_run)
    return seen


def test_http_alone_loads_the_http_api_it_names(monkeypatch, tmp_path):
    from arbitrage_common.cli.main import main

    seen = _captured_settings(monkeypatch)
    assert main(["loadtest", "--http", "http://h:8000", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen[0].transport == "http" and seen[0].host_http == "http://h:8000"  # was grpc on 127.0.0.1:9000
    assert main(["loadtest", "--grpc", "h:9000", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen[1].transport == "grpc" and seen[1].host_grpc == "h:9000"


@pytest.mark.parametrize("given,transport,needle", [
    (["--http", "http://h:8000"], "grpc-stream", "--transport grpc-stream loads the gRPC API, but only --http"),
    (["--grpc", "h:9000"], "openai", "--transport openai loads the HTTP API, but only --grpc"),
])
def test_a_transport_without_its_endpoint_is_refused_naming_transport(monkeypatch, capsys, tmp_path, given,
                                                                     transport, needle):
    from arbitrage_common.cli.main import main

    seen = _captured_settings(monkeypatch)
    assert main(["loadtest", *given, "--transport", transport, "--out", str(tmp_path)]) == 1
    assert needle in capsys.readouterr().err and not seen
