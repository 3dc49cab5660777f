"""Request validation and wire conversion of the service, without Ray."""
from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from arbitrage_common.accounting import LoopResult, StepRecord, Usage
from arbitrage_common.config import AppConfig, LimitsSpec, ModelSpec, PolicySpec, PoolSpec, PoolsSpec
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument
from protos.arbitrage.v1 import arbitrage_pb2 as pb
from services import convert
from services.validation import (
    ChatCompletionBody,
    CompletionBody,
    GenerateBody,
    RequestFields,
    field_from_loc,
    fields_from_proto,
    prepare,
)

PROMPT = "Start with 12. Add 3."


def _cfg(**kw) -> AppConfig:
    pool = PoolSpec(model=ModelSpec(path="m"))
    return AppConfig(pools=PoolsSpec(draft=pool, target=pool, router=pool, prm=pool),
                     limits=LimitsSpec(max_prompt_chars=50, max_steps=10, default_max_steps=4,
                                       request_timeout_s=30), **kw)


def test_defaults_from_config():
    p = prepare(RequestFields(prompt=PROMPT), _cfg(policy=PolicySpec(default="rsd", threshold=0.7)))
    assert (p.policy, p.threshold) == ("rsd", 0.7)
    assert p.request.max_steps == 4 and p.request.deadline_s == 30 and p.request.options.temperature == 0
    assert len(p.request_id) == 32


def test_another_policy_gets_its_own_default_threshold():
    p = prepare(RequestFields(prompt=PROMPT, policy="oracle"), _cfg(policy=PolicySpec(default="rsd", threshold=0.7)))
    assert (p.policy, p.threshold) == ("oracle", 0.0)


def test_timeout_is_capped_by_the_limit():
    assert prepare(RequestFields(prompt=PROMPT, timeout_s=5), _cfg()).request.deadline_s == 5
    assert prepare(RequestFields(prompt=PROMPT, timeout_s=500), _cfg()).request.deadline_s == 30


