"""The HTTP API of the coordinator (FastAPI), built per replica around a ``Coordinator``.

Routes: ``POST /v1/generate`` (JSON, or server-sent events with ``stream: true``),
OpenAI-compatible ``POST /v1/completions`` and ``POST /v1/chat/completions`` (with
``stream``), ``GET`` (or ``HEAD``) ``/v1/models``, ``/v1/models/{id}``, ``/healthz``,
``/livez`` (liveness: 200 whenever the replica answers, no pool call). Errors use OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}``: 422 names the field
(``param``; ``body`` for a body that is not JSON or not sent as ``application/json``),
503 carries Retry-After, 504 is a missed deadline. Every refusal, the middlewares' and
FastAPI's own included, is counted and logged once (``Coordinator.reject``). A stream's
status goes out with its first event, so one that fails before that answers like a plain
request; a stream that fails after it started ends with an error event and no summary /
``[DONE]``: nothing partial passes as success.

Two ASGI middlewares run before any route: ``AuthMiddleware`` (with API keys configured,
401 ``unauthenticated`` and ``WWW-Authenticate: Bearer`` unless the request carries
``Authorization: Bearer <key>``; ``/healthz`` and ``/livez`` stay open) and
``BodyLimitMiddleware`` (413 ``payload_too_large`` for a body over ``limits.max_body_bytes``,
by Content-Length up front or counted as a chunked body arrives).
"""
from __future__ import annotations

import asyncio
import email.message
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from arbitrage_common.auth import check_bearer, load_keys

from . import convert
from .convert import retry_after
from .validation import ChatCompletionBody, CompletionBody, GenerateBody, Prepared, RequestFields, field_from_loc

if TYPE_CHECKING:
    from arbitrage_common.loop import LoopStream

    from .coordinator import Coordinator


OPEN_PATHS = frozenset({"/healthz", "/livez"})  # no API key: probes of load balancers and kubelets
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
OnReject = Callable[[str, convert.ApiError], None]  # (path, error) of a request answered by a middleware


