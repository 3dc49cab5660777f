"""The HTTP API's guards without Ray: API key auth, body size limits, /livez.

``build_http_api`` runs on a fake coordinator (the attributes the routes use), under
FastAPI's TestClient; the body-limit middleware is also driven by raw ASGI messages, to
count a body that arrives in chunks.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json

import pytest
from fastapi.testclient import TestClient

from arbitrage_common.auth import AuthConfigError
from arbitrage_common.config import AppConfig, AuthSpec, LimitsSpec, ModelSpec, PoolSpec, PoolsSpec
from arbitrage_common.errors import InvalidArgument
from services import convert
from services.coordinator import Coordinator
from services.http_api import BodyLimitMiddleware, build_http_api, route_path

LIMIT = 2048
KEY = "test-key-0123"
PROMPT = "Start with 12. Add 3."


class FakeHealth:
    """services.health.PoolHealth as http_api reads it."""

    def __init__(self, serving: bool = True) -> None:
        self.serving = serving
        self.running = {"draft": int(serving), "target": 1}

    async def current(self) -> bool:
        return self.serving


class FakeCoordinator:
    """What services.http_api uses of a Coordinator. ``prepare_request`` records the fields it
    got (so a test sees the body reached the route) and refuses them as bad input. ``records``
    holds (transport, policy label, status) as the real coordinator labels them."""

    def __init__(self, auth: AuthSpec | None = None, api_keys=None, limit: int = LIMIT, fail_with=None):
        pool = PoolSpec(model=ModelSpec(path="m"))
        self.cfg = AppConfig(pools=PoolsSpec(draft=pool, target=pool, router=pool, prm=pool),
                             limits=LimitsSpec(max_body_bytes=limit), auth=auth or AuthSpec())
        if api_keys is not None:
            self.api_keys = api_keys
        self.available = ["draft", "target"]
        self.health = FakeHealth()
        self.opened: list = []
        self.records: list[tuple[str, str, str]] = []
        self.fail_with = fail_with

    def record(self, transport: str, policy: str | None, status: str, started: float | None = None) -> None:
        self.records.append((transport, Coordinator.policy_label(policy), status))

    def reject(self, transport, policy, err, request_id=None, exc=None) -> convert.ApiError:
        self.record(transport, policy, err.code)
        return err

    def fail(self, transport: str, policy: str | None, exc: BaseException, request_id=None) -> convert.ApiError:
        return self.reject(transport, policy, convert.classify(exc), request_id, exc)

    def prepare_request(self, fields):
        self.opened.append(fields)
        if self.fail_with is not None:
            raise self.fail_with
        raise InvalidArgument("policy", "refused by the fake coordinator")

    def list_models(self):
        return {"object": "list", "data": []}


def _client(coord: FakeCoordinator) -> TestClient:
    return TestClient(build_http_api(coord), raise_server_exceptions=True)


def _generate(client: TestClient, headers: dict | None = None, **body):
    return client.post("/v1/generate", json={"prompt": PROMPT, **body}, headers=headers or {})


# -- /livez and /healthz ------------------------------------------------------------------
def test_livez_answers_alive_and_touches_no_pool():
    coord = FakeCoordinator()
    r = _client(coord).get("/livez")
    assert r.status_code == 200 and r.json() == {"status": "alive"}
    assert coord.opened == [] and coord.records == []


# -- authentication -----------------------------------------------------------------------
@pytest.fixture
def secured():
    coord = FakeCoordinator(auth=AuthSpec(api_key_env="ARB_KEYS"), api_keys=(KEY.encode(), b"other-key"))
    return coord, _client(coord)


@pytest.mark.parametrize("method,path", [("post", "/v1/generate"), ("post", "/v1/completions"),
                                         ("post", "/v1/chat/completions"), ("get", "/v1/models"),
                                         ("get", "/openapi.json"), ("get", "/docs"), ("get", "/no-such-route")])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", KEY])
def test_every_route_but_the_probes_needs_a_key(secured, method, path, header):
    coord, client = secured
    headers = {"Authorization": header} if header else {}
    r = getattr(client, method)(path, headers=headers, **({"json": {"prompt": PROMPT}} if method == "post" else {}))
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": {"message": "missing or invalid API key (header 'Authorization: Bearer <key>')",
                                  "type": "authentication_error", "param": None, "code": "unauthenticated"}}
    assert coord.opened == []  # refused before any route ran
    assert coord.records[-1][2] == "unauthenticated"


def test_a_valid_key_reaches_the_routes(secured):
    coord, client = secured
    for key in (KEY, "other-key"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    r = _generate(client, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "policy"  # the fake's refusal: it got through
    assert coord.opened[0].prompt == PROMPT


def test_probes_stay_open(secured):
    _, client = secured
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/healthz").json()["status"] == "ok"


def test_healthz_is_503_with_retry_after_while_a_pool_has_no_replica(secured):
    coord, client = secured
    coord.health = FakeHealth(serving=False)
    reply = client.get("/healthz")
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["running_replicas"]["draft"] == 0
    assert client.get("/livez").status_code == 200


def test_unauthenticated_requests_are_counted_by_transport(secured):
    coord, client = secured
    client.post("/v1/completions", json={"prompt": PROMPT})
    client.post("/v1/generate", json={"prompt": PROMPT})
    assert coord.records == [("openai", "none", "unauthenticated"), ("http", "none", "unauthenticated")]


def test_without_keys_nothing_is_checked():
    coord = FakeCoordinator(api_keys=())
    assert _client(coord).get("/v1/models").status_code == 200


def test_keys_are_loaded_when_the_coordinator_holds_none(monkeypatch):
    """Fail closed: a config with auth is enforced even if the coordinator did not load keys."""
    monkeypatch.setenv("ARB_HTTP_TEST_KEYS", KEY)
    client = _client(FakeCoordinator(auth=AuthSpec(api_key_env="ARB_HTTP_TEST_KEYS")))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    monkeypatch.delenv("ARB_HTTP_TEST_KEYS")
    with pytest.raises(AuthConfigError, match="ARB_HTTP_TEST_KEYS"):
        build_http_api(FakeCoordinator(auth=AuthSpec(api_key_env="ARB_HTTP_TEST_KEYS")))


# -- body size ------------------------------------------------------------------------------
def _assert_413(r) -> None:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "payload_too_large" and error["param"] == "body"
    assert error["type"] == "invalid_request_error" and f"the limit is {LIMIT} bytes" in error["message"]


def test_a_body_over_the_limit_by_content_length_is_refused_unread():
    coord = FakeCoordinator()
    r = _generate(_client(coord), prompt="x" * (LIMIT + 10))
    _assert_413(r)
    assert "is 2" in r.json()["error"]["message"]  # the declared size is named
    assert coord.opened == [] and coord.records == [("http", "none", "payload_too_large")]


def test_a_body_at_the_limit_passes():
    coord = FakeCoordinator()
    padding = LIMIT - len(json.dumps({"prompt": PROMPT, "request_id": ""}))
    body = json.dumps({"prompt": PROMPT, "request_id": "r" * padding}).encode()
    assert len(body) == LIMIT
    r = _client(coord).post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and coord.opened, r.text  # reached the route


def test_a_chunked_body_without_content_length_is_counted():
    coord = FakeCoordinator()
    client = _client(coord)
    big = json.dumps({"prompt": "x" * (LIMIT + 10)}).encode()

    def chunks(data: bytes):
        for i in range(0, len(data), 512):
            yield data[i:i + 512]

    r = client.post("/v1/generate", content=chunks(big), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _assert_413(r)
    assert coord.opened == []
    assert coord.records == [("http", "none", "payload_too_large")]  # once: FastAPI's own 400 is not counted
    small = json.dumps({"prompt": PROMPT}).encode()
    r = client.post("/v1/generate", content=chunks(small), headers={"content-type": "application/json"})
    assert r.status_code == 422 and coord.opened[0].prompt == PROMPT


def test_the_auth_check_runs_before_the_body_limit(secured):
    coord, client = secured
    assert _generate(client, prompt="x" * (LIMIT + 10)).status_code == 401
    assert coord.records == [("http", "none", "unauthenticated")]


def _run_asgi(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None):
    """One HTTP request through ``app``, its body in ``chunks``; returns (status, body, chunks read)."""
    pending = list(chunks)
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if not pending:
            return {"type": "http.disconnect"}
        read += 1
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "root_path": "", "headers": headers or [],
             "query_string": b""}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, read


async def _reading_app(scope, receive, send):
    """An app that reads the whole body, then answers 200 with its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def test_the_middleware_stops_reading_at_the_limit():
    app = BodyLimitMiddleware(_reading_app, limit=1000)
    status, body, read = _run_asgi(app, [b"x" * 400] * 10)
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert read == 3  # 1200 bytes > 1000: the other 7 chunks are never read
    assert _run_asgi(app, [b"x" * 250] * 4)[:2] == (200, b"1000")


