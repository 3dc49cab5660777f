"""Every request that does not succeed is counted once and logged once by the coordinator,
gRPC and HTTP labelling the same cases the same way (real Coordinator over fake pools, no Ray)."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest
from fake_pools import coordinator, count_records
from fastapi.testclient import TestClient
from ray.serve.exceptions import gRPCStatusError

from protos.arbitrage.v1 import arbitrage_pb2 as pb
from services.coordinator import _GrpcAbort
from services.http_api import build_http_api

PROMPT = "Start with 2. Add 3."


class GrpcContext:
    def __init__(self, metadata=()) -> None:
        self.metadata, self.code, self.details = tuple(metadata), None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details

    def set_trailing_metadata(self, trailers) -> None:
        self.trailers = tuple(trailers)


@pytest.fixture
def logged():
    """The coordinator's log records (Serve's logger may not propagate: a handler of our own)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("ray.serve")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _failures(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage().startswith("request failed:")]


def _unary(coord, request: pb.GenerateRequest, context: GrpcContext | None = None) -> GrpcContext:
    context = context or GrpcContext()
    asyncio.run(coord.Generate(request, context))
    return context


def _stream(coord, request: pb.GenerateRequest) -> GrpcContext:
    context = GrpcContext()

    async def drain():
        with contextlib.suppress(_GrpcAbort):  # how a stream ends: Serve sends the status set
            async for _ in coord.GenerateStream(request, context):
                pass
    asyncio.run(drain())
    return context


# -- labels: gRPC as HTTP ------------------------------------------------------------------
@pytest.mark.parametrize("policy,label", [("target", "target"), ("", "none"), ("not-a-policy", "none")])
def test_grpc_and_http_label_bad_input_alike(policy, label):
    coord = coordinator()
    records = count_records(coord)
    context = _unary(coord, pb.GenerateRequest(prompt="", policy=policy))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    body = {"prompt": ""} if not policy else {"prompt": "", "policy": policy}
    assert TestClient(build_http_api(coord)).post("/v1/generate", json=body).status_code == 422
    assert records == [("grpc", label, "invalid_argument"), ("http", label, "invalid_argument")]


def test_grpc_and_http_label_unauthenticated_requests_none(monkeypatch):
    monkeypatch.setenv("ARB_TEST_KEYS", "k-1")
    coord = coordinator(auth={"api_key_env": "ARB_TEST_KEYS"})
    records = count_records(coord)
    context = _unary(coord, pb.GenerateRequest(prompt=PROMPT, policy="rsd"))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    reply = TestClient(build_http_api(coord)).post("/v1/generate", json={"prompt": PROMPT, "policy": "rsd"})
    assert reply.status_code == 401
    assert records == [("grpc", "none", "unauthenticated"), ("http", "none", "unauthenticated")]


def test_a_request_refused_after_validation_keeps_its_policy_label():
    from ray.exceptions import RayActorError

    coord = coordinator()
    coord.pool_record.fail["draft"] = RayActorError()
    records = count_records(coord)
    context = _unary(coord, pb.GenerateRequest(prompt=PROMPT))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert records == [("grpc", coord.cfg.policy.default, "unavailable")]


# -- one log line per request that did not succeed -------------------------------------------
def test_a_failed_unary_call_logs_one_line_with_status_policy_transport_and_request_id(logged):
    coord = coordinator()
    _unary(coord, pb.GenerateRequest(prompt="", policy="rsd", request_id="job-7"))
    (line,) = _failures(logged)
    assert line.levelno == logging.INFO and line.exc_info is None
    assert line.getMessage() == ("request failed: status=invalid_argument policy=rsd transport=grpc "
                                 "request_id='job-7': prompt: must not be empty")


@pytest.mark.parametrize("failure,code,level", [
    ("dead", "unavailable", logging.WARNING), ("full", "resource_exhausted", logging.WARNING),
    ("bug", "internal", logging.ERROR),
])
@pytest.mark.parametrize("call", [_unary, _stream])
def test_pool_failures_are_logged_once_at_their_level(logged, failure, code, level, call):
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    coord = coordinator()
    coord.pool_record.fail["draft"] = {"dead": RayActorError(), "full": BackPressureError(num_queued_requests=1,
                                                                                        max_queued_requests=1),
                                       "bug": ValueError("boom")}[failure]
    context = call(coord, pb.GenerateRequest(prompt=PROMPT, policy="draft", request_id="r-1"))
    assert context.code.name.lower() == code
    (line,) = _failures(logged)
    assert line.levelno == level and f"status={code} policy=draft transport=grpc request_id='r-1'" in line.getMessage()
    assert (line.exc_info is not None) == (code == "internal")  # a traceback only for a bug
    assert len([r for r in logged if r.levelno >= logging.WARNING]) == 1  # nothing else of ours logs it


def test_a_missed_deadline_is_a_warning(logged):
    coord = coordinator()
    context = _unary(coord, pb.GenerateRequest(prompt=PROMPT, policy="draft", timeout_s=1e-9))
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED
    (line,) = _failures(logged)
    assert line.levelno == logging.WARNING and "status=deadline_exceeded" in line.getMessage()


def test_a_client_request_id_is_logged_bounded_and_escaped(logged):
    coord = coordinator()
    _unary(coord, pb.GenerateRequest(prompt="", request_id="a\nb" + "x" * 500))
    (line,) = _failures(logged)
    assert "\n" not in line.getMessage() and "request_id='a\\nb" in line.getMessage()
    assert len(line.getMessage()) < 300


def test_http_refusals_are_logged_once_too(logged):
    coord = coordinator()
    client = TestClient(build_http_api(coord))
    client.post("/v1/generate", json={"prompt": 5, "request_id": "h-1"})
    client.get("/nope")
    lines = [r.getMessage() for r in _failures(logged)]
    assert len(lines) == 2
    assert lines[0].startswith("request failed: status=invalid_argument policy=none transport=http "
                               "request_id='h-1': prompt:")
    assert lines[1].startswith("request failed: status=not_found policy=none transport=http")


def test_serves_request_failed_traceback_for_a_stream_abort_is_dropped_but_other_errors_stay(logged):
    """Serve's replica logs ``logger.exception("Request failed.")`` on the "ray.serve" logger for
    every exception a handler raises: a stream's abort is logged once by the coordinator only."""
    coord = coordinator()
    serve_logger = logging.getLogger("ray.serve")
    _stream(coord, pb.GenerateRequest(prompt=""))  # invalid: the stream ends with _GrpcAbort
    abort = _GrpcAbort("prompt: must not be empty")
    # Serve's replica logs the abort wrapped, raised from it (replica.py _raise_user_exception)
    wrapped = gRPCStatusError(original_exception=abort, code=grpc.StatusCode.INVALID_ARGUMENT, details=str(abort))
    for exc, cause in ((abort, None), (wrapped, abort), (RuntimeError("a bug"), None)):
        try:
            raise exc from cause
        except Exception:  # as Serve's replica does
            serve_logger.exception("Request failed.")
    serve_failed = [r for r in logged if r.getMessage() == "Request failed."]
    assert [type(r.exc_info[1]) for r in serve_failed] == [RuntimeError]
    assert len(_failures(logged)) == 1


def test_client_text_in_a_logged_message_cannot_forge_lines_or_send_escapes(logged):
    coord = coordinator()
    with TestClient(build_http_api(coord)) as http:
        http.get("/v1/nope%0DINFO%20forged%1B[31m")
    (line,) = [r.getMessage() for r in _failures(logged)]
    assert "\r" not in line and "\x1b" not in line and "\\r" in line and "\\x1b" in line
