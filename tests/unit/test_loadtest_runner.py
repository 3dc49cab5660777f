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


@pytest.mark.parametrize("value,message", [(str(2**31), "must be <= 2147483647"), ("0", "must be >= 1")])
def test_loadtest_max_steps_out_of_the_apis_int32_is_refused_naming_the_flag(monkeypatch, capsys, value, message):
    """Was let through: every gRPC request failed to build and the run ended "locust sent no request"."""
    from arbitrage_common.cli.main import main

    def no_run(*a, **kw):
        raise AssertionError(f"--max-steps {value} was let through to a run")

    monkeypatch.setattr(runner, "run_local", no_run)
    monkeypatch.setattr(runner, "run_locust", no_run)
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "--grpc", "h:9000", "--max-steps", value])
    assert exc.value.code == 2
    assert f"argument --max-steps: {message}" in capsys.readouterr().err


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


def _summary(requests: int = 10, **failures: int) -> dict:
    """A run's summary as the CLI reads it: ``requests`` sent, ``failures`` by status."""
    brief = dict.fromkeys(("requests_per_s", "e2e_ms", "e2e_ms_all", "ttfs_ms", "time_per_step_ms", "target_step_fraction",
                           "proposal_tokens_kept", "goodput"))
    return {**brief, "requests": requests, "succeeded": requests - sum(failures.values()),
            "failures_by_status": failures}


def _captured_settings(monkeypatch, summary: dict | None = None) -> list:
    seen = []

    def fake_run(settings, *_a, **_kw):
        seen.append(settings)
        return summary or _summary()

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