def test_the_middleware_replaces_what_the_app_answers_to_an_unreadable_body():
    async def swallowing_app(scope, receive, send):  # like FastAPI: a failed read becomes a 400
        try:
            while (await receive()).get("more_body"):
                pass
        except Exception:  # noqa: BLE001
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"There was an error parsing the body"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    status, body, _ = _run_asgi(BodyLimitMiddleware(swallowing_app, limit=100), [b"y" * 60] * 3)
    assert status == 413 and b"parsing" not in body


def test_content_length_over_the_limit_is_refused_before_any_read():
    app = BodyLimitMiddleware(_reading_app, limit=1000)
    status, _, read = _run_asgi(app, [b"x" * 10], headers=[(b"content-length", b"5000")])
    assert status == 413 and read == 0


def test_route_path_strips_the_route_prefix():
    assert route_path({"path": "/slow/livez", "root_path": "/slow"}) == "/livez"
    assert route_path({"path": "/livez", "root_path": ""}) == "/livez"
    assert route_path({"path": "/slowlivez", "root_path": "/slow"}) == "/slowlivez"


# -- cancellation is counted ------------------------------------------------------------------
def test_a_cancelled_request_is_counted_as_cancelled():
    coord = FakeCoordinator(fail_with=asyncio.CancelledError())
    # The cancellation goes on, up to Serve (TestClient's portal reports it as its own kind).
    with pytest.raises((asyncio.CancelledError, concurrent.futures.CancelledError)):
        _generate(_client(coord))
    assert coord.records == [("http", "none", "cancelled")]


