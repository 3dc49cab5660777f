"""The HTTP API of the coordinator (FastAPI), built per replica around a ``Coordinator``.

Routes: ``POST /v1/generate`` (JSON, or server-sent events with ``stream: true``),
OpenAI-compatible ``POST /v1/completions`` and ``POST /v1/chat/completions`` (with
``stream``), ``GET /v1/models``, ``GET /healthz``. Errors use OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``: 422 names the field (``param``),
503 carries Retry-After, 504 is a missed deadline. A stream that fails after it started
ends with an error event and no summary / ``[DONE]``: nothing partial passes as success.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from . import convert
from .validation import ChatCompletionBody, CompletionBody, GenerateBody, Prepared, RequestFields, field_from_loc

if TYPE_CHECKING:
    from arbitrage_common.loop import LoopStream

    from .coordinator import Coordinator


def error_response(err: convert.ApiError, retry_after_s: float | None = None) -> JSONResponse:
    headers = None
    if err.http_status == 503 and retry_after_s:
        headers = {"Retry-After": str(max(1, round(retry_after_s)))}
    return JSONResponse(err.json(), status_code=err.http_status, headers=headers)


def build_http_api(coord: Coordinator) -> FastAPI:
    api = FastAPI(title="Arbitrage Serve", version="1",
                  description="Step-level speculative reasoning. 422 names the bad field, 503 = overloaded "
                              "(retry after Retry-After), 504 = deadline exceeded.")
    retry = coord.cfg.coordinator.retry_after_s

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        field = field_from_loc(first.get("loc", ("body",)), first.get("type", ""))
        message = "malformed JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid")
        return error_response(convert.invalid(field, message))

    async def run(transport: str, get_fields: Callable[[], RequestFields], stream_it: bool,
                  events: Callable[[Prepared, LoopStream], AsyncIterator[str]],
                  render: Callable[[Any, Prepared], dict[str, Any]]):
        started, policy = time.perf_counter(), ""
        try:
            prepared, stream = coord.open_stream(get_fields())
            policy = prepared.policy
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)  # bad input is answered before any stream starts
            return error_response(coord.fail(transport, policy, exc), retry)
        if stream_it:
            return StreamingResponse(guard(transport, prepared, events(prepared, stream), started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for _ in coord.steps_of(stream, policy):
                pass
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            return error_response(coord.fail(transport, policy, exc), retry)
        coord.record(transport, policy, "ok", started)
        return JSONResponse(render(stream.result, prepared))

    async def guard(transport: str, prepared: Prepared, events: AsyncIterator[str],
                    started: float) -> AsyncIterator[str]:
        try:
            async for chunk in events:
                yield chunk
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            err = coord.fail(transport, prepared.policy, exc)
            yield convert.sse(err.json(), event="error" if transport == "http" else None)
            return
        coord.record(transport, prepared.policy, "ok", started)

    async def generate_events(prepared: Prepared, stream: LoopStream) -> AsyncIterator[str]:
        async for step in coord.steps_of(stream, prepared.policy):
            yield convert.sse(convert.step_json(step), event="step")
        yield convert.sse(convert.result_json(stream.result, prepared), event="summary")

    def openai_events(model: str, chat: bool):
        async def events(prepared: Prepared, stream: LoopStream) -> AsyncIterator[str]:
            first = True
            async for step in coord.steps_of(stream, prepared.policy):
                yield convert.sse(convert.openai_chunk(prepared, model, chat, convert.step_delta(step), first=first))
                first = False
            result = stream.result
            yield convert.sse(convert.openai_chunk(prepared, model, chat, None if chat else "",
                                                   finish=convert.OPENAI_FINISH[result.finish_reason],
                                                   result=result))
            yield convert.sse("[DONE]")
        return events

    async def openai(body: CompletionBody | ChatCompletionBody, chat: bool):
        model = body.model or coord.cfg.served_model_name
        return await run("openai", lambda: body.fields(coord.cfg), body.stream, openai_events(model, chat),
                         lambda result, prepared: convert.openai_response(result, prepared, model, chat))

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "policies": coord.available}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return coord.list_models()

    @api.post("/v1/generate")
    async def generate(body: GenerateBody):
        return await run("http", body.fields, body.stream, generate_events, convert.result_json)

    @api.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await openai(body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody):
        return await openai(body, chat=True)

    return api
