"""Wire formats: loop results -> proto / JSON / OpenAI shapes, and errors -> status codes.

JSON is the canonical shape (field names as in arbitrage.proto, source as "draft" /
"target"); the proto is parsed from it, so HTTP and gRPC clients see the same fields.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from arbitrage_common.accounting import STAGES, LoopResult, StepRecord
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument, ScorerError
from arbitrage_common.steps import STEP_DELIMITER
from arbitrage_common.synthetic import extract_answer
from protos.arbitrage.v1 import arbitrage_pb2 as pb

from .validation import Prepared

_PROTO_SOURCE = {"draft": "SOURCE_DRAFT", "target": "SOURCE_TARGET"}
OPENAI_FINISH = {"eos": "stop", "max_steps": "length", "length": "length", "deadline": "length"}


def _stage_ms(values: dict[str, float]) -> dict[str, float]:
    return {stage: round(float(values.get(stage, 0.0)), 3) for stage in STAGES}


def step_json(step: StepRecord) -> dict[str, Any]:
    return {"index": step.index, "text": step.text, "source": step.source, "score": step.score,
            "draft_discarded": step.draft_discarded, "discarded_draft_text": step.discarded_draft_text,
            "tokens": step.tokens, "finish_reason": step.finish_reason, "stage_ms": _stage_ms(step.stage_ms)}


def result_json(result: LoopResult, prepared: Prepared) -> dict[str, Any]:
    u = result.usage
    return {
        "request_id": prepared.request_id,
        "text": result.text,
        "answer": extract_answer(result.text),
        "steps": [step_json(s) for s in result.steps],
        "usage": {
            "draft_tokens_kept": u.draft_tokens_kept, "draft_tokens_discarded": u.draft_tokens_discarded,
            "target_tokens": u.target_tokens, "acceptance_rate": u.acceptance_rate,
            "target_steps": u.steps_by_source["target"], "draft_steps": u.steps_by_source["draft"],
            "target_step_fraction": u.target_step_fraction, "router_calls": u.router_calls,
            "prm_calls": u.prm_calls, "stage_ms": _stage_ms({k: v * 1000.0 for k, v in u.stage_seconds.items()}),
        },
        "finish_reason": result.finish_reason,
        "policy": prepared.policy,
        "threshold": prepared.threshold,
        "total_ms": round(result.total_seconds * 1000.0, 3),
    }


def _proto_ready(step: dict[str, Any]) -> dict[str, Any]:
    return {**step, "source": _PROTO_SOURCE[step["source"]]}


def step_proto(step: StepRecord) -> pb.Step:
    return json_format.ParseDict(_proto_ready(step_json(step)), pb.Step())


def result_proto(result: LoopResult, prepared: Prepared) -> pb.GenerateResponse:
    d = result_json(result, prepared)
    d["steps"] = [_proto_ready(s) for s in d["steps"]]
    return json_format.ParseDict(d, pb.GenerateResponse())


# -- OpenAI shapes ------------------------------------------------------------------------
def _usage(result: LoopResult) -> dict[str, int]:
    completion = sum(step.tokens for step in result.steps)
    # Draft and target may tokenize differently; prompt tokens are not counted.
    return {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}


def openai_response(result: LoopResult, prepared: Prepared, model: str, chat: bool) -> dict[str, Any]:
    finish = OPENAI_FINISH[result.finish_reason]
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}
    return {"id": ("chatcmpl-" if chat else "cmpl-") + prepared.request_id,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(result),
            "arbitrage": result_json(result, prepared)}


def openai_chunk(prepared: Prepared, model: str, chat: bool, text: str | None, finish: str | None = None,
                 first: bool = False, result: LoopResult | None = None) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    chunk = {"id": ("chatcmpl-" if chat else "cmpl-") + prepared.request_id,
             "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
             "model": model, "choices": [choice]}
    if result is not None:
        chunk["usage"] = _usage(result)
        chunk["arbitrage"] = result_json(result, prepared)
    return chunk


def step_delta(step: StepRecord) -> str:
    """The text a step adds to the streamed completion (chunks concatenate to the text)."""
    return step.text if step.index == 0 else STEP_DELIMITER + step.text


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n"


# -- errors -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiError:
    """One failure as every transport reports it."""

    code: str              # invalid_argument, resource_exhausted, deadline_exceeded, unavailable, internal
    grpc_code: grpc.StatusCode
    http_status: int
    message: str
    field: str | None = None

    def json(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.code == "invalid_argument" else self.code
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": self.code}}


def invalid(field: str, message: str) -> ApiError:
    return ApiError("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, 422, f"{field}: {message}", field)


def _cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's task errors to the exception the pool raised."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def classify(exc: BaseException) -> ApiError:
    """Map any failure of a request to the status every transport reports."""
    if isinstance(exc, InvalidArgument):
        return invalid(exc.field, exc.detail)
    if isinstance(exc, DeadlineExceeded):
        return ApiError("deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED, 504,
                        f"request deadline exceeded after {len(exc.partial.steps)} steps; no partial result "
                        f"is returned (raise timeout_s or lower max_steps)")
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    inner = _cause(exc)
    if isinstance(exc, BackPressureError) or isinstance(inner, BackPressureError):
        return ApiError("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 503,
                        f"overloaded, a model pool's queue is full; retry with backoff ({inner})")
    if isinstance(exc, DeploymentUnavailableError) or isinstance(inner, DeploymentUnavailableError):
        return ApiError("unavailable", grpc.StatusCode.UNAVAILABLE, 503, f"a model pool is unavailable: {inner}")
    if isinstance(exc, asyncio.TimeoutError):
        return ApiError("deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED, 504, "request deadline exceeded")
    role = f" ({inner.role})" if isinstance(inner, ScorerError) else ""
    return ApiError("internal", grpc.StatusCode.INTERNAL, 500,
                    f"internal error{role}: {type(inner).__name__}: {str(inner)[:500]}")


# -- the way back (clients: remote benches, tests) ----------------------------------------
def loop_result(msg: pb.GenerateResponse, prompt: str = "") -> LoopResult:
    """A ``GenerateResponse`` as the engine's ``LoopResult``, so code written against the
    in-process loop (benches, graders, router data) can run against a service."""
    from arbitrage_common.accounting import Usage

    source = {pb.SOURCE_DRAFT: "draft", pb.SOURCE_TARGET: "target"}
    steps = [StepRecord(index=s.index, text=s.text, source=source[s.source],
                        score=s.score if s.HasField("score") else None, draft_discarded=s.draft_discarded,
                        discarded_draft_text=s.discarded_draft_text if s.HasField("discarded_draft_text") else None,
                        tokens=s.tokens, finish_reason=s.finish_reason,
                        stage_ms={k: v for k in STAGES if (v := getattr(s.stage_ms, k))})
             for s in msg.steps]
    u = msg.usage
    usage = Usage(draft_tokens_kept=u.draft_tokens_kept, draft_tokens_discarded=u.draft_tokens_discarded,
                  target_tokens=u.target_tokens, steps_by_source={"draft": u.draft_steps, "target": u.target_steps},
                  router_calls=u.router_calls, prm_calls=u.prm_calls,
                  stage_seconds={k: getattr(u.stage_ms, k) / 1000.0 for k in STAGES})
    return LoopResult(prompt=prompt, steps=steps, finish_reason=msg.finish_reason, usage=usage,
                      total_seconds=msg.total_ms / 1000.0)
