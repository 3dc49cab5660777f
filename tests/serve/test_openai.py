"""The official openai SDK, unchanged, against the OpenAI-compatible routes."""
from __future__ import annotations

import openai
import pytest
from serve_helpers import main_policy, problems

from arbitrage_common.synthetic import extract_answer


@pytest.fixture(scope="module")
def client(http_url):
    return openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0)


def test_models_list(client, app_config):
    ids = [m.id for m in client.models.list()]
    assert app_config.served_model_name in ids and "arbitrage" in ids


def test_completion(client, engine):
    prompt = problems(1)[0].prompt
    out = client.completions.create(model=main_policy(), prompt=prompt)
    ref = engine.run(prompt, main_policy())
    assert out.object == "text_completion"
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == sum(s.tokens for s in ref.steps)


def test_completion_stream_concatenates_to_the_text(client):
    prompt = problems(2)[1].prompt
    full = client.completions.create(model="arbitrage-serve", prompt=prompt, extra_body={"policy": main_policy()})
    chunks = list(client.completions.create(model="arbitrage-serve", prompt=prompt, stream=True,
                                            extra_body={"policy": main_policy()}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_completion_and_stream(client):
    prompt = problems(3)[2].prompt
    messages = [{"role": "user", "content": prompt}]
    out = client.chat.completions.create(model=main_policy(), messages=messages)
    assert out.choices[0].message.role == "assistant"
    text = out.choices[0].message.content
    assert extract_answer(text) == out.model_extra["arbitrage"]["answer"]
    chunks = list(client.chat.completions.create(model=main_policy(), messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_include_usage_sends_a_last_chunk_with_the_usage_and_nulls_before_it(client, engine):
    prompt = problems(4)[3].prompt
    chunks = list(client.chat.completions.create(model=main_policy(), messages=[{"role": "user", "content": prompt}],
                                                 stream=True, stream_options={"include_usage": True}))
    *steps, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == sum(s.tokens for s in engine.run(prompt, main_policy()).steps)
    assert all(c.usage is None for c in steps) and steps[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1
    plain = list(client.completions.create(model=main_policy(), prompt=prompt, stream=True))
    assert all(c.choices for c in plain)  # no usage-only chunk unless asked


def test_stream_options_without_stream_is_refused_naming_it(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model="draft", prompt="Start with 3.", stream_options={"include_usage": True})
    assert info.value.body["param"] == "stream_options"
    # an empty one asks for nothing: clients that always send it still run (as vLLM takes it)
    assert client.completions.create(model="draft", prompt="Start with 3.", stream_options={}).choices[0].text


def test_threshold_and_max_steps_through_extra_body(client):
    out = client.completions.create(model="rsd", prompt=problems(1)[0].prompt,
                                    extra_body={"threshold": 0.9, "max_steps": 2})
    info = out.model_extra["arbitrage"]
    assert info["policy"] == "rsd" and info["threshold"] == 0.9 and len(info["steps"]) <= 2


@pytest.mark.parametrize("kwargs,param", [
    ({"model": "gpt-4"}, "model"),
    ({"model": "arbitrage", "extra_body": {"threshold": 7}}, "threshold"),
    ({"model": "draft", "extra_body": {"max_steps": 0}}, "max_steps"),
    ({"model": "draft", "max_tokens": 0}, "max_tokens"),
    ({"model": "draft", "stop": ["\n"]}, "stop"),
    ({"model": "draft", "logprobs": 2}, "logprobs"),
    ({"model": "draft", "extra_body": {"max_steps": True}}, "max_steps"),
    ({"model": "draft", "extra_body": {"policy": "rsd"}}, "policy"),
    ({"model": "draft", "seed": 2**64}, "seed"),
])
def test_bad_input_raises_unprocessable_entity_naming_the_param(client, kwargs, param):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(prompt="Start with 3.", **kwargs)
    assert info.value.body["param"] == param


def test_an_empty_chat_is_rejected_naming_messages(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="draft", messages=[])
    assert info.value.body["param"] == "messages"


def test_empty_chat_prompt_is_rejected(client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="draft", messages=[{"role": "user", "content": " "}])
    assert info.value.body["param"] == "messages[0].content"
