"""HTTP against the real local service: /v1/generate (JSON and SSE), health, models,
errors (422 naming the field, 503 on overload, 504 past the deadline)."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import SLOW_APP, assert_no_more_pool_calls, main_policy, problems

from arbitrage_common.steps import join_steps
from arbitrage_common.synthetic import extract_answer


def _events(text: str) -> list[tuple[str | None, dict | str]]:
    out = []
    for block in text.strip().split("\n\n"):
        event, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


class Client:
    """requests with a base URL (the SDK-free way any HTTP client talks to the service)."""

    def __init__(self, base: str) -> None:
        self.base, self.session = base, requests.Session()

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base + path, timeout=120)

    def post(self, path: str, **kw) -> requests.Response:
        return self.session.post(self.base + path, timeout=120, **kw)


@pytest.fixture(scope="module")
def client(http_url):
    return Client(http_url)


def test_healthz_and_models(client, app_config):
    assert client.get("/healthz").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == app_config.served_model_name
    assert {"draft", "target", "rsd", "arbitrage", "oracle"} <= set(ids)


def test_generate_json_matches_grpc_shape(client, engine):
    prompt, policy = problems(1)[0].prompt, main_policy()
    r = client.post("/v1/generate", json={"prompt": prompt, "policy": policy, "request_id": "h1"})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = engine.run(prompt, policy)
    assert body["request_id"] == "h1" and body["policy"] == policy
    assert body["text"] == ref.text == join_steps([s["text"] for s in body["steps"]])
    assert body["answer"] == extract_answer(ref.text)
    assert {s["source"] for s in body["steps"]} <= {"draft", "target"}
    assert set(body["usage"]) >= {"draft_tokens_kept", "draft_tokens_discarded", "target_tokens",
                                  "acceptance_rate", "target_steps"}
    assert set(body["steps"][0]["stage_ms"]) == {"draft", "target", "router", "prm"}


def test_generate_sse_streams_steps_then_summary(client):
    prompt = problems(2)[1].prompt
    r = client.post("/v1/generate", json={"prompt": prompt, "policy": main_policy(), "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    names = [e for e, _ in events]
    assert names[-1] == "summary" and set(names[:-1]) == {"step"}
    steps = [d for e, d in events if e == "step"]
    assert events[-1][1]["steps"] == steps
    assert events[-1][1]["text"] == join_steps([s["text"] for s in steps])


BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "Start with 1. " * 40}, "prompt"),
    ({"prompt": "Start with 1.", "policy": "nope"}, "policy"),
    ({"prompt": "Start with 1.", "policy": "rsd", "threshold": 1.5}, "threshold"),
    ({"prompt": "Start with 1.", "max_steps": 0}, "max_steps"),
    ({"prompt": "Start with 1.", "max_steps": 1000}, "max_steps"),
    ({"prompt": "Start with 1.", "max_steps": "many"}, "max_steps"),
    ({"prompt": "Start with 1.", "threshold": "high"}, "threshold"),
    ({"prompt": "Start with 1.", "bogus": 1}, "bogus"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("body,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_422_naming_the_field(client, body, field, stream):
    r = client.post("/v1/generate", json={**body, "stream": stream})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}:") and error["code"] == "invalid_argument"


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/completions"])
@pytest.mark.parametrize("raw,field", [(b'{"prompt": "Start with 1.\\ud800"}', "prompt"),
                                       (b'{"prompt": "Start with 1.", "request_id": "r\\udfff"}', "request_id")])
def test_a_lone_surrogate_in_json_is_422_naming_the_field(client, route, raw, field):
    """Valid JSON, but no UTF-8 text: it must not reach the tokenizers or the reply's encoder."""
    r = client.post(route, data=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2"])
def test_malformed_json_is_422(client, raw):
    r = client.post("/v1/generate", data=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "body"


def test_past_deadline_is_504(client):
    r = client.post("/slow/v1/generate", json={"prompt": problems(1)[0].prompt, "timeout_s": 0.5})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded" and "steps" not in r.json()


def test_a_stream_past_its_deadline_before_its_first_step_is_a_plain_504(client):
    """The slow app's first step takes 2 s: the stream's status has not gone out, so the missed
    deadline is the status itself (a stream that fails later ends with an error event instead:
    tests/unit/test_http_guards.py, tests/serve/test_chaos.py)."""
    r = client.post("/slow/v1/generate", json={"prompt": problems(1)[0].prompt, "timeout_s": 0.5, "stream": True})
    assert r.status_code == 504 and r.headers["content-type"] == "application/json", (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] == "deadline_exceeded"


def test_overload_is_503_with_retry_after(http_url):
    body = {"prompt": problems(1)[0].prompt, "max_steps": 2}
    with ThreadPoolExecutor(5) as ex:
        replies = list(ex.map(lambda _: requests.post(f"{http_url}/slow/v1/generate", json=body, timeout=120),
                              range(5)))
    codes = [r.status_code for r in replies]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    assert all("retry-after" in r.headers for r in replies if r.status_code == 503)


def _probe_slow(http_url: str, tries: int = 60) -> None:
    """Until the slow app admits and answers a one-step request (503 while it is busy)."""
    for _ in range(tries):
        r = requests.post(f"{http_url}/slow/v1/generate", json={"prompt": "Start with 1.", "max_steps": 1},
                          timeout=120)
        if r.status_code == 200:
            return
        assert r.status_code == 503, r.text
        time.sleep(0.5)
    raise AssertionError("the slow app never admitted a request")


def test_client_disconnect_stops_the_loop(http_url):
    """Closing an SSE stream stops its loop and its in-flight pool call."""
    _probe_slow(http_url)
    r = requests.post(f"{http_url}/slow/v1/generate", stream=True, timeout=120,
                      json={"prompt": problems(1)[0].prompt, "max_steps": 32, "stream": True})
    lines = r.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line) == "event: step"  # it is running
    r.close()
    assert_no_more_pool_calls(SLOW_APP)
    _probe_slow(http_url, tries=10)


def test_a_body_over_the_limit_is_413(client, app_config):
    limit = app_config.limits.max_body_bytes
    reply = client.post("/v1/generate", data=b'{"prompt": "' + b"x" * (limit + 10) + b'"}',
                        headers={"content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["param"] == "body"
