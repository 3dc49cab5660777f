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
