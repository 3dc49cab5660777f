"""The HTTP API's refusals on the real Coordinator over fake pools (no Ray): bodies that are
not JSON, unknown models, HEAD on the read-only routes, failures the OpenAI SDK must not
resend, and that every refusal is counted once with a bounded policy label (the policy the client named when it is a known one, else
'none'; the request's own policy once it is validated)."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from fake_pools import PoolRecord, coordinator, count_records
from fastapi.testclient import TestClient

from services.http_api import build_http_api, is_json_content_type

PROMPT = "Start with 2. Add 3."


@pytest.fixture
def api():
    coord = coordinator()
    return coord, count_records(coord), TestClient(build_http_api(coord))


def _error(reply) -> dict:
    return reply.json()["error"]


# -- bodies that are not JSON ---------------------------------------------------------------
@pytest.mark.parametrize("content_type,shown", [("text/plain", "'text/plain'"),
                                                ("application/x-www-form-urlencoded",
                                                 "'application/x-www-form-urlencoded'"),
                                                (None, "none")])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions"])
def test_json_sent_without_a_json_content_type_is_422_naming_the_content_type(api, path, content_type, shown):
    _, records, client = api
    body = {"prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}]}
    if path == "/v1/generate":
        body.pop("messages")
    headers = {"content-type": content_type} if content_type else {}
    reply = client.post(path, content=json.dumps(body).encode(), headers=headers)
    if content_type is None:  # httpx sends no Content-Type for raw content
        assert "content-type" not in {k.lower() for k in reply.request.headers}
    assert reply.status_code == 422, reply.text
    assert _error(reply) == {"message": f"body: Content-Type must be application/json, got {shown}",
                             "type": "invalid_request_error", "param": "body", "code": "invalid_argument"}
    assert records == [("openai" if path != "/v1/generate" else "http", "none", "invalid_argument")]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_with_parameters_or_a_json_suffix_are_accepted(api, content_type):
    _, records, client = api
    reply = client.post("/v1/generate", content=json.dumps({"prompt": PROMPT, "policy": "draft"}).encode(),
                        headers={"content-type": content_type})
    assert reply.status_code == 200, reply.text
    assert records == [("http", "draft", "ok")]


def test_is_json_content_type():
    assert is_json_content_type("application/json;charset=UTF-8")
    assert is_json_content_type("application/problem+json")
    assert not is_json_content_type("application/jsonx")
    assert not is_json_content_type("text/json")
    assert not is_json_content_type("")
    assert not is_json_content_type(None)


@pytest.mark.parametrize("raw,message", [
    ('{"prompt": "caf\xe9"}'.encode("latin-1"), "body: is not UTF-8 JSON text (invalid byte at position 15)"),
    (b'{"prompt": "x", "max_steps": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "body: is JSON nested too deeply to parse"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "body: holds an integer of more than 4300 digits"),
])
def test_a_body_that_is_not_json_text_is_422_naming_body_not_400(api, raw, message):
    _, records, client = api
    reply = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert _error(reply) == {"message": message, "type": "invalid_request_error", "param": "body",
                             "code": "invalid_argument"}
    assert records == [("http", "none", "invalid_argument")]


def test_malformed_json_stays_422_naming_body(api):
    _, records, client = api
    reply = client.post("/v1/generate", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert reply.status_code == 422 and _error(reply)["param"] == "body"
    assert records == [("http", "none", "invalid_argument")]


# -- models and HEAD ------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_model_whose_pool_is_not_configured_is_refused_naming_model(path):
    """The client sent ``model``, not ``policy``: the refusal names what it sent."""
    coord = coordinator(pools={"router": None}, policy={"default": "rsd"})
    records, client = count_records(coord), TestClient(build_http_api(coord))
    body = {"model": "arbitrage", "prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}]}
    body.pop("messages" if path == "/v1/completions" else "prompt")
    reply = client.post(path, json=body)
    assert reply.status_code == 422, reply.text
    error = _error(reply)
    assert (error["param"], error["code"]) == ("model", "invalid_argument")
    assert error["message"].startswith("model: 'arbitrage' needs a router pool, and none is configured"), error
    assert records == [("openai", "arbitrage", "invalid_argument")]


def test_an_unknown_model_is_404_model_not_found_in_openais_shape(api):
    _, records, client = api
    reply = client.get("/v1/models/nope")
    assert reply.status_code == 404
    error = _error(reply)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert error["message"].startswith("model 'nope' does not exist; expected one of 'arbitrage-serve', ")
    assert "'draft'" in error["message"]
    assert records == [("http", "none", "model_not_found")]
    assert client.get("/v1/models/draft").json()["id"] == "draft"


def test_a_model_id_with_a_slash_is_retrieved(api):
    """Hugging Face style ids (org/model) are common served_model_names."""
    coord, _, client = api
    coord.cfg = coord.cfg.model_copy(update={"served_model_name": "acme/arbitrage-7b"})
    assert client.get("/v1/models/acme/arbitrage-7b").json()["id"] == "acme/arbitrage-7b"
    assert _error(client.get("/v1/models/acme/nope"))["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/v1/models", "/v1/models/draft"])
def test_head_is_answered_on_the_read_only_routes(api, path):
    _, records, client = api
    reply = client.head(path)
    assert reply.status_code == 200 and reply.content == b""
    assert records == []


# -- every refusal is counted once, with a bounded label -------------------------------------
@pytest.mark.parametrize("path,body,label", [
    ("/v1/generate", {"prompt": 5}, "none"),  # schema error, no policy named
    ("/v1/generate", {"prompt": 5, "policy": "rsd"}, "rsd"),  # schema error, a known policy named
    ("/v1/generate", {"prompt": PROMPT, "bogus": 1, "policy": "not-a-policy"}, "none"),
    ("/v1/chat/completions", {"model": "oracle", "messages": "hi"}, "oracle"),  # the model names the policy
    ("/v1/generate", {"prompt": "", "policy": "target"}, "target"),  # refused in validation
    ("/v1/generate", {"prompt": ""}, "none"),  # never the default policy: none was chosen
    ("/v1/completions", {"model": "arbitrage-serve", "prompt": PROMPT, "n": 2}, "none"),
    ("/v1/completions", {"model": "draft", "prompt": PROMPT, "n": 2}, "draft"),
])
def test_a_refused_request_is_counted_once_labelled_with_the_policy_it_named(api, path, body, label):
    _, records, client = api
    reply = client.post(path, json=body)
    assert reply.status_code == 422, reply.text
    assert records == [("openai" if path != "/v1/generate" else "http", label, "invalid_argument")]


@pytest.mark.parametrize("method,path,status", [("get", "/v1/generate", "method_not_allowed"),
                                                ("get", "/nope", "not_found")])
def test_unknown_routes_and_methods_are_counted(api, method, path, status):
    _, records, client = api
    getattr(client, method)(path)
    assert records == [("http", "none", status)]


def test_a_pool_down_after_validation_is_labelled_with_the_requests_policy(api):
    from ray.exceptions import RayActorError

    coord, records, client = api
    coord.pool_record.fail["draft"] = RayActorError()
    reply = client.post("/v1/generate", json={"prompt": PROMPT})  # no policy named: the default runs
    assert reply.status_code == 503
    assert records == [("http", coord.cfg.policy.default, "unavailable")]


# -- what the OpenAI SDK does with a failure ----------------------------------------------------
@pytest.mark.parametrize("fail,code", [({}, "deadline_exceeded"), ({"router": ValueError("bug")}, "internal")])
def test_the_openai_sdk_does_not_resend_a_passed_deadline_or_a_bug(fail, code):
    """It retries a 5xx twice unless the reply says ``x-should-retry: false``: the same request
    would run three times and be counted three times."""
    openai = pytest.importorskip("openai")
    coord = coordinator(PoolRecord(fail=fail))
    records = count_records(coord)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused",
                           http_client=TestClient(build_http_api(coord)))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="arbitrage", messages=[{"role": "user", "content": PROMPT}],
                                       extra_body={"timeout_s": 1e-9} if not fail else None)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert records == [("openai", "arbitrage", code)]


# -- a failure while the finished response is rendered ---------------------------------------
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_a_response_that_fails_to_render_is_the_apis_500_counted_once(api, path, monkeypatch):
    """Rendering runs inside the request's error handling: the client gets the API's error
    shape (not Starlette's bare text 500) and the request is counted as what it was."""
    from services import convert

    def broken(*_args, **_kwargs):
        raise RuntimeError("render bug")

    monkeypatch.setattr(convert, "result_json", broken)
    monkeypatch.setattr(convert, "openai_response", broken)
    _, records, client = api
    reply = client.post(path, json={"prompt": PROMPT, "model": "draft"}
                        if path != "/v1/generate" else {"prompt": PROMPT, "policy": "draft"})
    assert reply.status_code == 500 and reply.headers["x-should-retry"] == "false", reply.text
    assert _error(reply)["code"] == "internal"
    assert [status for *_, status in records] == ["internal"]


def test_an_answer_longer_than_python_parses_leaves_answer_unset(monkeypatch):
    """``Answer: `` and 5000 digits: past int64 and past Python's digit cap; no answer, no 500."""
    import fake_pools
    from fake_pools import FakePool

    real = FakePool._generation

    async def long_answer(self, prefix, session):
        made = await real(self, prefix, session)
        return dataclasses.replace(made, text="Answer: " + "9" * 5000) if made.text.startswith("Answer") else made

    monkeypatch.setattr(fake_pools.FakePool, "_generation", long_answer)
    client = TestClient(build_http_api(coordinator()))
    reply = client.post("/v1/generate", json={"prompt": PROMPT, "policy": "draft"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["answer"] is None and reply.json()["text"].endswith("9" * 5000)


# -- a client gone before a stream's body starts --------------------------------------------------
def test_a_stream_whose_client_left_before_its_body_started_is_counted_once_as_cancelled():
    """Starlette (ASGI spec 2.3: a disconnect listener) cancels a body it never read when the
    client is gone: the request is still counted, once, and its stream closed."""
    coord = coordinator()
    records = count_records(coord)
    app = build_http_api(coord)
    body = json.dumps({"prompt": PROMPT, "policy": "draft", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate",
             "root_path": "", "query_string": b"", "server": ("test", 80), "client": ("client", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def main() -> list[dict]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}  # then the client is gone

        async def send(message: dict) -> None:
            await asyncio.sleep(0)  # a transport's write yields to the loop
            sent.append(message)

        await app(scope, receive, send)
        return sent

    sent = asyncio.run(main())
    assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)  # nothing streamed
    assert records == [("http", "draft", "cancelled")]
    assert coord._inflight == 0  # the stream was closed, not left to the garbage collector