def error_response(err: convert.ApiError, retry_after_s: float | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if err.http_status == 503 and retry_after_s is not None:
        headers["Retry-After"] = retry_after(retry_after_s)
    if err.http_status >= 500 and not err.retriable:
        # The OpenAI SDKs retry any 5xx twice unless told not to: a deadline or a bug would run
        # the whole request three times.
        headers["x-should-retry"] = "false"
    return JSONResponse(err.json(), status_code=err.http_status, headers=headers or None)


def route_path(scope: Scope) -> str:
    """The path below the app's route prefix (``root_path``), as Starlette routes it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


def transport_of(path: str) -> str:
    """The metrics transport of a route: 'openai' or 'http'."""
    return "openai" if path in OPENAI_PATHS else "http"


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", ()) if key.lower() == name), None)


class AuthMiddleware:
    """401 unless ``Authorization: Bearer <key>`` names one of ``keys`` (every path but
    ``OPEN_PATHS``). No keys: authentication is off and every request passes."""

    def __init__(self, app: ASGIApp, keys: tuple[bytes, ...], on_reject: OnReject | None = None) -> None:
        self.app, self.keys, self.on_reject = app, tuple(keys), on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if check_bearer(_header(scope, b"authorization"), self.keys):
            await self.app(scope, receive, send)
            return
        err = convert.unauthenticated()
        if self.on_reject is not None:
            self.on_reject(route_path(scope), err)
        response = error_response(err, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised into the app by ``receive`` once the body passed the limit."""


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes: a larger Content-Length is refused before
    the body is read; a body without one (chunked) is counted as it arrives, and once past the
    limit the app's reading fails and whatever it would have answered is replaced by the 413."""

    def __init__(self, app: ASGIApp, limit: int, on_reject: OnReject | None = None) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        err = convert.payload_too_large(self.limit, size)
        if self.on_reject is not None:
            self.on_reject(route_path(scope), err)
        response = error_response(err, headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send, int(declared))
            return
        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:  # the app asks again after its read failed: the body is not delivered
                raise _BodyTooLarge
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # e.g. FastAPI's 400 for a body it could not read: the 413 goes instead
                return
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._reject(scope, receive, send, None)


class _EventStream(StreamingResponse):
    """Server-sent events, with ``unread`` awaited once the response ends: a client gone
    before the body starts makes Starlette cancel it unread, and ``unread`` then counts the
    request and closes its stream (else it is never counted)."""

    def __init__(self, body: AsyncIterator[str], unread: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._unread = unread

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._unread()


def build_http_api(coord: Coordinator) -> FastAPI:
    api = FastAPI(title="Arbitrage Serve", version="1",
                  description="Step-level speculative reasoning. 422 names the bad field, 503 = overloaded "
                              "(retry after Retry-After), 504 = deadline exceeded, 401 = missing or invalid "
                              "API key, 413 = body too large.")
    retry = coord.cfg.coordinator.retry_after_s
    keys = getattr(coord, "api_keys", None)
    if keys is None:  # fail closed: keys configured are always checked, whoever loads them
        keys = load_keys(coord.cfg.auth)

    def rejected(path: str, err: convert.ApiError) -> None:
        coord.reject(transport_of(path), None, err)  # the body is unread: no policy to label with

    # The last added runs first: authentication, then the body limit, then the routes.
    api.add_middleware(BodyLimitMiddleware, limit=coord.cfg.limits.max_body_bytes, on_reject=rejected)
    api.add_middleware(AuthMiddleware, keys=tuple(keys), on_reject=rejected)

    def refuse(request: Request, status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        """An HTTP-only refusal (no such route, method or model) in OpenAI's error shape, counted and logged."""
        grpc_code = grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.UNIMPLEMENTED
        coord.reject(transport_of(route_path(request.scope)), None,
                     convert.ApiError(code, grpc_code, status, message, field))
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": field,
                                       "code": code}}, status_code=status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def _no_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """404 / 405 (and any other HTTPException) in the API's error shape, not FastAPI's; a
        body FastAPI could not parse (its 400) is bad input like any other: 422 naming ``body``."""
        path = route_path(request.scope)
        if exc.status_code == 400 and isinstance(exc.__cause__, _BodyTooLarge):
            return JSONResponse({}, status_code=413)  # never sent: the body limit answers and counts it
        if exc.status_code == 400:
            return error_response(coord.reject(transport_of(path), None, unreadable_body(exc.__cause__)))
        shown = path[:80]
        if exc.status_code == 404:
            code, message = "not_found", f"no route {request.method} {shown}"
        elif exc.status_code == 405:
            code, message = "method_not_allowed", f"{request.method} is not allowed on {shown}"
            if allowed := (exc.headers or {}).get("Allow"):
                message += f"; use {allowed}"
        else:
            code, message = "invalid_request", str(exc.detail)[:200]
        return refuse(request, exc.status_code, code, message, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # The deepest error: a union (str or a list of str) reports each branch, and the one
        # that got furthest names the bad element (prompt[1], not prompt).
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else \
            {"loc": ("body",), "msg": "invalid request", "type": ""}
        loc = tuple(first.get("loc", ("body",)))
        content_type = request.headers.get("content-type")
        if loc[:1] == ("body",) and not is_json_content_type(content_type):  # FastAPI left the body unparsed
            got = repr(content_type[:100]) if content_type else "none"
            err = convert.invalid("body", f"Content-Type must be application/json, got {got}")
        else:
            field = field_from_loc(loc, first.get("type", ""))
            err = convert.invalid(field, "malformed JSON" if first.get("type") == "json_invalid"
                                  else first.get("msg", "invalid"))
        path = route_path(request.scope)
        policy, request_id = named_in(exc.body, path)
        return error_response(coord.reject(transport_of(path), policy, err, request_id))

    async def run(transport: str, body: GenerateBody | CompletionBody | ChatCompletionBody,
                  get_fields: Callable[[], RequestFields], events: Callable[[Prepared, LoopStream], AsyncIterator[str]],
                  render: Callable[[Any, Prepared], dict[str, Any]]):
        # Until the request is validated, failures are labelled with what the client named.
        started, policy, request_id = time.perf_counter(), body.named_policy(), body.request_id
        try:
            prepared = coord.prepare_request(get_fields())
            policy, request_id = prepared.policy, prepared.request_id
            prepared, stream = await coord.start_stream(prepared)
        except asyncio.CancelledError as exc:  # the client left (counted, then Serve's cancellation goes on)
            coord.fail(transport, policy, exc, request_id)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)  # bad input is answered before any stream starts
            return error_response(coord.fail(transport, policy, exc, request_id), retry)
        if body.stream:
            # The status line goes out with the first event: a request that fails before its
            # first step (a pool down or full, no room in the context) gets its real status.
            chunks = events(prepared, stream)
            try:
                first = await anext(chunks)
            except asyncio.CancelledError as exc:
                coord.fail(transport, policy, exc, request_id)
                raise
            except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
                return error_response(coord.fail(transport, policy, exc, request_id), retry)
            opened: list[bool] = []

            async def unread() -> None:
                if not opened:  # Starlette cancelled the body unread: the client left before it started
                    coord.fail(transport, policy, asyncio.CancelledError(), request_id)
                    await chunks.aclose()
            return _EventStream(guard(transport, prepared, first, chunks, started, opened), unread)
        try:
            async for _ in coord.steps_of(stream, prepared):
                pass
            response = JSONResponse(render(stream.result, prepared))  # encoded here: counted ok only once it is
        except asyncio.CancelledError as exc:
            coord.fail(transport, policy, exc, request_id)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            return error_response(coord.fail(transport, policy, exc, request_id), retry)
        coord.record(transport, policy, "ok", started)
        return response

    async def guard(transport: str, prepared: Prepared, first: str, events: AsyncIterator[str],
                    started: float, opened: list[bool]) -> AsyncIterator[str]:
        opened.append(True)  # from here on, this counts the request
        try:
            yield first
            async for chunk in events:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):  # the client disconnected mid-stream
            coord.fail(transport, prepared.policy, asyncio.CancelledError(), prepared.request_id)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            err = coord.fail(transport, prepared.policy, exc, prepared.request_id)
            yield convert.sse(err.json(), event="error" if transport == "http" else None)
            return
        coord.record(transport, prepared.policy, "ok", started)

    async def generate_events(prepared: Prepared, stream: LoopStream) -> AsyncIterator[str]:
        async for step in coord.steps_of(stream, prepared):
            yield convert.sse(convert.step_json(step), event="step")
        yield convert.sse(convert.result_json(stream.result, prepared), event="summary")

    def openai_events(model: str, chat: bool, include_usage: bool):
        async def events(prepared: Prepared, stream: LoopStream) -> AsyncIterator[str]:
            first, created = True, int(time.time())  # one stream, one `created` (as OpenAI and vLLM)
            async for step in coord.steps_of(stream, prepared):
                yield convert.sse(convert.openai_chunk(prepared, model, chat, created, convert.step_delta(step),
                                                       first=first, include_usage=include_usage))
                first = False
            result = stream.result
            yield convert.sse(convert.openai_chunk(prepared, model, chat, created, None if chat else "",
                                                   finish=convert.OPENAI_FINISH[result.finish_reason],
                                                   result=result, include_usage=include_usage))
            if include_usage:
                yield convert.sse(convert.openai_usage_chunk(prepared, model, chat, created, result))
            yield convert.sse("[DONE]")
        return events

    async def openai(body: CompletionBody | ChatCompletionBody, chat: bool):
        model = body.model or coord.cfg.served_model_name
        return await run("openai", body, lambda: body.fields(coord.cfg), openai_events(model, chat, body.include_usage),
                         lambda result, prepared: convert.openai_response(result, prepared, model, chat))

    # GET and HEAD: load balancers and uptime checks probe with HEAD.
    @api.api_route("/livez", methods=["GET", "HEAD"])
    async def livez() -> dict[str, str]:
        """Liveness: the replica's event loop answers. No pool call, no API key."""
        return {"status": "alive"}

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        """Readiness: 200 while every pool the default policy needs serves (a running replica,
        or scaled to zero by its autoscaler: the next request starts one), else 503 with
        Retry-After and the running replicas per pool. No API key."""
        serving = await coord.health.current()
        body = {"status": "ok" if serving else "not_serving", "policies": coord.available,
                "running_replicas": dict(coord.health.running)}
        if serving:
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": retry_after(retry)})

    @api.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return coord.list_models()

    @api.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])  # ids such as org/model
    async def model(model_id: str, request: Request):
        """One entry of /v1/models (the OpenAI SDK's ``models.retrieve``); 404 ``model_not_found``
        in OpenAI's shape for an id it does not list."""
        listed = coord.list_models()["data"]
        found = next((m for m in listed if m["id"] == model_id), None)
        if found is None:
            expected = ", ".join(repr(m["id"]) for m in listed)
            return refuse(request, 404, "model_not_found",
                          f"model {model_id[:64]!r} does not exist; expected one of {expected}", field="model")
        return found

    @api.post("/v1/generate")
    async def generate(body: GenerateBody):
        return await run("http", body, body.fields, generate_events, convert.result_json)

    @api.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await openai(body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody):
        return await openai(body, chat=True)

    return api


