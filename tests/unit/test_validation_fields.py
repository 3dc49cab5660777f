"""Request fields: OpenAI fields that would change the output are refused (not ignored),
nullable OpenAI fields take null, chat errors name the message that is the problem, and the
operator's policy limits (``policy.allowed``, ``policy.threshold_override``)."""
from __future__ import annotations

import asyncio

import pytest
from fake_pools import PoolRecord, coordinator
from pydantic import ValidationError

from arbitrage_common.config import AppConfig, LimitsSpec, ModelSpec, PolicySpec, PoolSpec, PoolsSpec
from arbitrage_common.errors import InvalidArgument
from services.validation import ChatCompletionBody, CompletionBody, RequestFields, prepare

PROMPT = "Start with 12. Add 3."
CHAT = [{"role": "user", "content": PROMPT}]


def _cfg(policy: PolicySpec | None = None) -> AppConfig:
    pool = PoolSpec(model=ModelSpec(path="m"))
    return AppConfig(pools=PoolsSpec(draft=pool, target=pool, router=pool, prm=pool),
                     limits=LimitsSpec(max_prompt_chars=50), policy=policy or PolicySpec())


def _refused_field(make, cfg: AppConfig | None = None) -> str:
    cfg = cfg or _cfg()
    with pytest.raises(InvalidArgument) as info:
        prepare(make().fields(cfg), cfg)
    return info.value.field


# -- OpenAI fields ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("stop_token_ids", [13]), ("min_tokens", 50), ("ignore_eos", True), ("guided_json", {"type": "object"}),
    ("guided_choice", ["yes", "no"]), ("guided_regex", "[0-9]+"), ("guided_grammar", "root ::= x"),
    ("structured_outputs", {"choice": ["a"]}), ("bad_words", ["Answer"]), ("reasoning_effort", "high"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}), ("tool_choice", "required"),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}), ("best_of", True),
    ("use_beam_search", True), ("length_penalty", 0.5), ("allowed_token_ids", [1, 2]),
    ("truncate_prompt_tokens", 16), ("prompt_logprobs", 0), ("chat_template", "{{ messages }}"),
    ("chat_template_kwargs", {"enable_thinking": False}), ("continue_final_message", True), ("verbosity", "low"),
])
@pytest.mark.parametrize("chat", [True, False])
def test_output_changing_fields_are_refused_naming_the_field(name, value, chat):
    def make():
        return ChatCompletionBody(messages=CHAT, **{name: value}) if chat else CompletionBody(prompt=PROMPT,
                                                                                            **{name: value})
    assert _refused_field(make) == name


@pytest.mark.parametrize("extra", [
    {"tool_choice": None}, {"tool_choice": "none"}, {"tool_choice": "auto"}, {"modalities": ["text"]},
    {"stop_token_ids": []}, {"min_tokens": 0}, {"ignore_eos": False}, {"bad_words": []}, {"guided_json": None},
    {"reasoning_effort": None}, {"audio": None}, {"prediction": None}, {"structured_outputs": None},
    {"use_beam_search": False}, {"length_penalty": 1.0}, {"allowed_token_ids": None}, {"chat_template_kwargs": {}},
    {"continue_final_message": False}, {"verbosity": None},
])
def test_those_fields_at_their_do_nothing_values_pass(extra):
    body = ChatCompletionBody(messages=CHAT, **extra)
    assert prepare(body.fields(_cfg()), _cfg()).request.prompt == PROMPT


@pytest.mark.parametrize("model", [CompletionBody, ChatCompletionBody])
def test_n_and_stream_take_null_as_their_defaults(model):
    body = model.model_validate({"prompt": PROMPT, "messages": CHAT, "n": None, "stream": None})
    assert (body.n, body.stream) == (1, False)
    with pytest.raises(ValidationError):
        model.model_validate({"prompt": PROMPT, "messages": CHAT, "stream": "yes"})


def test_completions_take_max_completion_tokens_as_chat_does():
    body = CompletionBody(prompt=PROMPT, max_completion_tokens=7)
    assert prepare(body.fields(_cfg()), _cfg()).request.max_new_tokens == 7
    assert _refused_field(lambda: CompletionBody(prompt=PROMPT, max_completion_tokens=0)) == "max_completion_tokens"
    assert _refused_field(lambda: CompletionBody(prompt=PROMPT, max_completion_tokens=5, max_tokens=5)) == \
        _refused_field(lambda: ChatCompletionBody(messages=CHAT, max_completion_tokens=5, max_tokens=5)) == \
        "max_tokens"


