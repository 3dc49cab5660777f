"""Hypothesis fuzzing of the running service: random, malformed and extreme request fields
over gRPC, HTTP JSON and the OpenAI routes, in a bounded number of cases. Every answer is a
success or a client error (4xx / a non-INTERNAL status); the service is healthy afterwards.

DEADLINE_EXCEEDED / 504 are allowed: a fuzzed ``timeout_s`` of a millisecond is the
client's own deadline. UNAVAILABLE / 5xx are not: no fault is injected here.
"""
from __future__ import annotations

import json
import math

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import problems

from arbitrage_common.policies import POLICIES
from protos.arbitrage.v1 import arbitrage_pb2 as pb

CASES = 30
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}
PROMPTS = [p.prompt for p in problems(3, seed=99)]

texts = st.one_of(st.sampled_from(PROMPTS), st.text(max_size=300), st.just(""), st.just("\x00" * 10),
                  st.text(min_size=190, max_size=260), st.just(PROMPTS[0] + " 1234567890123456789012345678901234"))
policies = st.one_of(st.sampled_from([*POLICIES, "", "ARBITRAGE", "nope"]), st.text(max_size=40))
# No subnormals: the in-process reference engine sets torch's flush-denormal mode, which
# hypothesis detects and refuses to generate them under.
floats = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
int32 = st.one_of(st.integers(-3, 40), st.integers(-(2**31), 2**31 - 1))
small_timeouts = st.one_of(st.none(), st.floats(min_value=1e-3, max_value=0.05, allow_subnormal=False), floats)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                                     st.floats(allow_nan=False, allow_subnormal=False), st.text(max_size=30)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=6)


def _grpc_request(data) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=data.draw(texts), policy=data.draw(policies),
                             request_id=data.draw(st.text(max_size=200)))
    if data.draw(st.booleans()):
        req.messages.extend(pb.ChatMessage(role=data.draw(st.sampled_from(["user", "system", "bot", ""])),
                                           content=data.draw(texts)) for _ in range(data.draw(st.integers(0, 3))))
    for name, strategy in (("threshold", floats), ("max_steps", int32), ("max_new_tokens", int32),
                           ("timeout_s", small_timeouts)):
        value = data.draw(st.one_of(st.none(), strategy))
        if value is not None:
            setattr(req, name, value)
    if data.draw(st.booleans()):
        req.sampling.temperature = data.draw(floats)
        req.sampling.seed = data.draw(st.integers(-(2**63), 2**63 - 1))
    return req


@FUZZ
@given(data=st.data(), streaming=st.booleans())
def test_fuzzed_grpc_requests_get_clear_answers(stub, main_metadata, data, streaming):
    request = _grpc_request(data)
    try:
        if streaming:
            messages = list(stub.GenerateStream(request, metadata=main_metadata, timeout=120))
            assert messages[-1].WhichOneof("event") == "summary"
        else:
            stub.Generate(request, metadata=main_metadata, timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() in GRPC_OK, (exc.code(), exc.details(), request)
        assert "Traceback" not in (exc.details() or "") and "/models/" not in (exc.details() or "")


def _body(data, chat: bool, openai: bool) -> dict:
    body: dict = {}
    fields = ["policy", "threshold", "max_steps", "seed", "temperature", "request_id", "timeout_s", "stream"]
    fields += ["model", "max_tokens", "n"] if openai else ["max_new_tokens"]
    for name in fields:
        if data.draw(st.booleans()):
            body[name] = data.draw(json_values)
    if data.draw(st.booleans()):  # mostly well-typed, so some cases reach the step loop
        body["max_steps"] = data.draw(st.integers(1, 4))
        body.pop("stream", None)
        body.pop("timeout_s", None)
    if chat:
        body["messages"] = data.draw(st.one_of(
            st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]), "content": texts}),
                     max_size=3), json_values))
    else:
        body["prompt"] = data.draw(st.one_of(texts, json_values))
    return body


@FUZZ
@given(data=st.data(), route=st.sampled_from(["/v1/generate", "/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_http_bodies_get_clear_answers(http_url, data, route):
    body = _body(data, chat=route.endswith("chat/completions"), openai=route != "/v1/generate")
    raw = json.dumps(body, allow_nan=True)
    if data.draw(st.integers(0, 9)) == 0:  # sometimes not JSON at all
        raw = data.draw(st.binary(max_size=200)).decode("latin-1")
    reply = requests.post(http_url + route, data=raw.encode(), headers={"content-type": "application/json"}, timeout=120)
    assert reply.status_code in (200, 401, 404, 413, 422, 429, 503, 504) and reply.status_code != 500, \
        (reply.status_code, reply.text[:300], raw[:300])
    assert reply.status_code != 503, reply.text[:300]  # no fault here: overload would be a bug too
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert error["code"] != "internal" and "Traceback" not in error["message"], error
    elif body.get("stream") is True:  # a stream may end with an error event, never an internal one
        assert '"code": "internal"' not in reply.text and '"unavailable"' not in reply.text, reply.text[-300:]


def test_service_is_healthy_after_fuzzing(grpc_channel, main_metadata, stub, engine):
    health = health_pb2_grpc.HealthStub(grpc_channel)
    assert health.Check(health_pb2.HealthCheckRequest(), metadata=main_metadata).status == \
        health_pb2.HealthCheckResponse.SERVING
    prompt = PROMPTS[0]
    reply = stub.Generate(pb.GenerateRequest(prompt=prompt, policy="draft"), metadata=main_metadata)
    assert reply.text == engine.run(prompt, "draft").text


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e308, -1e-308])
def test_extreme_floats_are_invalid_argument_or_served(stub, main_metadata, value):
    request = pb.GenerateRequest(prompt=PROMPTS[1], threshold=value, timeout_s=value)
    try:
        stub.Generate(request, metadata=main_metadata, timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED), exc.details()