def test_retry_after_is_whole_seconds_rounded_up_and_never_zero():
    from services.http_api import retry_after

    assert [retry_after(s) for s in (0.0, 0.4, 1.0, 1.2, 2.0, 2.5)] == ["1", "1", "1", "2", "2", "3"]


# -- a stream's status ----------------------------------------------------------------------
class SteppingCoordinator(FakeCoordinator):
    """Opens a stream whose loop yields ``steps`` decided steps, then raises ``fail_after``."""

    def __init__(self, steps: int, fail_after: BaseException) -> None:
        super().__init__()
        self.steps, self.fail_after = steps, fail_after

    def prepare_request(self, fields):
        from services.validation import Prepared

        self.opened.append(fields)
        return Prepared(request=None, policy="draft", threshold=None, request_id="r1")

    async def start_stream(self, prepared):
        return prepared, object()

    async def steps_of(self, stream, prepared):
        from arbitrage_common.accounting import StepRecord

        for index in range(self.steps):
            yield StepRecord(index=index, text=f"step {index}", source="draft", score=None, draft_discarded=False,
                             discarded_draft_text=None, tokens=3, finish_reason="eos")
        raise self.fail_after


def _dead_pool() -> BaseException:
    from ray.exceptions import RayActorError

    return RayActorError()


