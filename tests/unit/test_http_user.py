"""The HTTP load-test user's SSE handling over a fake response: what locust would report for the
call and what the run's records hold. Importing locust here would gevent-patch the whole test
process, so ``_CaughtResponse`` stands in for ``locust.clients.ResponseContextManager`` (2.47)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import requests

from loadtests import http_user, records
from loadtests.settings import LoadSettings, Mix

HEADERS_MS = 0.001  # what locust measured when the headers came: far less than any whole call


class _Body:
    """A response body that yields its bytes, then raises ``error`` (a dropped connection)."""

    def __init__(self, data: bytes, error: Exception | None = None):
        self.data, self.error = data, error

    def read(self, n: int = -1, **_kw) -> bytes:
        if self.data:
            chunk, self.data = self.data, b""
            return chunk
        if self.error is not None:
            raise self.error
        return b""


class _CaughtResponse(requests.Response):
    """``catch_response=True`` as locust 2.47 does it: ``request_meta`` is fired on ``__exit__``
    with the manual success / failure; an exception that is neither escapes unreported."""

    def __init__(self, body: _Body, fire, name: str):
        super().__init__()
        self.status_code, self.raw, self.encoding, self._fire = 200, body, "utf-8", fire
        self.request_meta = {"request_type": "POST", "name": name, "response_time": HEADERS_MS,
                             "response_length": 0, "exception": None}
        self._result: bool | Exception | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._result is None:
            if exc is not None:
                return False
            self._result = True
        self.request_meta["exception"] = None if self._result is True else self._result
        self._fire(**self.request_meta)
        return exc is None

    def success(self):
        self._result = True

    def failure(self, why):
        self._result = why if isinstance(why, Exception) else RuntimeError(why)


def _events(*pairs: tuple[str, dict]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in pairs).encode()


STEP = ("step", {"index": 0, "text": "x"})
SUMMARY = ("summary", {"usage": {"target_steps": 1}, "policy": "arbitrage"})


def _call(monkeypatch, body: _Body) -> tuple[records.Record, dict]:
    """One ``call_http`` over ``body``; the record it adds and the event locust fires for the call."""
    fired: list[dict] = []

    def fire(**kw):
        fired.append(kw)

    def post(route, **kw):
        assert kw["catch_response"] and kw["stream"]
        return _CaughtResponse(body, fire, kw["name"])

    added: list[records.Record] = []
    monkeypatch.setattr(records, "add", added.append)
    settings = LoadSettings(transport="http-sse", mix=Mix(policy="arbitrage"))
    http_user.call_http(SimpleNamespace(post=post), SimpleNamespace(events=SimpleNamespace(request=SimpleNamespace(
        fire=fire))), settings, "prompt")
    (rec,) = added
    (call,) = [e for e in fired if e["name"] == "/v1/generate (sse)"]
    return rec, call


def test_a_finished_stream_is_one_success_timed_over_the_whole_call(monkeypatch):
    rec, call = _call(monkeypatch, _Body(_events(STEP, STEP, SUMMARY)))
    assert (rec.status, rec.steps, rec.target_steps) == ("OK", 2, 1)
    assert call["exception"] is None
    assert call["response_time"] == rec.e2e_ms != HEADERS_MS  # not the time to the headers


@pytest.mark.parametrize("error", [requests.exceptions.ChunkedEncodingError("connection reset"),
                                   requests.exceptions.ConnectionError("read timed out")])
def test_a_stream_broken_mid_way_is_recorded_and_reported_as_a_failure(monkeypatch, error):
    rec, call = _call(monkeypatch, _Body(_events(STEP), error))
    assert rec.status == "STREAM_BROKEN" and rec.steps == 1
    assert "STREAM_BROKEN" in str(call["exception"]) and call["response_time"] == rec.e2e_ms


def test_a_stream_that_ends_without_its_summary_is_a_failure(monkeypatch):
    rec, call = _call(monkeypatch, _Body(_events(STEP, STEP)))
    assert rec.status == "STREAM_INCOMPLETE"
    assert "STREAM_INCOMPLETE" in str(call["exception"])


def test_an_error_event_keeps_its_code(monkeypatch):
    rec, call = _call(monkeypatch, _Body(_events(STEP, ("error", {"error": {"code": "unavailable"}}))))
    assert rec.status == "UNAVAILABLE" and call["exception"] is not None


class _NoReply(_CaughtResponse):
    """What locust's session returns for a call that got no HTTP reply (a timeout, a refused or
    dropped connection): status 0 with the exception in ``error`` (``ResponseContextManager(e)``)."""

    def __init__(self, error: Exception, fire, name: str):
        super().__init__(_Body(b""), fire, name)
        self.status_code, self.error = 0, error


def _unary(monkeypatch, make, transport: str = "http", prompt: str = "prompt",
           outcome: list | None = None) -> tuple[records.Record, dict, dict]:
    """One non-streamed ``call_http``; the record, the call's locust event and the post's kwargs
    (``outcome`` gets what ``call_http`` returned)."""
    fired: list[dict] = []
    sent: dict = {}

    def post(route, **kw):
        sent.update(kw)
        return make(lambda **e: fired.append(e), kw["name"])

    added: list[records.Record] = []
    monkeypatch.setattr(records, "add", added.append)
    settings = LoadSettings(transport=transport, mix=Mix(policy="arbitrage"), timeout_s=30.0)
    returned = http_user.call_http(SimpleNamespace(post=post), SimpleNamespace(events=SimpleNamespace(
        request=SimpleNamespace(fire=lambda **e: fired.append(e)))), settings, prompt)
    if outcome is not None:
        outcome.append(returned)
    (rec,) = added
    (call,) = fired
    return rec, call, sent


def _reply(status: int, body: bytes, headers: dict | None = None):
    def make(fire, name):
        resp = _CaughtResponse(_Body(body), fire, name)
        resp.status_code = status
        resp.headers.update(headers or {})
        return resp
    return make


@pytest.mark.parametrize("error,status", [
    (requests.exceptions.ReadTimeout("read timed out"), "TIMEOUT"),
    (requests.exceptions.ConnectTimeout("connect timed out"), "TIMEOUT"),
    (requests.exceptions.ConnectionError(__import__("urllib3").exceptions.ReadTimeoutError(None, "/", "timed out")),
     "TIMEOUT"),
    (requests.exceptions.ConnectionError("connection refused"), "CONNECTION_ERROR"),
    (requests.exceptions.ChunkedEncodingError("connection dropped"), "CONNECTION_ERROR"),
])
def test_a_call_that_got_no_reply_is_named_for_what_happened_not_http_0(monkeypatch, error, status):
    rec, call, _ = _unary(monkeypatch, lambda fire, name: _NoReply(error, fire, name))
    assert rec.status == status
    assert status in str(call["exception"])


@pytest.mark.parametrize("body,status", [
    (b'{"error": {"message": "full", "type": "rate_limit", "param": null, "code": "resource_exhausted"}}',
     "RESOURCE_EXHAUSTED"),
    (b'{"error": {"message": "no replica", "type": "server_error", "param": null, "code": "unavailable"}}',
     "UNAVAILABLE"),
    (b"<html>bad gateway</html>", "HTTP_503"),
    (b'{"detail": "x"}', "HTTP_503"),
])
def test_an_error_reply_keeps_the_apis_code_so_overload_and_dead_replicas_differ(monkeypatch, body, status):
    rec, call, _ = _unary(monkeypatch, _reply(503, body))
    assert rec.status == status and status in str(call["exception"])


@pytest.mark.parametrize("make,status,retry_after_s", [
    (_reply(503, b'{"error": {"code": "resource_exhausted"}}', {"Retry-After": "2"}), "RESOURCE_EXHAUSTED", 2.0),
    (_reply(503, b"<html>no upstream</html>"), "HTTP_503", None),
    (lambda fire, name: _NoReply(requests.exceptions.ConnectionError("connection refused"), fire, name),
     "CONNECTION_ERROR", None),
    (_reply(200, b'{"steps": [], "usage": {"target_steps": 0}, "policy": "arbitrage"}'), "OK", None),
])
def test_a_call_returns_its_status_and_the_servers_retry_after_for_the_closed_loops_backoff(
        monkeypatch, make, status, retry_after_s):
    outcome: list = []
    rec, _, _ = _unary(monkeypatch, make, outcome=outcome)
    assert rec.status == status
    assert (outcome[0].status, outcome[0].retry_after_s) == (status, retry_after_s)


def test_the_client_waits_longer_than_the_deadline_it_sends_the_service(monkeypatch):
    ok = json.dumps({"steps": [{"text": "a"}], "usage": {"target_steps": 0}, "policy": "arbitrage"}).encode()
    _, _, sent = _unary(monkeypatch, _reply(200, ok))
    assert sent["json"]["timeout_s"] == 30.0 and sent["timeout"] > 30.0


@pytest.mark.parametrize("transport", ["http", "openai"])
def test_http_replies_are_graded_and_report_the_threshold(monkeypatch, transport):
    monkeypatch.setattr(records, "EXPECTED", {"p1": 7})
    result = {"steps": [{"text": "a"}, {"text": "b"}], "usage": {"target_steps": 1}, "policy": "arbitrage",
              "answer": 7, "threshold": 0.4}
    body = {"choices": [], "arbitrage": result} if transport == "openai" else result
    rec, _, _ = _unary(monkeypatch, _reply(200, json.dumps(body).encode()), transport, prompt="p1")
    assert (rec.status, rec.steps, rec.target_steps, rec.correct, rec.threshold) == ("OK", 2, 1, True, 0.4)
    wrong = {**result, "answer": 8}
    rec, _, _ = _unary(monkeypatch, _reply(200, json.dumps(wrong).encode()), "http", prompt="p1")
    assert rec.correct is False


def test_a_streamed_summary_is_graded(monkeypatch):
    monkeypatch.setattr(records, "EXPECTED", {"prompt": 3})
    summary = ("summary", {"usage": {"target_steps": 1}, "policy": "arbitrage", "answer": 3, "threshold": 0.5})
    rec, _ = _call(monkeypatch, _Body(_events(STEP, summary)))
    assert rec.status == "OK" and rec.correct is True and rec.threshold == 0.5


def test_an_open_loop_request_counts_from_its_scheduled_arrival(monkeypatch):
    """A send the open loop's scheduler made late (a busy client) counts as latency, so the
    measured p95 does not hide it (coordinated omission); the next call counts from its send."""
    clock = SimpleNamespace(now=1000.0)
    clock.perf_counter = clock.time = lambda: clock.now  # a still clock: only the schedule moves
    monkeypatch.setattr(records, "time", clock)
    monkeypatch.setattr(http_user, "time", clock)
    records.schedule_next(clock.now - 0.5)  # the scheduler sends 500 ms after the arrival
    late, _ = _call(monkeypatch, _Body(_events(STEP, SUMMARY)))
    on_time, _ = _call(monkeypatch, _Body(_events(STEP, SUMMARY)))  # an arrival is taken once
    assert (late.e2e_ms, late.ttfs_ms) == (500.0, 500.0)
    assert (on_time.e2e_ms, on_time.ttfs_ms) == (0.0, 0.0)
    assert on_time.start_s - late.start_s == pytest.approx(0.5)
