"""Wire formats: loop results -> proto / JSON / OpenAI shapes, and errors -> status codes.

JSON is the canonical shape (field names as in arbitrage.proto, source as "draft" /
"target"); the proto is parsed from it, so HTTP and gRPC clients see the same fields.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
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
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
OPENAI_FINISH = {"eos": "stop", "max_steps": "length", "length": "length", "deadline": "length"}


def _stage_ms(values: dict[str, float]) -> dict[str, float]:
    return {stage: round(float(values.get(stage, 0.0)), 3) for stage in STAGES}


def step_json(step: StepRecord) -> dict[str, Any]:
    return {"index": step.index, "text": step.text, "source": step.source, "score": step.score,
            "draft_discarded": step.draft_discarded, "discarded_draft_text": step.discarded_draft_text,
            "tokens": step.tokens, "finish_reason": step.finish_reason, "stage_ms": _stage_ms(step.stage_ms),
            "draft_score": step.draft_score}


def _int64_or_none(value: int | None) -> int | None:
    """``answer`` is an int64 in the proto: a longer number in the text leaves it unset (JSON too)."""
    return value if value is not None and INT64_MIN <= value <= INT64_MAX else None


def final_answer(result: LoopResult) -> int | None:
    """N of the final ``Answer: N`` step; None when there is none, or when the token budget cut
    that step (``Answer: 91`` cut from ``Answer: 914`` is not an answer)."""
    if result.steps and result.steps[-1].finish_reason == "length":
        return None
    return extract_answer(result.text)


def result_json(result: LoopResult, prepared: Prepared) -> dict[str, Any]:
    u = result.usage
    return {
        "request_id": prepared.request_id,
        "text": result.text,
        "answer": _int64_or_none(final_answer(result)),
        "steps": [step_json(s) for s in result.steps],
        "usage": {
            "draft_tokens_kept": u.draft_tokens_kept, "draft_tokens_discarded": u.draft_tokens_discarded,
            "target_tokens": u.target_tokens, "acceptance_rate": u.acceptance_rate,
            "target_steps": u.steps_by_source["target"], "draft_steps": u.steps_by_source["draft"],
            "target_step_fraction": u.target_step_fraction, "router_calls": u.router_calls,
            "prm_calls": u.prm_calls, "stage_ms": _stage_ms({k: v * 1000.0 for k, v in u.stage_seconds.items()}),
            "speculative_drafts_used": u.speculative_drafts_used,
            "speculative_drafts_discarded": u.speculative_drafts_discarded,
            "speculative_draft_tokens_discarded": u.speculative_draft_tokens_discarded,
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


def openai_chunk(prepared: Prepared, model: str, chat: bool, created: int, text: str | None,
                 finish: str | None = None, first: bool = False, result: LoopResult | None = None,
                 include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk; ``created`` is the stream's, the same on every chunk. The last
    (``result`` given) carries the summary under ``arbitrage``, and the usage unless
    ``include_usage`` asked for OpenAI's separate usage chunk (then null here)."""
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    chunk = _chunk_head(prepared, model, chat, created) | {"choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    elif result is not None:
        chunk["usage"] = _usage(result)
    if result is not None:
        chunk["arbitrage"] = result_json(result, prepared)
    return chunk


def openai_usage_chunk(prepared: Prepared, model: str, chat: bool, created: int,
                       result: LoopResult) -> dict[str, Any]:
    """The chunk ``stream_options.include_usage`` asks for, before ``[DONE]``: empty choices, the usage."""
    return _chunk_head(prepared, model, chat, created) | {"choices": [], "usage": _usage(result)}


def _chunk_head(prepared: Prepared, model: str, chat: bool, created: int) -> dict[str, Any]:
    return {"id": ("chatcmpl-" if chat else "cmpl-") + prepared.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model}


def step_delta(step: StepRecord) -> str:
    """The text a step adds to the streamed completion (chunks concatenate to the text)."""
    return step.text if step.index == 0 else STEP_DELIMITER + step.text


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n"


# -- errors -------------------------------------------------------------------------------
RETRIABLE_CODES = frozenset({"unavailable", "resource_exhausted"})
POOL_NAMES = ("draft", "target", "router", "prm")
_OPENAI_TYPE = {"invalid_argument": "invalid_request_error", "payload_too_large": "invalid_request_error",
                "unauthenticated": "authentication_error"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
# Where Ray and Serve name a deployment in an error: the replica actor's class and name,
# ReplicaID / DeploymentID strings, and our pools' own "<role> pool: ..." prefix.
_POOL_PATTERNS = (re.compile(r"ServeReplica:[^:\s]+:([A-Za-z0-9_-]+)"),
                  re.compile(r"SERVE_REPLICA::[^#\s]+#([A-Za-z0-9_-]+)#"),
                  re.compile(r"deployment='([A-Za-z0-9_-]+)'"),
                  re.compile(r"Deployment\(name='([A-Za-z0-9_-]+)'"),
                  re.compile(r"^([a-z]+) pool: "))


class PoolDown(RuntimeError):
    """A pool a request needs has no running replica: its deadline passed while one was
    starting or restarting, or (``failed``) Serve reports the pool failing, so the call was not
    sent to wait for one. The pool's fault, not the client's deadline."""

    def __init__(self, pool: str, failed: bool = False) -> None:
        self.pool, self.failed = pool, failed
        super().__init__(f"the {pool} pool has no running replica")


class PoolStalled(RuntimeError):
    """A request's deadline passed while a pool it waited on had answered nothing for
    ``coordinator.pool_stall_s`` or more though calls were out to it
    (``arbitrage_common.pool_progress``): a hung replica, so the client should retry later
    rather than raise its deadline."""

    def __init__(self, pool: str, waited_s: float) -> None:
        self.pool, self.waited_s = pool, waited_s
        super().__init__(f"the {pool} pool answered no call for {waited_s:.1f} s")


@dataclass(frozen=True)
class ApiError:
    """One failure as every transport reports it.

    ``code``: invalid_argument, unauthenticated, payload_too_large, resource_exhausted,
    unavailable, deadline_exceeded, cancelled, internal (or not_found). ``message`` names the
    field or the pool, never a path, exception text or traceback. ``reference`` (internal
    errors): a short id, also in ``message``, for the server's log line with the traceback."""

    code: str
    grpc_code: grpc.StatusCode
    http_status: int
    message: str
    field: str | None = None
    reference: str | None = None

    @property
    def retriable(self) -> bool:
        """True where the same request may succeed if sent again (after a backoff)."""
        return self.code in RETRIABLE_CODES

    def json(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        kind = _OPENAI_TYPE.get(self.code, self.code)
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": self.code}}


# Bad input is echoed back (a value, an unknown field's name) only this far: a reply must not grow
# with the request (gRPC caps status details at 16 KB and would answer RESOURCE_EXHAUSTED).
MAX_FIELD_CHARS, MAX_INVALID_MESSAGE_CHARS = 64, 400


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def invalid(field: str, message: str) -> ApiError:
    field = _bounded(field, MAX_FIELD_CHARS)
    return ApiError("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, 422,
                    _bounded(f"{field}: {message}", MAX_INVALID_MESSAGE_CHARS), field)


def unauthenticated(where: str = "header 'Authorization: Bearer <key>'") -> ApiError:
    """401 / UNAUTHENTICATED: no valid API key (``where``: how the client sends one)."""
    return ApiError("unauthenticated", grpc.StatusCode.UNAUTHENTICATED, 401,
                    f"missing or invalid API key ({where})")


def payload_too_large(limit: int, size: int | None = None, field: str = "body") -> ApiError:
    """413 (HTTP) / INVALID_ARGUMENT (gRPC; not RESOURCE_EXHAUSTED, which clients retry): the
    request is larger than ``limit`` bytes. ``field`` is 'body' (HTTP) or 'request' (gRPC)."""
    got = f"is {size} bytes" if size is not None else "is too large"
    return ApiError("payload_too_large", grpc.StatusCode.INVALID_ARGUMENT, 413,
                    f"{field}: {got}; the limit is {limit} bytes", field)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, then the exceptions Ray wrapped in it (``RayTaskError.cause``), outermost first."""
    chain = [exc]
    while len(chain) < 8:
        cause = getattr(chain[-1], "cause", None)
        if not isinstance(cause, BaseException) or any(cause is seen for seen in chain):
            break
        chain.append(cause)
    return chain


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except Exception:  # noqa: BLE001 (a broken __str__ must not break the error path)
        return ""


def _pool_of(chain: list[BaseException]) -> str | None:
    """The pool a failure came from, where it can be known: a ``pool`` attribute, the
    deployment a Serve error names, a ScorerError's role, or a replica named in Ray's text.
    Only known pool names (or a plain name set as ``pool``) come out, never other text."""
    for e in chain:
        pool = getattr(e, "pool", None)
        if isinstance(pool, str) and _SAFE_NAME.fullmatch(pool):
            return pool
    for e in chain:
        name = getattr(getattr(e, "_deployment_id", None), "name", None)
        if name in POOL_NAMES:
            return name
        if isinstance(e, ScorerError) and (role := str(e.role).split(" ")[0]) in POOL_NAMES:
            return role
    for e in reversed(chain):  # the innermost first: its message is the pool's own
        texts = [getattr(e, "proctitle", None), getattr(e, "actor_repr", None), getattr(e, "_replica_id", None),
                 _safe_str(e)]
        for text in texts:
            if not isinstance(text, str):
                text = _safe_str(text) if text is not None else ""
            for pattern in _POOL_PATTERNS:
                for m in pattern.finditer(text):
                    if m.group(1) in POOL_NAMES:
                        return m.group(1)
    return None


def _any(chain: list[BaseException], types: type | tuple[type, ...]) -> BaseException | None:
    return next((e for e in chain if isinstance(e, types)), None)


def retry_after(seconds: float) -> str:
    """Retry-After is whole seconds: never less than advised, never 0 (an immediate retry). HTTP
    sends it as a header, gRPC as ``retry-after`` trailing metadata."""
    return str(max(1, math.ceil(seconds)))


def unavailable(message: str) -> ApiError:
    return ApiError("unavailable", grpc.StatusCode.UNAVAILABLE, 503, message)


def new_reference() -> str:
    """A short id tying a client's error message to the server's log line."""
    return secrets.token_hex(6)


def replica_channel_lost(exc: BaseException) -> bool:
    """A pool call over Serve's gRPC channel (``pool_calls_over_grpc``) that the replica's
    server ended UNAVAILABLE or CANCELLED (it shut down) and Serve passed on raw: its
    replica went away, like a ``RayActorError``. A local cancellation is ``CancelledError``."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                    grpc.StatusCode.CANCELLED)


def classify(exc: BaseException) -> ApiError:
    """Map any failure of a request to the status every transport reports.

    - ``InvalidArgument`` -> INVALID_ARGUMENT / 422, naming the field.
    - ``PoolDown`` (a needed pool had no running replica: the deadline passed waiting for one,
      or Serve reports the pool failing) -> UNAVAILABLE / 503, retriable: the client's deadline
      was not what failed it.
    - ``PoolStalled`` (the deadline passed while a pool it waited on had answered nothing for
      ``pool_stall_s``) -> UNAVAILABLE / 503, retriable, naming the pool.
    - ``DeadlineExceeded`` raised here (the request's own deadline) -> DEADLINE_EXCEEDED / 504.
    - cancellation (``asyncio.CancelledError``, Ray's ``TaskCancelledError``) -> CANCELLED / 499.
    - ``BackPressureError`` (a pool's queue is full) -> RESOURCE_EXHAUSTED / 503, retriable.
    - a dead or unreachable replica or engine (``RayActorError`` and subclasses, a crashed
      worker or node, ``DeploymentUnavailableError``, ``ReplicaUnavailableError``,
      ``EngineDeadError``) or a ``TimeoutError`` raised by a backend or a Ray call (not our
      deadline) -> UNAVAILABLE / 503, retriable.
    - anything else (a bug, a bad checkpoint, unusable model output) -> INTERNAL / 500 with a
      ``reference`` and no exception text; the caller logs the traceback with the reference.

    Ray's ``RayTaskError`` is looked through (``.cause``) to what the pool raised."""
    from ray.exceptions import (
        LocalRayletDiedError,
        NodeDiedError,
        RayActorError,
        TaskCancelledError,
        WorkerCrashedError,
    )
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    from arbitrage_common.backends.checkpoints import CheckpointError
    from arbitrage_common.backends.vllm_generator import EngineDeadError, EngineRequestError

    chain = _chain(exc)
    if (bad := _any(chain, InvalidArgument)) is not None:
        return invalid(bad.field, bad.detail)
    if isinstance(down := _any(chain, PoolDown), PoolDown) and down.pool in POOL_NAMES:
        why = ("its replicas died or cannot start, e.g. no node for them yet" if down.failed
               else "it is starting or restarting")
        return unavailable(f"the {down.pool} pool has no running replica ({why}); retry after Retry-After")
    if isinstance(stalled := _any(chain, PoolStalled), PoolStalled) and stalled.pool in POOL_NAMES:
        return unavailable(f"the {stalled.pool} pool answered no call for {stalled.waited_s:.1f} s while calls were "
                           f"out to it (a replica hung); retry after Retry-After")
    if isinstance(exc, DeadlineExceeded) and len(chain) == 1:  # wrapped, it would be a pool's own timeout
        return ApiError("deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED, 504,
                        f"request deadline exceeded after {len(exc.partial.steps)} steps; no partial result "
                        f"is returned (raise timeout_s or lower max_steps)")
    if _any(chain, (asyncio.CancelledError, TaskCancelledError)) is not None:
        return ApiError("cancelled", grpc.StatusCode.CANCELLED, 499, "request cancelled")
    pool = _pool_of(chain)
    the_pool = f"the {pool} pool" if pool else "a model pool"
    if _any(chain, BackPressureError) is not None:
        return ApiError("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 503,
                        f"overloaded: {the_pool}'s queue is full; retry with backoff")
    if _any(chain, EngineDeadError) is not None:
        return unavailable(f"{the_pool}'s vLLM engine is dead; retry (Serve replaces its replica)")
    if _any(chain, DeploymentUnavailableError) is not None:
        return unavailable(f"{the_pool} is unavailable (it failed to deploy); retry later")
    if _any(chain, (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError,
                    LocalRayletDiedError)) is not None or any(replica_channel_lost(e) for e in chain):
        return unavailable(f"{the_pool} lost a replica (it died or is unreachable); retry")
    if _any(chain, TimeoutError) is not None:  # raised by a backend or a Ray call; our deadline returned above
        return unavailable(f"{the_pool} timed out; retry")
    reference = new_reference()
    if (scorer := _any(chain, ScorerError)) is not None:
        role = scorer.role if isinstance(scorer.role, str) and re.fullmatch(r"[a-z ]{1,40}", scorer.role) else pool
        what = f": the {role} returned an unusable result" if role else ": a model returned an unusable result"
    else:
        details = [f"{pool} pool"] if pool else []
        if _any(chain, CheckpointError) is not None:  # its message names a path: never shown
            details.append("unusable checkpoint")
        elif _any(chain, EngineRequestError) is not None:
            details.append("engine request failed")
        what = f" ({', '.join(details)})" if details else ""
    return ApiError("internal", grpc.StatusCode.INTERNAL, 500, f"internal error{what}; reference {reference}",
                    reference=reference)
