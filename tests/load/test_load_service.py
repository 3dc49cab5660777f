"""Locust against a real local service (`arbitrage serve` in a child process, driven as a black
box): the CI smoke, every transport, a service that is down, and the pools autoscaling
independently under load on the rows they hold (policy target scales the target pool only, policy
draft the draft pool only, both back down after the load stops), with merged calls and a
target_ongoing_requests at which counting Serve calls could never scale a pool."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from arbitrage_common.config import LANES_PER_REPLICA, default_config
from loadtests.runner import LocalService, run_locust
from loadtests.service_metrics import ReplicaTracker, scrape
from loadtests.settings import LoadSettings, Mix

ROOT = Path(__file__).resolve().parents[2]
# Fast autoscaling so a CI run shows it: 10 rows (request steps) per replica, decided on 3 s of
# history, up after 2 s, down after 10 s. Merged calls are on (the default): each pool has
# LANES_PER_REPLICA x 2 = 8 lanes, at most one call out per lane, so Serve's default policy, which
# counts calls, could ask for at most ceil(8 / 10) = 1 replica (test_counting_calls_could_not_scale);
# LOAD_USERS closed-loop clients, all started at once, keep well over 10 rows in the loaded pool
# (measured, from the policy's inputs: 15-20 rows in the draft or target pool at 40 clients; at 24
# the draft pool held 9-11, and its scale-up came late or not at all). An idle pool gets no call
# at all (a request releases only the pools it called).
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 10, "upscale_delay_s": 2,
               "downscale_delay_s": 10, "look_back_period_s": 3, "metrics_interval_s": 1}
LOAD_USERS = 40
# downscale_delay_s + look-back + replica shutdown + the tracker's 15 s memory of a replica
DOWNSCALE_GRACE_S = 90
# Back at min_replicas means: so for this long (two health-check periods, in which a replica that
# is still retiring would report itself).
SETTLED_S = 20
STALE_RAY_ADDRESS = "127.0.0.1:1"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    out = tmp_path_factory.mktemp("load")
    data = default_config().model_dump(mode="json")
    for role in ("draft", "target"):
        data["pools"][role]["autoscaling_config"] = dict(AUTOSCALING)
    # No call slots: rows waiting for a slot wait in the coordinator, where no pool counts them (and
    # where pools share one node's cores, as slots are for, more replicas add no cores anyway).
    data["coordinator"].pop("pool_calls_in_flight", None)
    cfg = out / "autoscaling.yaml"
    cfg.write_text(yaml.safe_dump(data))
    # Ray's temp dir holds the address a `ray start` records, left behind when it died before
    # `ray stop` (nothing listens on port 1). A short path: Ray's socket paths are capped.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(STALE_RAY_ADDRESS)
    try:
        svc = _started(lambda: LocalService(str(cfg), out / "service.log", env={"RAY_TMPDIR": str(ray_tmp)}))
        svc.ray_tmp = ray_tmp
        try:
            yield svc
        finally:
            svc.__exit__(None, None, None)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _started(make: Callable[[], LocalService]) -> LocalService:
    """A service from ``make``, started; a second one (on new ports) if the first failed to
    start, with that failure kept as a warning in the test report. The tests here are about
    load, not about starting up, which has its own tests and gets no second try there."""
    try:
        return make().__enter__()
    except RuntimeError as exc:
        warnings.warn(f"the load tests' service failed to start once; starting another: {exc}", stacklevel=2)
        return make().__enter__()


def _settings(svc, **kw) -> LoadSettings:
    mix = kw.pop("mix", Mix(max_steps=8))
    return LoadSettings(**svc.endpoints, mix=mix, timeout_s=60, **kw)


def _metrics(svc) -> list[str]:
    return [f"http://127.0.0.1:{svc.metrics_port}/metrics"]


def _goodput_of_rows(out: Path, slo_ms: float) -> float:
    """Goodput recomputed from the raw requests.jsonl rows (not by the report's code): the
    share of all rows answered OK within ``slo_ms``. Timing decides the value, never the test."""
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines() if line.strip()]
    return round(sum(r["status"] == "OK" and r["e2e_ms"] <= slo_ms for r in rows) / len(rows), 4)


_TRACKER = ReplicaTracker()


def _replicas(svc) -> dict[str, int]:
    return _TRACKER.update(scrape(_metrics(svc)), svc.name)


def _series(timeline: list[dict], pool: str) -> list[int]:
    return [row["pools"][pool]["replicas"] for row in timeline if row["pools"].get(pool, {}).get("replicas")]


def _rose(series: list[int]) -> bool:
    """Some sample is above an earlier one: the pool scaled up during the run."""
    return any(b > min(series[:i + 1]) for i, b in enumerate(series[1:]))


def _wait_scaled_down(svc, pools: tuple[str, ...]) -> list[dict]:
    """Replicas over time until every pool has been back at min_replicas for SETTLED_S (or the
    grace runs out)."""
    record, started, settled_since = [], time.monotonic(), None
    while time.monotonic() - started < DOWNSCALE_GRACE_S:
        reps = _replicas(svc)
        now = time.monotonic()
        record.append({"t": round(now - started, 1), **{p: reps.get(p) for p in pools}})
        if all(reps.get(p) == AUTOSCALING["min_replicas"] for p in pools):
            settled_since = now if settled_since is None else settled_since
            if now - settled_since >= SETTLED_S:
                return record
        else:
            settled_since = None
        time.sleep(2)
    raise AssertionError(f"not back to {AUTOSCALING['min_replicas']} replica(s) within {DOWNSCALE_GRACE_S} s: "
                         f"{record}")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    """Every process under ``pid`` now (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_service_outlives_no_run_that_was_killed(tmp_path):
    """A run that started its own service and was killed hard (kill -9, a CI timeout) takes the
    service and its Ray processes down with it. Runs before the module's service starts, so
    only one local Ray cluster is up at a time."""
    import textwrap

    holder_py = tmp_path / "holder.py"
    holder_py.write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path
        from loadtests.runner import LocalService
        with LocalService(None, Path({str(tmp_path / "service.log")!r})) as svc:
            print(svc.proc.pid, flush=True)
            time.sleep(600)
    """))
    holder = subprocess.Popen([sys.executable, str(holder_py)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = holder.stdout.readline()
        assert line.strip().isdigit(), f"the service did not start: {(tmp_path / 'service.log').read_text()[-2000:]}"
        service_pid = int(line)
        tree = {service_pid} | _descendants(service_pid)
        assert len(tree) > 2, tree  # the service, its raylet, GCS, workers...
    finally:
        holder.kill()  # SIGKILL: no cleanup code of the holder runs
        holder.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
        time.sleep(1)
    assert not [pid for pid in tree if _alive(pid)]


def test_serve_starts_its_own_cluster_despite_a_stale_ray_start_address(service):
    """Without --address, `arbitrage serve` starts a local cluster: it neither joins the
    cluster that `ray start` last recorded on the machine nor fails on its dead address."""
    assert (service.ray_tmp / "ray" / "ray_current_cluster").read_text() == STALE_RAY_ADDRESS
    assert list((service.ray_tmp / "ray").glob("session_2*")), "the service's Ray session is not in RAY_TMPDIR"
    assert "Connecting to existing Ray cluster" not in service.log.read_text()


def test_smoke_grpc_stream_zero_failures_and_report(service, tmp_path):
    out = tmp_path / "smoke"
    summary = run_locust(_settings(service, transport="grpc-stream", users=3, duration_s=20, slo_ms=30000),
                         out, _metrics(service), progress=False)
    assert summary["requests"] > 0 and summary["failures_by_status"] == {}
    assert summary["ttfs_ms"]["n"] == summary["succeeded"] and summary["time_per_step_ms"]["n"] > 0
    assert summary["ttfs_ms"]["p50"] <= summary["e2e_ms"]["p50"]
    assert 0.0 <= summary["target_step_fraction"] <= 1.0
    assert 0.0 <= summary["goodput"] <= 1.0 and summary["goodput"] == _goodput_of_rows(out, 30000)
    assert {"summary.json", "report.html", "locust_stats.csv", "requests.jsonl"} <= {p.name for p in out.iterdir()}
    stats = (out / "locust_stats.csv").read_text()
    assert "GenerateStream TTFS" in stats and "GenerateStream end" in stats and "GenerateStream step" in stats
    assert any(row["pools"].get("draft", {}).get("replicas") for row in summary["pools_over_time"])
    # The default policy routes some steps to the target, which verifies the draft's step as its
    # proposal: the pool's counter reaches the report (the draft pool gets no proposal).
    assert summary["target_step_fraction"] > 0
    assert set(summary["proposal_tokens_kept"]) == {"target"}
    assert 0.0 < summary["proposal_tokens_kept"]["target"] < 1.0


@pytest.mark.parametrize("transport", ["http-sse", "openai-chat"])
def test_http_transports(service, tmp_path, transport):
    summary = run_locust(_settings(service, transport=transport, users=2, duration_s=8), tmp_path, [], False)
    assert summary["requests"] > 0 and summary["failures_by_status"] == {}
    assert summary["steps_per_request"] > 0
    if transport == "http-sse":
        assert summary["ttfs_ms"]["n"] == summary["succeeded"]


def test_slo_goodput_counts_slow_requests_out(service, tmp_path):
    summary = run_locust(_settings(service, transport="grpc", users=2, duration_s=6, slo_ms=1), tmp_path, [], False)
    assert summary["succeeded"] > 0
    assert 0.0 <= summary["goodput"] <= 1.0 and summary["goodput"] == _goodput_of_rows(tmp_path, 1)


def test_a_service_that_is_down_fails_fast_with_a_clear_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "arbitrage_common.cli", "loadtest", "--grpc", f"127.0.0.1:{port}",
                           "--duration", "30", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1 and f"127.0.0.1:{port}" in proc.stderr and "did not answer" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_counting_calls_could_not_scale():
    """The autoscaling below is one where Serve's default policy (desired = calls in flight /
    target_ongoing_requests) never leaves min_replicas: one coordinator has at most one merged
    call out per lane, so the pool's load in calls stays within min_replicas' target."""
    coordinator = default_config().coordinator
    assert coordinator.merge_calls and coordinator.autoscaling_config is None and coordinator.num_replicas in (None, 1)
    lanes = LANES_PER_REPLICA * AUTOSCALING["max_replicas"]
    assert lanes <= AUTOSCALING["target_ongoing_requests"] * AUTOSCALING["min_replicas"]
    assert LOAD_USERS > AUTOSCALING["target_ongoing_requests"] * AUTOSCALING["min_replicas"]


@pytest.mark.parametrize("policy,scaled,idle", [("target", "target", "draft"), ("draft", "draft", "target")])
def test_pools_autoscale_independently(service, tmp_path, policy, scaled, idle, request):
    _wait_scaled_down(service, ("draft", "target"))  # start from min_replicas
    summary = run_locust(_settings(service, transport="grpc", users=LOAD_USERS, duration_s=30, spawn_rate=LOAD_USERS,
                                   mix=Mix(policy=policy, max_steps=10)),
                         tmp_path, _metrics(service), progress=False)
    timeline = summary["pools_over_time"]
    record = {"policy": policy, "during": [{"t": r["t"], **{p: r["pools"].get(p, {}).get("replicas")
                                                             for p in ("draft", "target")}} for r in timeline]}
    (ROOT / "runs").mkdir(exist_ok=True)
    out = ROOT / "runs" / f"autoscaling-{policy}.json"
    out.write_text(json.dumps(record, indent=1))
    assert summary["failures_by_status"] == {}
    scaled_series, idle_series = _series(timeline, scaled), _series(timeline, idle)
    # Both pools start at min_replicas (waited for above), so the loaded one rose if it reached its
    # max (the run's own sampler may first see a replica at its next health check, after the pool
    # scaled up). The other never goes up (a replica the previous scenario is still retiring may
    # show at the first samples, so "never rises", not "always 1").
    assert max(scaled_series) == AUTOSCALING["max_replicas"], record
    assert not _rose(idle_series) and idle_series[-1] == AUTOSCALING["min_replicas"], record
    record["after_load"] = _wait_scaled_down(service, (scaled, idle))
    out.write_text(json.dumps(record, indent=1))