@pytest.mark.parametrize("route,body", [("/v1/generate", {"prompt": PROMPT, "stream": True}),
                                        ("/v1/completions", {"model": "draft", "prompt": PROMPT, "stream": True})])
def test_a_stream_that_fails_before_its_first_step_gets_the_real_status_not_200(route, body):
    coord = SteppingCoordinator(steps=0, fail_after=_dead_pool())
    reply = _client(coord).post(route, json=body)
    assert reply.status_code == 503 and reply.headers["retry-after"], (reply.status_code, reply.text[:300])
    assert reply.json()["error"]["code"] == "unavailable"
    assert coord.records[-1][2] == "unavailable"


def test_a_stream_that_fails_before_its_first_step_on_bad_input_is_422():
    coord = SteppingCoordinator(steps=0, fail_after=InvalidArgument("prompt", "leaves no room in the context"))
    reply = _client(coord).post("/v1/generate", json={"prompt": PROMPT, "stream": True})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "prompt", reply.text[:300]


def test_a_stream_that_fails_after_a_step_keeps_its_200_and_ends_with_an_error_event():
    coord = SteppingCoordinator(steps=1, fail_after=_dead_pool())
    reply = _client(coord).post("/v1/generate", json={"prompt": PROMPT, "stream": True})
    assert reply.status_code == 200
    events = [line for line in reply.text.splitlines() if line]
    assert events[0] == "event: step" and json.loads(events[1].removeprefix("data: "))["text"] == "step 0"
    assert events[2] == "event: error" and json.loads(events[3].removeprefix("data: "))["error"]["code"] == \
        "unavailable"
    assert len(events) == 4 and coord.records[-1][2] == "unavailable"


# -- routes that do not exist, and OpenAI's chat forms ----------------------------------------
@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("get", "/v1/generate", 405, "method_not_allowed"), ("get", "/v1/nope", 404, "not_found"),
    ("post", "/v1/models", 405, "method_not_allowed"),
])
def test_unknown_routes_and_methods_answer_in_the_apis_error_shape(method, path, status, code):
    reply = getattr(_client(FakeCoordinator()), method)(path)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and path in error["message"], error
    if status == 405:
        assert reply.headers["allow"] and reply.headers["allow"] in error["message"]


def test_models_retrieve_finds_one_model():
    coord = FakeCoordinator()
    coord.list_models = lambda: {"object": "list", "data": [{"id": "arbitrage", "object": "model"}]}
    assert _client(coord).get("/v1/models/arbitrage").json() == {"id": "arbitrage", "object": "model"}


def test_chat_takes_the_developer_role_and_text_parts():
    coord = FakeCoordinator()
    body = {"model": "arbitrage", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Start with 12."}, {"type": "text", "text": "Add 3."}]}]}
    reply = _client(coord).post("/v1/chat/completions", json=body)
    assert reply.json()["error"]["param"] == "policy"  # the fake's own refusal: the body got through
    assert coord.opened[0].messages == [("developer", "Be brief."), ("user", "Start with 12.\nAdd 3.")]


def test_chat_refuses_a_part_that_is_not_text_naming_it():
    body = {"model": "arbitrage", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Start with 12."}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]}
    reply = _client(FakeCoordinator()).post("/v1/chat/completions", json=body)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "messages[0].content[1]", reply.text


@pytest.mark.parametrize(("body", "param"), [({"prompt": ["Start with 2.", 5]}, "prompt[1]"),
                                             ({"prompt": 5}, "prompt")])
def test_a_bad_element_of_a_prompt_list_is_named_by_its_index(body, param):
    """``prompt`` is a string or a list of strings: pydantic reports both branches, and the
    error names the one that reached the bad element."""
    reply = _client(FakeCoordinator()).post("/v1/completions", json={"model": "arbitrage", **body})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == param, reply.text
