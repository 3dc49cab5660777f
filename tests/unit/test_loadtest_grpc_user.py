"""The gRPC load-test user's stream handling over a fake stream: what locust is told about the
call and what the run's records hold. ``grpc_user`` patches grpc for gevent when imported; that
is switched off here so the rest of the test process keeps plain grpc."""
from __future__ import annotations

from types import SimpleNamespace

import grpc.experimental.gevent
import pytest

from loadtests import records
from protos.arbitrage.v1 import arbitrage_pb2 as pb


@pytest.fixture
def interceptor(monkeypatch):
    monkeypatch.setattr(grpc.experimental.gevent, "init_gevent", lambda: None)
    from loadtests.grpc_user import LocustInterceptor

    fired: list[dict] = []
    added: list[records.Record] = []
    monkeypatch.setattr(records, "add", added.append)
    monkeypatch.setattr(records, "EXPECTED", {"p": 4})
    env = SimpleNamespace(events=SimpleNamespace(request=SimpleNamespace(fire=lambda **kw: fired.append(kw))))
    return LocustInterceptor(env, "grpc-stream"), fired, added


def _stream(*events):
    yield from events


def _step() -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(step=pb.Step(text="s"))


def _summary() -> pb.GenerateStreamResponse:
    reply = pb.GenerateResponse(request_id="x", text="t", answer=4, policy="arbitrage", threshold=0.5)
    reply.steps.add(text="s")
    reply.usage.target_steps = 1
    return pb.GenerateStreamResponse(summary=reply)


def _run(interceptor, *events):
    icpt, fired, added = interceptor
    request = pb.GenerateRequest(prompt="p", policy="arbitrage")
    list(icpt._timed(_stream(*events), "GenerateStream", request))
    (rec,) = added
    (end,) = [e for e in fired if e["name"] == "GenerateStream end"]
    return rec, end


def test_a_stream_that_ends_ok_without_its_summary_is_incomplete_and_a_failure(interceptor):
    rec, end = _run(interceptor, _step(), _step())
    assert rec.status == "STREAM_INCOMPLETE" and rec.steps == 2
    assert end.get("exception") is not None and "STREAM_INCOMPLETE" in str(end["exception"])


def test_a_stream_with_its_summary_succeeds_and_is_graded(interceptor):
    rec, end = _run(interceptor, _step(), _summary())
    assert (rec.status, rec.steps, rec.target_steps, rec.correct) == ("OK", 1, 1, True)
    assert end.get("exception") is None


@pytest.mark.parametrize("transport", ["grpc", "grpc-stream"])
def test_a_call_returns_its_grpc_status_for_the_closed_loops_backoff(monkeypatch, transport):
    monkeypatch.setattr(grpc.experimental.gevent, "init_gevent", lambda: None)
    from arbitrage_common.client import ServiceError
    from loadtests.backoff import Outcome
    from loadtests.grpc_user import call_grpc
    from loadtests.settings import LoadSettings

    def refused(request, timeout=None):
        raise ServiceError("h:9000", "UNAVAILABLE", "failed to connect to all addresses; connection refused")

    def overloaded(request, timeout=None):  # the service's own refusal: with its retry-after trailer
        raise ServiceError("h:9000", "RESOURCE_EXHAUSTED", "overloaded", retry_after_s=2.0)

    down = SimpleNamespace(generate=refused, stream=refused)
    busy = SimpleNamespace(generate=overloaded, stream=overloaded)
    up = SimpleNamespace(generate=lambda request, timeout=None: pb.GenerateResponse(),
                         stream=lambda request, timeout=None: iter([_step(), _summary()]))
    settings = LoadSettings(transport=transport)
    assert call_grpc(down, settings, "p") == Outcome("UNAVAILABLE", None)
    assert call_grpc(busy, settings, "p") == Outcome("RESOURCE_EXHAUSTED", 2.0)
    assert call_grpc(up, settings, "p").status == "OK"
