"""The Coordinator: gRPC servicer and HTTP ingress. It validates a request, runs the
engine's step loop (``arbitrage_common.loop``) over adapters on the pool handles, streams
steps as they are decided, and records metrics. It holds no model.

No ``@serve.deployment`` here; ``services.app`` wraps the class with ``serve.ingress()``
(the FastAPI app is built per replica by ``__serve_build_asgi_app__``) and
``serve.deployment`` from the AppConfig.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.metrics import Counter, Gauge, Histogram

from arbitrage_common.accounting import LoopResult, Usage
from arbitrage_common.auth import check_bearer, load_keys
from arbitrage_common.config import AppConfig
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument
from arbitrage_common.loop import LoopStream, stream_loop
from arbitrage_common.policies import POLICIES, make_policy
from arbitrage_common.retry import RetryPolicy
from arbitrage_common.steps import build_prefix
from arbitrage_common.threshold_control import LoadController
from protos.arbitrage.v1 import arbitrage_pb2 as pb

from . import convert
from .handles import PoolHandles
from .health import PoolHealth, pools_needed, serving_app_name
from .validation import Prepared, RequestFields, fields_from_proto, prepare

logger = logging.getLogger("ray.serve")
SERVICE_NAME = "arbitrage.v1.ArbitrageService"
# up to the longest deadline a preset allows (300 s): a p99 past the top bound reads as that bound
_LATENCY_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000]
# Byte-level and character tokenizers never produce more tokens than the text has bytes
# (plus a few special tokens), so a prompt this far below the context needs no counting.
_SPECIAL_TOKENS_MARGIN = 8
_MIN_DEADLINE_S = 1e-3  # what a request whose admission used up its deadline runs with: it fails at once
WATCH_RESEND_S = 5.0
WATCHES_PER_SLOTS = 8  # open health Watch streams: at most one per this many request slots
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _GrpcAbort(Exception):
    """Raised after setting the gRPC status on the context: Serve returns that status."""


class _Refused(Exception):
    """A gRPC call refused before validation; carries its ApiError."""

    def __init__(self, err: convert.ApiError) -> None:
        self.err = err


_UNAUTHENTICATED = convert.unauthenticated("metadata 'authorization: Bearer <key>'")


class Coordinator:
    """One replica runs many requests concurrently; each is one step loop."""

    def __init__(self, config: dict[str, Any], draft: Any, target: Any, router: Any | None = None,
                 prm: Any | None = None) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.api_keys = load_keys(self.cfg.auth)  # a missing key variable fails the replica at start
        c, load_control = self.cfg.coordinator, self.cfg.policy.load_control
        self.load = LoadController(load_control) if load_control.enabled else None
        lanes = {role: spec.merge_lanes() for role, spec in self.cfg.pools.configured()} if c.merge_calls else None
        # A vLLM engine admits rows into its running batch at every engine step, so a row held
        # for a call slot would only wait: those pools never take one.
        slotted = {role for role, spec in self.cfg.pools.configured() if spec.model.backend != "vllm"}
        self.pools = PoolHandles(draft, target, router, prm,
                                 retry=RetryPolicy(retries=c.pool_retries, base_s=c.retry_backoff_s),
                                 on_retry=self._count_retry, load=self.load, lanes=lanes,
                                 over_grpc=c.pool_calls_over_grpc, calls_in_flight=c.pool_calls_in_flight,
                                 slot_roles=slotted)
        self._offset = Gauge("arbitrage_threshold_offset", description="Load-aware threshold offset toward fewer "
                                                                       "target calls (this coordinator replica).")
        self.available = [name for name, cls in POLICIES.items()
                          if cls.scorer is None or getattr(self.pools, cls.scorer) is not None]
        self.health = PoolHealth(serving_app_name(self.cfg.name), pools_needed(self.cfg.policy.default),
                                 c.health_probe_s)
        self._contexts: dict[str, int] | None = None
        # Generator pools that keep a per-request prefix cache (transformers, cache not off).
        self._cached_generators = {role for role in ("draft", "target")
                                   if (m := getattr(self.cfg.pools, role).model).backend == "transformers"
                                   and m.prefix_cache_mb != 0}
        self._releases: set[asyncio.Task] = set()
        self._inflight = 0  # requests whose steps are being run (``steps_of``)
        self._watches, self._max_watches = 0, max(1, c.max_ongoing_requests // WATCHES_PER_SLOTS)
        self._retries = Counter("arbitrage_pool_retries_total", description="Pool calls retried, by pool and reason "
                                                                            "(replica died, pool full).",
                                tag_keys=("role", "reason"))
        tags = ("transport", "policy", "status")
        self._requests = Counter("arbitrage_requests_total", description="Requests by transport, policy, status.",
                                 tag_keys=tags)
        self._latency = Histogram("arbitrage_request_ms", description="End-to-end ms of successful requests.",
                                  boundaries=_LATENCY_MS, tag_keys=("transport", "policy"))
        self._steps = Counter("arbitrage_steps_total", description="Decided steps by writer and policy.",
                              tag_keys=("source", "policy"))
        self._first_step = Histogram("arbitrage_first_step_ms", description="Ms from the start of a request's step "
                                                                            "loop to its first decided step (TTFS).",
                                     boundaries=_LATENCY_MS, tag_keys=("policy",))

    # -- shared core ---------------------------------------------------------------------
    async def open_stream(self, fields: RequestFields) -> tuple[Prepared, LoopStream]:
        """Validate, admit (the prompt fits every generator's context) and bind the pools.
        A client's own gRPC deadline needs nothing here: when it passes, the proxy cancels the
        call, which cancels the loop and its pool call in flight."""
        prepared = self._under_load(prepare(fields, self.cfg), explicit=fields.threshold is not None)
        # Retries stop in time for the request to fail before its deadline, not at it.
        deadline = time.monotonic() + prepared.request.deadline_s if prepared.request.deadline_s else None
        try:
            await self._admit(prepared, deadline)
        except DeadlineExceeded as exc:
            await self._blame_pool_down(exc, prepared.policy)
        request = prepared.request
        if deadline is not None:  # the loop's clock starts at its first step: it gets what admission left
            request = dataclasses.replace(request, deadline_s=max(deadline - time.monotonic(), _MIN_DEADLINE_S))
        busiest = self.cfg.limits.step_pipelining_max_inflight
        if request.pipeline and busiest is not None and self._inflight >= busiest:
            # Busy: no spare capacity for early drafts, so the plain loop (same outputs).
            request = dataclasses.replace(request, pipeline=False)
        prepared = dataclasses.replace(prepared, request=request)
        # The request id is the session id: each pool with affinity serves all its steps on one replica.
        models = self.pools.models(prepared.request_id, deadline)
        return prepared, stream_loop(prepared.request, models)  # 'policy' if its pool is missing

    def _under_load(self, prepared: Prepared, explicit: bool) -> Prepared:
        """The request with the threshold the load controller sets now (when it is on and the
        client left the threshold to the server); the response reports the one used."""
        if self.load is None:
            return prepared
        used = self.load.threshold_for(prepared.policy, prepared.threshold, time.monotonic(), explicit=explicit)
        self._offset.set(self.load.offset)
        if used == prepared.threshold:
            return prepared
        policy = make_policy(prepared.policy, used, prepared.request.options.seed)
        return dataclasses.replace(prepared, threshold=used, request=dataclasses.replace(prepared.request,
                                                                                         policy=policy))

    async def _generator_contexts(self, deadline: float | None) -> dict[str, int]:
        """Each generator pool's context length (asked once; {} while a pool cannot answer)."""
        if self._contexts is None:
            try:
                infos = await asyncio.gather(*(self.pools.caller(role, "context_info", deadline=deadline)()
                                               for role in ("draft", "target")))
            except Exception:  # noqa: BLE001 (the loop still ends an overlong prompt cleanly)
                return {}
            self._contexts = {role: info["context"] for role, info in zip(("draft", "target"), infos)
                              if info.get("context")}
        return self._contexts

    async def _admit(self, prepared: Prepared, deadline: float | None) -> None:
        """INVALID_ARGUMENT('prompt') for a prompt that leaves no room in a generator's context,
        counted in that model's own tokens; short prompts are let through uncounted. Within the
        request's deadline, like every other pool call it makes."""
        request = prepared.request
        timeout = asyncio.timeout(None if deadline is None else deadline - time.monotonic())
        try:
            async with timeout:
                await self._check_prompt_fits(build_prefix(request.prompt, [], request.prompt_template), deadline)
        except TimeoutError:
            if not timeout.expired():
                raise
            raise DeadlineExceeded(LoopResult(request.prompt, [], "deadline", Usage(), 0.0),
                                   "deadline exceeded while checking the prompt's length") from None

    async def _check_prompt_fits(self, prefix: str, deadline: float | None) -> None:
        contexts = await self._generator_contexts(deadline)
        if not contexts or len(prefix.encode()) + _SPECIAL_TOKENS_MARGIN < min(contexts.values()):
            return
        roles = list(contexts)
        counts = await asyncio.gather(*(self.pools.caller(role, "count_tokens", deadline=deadline)(prefix)
                                        for role in roles))
        for role, tokens in zip(roles, counts):
            if tokens >= contexts[role]:
                raise InvalidArgument("prompt", f"is {tokens} tokens for the {role} model (prompt template "
                                                f"included); its context holds {contexts[role]}")

    def policy_label(self, raw: str | None) -> str:
        """A bounded metrics label: a known policy name, else 'invalid' (clients cannot mint labels)."""
        name = raw or self.cfg.policy.default
        return name if name in POLICIES else "invalid"

    def authorized(self, header: str | None) -> bool:
        return not self.api_keys or check_bearer(header, self.api_keys)

    def _count_retry(self, role: str, reason: str) -> None:
        self._retries.inc(tags={"role": role, "reason": reason})

    def record(self, transport: str, policy: str, status: str, started: float | None = None) -> None:
        self._requests.inc(tags={"transport": transport, "policy": self.policy_label(policy), "status": status})
        if started is not None and status == "ok":
            self._latency.observe((time.perf_counter() - started) * 1000.0,
                                  tags={"transport": transport, "policy": self.policy_label(policy)})

    async def steps_of(self, stream: LoopStream, prepared: Prepared) -> AsyncIterator[Any]:
        """The stream's steps, counted by source and (validated) policy; the first one also
        records time to first step. At the end the pools drop the request's cache."""
        started, first, policy = time.perf_counter(), True, prepared.policy
        self._inflight += 1
        try:
            async for step in stream:
                if first:
                    self._first_step.observe((time.perf_counter() - started) * 1000.0, tags={"policy": policy})
                    first = False
                self._steps.inc(tags={"source": step.source, "policy": policy})
                yield step
        except DeadlineExceeded as exc:
            await self._blame_pool_down(exc, policy)
        finally:
            self._inflight -= 1
            await stream.aclose()
            self._release(prepared, stream)

    async def _blame_pool_down(self, exc: DeadlineExceeded, policy: str) -> None:
        """Re-raise a missed deadline, as ``PoolDown`` when a pool the policy needs has no
        running replica: the request waited for it (Serve holds a call until a replica runs),
        and the client should retry later rather than raise its deadline."""
        down = await self.health.down(pools_needed(policy))
        if down:
            raise convert.PoolDown(down[0]) from exc
        raise exc

    def _release(self, prepared: Prepared, stream: LoopStream) -> None:
        """Fire and forget: the pools this request called drop its cached prefix (their LRU
        evicts it anyway if this is lost). With merged calls it rides on the next call. A pool
        the request never called gets nothing: a draft-only request sends the target no
        traffic, which would count as load to its autoscaler."""
        called = {role for role in ("draft", "target", "router", "prm")
                  if getattr(getattr(stream.models, role), "called", False)}
        for role in called & ({"router", "prm"} | self._cached_generators):
            if getattr(self.pools, role) is None or self.pools.release(role, prepared.request_id):
                continue
            task = asyncio.get_running_loop().create_task(self._release_one(role, prepared.request_id))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_one(self, role: str, session: str) -> None:
        try:
            await self.pools.caller(role, "release", session)(session)
        except Exception as exc:  # noqa: BLE001 (best effort: the LRU bounds the cache anyway)
            logger.debug("release of %s on %s failed: %s", session, role, type(exc).__name__)

    def fail(self, transport: str, policy: str, exc: BaseException) -> convert.ApiError:
        err = convert.classify(exc)
        self.record(transport, policy, err.code)
        if err.code == "internal":  # the client sees only the reference; the log has the traceback
            logger.error("request failed (reference %s)", err.reference, exc_info=exc)
        elif err.code == "unavailable":
            logger.warning("request failed: %s (%s)", err.message, type(exc).__name__)
        return err

    def _refused(self, exc: _Refused, policy: str) -> convert.ApiError:
        self.record("grpc", policy, exc.err.code)
        return exc.err

    def cancelled(self, transport: str, policy: str) -> None:
        self.record(transport, policy, "cancelled")

    # -- gRPC: arbitrage.v1.ArbitrageService -------------------------------------------
    def _grpc_fields(self, request: pb.GenerateRequest, grpc_context: Any) -> RequestFields:
        """Auth and size checks, then the request's fields."""
        if grpc_context is not None and self.api_keys:
            metadata = dict(grpc_context.invocation_metadata())
            if not self.authorized(metadata.get("authorization")):
                raise _Refused(_UNAUTHENTICATED)
        limit = self.cfg.limits.max_grpc_message_bytes
        if request.ByteSize() > limit:
            raise _Refused(convert.payload_too_large(limit, request.ByteSize(), field="request"))
        return fields_from_proto(request)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        started, policy = time.perf_counter(), request.policy
        try:
            prepared, stream = await self.open_stream(self._grpc_fields(request, grpc_context))
            policy = prepared.policy
            async for _ in self.steps_of(stream, prepared):
                pass
            response = convert.result_proto(stream.result, prepared)
        except asyncio.CancelledError:
            self.cancelled("grpc", policy)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            err = self._refused(exc, policy) if isinstance(exc, _Refused) else self.fail("grpc", policy, exc)
            if grpc_context is None:
                raise _GrpcAbort(err.message) from None
            # Unary: the status travels with the (empty, never delivered) reply; no traceback logged.
            grpc_context.set_code(err.grpc_code)
            grpc_context.set_details(err.message)
            return pb.GenerateResponse()
        self.record("grpc", policy, "ok", started)
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: Any = None) -> AsyncIterator[pb.GenerateStreamResponse]:
        started, policy = time.perf_counter(), request.policy
        try:
            prepared, stream = await self.open_stream(self._grpc_fields(request, grpc_context))
            policy = prepared.policy
            async for step in self.steps_of(stream, prepared):
                yield pb.GenerateStreamResponse(step=convert.step_proto(step))
            summary = convert.result_proto(stream.result, prepared)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled("grpc", policy)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            err = self._refused(exc, policy) if isinstance(exc, _Refused) else self.fail("grpc", policy, exc)
            self._abort(grpc_context, err)
        self.record("grpc", policy, "ok", started)
        yield pb.GenerateStreamResponse(summary=summary)

    @staticmethod
    def _abort(grpc_context: Any, err: convert.ApiError) -> NoReturn:
        """Streams: set the status, then raise; Serve ends the stream with that status."""
        if grpc_context is not None:
            grpc_context.set_code(err.grpc_code)
            grpc_context.set_details(err.message)
        raise _GrpcAbort(err.message) from None

    # -- gRPC: grpc.health.v1.Health (open: no API key) -------------------------------
    def _check_service(self, request: Any, grpc_context: Any) -> None:
        if request.service not in ("", SERVICE_NAME):
            self._abort(grpc_context, convert.ApiError("not_found", grpc.StatusCode.NOT_FOUND, 404,
                                                       f"unknown service {request.service!r}"))

    @staticmethod
    def _health_reply(serving: bool) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=_SERVING if serving else _NOT_SERVING)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):
        """SERVING while every pool the default policy needs has a running replica."""
        self._check_service(request, grpc_context)
        return self._health_reply(await self.health.current())

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):
        """The current status, then a message at each change, until the client leaves. The
        status is also re-sent every ``WATCH_RESEND_S`` unchanged: Serve's proxy notices a
        client that left only when it writes, and until then the stream counts as a request
        in flight that would hold a stopping replica for its whole graceful shutdown. An
        unknown service name gets SERVICE_UNKNOWN on an open stream, as grpc.health.v1 says
        (clients that watch it wait; an error would make them retry in a loop)."""
        # Health is open (no API key) and a stream holds one of the replica's request slots
        # for as long as it lives: a share of them at most, so watches cannot starve requests.
        if self._watches >= self._max_watches:
            self._abort(grpc_context, convert.ApiError(
                "resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 503,
                f"too many open health watches on this replica ({self._max_watches}); use Check, or retry"))
        self._watches += 1
        try:
            if request.service not in ("", SERVICE_NAME):
                while True:
                    yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    await asyncio.sleep(WATCH_RESEND_S)
            serving = await self.health.current()
            while True:
                yield self._health_reply(serving)
                try:
                    serving = await asyncio.wait_for(self.health.wait_change(serving), WATCH_RESEND_S)
                except TimeoutError:
                    pass
        finally:
            self._watches -= 1

    # -- HTTP (routes in services.http_api) ------------------------------------------------
    def __serve_build_asgi_app__(self):
        """Serve calls this on each replica after __init__: the FastAPI app bound to self."""
        from .http_api import build_http_api

        return build_http_api(self)

    def list_models(self) -> dict[str, Any]:
        """OpenAI ``/v1/models``: the default (served_model_name) and one id per runnable policy."""
        default = {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "arbitrage-serve",
                   "policy": self.cfg.policy.default,
                   "threshold": make_policy(self.cfg.policy.default, self.cfg.policy.threshold).threshold}
        per_policy = [{"id": name, "object": "model", "created": 0, "owned_by": "arbitrage-serve", "policy": name,
                       **{k: v for k, v in POLICIES[name].describe().items() if k != "name"}}
                      for name in self.available]
        return {"object": "list", "data": [default, *per_policy]}
