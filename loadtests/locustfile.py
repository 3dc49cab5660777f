"""Locust entry point: ``locust -f loadtests/locustfile.py`` (``arbitrage loadtest`` runs it).

The run is described by ``ARBITRAGE_LOAD`` (``settings.LoadSettings`` as JSON): transport, mix,
shape, and for open-loop runs a Poisson arrival rate. Closed loop: ``users`` users, each sending
its next request when the last one ends (after a backoff when it failed retriably:
``backoff``), shaped steady / ramp / spike. Open loop
(``rate``): one scheduler user starts requests at seeded Poisson arrival times whatever the
responses do (locust alone is closed-loop); more than ``max_in_flight`` at once are dropped and
counted, never silently queued. Per-request records go to ``records`` when the run stops.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `loadtests` as a package

import gevent
from gevent.pool import Pool
from locust import HttpUser, constant, events, task
from locust import stats as locust_stats

from loadtests import records
from loadtests.backoff import Backoff, Outcome
from loadtests.grpc_user import call_grpc, make_client
from loadtests.http_user import call_http
from loadtests.settings import LoadSettings, poisson_arrivals
from loadtests.shapes import SHAPES

SETTINGS = LoadSettings.from_env()
records.EXPECTED.update(SETTINGS.mix.answers())
PROMPTS = list(records.EXPECTED)
_NEXT = itertools.count()
_USERS = itertools.count()  # closed-loop users in start order: each seeds its own backoff
# Locust writes its CSVs every ``CSV_STATS_INTERVAL_SEC`` and not again at quit (it only closes
# them), so the open loop waits one interval and a margin for the write after its last request.
CSV_WRITE_MARGIN_S = 0.5


def csv_write_wait_s() -> float:
    return locust_stats.CSV_STATS_INTERVAL_SEC + CSV_WRITE_MARGIN_S


def next_prompt() -> str:
    """Requests cycle through the seeded problem pool in one fixed order."""
    return PROMPTS[next(_NEXT) % len(PROMPTS)]


class _Caller:
    """What both user kinds share: one request of the configured transport."""

    def setup_transport(self) -> None:
        if SETTINGS.transport.startswith("grpc"):
            self.grpc_client = make_client(self.environment, SETTINGS)

    def one_request(self, scheduled: float | None = None) -> Outcome:
        """``scheduled``: the open loop's arrival time (perf_counter), where latency starts."""
        records.schedule_next(scheduled)
        if SETTINGS.transport.startswith("grpc"):
            return call_grpc(self.grpc_client, SETTINGS, next_prompt())
        return call_http(self.client, self.environment, SETTINGS, next_prompt())


class ArbitrageUser(_Caller, HttpUser):
    """Closed loop: the next request as soon as the last one ends, or after a backoff when it
    failed retriably (the service down or overloaded), as a real client would."""

    host = SETTINGS.host_http
    abstract = SETTINGS.rate is not None

    def on_start(self) -> None:
        self.setup_transport()
        self.backoff, self.pause_s = Backoff.for_user(SETTINGS.mix.seed, next(_USERS)), 0.0

    def wait_time(self) -> float:
        """Locust's wait before the next request: a wait, not a request, so nothing counts it, and
        locust stops a waiting user at once."""
        return self.pause_s

    @task
    def request(self) -> None:
        self.pause_s = 0.0  # a request that raises (a bug here) leaves no stale wait behind
        self.pause_s = self.backoff.after(self.one_request())


class OpenLoopUser(_Caller, HttpUser):
    """Open loop: Poisson arrivals at ``rate`` per second, each request in its own greenlet."""

    host = SETTINGS.host_http
    fixed_count = 1
    wait_time = constant(0)
    abstract = SETTINGS.rate is None

    def on_start(self) -> None:
        self.setup_transport()

    @task
    def schedule(self) -> None:
        pool, started = Pool(SETTINGS.max_in_flight), time.perf_counter()
        for at in poisson_arrivals(SETTINGS.rate, SETTINGS.duration_s, SETTINGS.mix.seed):
            gevent.sleep(max(0.0, at - (time.perf_counter() - started)))
            if pool.full():
                self.environment.events.request.fire(request_type="open-loop", name="dropped", response_time=0,
                                                     response_length=0, exception=RuntimeError("max_in_flight"))
                records.add(records.Record(SETTINGS.transport, records.since_start(), 0.0, "DROPPED"))
                continue
            pool.spawn(self.one_request, started + at)
        pool.join(timeout=SETTINGS.client_timeout_s)
        gevent.sleep(csv_write_wait_s())  # else locust_stats.csv misses the last interval's requests
        self.environment.runner.quit()


if SETTINGS.rate is None:
    Shape = SHAPES[SETTINGS.shape]  # locust uses the LoadTestShape subclass it finds in this module

@events.test_stop.add_listener
def _write_records(environment, **_kw) -> None:
    if SETTINGS.records:
        records.write(SETTINGS.records)
