"""The proxy's own answers (services.proxy_status) through Serve's real status mappers and
error writer, installed in this process: JSON in the API's error shape, Retry-After, and a
started stream's last event."""
from __future__ import annotations

import json

import grpc
import pytest
from ray.exceptions import RayActorError
from ray.serve._private import proxy
from ray.serve.exceptions import BackPressureError

from services import proxy_status


@pytest.fixture(scope="module", autouse=True)
def installed():
    saved = {name: getattr(proxy, name) for name in
             ("get_grpc_response_status", "get_http_response_status", "send_http_response_on_exception")}
    proxy_status.install()
    proxy_status.install()  # idempotent: the second call must not wrap the wrappers
    yield
    for name, fn in saved.items():
        setattr(proxy, name, fn)


def _http(exc: BaseException, started: bool = False):
    status = proxy.get_http_response_status(exc, None, "req-1")
    return status, proxy.send_http_response_on_exception(status, started)


def _body(messages) -> tuple[dict, bytes]:
    start, body = messages
    return {k.decode(): v.decode() for k, v in start["headers"]}, body["body"]


@pytest.mark.parametrize(("exc", "code", "message"), [
    (RayActorError(), "unavailable", proxy_status.MESSAGE),
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), "resource_exhausted", proxy_status.QUEUE_FULL),
])
def test_a_proxy_answered_failure_is_a_503_with_retry_after_and_the_apis_json_error(exc, code, message):
    status, messages = _http(exc)
    headers, body = _body(messages)
    assert status.code == 503 and headers["retry-after"] == str(proxy_status.RETRY_AFTER_S), headers
    assert headers["content-type"] == "application/json", headers
    assert json.loads(body) == {"error": {"message": message, "type": code, "param": None, "code": code}}


def test_a_stream_already_started_ends_with_an_error_event_instead_of_a_cut():
    _, messages = _http(RayActorError(), started=True)
    assert [m.get("more_body", False) for m in messages] == [False] and messages[0]["type"] == "http.response.body"
    event, data = messages[0]["body"].decode().split("\n", 1)
    assert event == "event: error" and data.endswith("\n\n"), messages
    assert json.loads(data.removeprefix("data: "))["error"]["code"] == "unavailable"


def test_other_failures_keep_serves_own_answers():
    status, messages = _http(ValueError("a bug"))
    assert status.code == 500 and messages == []  # Serve writes no body of its own for a 500
    assert proxy.send_http_response_on_exception(status, True) == []


@pytest.mark.parametrize(("exc", "code"), [
    (RayActorError(), grpc.StatusCode.UNAVAILABLE),
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_grpc_answers_are_retriable_codes_with_the_https_words(exc, code):
    status = proxy.get_grpc_response_status(exc, None, "req-1")
    assert status.code == code and status.message == proxy_status.proxy_error(exc).message


def test_a_grpc_status_the_coordinator_set_passes_through_without_a_traceback(caplog):
    """A stream the coordinator aborted (bad input, overload) reaches the proxy as a
    gRPCStatusError: its code and details pass as they are, and the proxy logs no traceback
    (the coordinator counted and logged it); INTERNAL keeps Serve's own handling."""
    from ray.serve.exceptions import gRPCStatusError

    exc = gRPCStatusError(ValueError("bad"), code=grpc.StatusCode.INVALID_ARGUMENT, details="threshold: must be in [0, 1]")
    with caplog.at_level("DEBUG", logger="ray.serve"):
        status = proxy.get_grpc_response_status(exc, None, "req-1")
    assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT, "threshold: must be in [0, 1]")
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    internal = gRPCStatusError(ValueError("bug"), code=grpc.StatusCode.INTERNAL, details="internal error; reference r")
    assert proxy.get_grpc_response_status(internal, None, "req-1").code == grpc.StatusCode.INTERNAL
