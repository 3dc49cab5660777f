"""gRPC against the real local service: unary, streaming, health, reflection, concurrency,
errors, deadline, overload and cancellation."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from serve_helpers import SLOW_APP, assert_no_more_pool_calls, main_policy, problems

from arbitrage_common.steps import join_steps
from arbitrage_common.synthetic import extract_answer
from protos.arbitrage.v1 import arbitrage_pb2 as pb

SOURCES = {pb.SOURCE_DRAFT: "draft", pb.SOURCE_TARGET: "target"}


def test_unary_matches_the_in_process_engine(stub, main_metadata, engine):
    prompt, policy = problems(1)[0].prompt, main_policy()
    resp = stub.Generate(pb.GenerateRequest(prompt=prompt, policy=policy, request_id="unary-1"),
                         metadata=main_metadata)
    ref = engine.run(prompt, policy)
    assert resp.request_id == "unary-1" and resp.policy == policy
    assert [s.text for s in resp.steps] == [s.text for s in ref.steps]
    assert [SOURCES[s.source] for s in resp.steps] == [s.source for s in ref.steps]
    assert resp.text == join_steps([s.text for s in resp.steps]) == ref.text
    assert resp.finish_reason == ref.finish_reason
    assert (resp.answer if resp.HasField("answer") else None) == extract_answer(ref.text)
    u = resp.usage
    assert u.target_steps + u.draft_steps == len(resp.steps)
    assert u.draft_tokens_kept == ref.usage.draft_tokens_kept and u.target_tokens == ref.usage.target_tokens
    assert [s.index for s in resp.steps] == list(range(len(resp.steps)))


@pytest.mark.parametrize("policy", ["draft", "target", "rsd", "oracle", "arbitrage"])
def test_every_policy_runs_and_accounts(stub, main_metadata, policy):
    resp = stub.Generate(pb.GenerateRequest(prompt=problems(2)[1].prompt, policy=policy, max_steps=3),
                         metadata=main_metadata)
    u = resp.usage
    assert 1 <= len(resp.steps) <= 3
    if policy == "draft":
        assert u.target_steps == 0 and u.target_tokens == 0 and u.acceptance_rate in (0.0, 1.0)
    if policy == "target":
        assert u.draft_steps == 0 and u.draft_tokens_kept == 0
    if policy in ("rsd", "oracle"):
        assert u.prm_calls >= len(resp.steps) and all(s.HasField("score") for s in resp.steps)
    if policy == "arbitrage":
        assert u.router_calls == len(resp.steps) and all(s.HasField("score") for s in resp.steps)
        assert all(s.draft_discarded == (s.source == pb.SOURCE_TARGET) for s in resp.steps)


def test_stream_sends_each_step_then_a_summary(stub, main_metadata):
    prompt = problems(3)[2].prompt
    messages = list(stub.GenerateStream(pb.GenerateRequest(prompt=prompt, policy=main_policy()),
                                        metadata=main_metadata))
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[-1] == "summary" and set(kinds[:-1]) == {"step"} and len(kinds) >= 2
    steps = [m.step for m in messages[:-1]]
    summary = messages[-1].summary
    assert list(summary.steps) == steps
    assert [s.index for s in steps] == list(range(len(steps)))
    assert all(s.source in SOURCES for s in steps)
    assert summary.text == join_steps([s.text for s in steps])
    unary = stub.Generate(pb.GenerateRequest(prompt=prompt, policy=main_policy()), metadata=main_metadata)
    assert unary.text == summary.text


def test_cli_stream_json_prints_each_event_as_one_json_line(app_config, stub, main_metadata, capsys):
    from arbitrage_common.cli.main import main

    prompt = problems(3)[2].prompt
    assert main(["generate", prompt, "--stream", "--json", "--policy", main_policy(),
                 "--endpoint", f"127.0.0.1:{app_config.grpc.port}", "--app", app_config.name]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [next(iter(e)) for e in events] == ["step"] * (len(events) - 1) + ["summary"]
    unary = stub.Generate(pb.GenerateRequest(prompt=prompt, policy=main_policy()), metadata=main_metadata)
    assert [e["step"]["text"] for e in events[:-1]] == [s.text for s in unary.steps]
    assert events[-1]["summary"]["text"] == unary.text


def test_stream_delivers_steps_before_the_end(stub, slow_metadata):
    """On the slow app every step takes >= 2 s, so a step that arrives while the request
    is still running proves steps are sent as they are decided."""
    stream = stub.GenerateStream(pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=3),
                                 metadata=slow_metadata)
    first = next(stream)
    assert first.WhichOneof("event") == "step"
    if first.step.finish_reason == "delimiter":  # more steps follow, each >= 2 s away
        assert stream.is_active()
    rest = list(stream)
    assert rest[-1].WhichOneof("event") == "summary"
    assert [m.step.index for m in [first, *rest[:-1]]] == list(range(len(rest)))


def test_chat_messages_form(stub, main_metadata):
    prompt = problems(1)[0].prompt
    resp = stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="system", content="be exact"),
                                                      pb.ChatMessage(role="user", content=prompt)],
                                            policy="draft", max_steps=2), metadata=main_metadata)
    direct = stub.Generate(pb.GenerateRequest(prompt=prompt, policy="draft", max_steps=2), metadata=main_metadata)
    assert resp.text == direct.text


def test_policy_and_threshold_default_from_config(stub, main_metadata, app_config):
    resp = stub.Generate(pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=1), metadata=main_metadata)
    assert resp.policy == app_config.policy.default
    assert resp.threshold == pytest.approx(0.5)


def test_health_and_reflection(grpc_channel, main_metadata):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    health = health_pb2_grpc.HealthStub(grpc_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="arbitrage.v1.ArbitrageService"),
                         metadata=main_metadata)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = health.List(health_pb2.HealthListRequest(), metadata=main_metadata)  # no key: health is open
    assert {name: r.status for name, r in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING, "arbitrage.v1.ArbitrageService": health_pb2.HealthCheckResponse.SERVING}
    services = ProtoReflectionDescriptorDatabase(grpc_channel).get_services()
    assert "arbitrage.v1.ArbitrageService" in services and "grpc.health.v1.Health" in services


def test_eight_concurrent_clients_all_answered_correctly(stub, main_metadata, engine):
    policy = main_policy()
    pool = problems(16, seed=99)
    solved = [p for p in pool if engine.answer(p.prompt, policy) == p.answer]
    chosen = (solved + [p for p in pool if p not in solved])[:8]
    barrier = threading.Barrier(8)

    def ask(problem):
        barrier.wait()
        return stub.Generate(pb.GenerateRequest(prompt=problem.prompt, policy=policy), metadata=main_metadata)

    with ThreadPoolExecutor(8) as ex:
        replies = list(ex.map(ask, chosen))
    for problem, reply in zip(chosen, replies):
        served = reply.answer if reply.HasField("answer") else None
        assert served == engine.answer(problem.prompt, policy), problem.prompt
        if problem in solved:
            assert served == problem.answer, problem.prompt
    assert len({r.request_id for r in replies}) == 8


BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "Start with 1. " * 40}, "prompt"),           # over max_prompt_chars=200
    ({"prompt": "Start with 1.", "policy": "nope"}, "policy"),
    ({"prompt": "Start with 1.", "policy": "arbitrage", "threshold": 2.0}, "threshold"),
    ({"prompt": "Start with 1.", "policy": "oracle", "threshold": -3.0}, "threshold"),
    ({"prompt": "Start with 1.", "max_steps": 0}, "max_steps"),
    ({"prompt": "Start with 1.", "max_steps": -2}, "max_steps"),
    ({"prompt": "Start with 1.", "max_steps": 33}, "max_steps"),  # over limits.max_steps=32
    ({"prompt": "Start with 1.", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "Start with 1.", "timeout_s": -1.0}, "timeout_s"),
    ({"messages": [pb.ChatMessage(role="system", content="x")]}, "messages"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_input_is_invalid_argument_naming_the_field(stub, main_metadata, fields, field, streaming):
    request = pb.GenerateRequest(**fields)
    with pytest.raises(grpc.RpcError) as info:
        if streaming:
            list(stub.GenerateStream(request, metadata=main_metadata))
        else:
            stub.Generate(request, metadata=main_metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_past_deadline_is_deadline_exceeded_without_partial_result(stub, slow_metadata, streaming):
    _wait_idle(stub, slow_metadata)
    request = pb.GenerateRequest(prompt=problems(1)[0].prompt, timeout_s=0.5)
    with pytest.raises(grpc.RpcError) as info:
        if streaming:
            received = []
            for message in stub.GenerateStream(request, metadata=slow_metadata):
                received.append(message)  # noqa: PERF402 (what arrived before the error is kept)
        else:
            stub.Generate(request, metadata=slow_metadata)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    if streaming:
        assert all(m.WhichOneof("event") == "step" for m in received)  # never a summary


def _wait_idle(stub, metadata, tries: int = 60) -> None:
    """Wait until the slow app admits and answers a request (earlier tests may hold it)."""
    for _ in range(tries):
        try:
            stub.Generate(pb.GenerateRequest(prompt="Start with 1.", max_steps=1), metadata=metadata)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            time.sleep(0.5)
    raise AssertionError(f"the slow app never admitted a request in {tries} tries")


def test_overload_is_resource_exhausted(stub, slow_metadata):
    """The slow coordinator runs one request and queues one; more are refused at once."""
    _wait_idle(stub, slow_metadata)
    request = pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=2)
    calls = [stub.Generate.future(request, metadata=slow_metadata) for _ in range(5)]
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes, codes
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}, codes


def test_cancelled_client_stops_its_loop_and_frees_its_slot(stub, slow_metadata):
    """A cancelled stream stops its loop and its in-flight pool call."""
    _wait_idle(stub, slow_metadata)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=32),
                                 metadata=slow_metadata)
    assert next(stream).WhichOneof("event") == "step"  # it is running
    stream.cancel()
    assert_no_more_pool_calls(SLOW_APP)
    _wait_idle(stub, slow_metadata, tries=10)  # and its coordinator slot is free again


def test_a_grpc_deadline_bounds_the_servers_work(stub, slow_metadata):
    """The standard gRPC deadline (no timeout_s) ends the call and stops its loop and pool calls."""
    _wait_idle(stub, slow_metadata)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=32), metadata=slow_metadata,
                      timeout=3.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_more_pool_calls(SLOW_APP)
    _wait_idle(stub, slow_metadata, tries=10)


def test_an_oversized_request_is_invalid_argument_naming_it(stub, main_metadata, app_config):
    limit = app_config.limits.max_grpc_message_bytes
    request = pb.GenerateRequest(prompt="x", request_id="r" * 100, policy="draft")
    request.messages.add(role="system", content="y" * (limit + 1))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=main_metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request:"), info.value.details()


@pytest.mark.parametrize("method,call", [("Generate", "unary_unary"), ("GenerateStream", "unary_stream")])
@pytest.mark.parametrize("data", [b"\x0a\x03\xff\xfeA", b"\xff\xff\xff", b"\x0a\x10abc"],
                         ids=["bad-utf8", "bad-tag", "truncated"])
def test_bytes_that_do_not_parse_are_invalid_argument_naming_request(grpc_channel, main_metadata, method, call, data):
    """A broken client serializer: grpc's own parser would answer UNKNOWN with protobuf's exception text."""
    rpc = getattr(grpc_channel, call)(f"/arbitrage.v1.ArbitrageService/{method}",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        reply = rpc(data, metadata=main_metadata, timeout=30)
        if call == "unary_stream":
            list(reply)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("request: is not a valid arbitrage.v1.GenerateRequest message")


@pytest.mark.parametrize("method,call", [("Check", "unary_unary"), ("Watch", "unary_stream")])
def test_health_bytes_that_do_not_parse_are_invalid_argument_naming_request(grpc_channel, main_metadata, method,
                                                                           call):
    """The health service parses through the same tolerant registration as the API."""
    rpc = getattr(grpc_channel, call)(f"/grpc.health.v1.Health/{method}",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        reply = rpc(b"\x0a\x03\xff\xfeA", metadata=main_metadata, timeout=30)
        if call == "unary_stream":
            next(iter(reply))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("request: is not a valid grpc.health.v1.HealthCheckRequest message")
