"""``arbitrage loadtest``: a bounded headless locust run against a running service, or against
the embedded default started here (``arbitrage serve`` in a child process, a black box), with
the service's metrics sampled during the run and the report written at the end."""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Self

from arbitrage_common.client import Client

from . import records as records_mod
from .report import pool_metrics_note, records_window_s, summarize, write_report
from .service_metrics import Sampler
from .settings import ENV, LoadSettings

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
READY_TIMEOUT_S = 300
FAST_METRICS_INTERVAL_S = 2  # seconds between the local service's metric exports (pools over time)
# Open loop: run time beyond the drain for the locustfile's wait for locust's last CSV write
# (``csv_write_wait_s``, 1.5 s), so the run-time limit does not stop the run before it.
CSV_WAIT_MARGIN_S = 5
# What a run writes in its --out (locust's CSVs, the records, the report), removed before it starts.
RUN_OUTPUTS = ("requests.jsonl", "summary.json", "report.html", "locust_stats.csv", "locust_stats_history.csv",
               "locust_failures.csv", "locust_exceptions.csv")


class ServiceDown(RuntimeError):
    """The endpoint does not answer: the run never starts (and never reports zero requests as a success)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_up(settings: LoadSettings, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the endpoint, when the transport under test does not answer."""
    if settings.transport.startswith("grpc"):
        with Client(settings.host_grpc, settings.app) as client:
            if not client.healthy(timeout=timeout_s):
                raise ServiceDown(f"{settings.host_grpc}: the gRPC health check did not answer SERVING within "
                                  f"{timeout_s:g} s; start the service (`arbitrage serve`) or point --grpc at it")
        return
    try:
        with urllib.request.urlopen(f"{settings.host_http}/healthz", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
    except OSError as exc:
        raise ServiceDown(f"{settings.host_http}: /healthz did not answer within {timeout_s:g} s ({exc}); start "
                          f"the service (`arbitrage serve`) or point --http at it") from None
    raise ServiceDown(f"{settings.host_http}: /healthz is not 200")


def _exit_with_parent():
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``), so a run killed hard (a test runner's timeout, ``kill -9``)
    leaves no service and no Ray cluster behind; None elsewhere. libc's ``prctl`` is looked
    up here, in the parent: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _tail(path: Path, chars: int = 4000) -> str:
    """The end of a log, for an error raised where the log itself may be gone (a CI machine)."""
    return path.read_text(errors="replace")[-chars:]


class LocalService:
    """``arbitrage serve --config CFG`` on free ports in a child process (``env`` added to this
    process's environment), stopped by SIGTERM (also when this process dies without stopping it)."""

    def __init__(self, config: str | None, log: Path, fast_metrics: bool = True, env: dict[str, str] | None = None):
        self.config, self.log, self.fast_metrics, self.extra_env = config, log, fast_metrics, env or {}
        self.grpc_port, self.http_port, self.metrics_port = _free_port(), _free_port(), _free_port()

    def __enter__(self) -> Self:
        import yaml

        from arbitrage_common.config import default_config, load_config

        cfg = load_config(self.config) if self.config else default_config()
        data = cfg.model_dump(mode="json")
        data["grpc"]["port"], data["http"]["port"] = self.grpc_port, self.http_port
        self.name = cfg.name
        cfg_file = self.log.with_name("service-config.yaml")
        cfg_file.write_text(yaml.safe_dump(data, sort_keys=False))
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **self.extra_env}
        # pools over time at a 2 s grain (Ray's default export is every 10 s)
        interval = ["--metrics-interval-s", str(FAST_METRICS_INTERVAL_S)] if self.fast_metrics else []
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "arbitrage_common.cli", "serve", "--config",
                                      str(cfg_file), "--metrics-port", str(self.metrics_port), *interval],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_exit_with_parent())  # noqa: PLW1509 - a prctl call only
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"the local service exited ({self.proc.returncode}); the end of {self.log}:\n"
                                   f"{_tail(self.log)}")
            if "ready in" in self.log.read_text():
                return self
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"the local service was not ready after {READY_TIMEOUT_S} s; the end of {self.log}:\n"
                           f"{_tail(self.log)}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    @property
    def endpoints(self) -> dict[str, str]:
        return {"host_grpc": f"127.0.0.1:{self.grpc_port}", "host_http": f"http://127.0.0.1:{self.http_port}",
                "app": self.name}


def run_locust(settings: LoadSettings, out: Path, metrics_urls: list[str], progress: bool) -> dict:
    """Runs locust headless, bounded by the duration; returns the summary (also written to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    check_up(settings)
    rec_file = out / "requests.jsonl"
    settings = replace(settings, records=str(rec_file))
    rate_mode = settings.rate is not None
    # A reused --out: a locust that died before writing must not leave the last run's files to be
    # read (requests.jsonl) or shown (summary, report, CSVs) as this run's.
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    run_time = settings.duration_s + (settings.client_timeout_s + CSV_WAIT_MARGIN_S if rate_mode else 0)
    cmd = [shutil.which("locust") or str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE),
           "--headless", "--csv", str(out / "locust"), "--csv-full-history", "--host", settings.host_http,
           "-t", f"{math.ceil(run_time)}s",
           "--stop-timeout", str(math.ceil(settings.client_timeout_s)), "--loglevel", "WARNING"]
    cmd += ["-u", "1", "-r", "1"] if rate_mode else ["-u", str(settings.users), "-r", str(settings.spawn_rate)]
    if not progress:
        cmd.append("--only-summary")
    sampler = Sampler(metrics_urls, settings.app) if metrics_urls else None
    if sampler:
        sampler.start()
    started = time.monotonic()
    log = open(out / "locust.log", "w")  # noqa: SIM115
    try:
        proc = subprocess.run(cmd, env={**os.environ, ENV: settings.to_env()}, cwd=LOCUSTFILE.parent.parent,
                              stdout=None if progress else log, stderr=subprocess.STDOUT if not progress else None,
                              timeout=settings.duration_s + 2 * settings.client_timeout_s + 120, check=False)
    finally:
        log.close()
        timeline = sampler.stop() if sampler else None  # None: not sampled, unlike a run where no pool ran
    duration = time.monotonic() - started
    if not rec_file.is_file():
        raise RuntimeError(f"locust wrote no request records (exit {proc.returncode}); see {out / 'locust.log'}")
    recs = records_mod.read(rec_file)
    if not recs:
        raise RuntimeError(f"locust sent no request in {duration:.0f} s: nothing to report (see {out / 'locust.log'})")
    # Open loop: the arrivals' window. Closed loop: the records' own window, first start to last
    # end (the locust process's wall time also holds its start-up and the stop drain).
    active = min(duration, settings.duration_s) if rate_mode else (records_window_s(recs) or duration)
    summary = summarize(recs, active, settings.slo_ms, timeline, _settings_dict(settings))
    summary["pool_metrics_note"] = pool_metrics_note(timeline, metrics_urls, sampler.repeats if sampler else 0,
                                                     sampler.unreachable if sampler else None)
    summary["locust_exit_code"] = proc.returncode
    summary["locust_wall_s"] = round(duration, 2)
    write_report(out, recs, summary)
    return summary


def _settings_dict(settings: LoadSettings) -> dict:
    import json

    d = json.loads(settings.to_env())
    d.pop("records", None)
    return d


def run_local(settings: LoadSettings, out: Path, config: str | None = None, progress: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with LocalService(config, out / "service.log") as service:
        local = replace(settings, **service.endpoints)
        return run_locust(local, out, [f"http://127.0.0.1:{service.metrics_port}/metrics"], progress)
