"""The HTTP side: ``/v1/generate`` (JSON, or server-sent events timed per step) and the
OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``. Requests go through
locust's HTTP session, so each is a locust request entry; SSE adds TTFS and step entries."""
from __future__ import annotations

import json
import time

import requests
from urllib3.exceptions import ReadTimeoutError

from arbitrage_common.client import auth_metadata

from . import records
from .backoff import Outcome, parse_retry_after

# The service's API key, when it has one: $ARBITRAGE_API_KEY, as the gRPC client sends it.
_AUTH = dict(auth_metadata())
ROUTES = {"http": "/v1/generate", "http-sse": "/v1/generate", "openai": "/v1/completions",
          "openai-chat": "/v1/chat/completions"}


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def transport_status(error: BaseException | None) -> str:
    """The status of a call that got no HTTP reply: ``TIMEOUT`` (connect or read timeout) or
    ``CONNECTION_ERROR`` (refused, reset, dropped)."""
    if isinstance(error, requests.Timeout):
        return "TIMEOUT"
    # a read timeout while the body is read comes wrapped in a ConnectionError
    if isinstance(error, requests.ConnectionError) and any(isinstance(a, ReadTimeoutError) for a in error.args):
        return "TIMEOUT"
    return "CONNECTION_ERROR"


def error_status(status_code: int, text: str) -> str:
    """A non-200 reply's status: the API's ``error.code`` uppercased (``RESOURCE_EXHAUSTED`` and
    ``UNAVAILABLE`` are both 503), else ``HTTP_<status>``."""
    try:
        code = json.loads(text).get("error", {}).get("code")
    except (ValueError, AttributeError):
        code = None
    return str(code).upper() if isinstance(code, str) and code else f"HTTP_{status_code}"


def _body(settings, prompt: str) -> dict:
    mix = settings.mix
    extra = {k: v for k, v in (("policy", mix.policy), ("threshold", mix.threshold), ("max_steps", mix.max_steps),
                               ("timeout_s", settings.timeout_s)) if v is not None}
    if settings.transport == "openai":
        return {"prompt": prompt, **extra}
    if settings.transport == "openai-chat":
        return {"messages": [{"role": "user", "content": prompt}], **extra}
    return {"prompt": prompt, "stream": settings.transport == "http-sse", **extra}


def _result(settings, reply: dict) -> dict:
    """The service's result in a reply (the OpenAI routes carry it under ``arbitrage``)."""
    return reply.get("arbitrage", reply) if settings.transport.startswith("openai") else reply


def _fill(rec: records.Record, prompt: str, result: dict) -> None:
    """Steps, target steps, policy, threshold and correctness from a finished result's JSON."""
    rec.steps, rec.target_steps = len(result.get("steps", [])), result.get("usage", {}).get("target_steps", 0)
    rec.policy = result.get("policy", rec.policy)
    records.grade_json(rec, prompt, result)


def call_http(session, environment, settings, prompt: str) -> Outcome:
    """One request, recorded; its status and the server's Retry-After (503s carry one), for the
    closed loop's backoff."""
    route = ROUTES[settings.transport]
    started, t0 = records.request_start()
    rec = records.Record(settings.transport, t0, 0.0, "OK", policy=settings.mix.policy)
    stream = settings.transport == "http-sse"
    with session.post(route, json=_body(settings, prompt), stream=stream, catch_response=True, headers=_AUTH,
                      timeout=settings.client_timeout_s, name=route + (" (sse)" if stream else "")) as resp:
        try:
            # locust's session turns a call that got no reply (timeout, refused or dropped
            # connection) into a response of status 0 carrying the exception in ``error``
            if not resp.status_code:
                error = getattr(resp, "error", None)
                rec.status = transport_status(error)
                resp.failure(f"{rec.status}: {error!r}")
            elif resp.status_code != 200:
                rec.status = error_status(resp.status_code, resp.text)
                resp.failure(f"{rec.status} (HTTP {resp.status_code}): {resp.text[:200]}")
            elif stream:
                _read_sse(resp, environment, rec, started, prompt)
            else:
                _fill(rec, prompt, _result(settings, resp.json()))
                resp.success()
        except (ValueError, KeyError) as exc:  # a reply or event that does not parse (JSONDecodeError included)
            rec.status = "BAD_REPLY"
            resp.failure(f"BAD_REPLY: {exc!r}")
        except requests.RequestException as exc:  # connection reset or read timeout while reading the body
            rec.status = "STREAM_BROKEN"
            resp.failure(f"STREAM_BROKEN: {exc!r}")
        rec.e2e_ms = _ms(started)
        # Locust took response_time when the headers came; a streamed call's row must cover the
        # whole call, as the gRPC end row does. request_meta is reported on __exit__.
        resp.request_meta["response_time"] = rec.e2e_ms
        retry_after = parse_retry_after(resp.headers.get("Retry-After")) if resp.status_code else None
    records.add(rec)
    return Outcome(rec.status, retry_after)


def _read_sse(resp, environment, rec: records.Record, started: float, prompt: str = "") -> None:
    fire = environment.events.request.fire
    event, last, summarized = None, started, False
    for raw in resp.iter_lines(decode_unicode=True):
        if raw.startswith("event:"):
            event = raw.split(":", 1)[1].strip()
        elif raw.startswith("data:") and event == "step":
            now = time.perf_counter()
            if rec.ttfs_ms is None:
                rec.ttfs_ms = _ms(started)
                fire(request_type="SSE", name="/v1/generate TTFS", response_time=rec.ttfs_ms, response_length=0)
            else:
                rec.step_ms.append((now - last) * 1000.0)
                fire(request_type="SSE", name="/v1/generate step", response_time=rec.step_ms[-1], response_length=0)
            last, rec.steps = now, rec.steps + 1
        elif raw.startswith("data:") and event == "summary":
            summary = json.loads(raw.split(":", 1)[1])
            rec.target_steps, rec.policy = summary["usage"]["target_steps"], summary["policy"]
            records.grade_json(rec, prompt, summary)
            summarized = True
        elif raw.startswith("data:") and event == "error":
            error = json.loads(raw.split(":", 1)[1])
            rec.status = str(error.get("error", {}).get("code", "STREAM_ERROR")).upper()
    if rec.status == "OK" and not summarized:  # the service ends every finished stream with a summary
        rec.status = "STREAM_INCOMPLETE"
    if rec.status == "OK":
        resp.success()
    else:
        resp.failure(f"stream ended with {rec.status}")