def test_an_unknown_transport_is_named_before_the_endpoint_pairing(monkeypatch, capsys, tmp_path):
    from arbitrage_common.cli.main import main

    seen = _captured_settings(monkeypatch)
    assert main(["loadtest", "--grpc", "h:9000", "--transport", "foo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--transport: expected one of grpc, grpc-stream, http, http-sse, openai, openai-chat, got 'foo'" in err
    assert "only --grpc was given" not in err and not seen


@pytest.mark.parametrize("mix,needle", [
    (["--policy", "bogus"], "--policy: unknown policy 'bogus'; expected one of draft, target, rsd, arbitrage"),
    (["--policy", "rsd", "--threshold", "2"], "--threshold: must be in [0, 1] for policy 'rsd', got 2"),
])
def test_a_policy_or_threshold_the_service_refuses_is_named_before_any_run(monkeypatch, capsys, tmp_path, mix,
                                                                          needle):
    from arbitrage_common.cli.main import main

    seen = _captured_settings(monkeypatch)
    assert main(["loadtest", "--grpc", "h:9000", *mix, "--out", str(tmp_path)]) == 1
    assert needle in capsys.readouterr().err and not seen  # was 2185 INVALID_ARGUMENT and exit 0


def test_a_run_where_no_request_succeeded_exits_1_with_the_counts(monkeypatch, capsys, tmp_path):
    from arbitrage_common.cli.main import main

    _captured_settings(monkeypatch, _summary(2185, INVALID_ARGUMENT=2180, DROPPED=5))
    assert main(["loadtest", "--grpc", "h:9000", "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no request succeeded: 2185 sent, failed by status: INVALID_ARGUMENT 2180, DROPPED 5" in err


def test_failures_warn_without_fail_on_errors_and_fail_with_it(monkeypatch, capsys, tmp_path):
    from arbitrage_common.cli.main import main

    _captured_settings(monkeypatch, _summary(100, DEADLINE_EXCEEDED=3))
    args = ["loadtest", "--grpc", "h:9000", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert "warning: 3 of 100 request(s) failed (DEADLINE_EXCEEDED 3)" in capsys.readouterr().err
    assert main([*args, "--fail-on-errors"]) == 1
    assert "3 of 100 request(s) failed (DEADLINE_EXCEEDED 3)" in capsys.readouterr().err
    _captured_settings(monkeypatch, _summary(100))
    assert main(args) == 0 and "failed" not in capsys.readouterr().err


def test_a_run_without_metrics_says_pool_metrics_were_not_sampled(monkeypatch, capsys, tmp_path):
    """Against a running service without --metrics: null, not the empty figures of a run where none ran."""
    from arbitrage_common.cli.main import main

    recs = [Record("grpc", 1.0, 250.0, "OK", steps=4)]

    def fake_locust(cmd, env, **_kw):
        with open(json.loads(env["ARBITRAGE_LOAD"])["records"], "w") as f:
            f.writelines(json.dumps(r.__dict__) + "\n" for r in recs)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(runner, "check_up", lambda settings: None)
    monkeypatch.setattr(runner.subprocess, "run", fake_locust)
    monkeypatch.setattr(runner, "write_report", lambda *a: None)  # no matplotlib here
    assert main(["loadtest", "--grpc", "h:9000", "--duration", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.split("\narbitrage loadtest:")[0])["proposal_tokens_kept"] is None  # was {}
    assert "note: pool metrics (pools_over_time, proposal_tokens_kept) were not sampled: pass --metrics URL" in err


def test_the_open_loops_last_requests_reach_locust_stats_csv(tmp_path):
    """Locust writes its CSVs once an interval and not at quit: the open loop quit right after its
    last request, and locust_stats.csv missed that interval's requests (here: all of them)."""
    import subprocess
    import sys

    # In a child process (importing locust gevent-patches it): locust's own CSV writer, the open
    # loop's scheduler with two arrivals, each one request event; the CSV read when it quits.
    code = """if True:
        import csv, sys
        from types import SimpleNamespace
        import gevent
        from locust.env import Environment
        from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter
        from loadtests import locustfile as lf

        env = Environment(user_classes=[lf.OpenLoopUser])
        env.create_local_runner()  # hooks the request event to env.stats
        writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, sys.argv[1])
        gevent.spawn(writer.stats_writer)
        gevent.sleep(0)  # its first write, as locust starts it before the users

        def quit():
            writer.close_files()
            rows = list(csv.DictReader(open(sys.argv[1] + "_stats.csv")))
            print([r["Request Count"] for r in rows if r["Name"] == "Aggregated"][0])

        def one_request(at):
            env.events.request.fire(request_type="grpc", name="Generate", response_time=5, response_length=0,
                                    exception=None, context={})

        lf.poisson_arrivals = lambda rate, duration, seed: [0.01, 0.02]
        user = SimpleNamespace(environment=SimpleNamespace(events=env.events, runner=SimpleNamespace(quit=quit)),
                               one_request=one_request)
        lf.OpenLoopUser.schedule(user)
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, ENV: LoadSettings(rate=100.0, duration_s=1.0).to_env()}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "locust")], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "2"  # was 0: quit came before the next write


@pytest.mark.parametrize("closed,named", [
    (["--shape", "ramp"], "--rate 2 with --shape ramp: an open loop"),
    (["--users", "32"], "--rate 2 with --users 32: an open loop"),
    (["--users", "32", "--spawn-rate", "8"], "--rate 2 with --users 32 and --spawn-rate 8.0"),
])
def test_rate_with_a_closed_loop_flag_is_refused_naming_both(monkeypatch, capsys, tmp_path, closed, named):
    """Was run open loop, the closed loop's flag silently ignored."""
    from arbitrage_common.cli.main import main

    seen = _captured_settings(monkeypatch)
    assert main(["loadtest", "--grpc", "h:9000", "--rate", "2", *closed, "--out", str(tmp_path)]) == 1
    assert named in capsys.readouterr().err and not seen
    assert main(["loadtest", "--grpc", "h:9000", "--rate", "2", "--out", str(tmp_path), "--no-progress"]) == 0


def test_a_reused_out_does_not_report_the_last_runs_records(monkeypatch, tmp_path):
    """A locust that died before writing its records: the last run's requests.jsonl was read as this run's."""
    (tmp_path / "requests.jsonl").write_text(json.dumps(Record("grpc", 1.0, 250.0, "OK", steps=4).__dict__) + "\n")
    (tmp_path / "summary.json").write_text("{}")
    monkeypatch.setattr(runner, "check_up", lambda settings: None)
    monkeypatch.setattr(runner.subprocess, "run", lambda cmd, env, **kw: SimpleNamespace(returncode=2))
    with pytest.raises(RuntimeError, match="locust wrote no request records"):
        runner.run_locust(LoadSettings(users=4, duration_s=10.0), tmp_path, [], False)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("flags,named", [(["--users", "4"], "--users 4"), (["--shape", "steady"], "--shape steady"),
                                         (["--users", "8", "--spawn-rate", "2"], "--users 8 and --spawn-rate 2.0")])
def test_closed_loop_flags_beside_rate_are_refused_even_at_their_defaults(monkeypatch, capsys, tmp_path, flags,
                                                                        named):
    from arbitrage_common.cli.main import main

    seen = _captured_settings(monkeypatch)
    assert main(["loadtest", "--grpc", "h:9000", "--rate", "2", *flags, "--out", str(tmp_path)]) == 1
    assert f"--rate 2 with {named}: an open loop" in capsys.readouterr().err and not seen
    assert main(["loadtest", "--grpc", "h:9000", *flags, "--out", str(tmp_path), "--no-progress"]) == 0  # closed
    assert seen[0].rate is None
