"""The closed loop's backoff after a failed request (``loadtests.backoff``), and the closed-loop
user that waits it. A game day's dead proxy had 8 users send ~40,000 refused requests in 35 s:
each user sent its next request the moment the last one failed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from email.utils import formatdate

import pytest

from loadtests.backoff import CAP_S, INITIAL_S, RETRY_AFTER_CAP_S, Backoff, Outcome, parse_retry_after
from loadtests.settings import ENV, LoadSettings, Mix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _waits(backoff: Backoff, *outcomes: Outcome) -> list[float]:
    return [backoff.after(o) for o in outcomes]


def test_the_wait_grows_exponentially_to_its_cap_with_jitter_below_each_ceiling():
    waits = _waits(Backoff(0), *[Outcome("UNAVAILABLE")] * 8)
    ceilings = [min(CAP_S, INITIAL_S * 2 ** n) for n in range(8)]  # 0.5, 1, 2, 4, 5, 5, 5, 5
    assert ceilings[-1] == CAP_S
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling
    assert len(set(waits)) == len(waits)  # jittered, not in step


def test_a_success_resets_the_backoff_and_waits_nothing():
    backoff = Backoff(1)
    _waits(backoff, *[Outcome("CONNECTION_ERROR")] * 6)
    assert backoff.after(Outcome("OK")) == 0.0
    assert INITIAL_S / 2 <= backoff.after(Outcome("HTTP_503")) <= INITIAL_S  # from the start again


@pytest.mark.parametrize("status", ["INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "INTERNAL", "HTTP_422", "TIMEOUT",
                                    "STREAM_INCOMPLETE", "BAD_REPLY"])
def test_no_wait_after_a_non_retriable_failure(status):
    backoff = Backoff(2)
    assert backoff.after(Outcome(status)) == 0.0
    assert backoff.after(Outcome(status, retry_after_s=3.0)) == 0.0


@pytest.mark.parametrize("status", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "HTTP_502", "HTTP_503", "HTTP_504",
                                    "HTTP_429", "CONNECTION_ERROR"])
def test_every_retriable_failure_waits(status):
    assert Backoff(3).after(Outcome(status)) > 0.0


def test_the_servers_retry_after_is_honoured_never_undercut_and_capped():
    backoff = Backoff(4)
    for _ in range(5):  # whatever the failures before: the server's word, not the backoff's ceiling
        assert 2.0 <= backoff.after(Outcome("RESOURCE_EXHAUSTED", retry_after_s=2.0)) <= 2.2
    assert 8.0 <= backoff.after(Outcome("UNAVAILABLE", retry_after_s=8.0)) <= 8.8  # above the backoff's cap
    assert backoff.after(Outcome("UNAVAILABLE", retry_after_s=3600.0)) == RETRY_AFTER_CAP_S


def test_waits_repeat_with_the_seed_and_users_differ():
    failing = [Outcome("UNAVAILABLE")] * 6 + [Outcome("HTTP_503", 1.0), Outcome("OK"), Outcome("UNAVAILABLE")]
    assert _waits(Backoff.for_user(7, 0), *failing) == _waits(Backoff.for_user(7, 0), *failing)
    assert _waits(Backoff.for_user(7, 0), *failing) != _waits(Backoff.for_user(7, 1), *failing)
    assert _waits(Backoff.for_user(7, 0), *failing) != _waits(Backoff.for_user(8, 0), *failing)


def test_retry_after_is_read_as_seconds_or_an_http_date():
    assert parse_retry_after("1") == 1.0 and parse_retry_after("2.5") == 2.5
    assert parse_retry_after(formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30.0)
    for no_hint in (None, "", "soon", "0", "-3", "nan", formatdate(900.0, usegmt=True)):
        assert parse_retry_after(no_hint, now=1000.0) is None


def test_a_closed_loop_user_waits_its_backoff_after_a_retriable_failure_and_not_after_others():
    """A real locust user's task loop over a service that refuses, then answers: the waits locust
    sleeps between requests (was 0 after every one: the storm)."""
    # In a child process: importing locust gevent-patches the process that imports it.
    code = """if True:
        import json
        from locust.env import Environment
        from locust.exception import StopUser
        from locust.user.task import DefaultTaskSet
        from loadtests import locustfile as lf
        from loadtests.backoff import Outcome

        replies = iter([Outcome("UNAVAILABLE"), Outcome("UNAVAILABLE"), Outcome("HTTP_503", 2.0),
                        Outcome("INVALID_ARGUMENT"), Outcome("OK"), Outcome("CONNECTION_ERROR")])
        slept = []

        def sleep(self, seconds):
            slept.append(seconds)
            if len(slept) == 6:
                raise StopUser()

        DefaultTaskSet._sleep = sleep
        lf.ArbitrageUser.setup_transport = lambda self: None
        lf.ArbitrageUser.one_request = lambda self, scheduled=None: next(replies)
        lf.ArbitrageUser(Environment(user_classes=[lf.ArbitrageUser])).run()
        print(json.dumps(slept))
    """
    env = {**os.environ, ENV: LoadSettings(transport="http", users=2, mix=Mix(seed=5)).to_env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    slept = json.loads(out.stdout.strip().splitlines()[-1])
    first, second, retry_after, invalid, ok, refused = slept
    assert INITIAL_S / 2 <= first <= INITIAL_S
    assert INITIAL_S <= second <= 2 * INITIAL_S  # the ceiling doubled; jitter keeps at least half of it
    assert 2.0 <= retry_after <= 2.2
    assert invalid == ok == 0.0
    assert INITIAL_S / 2 <= refused <= INITIAL_S  # the success reset it
    assert slept == _waits(Backoff.for_user(5, 0), *[Outcome("UNAVAILABLE")] * 2 + [
        Outcome("HTTP_503", 2.0), Outcome("INVALID_ARGUMENT"), Outcome("OK"), Outcome("CONNECTION_ERROR")])