# -- chat errors name the message ---------------------------------------------------------------
@pytest.mark.parametrize("messages,field", [
    ([("system", "Be brief."), ("user", " ")], "messages[1].content"),
    ([("user", PROMPT), ("assistant", "ok"), ("user", "x" * 51)], "messages[2].content"),
    ([("user", "x" * 51), ("assistant", "ok"), ("user", "")], "messages[2].content"),
])
def test_an_empty_or_overlong_problem_names_its_message(messages, field):
    with pytest.raises(InvalidArgument) as info:
        prepare(RequestFields(messages=messages), _cfg())
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_a_prompt_over_the_context_names_its_message():
    record = PoolRecord(context=16, tokens=100)
    coord = coordinator(record)
    fields = RequestFields(messages=[("system", "Be brief."), ("user", PROMPT)], policy="draft")
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(coord.open_stream(fields))
    assert info.value.field == "messages[1].content" and "is 100 tokens for the" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(coord.open_stream(RequestFields(prompt=PROMPT, policy="draft")))
    assert info.value.field == "prompt"


# -- operator limits on policies and thresholds --------------------------------------------------
def test_policy_allowed_must_name_known_policies_and_include_the_default():
    assert PolicySpec(allowed=["arbitrage", "draft"]).allowed == ["arbitrage", "draft"]
    with pytest.raises(ValidationError, match="unknown policy 'orcale'"):
        PolicySpec(allowed=["arbitrage", "orcale"])
    with pytest.raises(ValidationError, match="must include the default policy 'arbitrage'"):
        PolicySpec(allowed=["draft"])
    assert PolicySpec(default="rsd", allowed=["rsd"]).allowed == ["rsd"]


def test_defaults_stay_out_of_renderings():
    assert set(PolicySpec().model_dump(mode="json")) == {"default", "threshold"}
    assert PolicySpec(allowed=["arbitrage"], threshold_override=False).model_dump(mode="json")["allowed"] == \
        ["arbitrage"]


def test_a_policy_the_operator_did_not_allow_is_refused():
    cfg = _cfg(PolicySpec(allowed=["arbitrage", "draft", "rsd"]))
    assert prepare(RequestFields(prompt=PROMPT, policy="draft"), cfg).policy == "draft"
    assert prepare(RequestFields(prompt=PROMPT), cfg).policy == "arbitrage"
    for name in ("oracle", "target"):
        with pytest.raises(InvalidArgument, match=f"'{name}' is not allowed on this server; allowed: "
                                                  "arbitrage, draft, rsd") as info:
            prepare(RequestFields(prompt=PROMPT, policy=name), cfg)
        assert info.value.field == "policy"
    with pytest.raises(InvalidArgument) as info:  # an unknown name is still 'unknown policy'
        prepare(RequestFields(prompt=PROMPT, policy="nope"), cfg)
    assert "unknown policy" in str(info.value)
    # OpenAI clients pick the policy by model: the error names the field they sent
    assert _refused_field(lambda: CompletionBody(model="oracle", prompt=PROMPT), cfg) == "model"
    assert _refused_field(lambda: CompletionBody(policy="oracle", prompt=PROMPT), cfg) == "policy"
    assert prepare(CompletionBody(model="arbitrage-serve", prompt=PROMPT).fields(cfg), cfg).policy == "arbitrage"


def test_an_explicit_threshold_is_refused_when_the_operator_turned_overrides_off():
    cfg = _cfg(PolicySpec(threshold=0.6, threshold_override=False))
    assert prepare(RequestFields(prompt=PROMPT), cfg).threshold == 0.6
    for fields in (RequestFields(prompt=PROMPT, threshold=0.0), RequestFields(prompt=PROMPT, threshold=0.6)):
        with pytest.raises(InvalidArgument, match="^threshold: ") as info:
            prepare(fields, cfg)
        assert info.value.field == "threshold"
    assert _refused_field(lambda: ChatCompletionBody(messages=CHAT, threshold=0.0), cfg) == "threshold"