def is_json_content_type(value: str | None) -> bool:
    """application/json (with any parameters) or application/*+json: what FastAPI parses as JSON."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def unreadable_body(cause: BaseException | None) -> convert.ApiError:
    """422 naming ``body`` for a body that is not JSON text (FastAPI's generic 400 says not why)."""
    if isinstance(cause, UnicodeDecodeError):
        detail = f"is not UTF-8 JSON text (invalid byte at position {cause.start})"
    elif isinstance(cause, RecursionError):
        detail = "is JSON nested too deeply to parse"
    elif isinstance(cause, ValueError) and "integer string conversion" in str(cause):  # CPython's digit cap
        detail = f"holds an integer of more than {sys.get_int_max_str_digits()} digits"
    else:
        detail = "could not be parsed as JSON"
    return convert.invalid("body", detail)


def named_in(body: Any, path: str) -> tuple[str | None, str | None]:
    """(policy, request_id) as a raw JSON body that failed validation names them (the OpenAI
    routes name a policy by ``model`` too): for its metrics label and log line."""
    if not isinstance(body, dict):
        return None, None
    policy = body.get("policy")
    if policy is None and path in OPENAI_PATHS:
        policy = body.get("model")
    request_id = body.get("request_id")
    return (policy if isinstance(policy, str) else None), (request_id if isinstance(request_id, str) else None)