@pytest.mark.parametrize("fields,field", [
    (RequestFields(), "prompt"),
    (RequestFields(prompt=" \n"), "prompt"),
    (RequestFields(prompt="x" * 51), "prompt"),
    (RequestFields(prompt=PROMPT, messages=[("user", PROMPT)]), "prompt"),
    (RequestFields(messages=[("system", "x")]), "messages"),
    (RequestFields(messages=[("robot", "x")]), "messages[0].role"),
    (RequestFields(prompt=PROMPT, policy="nope"), "policy"),
    (RequestFields(prompt=PROMPT, policy="arbitrage", threshold=1.5), "threshold"),
    (RequestFields(prompt=PROMPT, threshold=float("nan")), "threshold"),
    (RequestFields(prompt=PROMPT, max_steps=0), "max_steps"),
    (RequestFields(prompt=PROMPT, max_steps=-1), "max_steps"),
    (RequestFields(prompt=PROMPT, max_steps=11), "max_steps"),
    (RequestFields(prompt=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (RequestFields(prompt=PROMPT, temperature=-1.0), "temperature"),
    (RequestFields(prompt=PROMPT, temperature=2.5), "temperature"),  # above OpenAI's 2
    (RequestFields(prompt=PROMPT, temperature=1e308), "temperature"),  # float32 inf: a uniform draw
    (RequestFields(prompt=PROMPT, timeout_s=0), "timeout_s"),
    (RequestFields(prompt=PROMPT, request_id="r" * 200), "request_id"),
    (RequestFields(prompt=PROMPT, seed=2**63), "seed"),
    (RequestFields(prompt=PROMPT, seed=-2**63 - 1), "seed"),
    (RequestFields(prompt=PROMPT, seed=10**30), "seed"),
    (RequestFields(messages=[]), "messages"),
    (RequestFields(prompt="Start with 1.\ud800"), "prompt"),
    (RequestFields(messages=[("system", "x\udfff"), ("user", PROMPT)]), "messages[0].content"),
    (RequestFields(prompt=PROMPT, request_id="r-\ud800"), "request_id"),
    (RequestFields(prompt=PROMPT, max_new_tokens=0, budget_field="max_tokens"), "max_tokens"),
])
def test_bad_input_names_the_field(fields, field):
    with pytest.raises(InvalidArgument) as info:
        prepare(fields, _cfg())
    assert info.value.field == field
    assert convert.classify(info.value).http_status == 422
    assert convert.classify(info.value).message.startswith(f"{field}:")


def test_proto_optionals_stay_unset():
    f = fields_from_proto(pb.GenerateRequest(prompt=PROMPT))
    assert (f.threshold, f.max_steps, f.temperature, f.seed, f.timeout_s, f.policy) == (None,) * 6
    f = fields_from_proto(pb.GenerateRequest(prompt=PROMPT, max_steps=0, threshold=0.0,
                                             sampling=pb.SamplingOptions(temperature=0.5, seed=3)))
    assert (f.max_steps, f.threshold, f.temperature, f.seed) == (0, 0.0, 0.5, 3)


def test_empty_messages_are_unset_over_http_as_over_grpc():
    """The proto's rule (one of prompt / messages non-empty) reads the same on both transports."""
    over_http = prepare(GenerateBody(prompt=PROMPT, messages=[]).fields(), _cfg())
    over_grpc = prepare(fields_from_proto(pb.GenerateRequest(prompt=PROMPT)), _cfg())
    assert over_http.request.prompt == over_grpc.request.prompt == PROMPT


def test_chat_prompt_is_the_last_user_message():
    f = ChatCompletionBody(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": PROMPT}], max_completion_tokens=9).fields(_cfg())
    p = prepare(f, _cfg())
    assert p.request.prompt == PROMPT and p.request.max_new_tokens == 9


def test_openai_model_selects_the_policy():
    assert CompletionBody(model="rsd", prompt=PROMPT).fields(_cfg()).policy == "rsd"
    assert CompletionBody(model="arbitrage-serve", prompt=[PROMPT]).fields(_cfg()).policy is None
    with pytest.raises(InvalidArgument, match="model"):
        CompletionBody(model="gpt-4", prompt=PROMPT).fields(_cfg())
    with pytest.raises(InvalidArgument, match="^n:"):
        CompletionBody(prompt=PROMPT, n=2).fields(_cfg())


def test_a_seed_at_either_end_of_64_bits_is_accepted():
    for seed in (-2**63, 2**63 - 1):
        assert prepare(RequestFields(prompt=PROMPT, seed=seed, temperature=0.5), _cfg()).request.options.seed == seed


def test_a_temperature_too_small_for_float32_samples_greedily_and_one_below_vllms_floor_is_raised_to_it():
    def temperature(t: float) -> float:
        return prepare(RequestFields(prompt=PROMPT, temperature=t), _cfg()).request.options.temperature

    assert temperature(1e-50) == 0.0
    assert temperature(1e-3) == 0.01  # as vLLM would run it: the same on both backends
    assert temperature(0.7) == 0.7


@pytest.mark.parametrize("body", [{"threshold": True}, {"max_steps": True}, {"max_steps": "8"}, {"max_steps": 8.0},
                                  {"seed": 1.5}, {"temperature": "0.5"}, {"stream": "yes"}, {"prompt": 5}])
def test_http_bodies_take_json_types_as_they_are(body):
    """Pydantic's lax mode would turn true into 1 and "8" into 8: values gRPC could not send."""
    with pytest.raises(ValidationError) as info:
        GenerateBody(**{"prompt": PROMPT, **body})
    assert field_from_loc(("body",) + info.value.errors()[0]["loc"], info.value.errors()[0]["type"]) == next(iter(body))


def test_a_json_int_is_a_float_field():
    assert GenerateBody(prompt=PROMPT, threshold=1, temperature=0, timeout_s=5).threshold == 1.0


@pytest.mark.parametrize("body,field", [
    (CompletionBody(prompt=PROMPT, max_tokens=0), "max_tokens"),
    (CompletionBody(prompt=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (CompletionBody(prompt=PROMPT, max_tokens=5, max_new_tokens=5), "max_new_tokens"),
    (ChatCompletionBody(messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=0), "max_completion_tokens"),
    (ChatCompletionBody(messages=[{"role": "user", "content": PROMPT}], max_tokens=10**9), "max_tokens"),
    (ChatCompletionBody(messages=[{"role": "user", "content": PROMPT}], max_tokens=5, max_completion_tokens=5),
     "max_tokens"),
    (ChatCompletionBody(messages=[]), "messages"),
    (CompletionBody(model="arbitrage", policy="rsd", prompt=PROMPT), "policy"),
])
def test_openai_errors_name_the_field_the_client_sent(body, field):
    with pytest.raises(InvalidArgument) as info:
        prepare(body.fields(_cfg()), _cfg())
    assert info.value.field == field


def test_openai_budget_reaches_the_loop_under_any_of_its_names():
    for body in (CompletionBody(prompt=PROMPT, max_tokens=7), CompletionBody(prompt=PROMPT, max_new_tokens=7),
                 ChatCompletionBody(messages=[{"role": "user", "content": PROMPT}], max_tokens=7)):
        assert prepare(body.fields(_cfg()), _cfg()).request.max_new_tokens == 7


# logprobs 0 asks a completion for the chosen tokens' logprobs: not a do-nothing value
@pytest.mark.parametrize("extra", [{"stop": ["x"]}, {"stop": "\n"}, {"logprobs": 2}, {"logprobs": True}, {"logprobs": 0},
                                   {"echo": True}, {"best_of": 3}, {"top_p": 0.9}, {"presence_penalty": 0.5},
                                   {"logit_bias": {"5": 1}}, {"top_k": 5}])
def test_openai_fields_that_would_change_the_output_are_refused_not_ignored(extra):
    with pytest.raises(InvalidArgument) as info:
        CompletionBody(prompt=PROMPT, **extra).fields(_cfg())
    assert info.value.field == next(iter(extra))


def test_openai_fields_at_their_do_nothing_values_and_unknown_fields_pass():
    body = CompletionBody(prompt=PROMPT, stop=None, logprobs=None, echo=False, top_p=1, presence_penalty=0,
                          user="u-1", stream_options=None)
    assert body.fields(_cfg()).prompt == PROMPT


def test_generate_body_forbids_unknown_fields():
    with pytest.raises(ValidationError, match="bogus"):
        GenerateBody(prompt=PROMPT, bogus=1)


@pytest.mark.parametrize("loc,kind,field", [
    (("body", 7), "json_invalid", "body"),
    (("body",), "missing", "body"),
    (("body", "max_steps"), "int_parsing", "max_steps"),
    (("body", "messages", 0, "role"), "missing", "messages[0].role"),
    (("body", "prompt", "str"), "string_type", "prompt"),
])
def test_field_from_loc(loc, kind, field):
    assert field_from_loc(loc, kind) == field


def _result() -> LoopResult:
    steps = [StepRecord(0, "12 + 3 = 15", "draft", 0.2, False, None, 11, "delimiter", {"draft": 1.5, "router": 0.5}),
             StepRecord(1, "Answer: 15", "target", 0.9, True, "Answer: 16", 10, "eos", {"target": 2.0})]
    usage = Usage(draft_tokens_kept=11, draft_tokens_discarded=10, target_tokens=10,
                  steps_by_source={"draft": 1, "target": 1}, router_calls=2)
    return LoopResult(PROMPT, steps, "eos", usage, 0.25)


def test_result_json_and_proto_agree():
    prepared = prepare(RequestFields(prompt=PROMPT, request_id="r1"), _cfg())
    d = convert.result_json(_result(), prepared)
    msg = convert.result_proto(_result(), prepared)
    assert d["answer"] == 15 == msg.answer and d["text"] == msg.text == "12 + 3 = 15\n\nAnswer: 15"
    assert [s.source for s in msg.steps] == [pb.SOURCE_DRAFT, pb.SOURCE_TARGET]
    assert msg.steps[1].draft_discarded and msg.steps[0].stage_ms.draft == 1.5
    assert msg.usage.acceptance_rate == pytest.approx(11 / 21) == d["usage"]["acceptance_rate"]
    assert msg.usage.target_steps == 1 and msg.finish_reason == "eos" and msg.request_id == "r1"
    assert msg.total_ms == 250.0


def test_no_answer_leaves_the_optional_unset():
    r = _result()
    r.steps.pop()
    prepared = prepare(RequestFields(prompt=PROMPT), _cfg())
    assert not convert.result_proto(r, prepared).HasField("answer")
    assert convert.result_json(r, prepared)["answer"] is None


def test_an_answer_step_the_token_budget_cut_gives_no_answer():
    """``Answer: 91`` cut from ``Answer: 914`` by max_new_tokens is not an answer."""
    r = _result()
    r.steps[-1] = dataclasses.replace(r.steps[-1], text="Answer: 1", finish_reason="length")
    r.finish_reason = "length"
    prepared = prepare(RequestFields(prompt=PROMPT), _cfg())
    assert r.text.endswith("Answer: 1")
    assert convert.result_json(r, prepared)["answer"] is None
    assert not convert.result_proto(r, prepared).HasField("answer")
    openai = convert.openai_response(r, prepared, "arbitrage", chat=False)
    assert openai["arbitrage"]["answer"] is None


@pytest.mark.parametrize("answer,expected", [
    ("123456789012345678901234567890", None),          # 30 digits: no int64 holds it
    ("-123456789012345678901234567890", None),
    (str(2**63), None), (str(-(2**63) - 1), None),   # one past each end
    (str(2**63 - 1), 2**63 - 1), (str(-(2**63)), -(2**63)),
])
def test_an_answer_outside_int64_is_left_unset_in_json_and_proto(answer, expected):
    r = _result()
    r.steps[-1] = dataclasses.replace(r.steps[-1], text=f"Answer: {answer}")
    prepared = prepare(RequestFields(prompt=PROMPT), _cfg())
    assert r.text.endswith(answer)
    assert convert.result_json(r, prepared)["answer"] == expected
    msg = convert.result_proto(r, prepared)  # used to fail: ParseDict refuses an int64 overflow (INTERNAL)
    assert msg.HasField("answer") == (expected is not None)
    if expected is not None:
        assert msg.answer == expected


def test_openai_stream_chunks_concatenate_to_the_text():
    r = _result()
    assert "".join(convert.step_delta(s) for s in r.steps) == r.text


def test_deadline_maps_to_504_and_deadline_exceeded():
    err = convert.classify(DeadlineExceeded(_result()))
    assert err.http_status == 504 and err.grpc_code.name == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("answered", [True, False])
def test_the_grpc_clients_json_is_the_http_apis_json(answered):
    """``arbitrage generate --json`` (client.to_dict of the gRPC reply) prints what /v1/generate
    returns: int answer, "draft"/"target", unset optionals as null."""
    from arbitrage_common.client import to_dict

    r = _result()
    if not answered:
        r.steps.pop()
    prepared = prepare(RequestFields(prompt=PROMPT, request_id="r1"), _cfg())
    assert to_dict(convert.result_proto(r, prepared)) == convert.result_json(r, prepared)
    event = to_dict(pb.GenerateStreamResponse(step=convert.step_proto(r.steps[0])))
    assert event == {"step": convert.step_json(r.steps[0])}
