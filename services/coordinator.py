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
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.metrics import Counter, Histogram

from arbitrage_common.accounting import LoopResult, Usage
from arbitrage_common.auth import check_bearer, load_keys
from arbitrage_common.autoscaling import WATCHES_METRIC
from arbitrage_common.config import COORDINATOR_SCALING_KEY, AppConfig
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument
from arbitrage_common.loop import LoopStream, stream_loop
from arbitrage_common.policies import POLICIES, make_policy
from arbitrage_common.retry import RetryPolicy
from arbitrage_common.steps import build_prefix
from arbitrage_common.threshold_control import LoadController
from protos.arbitrage.v1 import arbitrage_pb2 as pb

from . import convert
from .gauge_clock import GaugeClock
from .handles import PoolHandles
from .health import PoolHealth, WatchSlots, pools_needed, serving_app_name
from .load_metrics import LoadGauges, RowsWaitingGauge
from .proxy_status import UnparsedRequest
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
WATCH_STALE_S = 3 * WATCH_RESEND_S  # a Watch whose client pulled nothing this long has left
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _GrpcAbort(Exception):
    """Raised after setting the gRPC status on the context: Serve returns that status."""


class _QuietGrpcAborts(logging.Filter):
    """Drops Serve's "Request failed." traceback for a ``_GrpcAbort``: a stream can end with a
    status only by raising (the proxy copies the context's status only alongside a message),
    and ``log_outcome`` has already logged the request's one line. Serve logs it wrapped (a
    ``gRPCStatusError`` carrying the status set, raised from the abort)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        for _ in range(4):  # the abort itself, or the wrapper(s) around it
            if exc is None or isinstance(exc, _GrpcAbort):
                return exc is None
            exc = getattr(exc, "original_exception", None) or exc.__cause__
        return True


_QUIET_GRPC_ABORTS = _QuietGrpcAborts()


class _Refused(Exception):
    """A gRPC call refused before validation; carries its ApiError."""

    def __init__(self, err: convert.ApiError) -> None:
        self.err = err


_UNAUTHENTICATED = convert.unauthenticated("metadata 'authorization: Bearer <key>'")
# A client's own mistake (or its cancel) is routine: INFO. Trouble on the server's side is a
# WARNING; only a bug is an ERROR, logged with its traceback.
_LOG_LEVELS = {"internal": logging.ERROR, "unavailable": logging.WARNING, "resource_exhausted": logging.WARNING,
               "deadline_exceeded": logging.WARNING}
_LOGGED_ID_CHARS = 64  # a request_id is logged before validation too: bounded, escaped (%r)


def _called(stream: LoopStream) -> set[str]:
    """The pools the request's loop called (a call was made, answered or not)."""
    return {role for role in ("draft", "target", "router", "prm")
            if getattr(getattr(stream.models, role), "called", False)}


def _in_replica() -> bool:
    """Whether this runs in a Serve replica (on its event loop), not in a test or a script
    that merely has Ray initialized."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with control characters escaped: messages quote client input (a path, a field),
    which must not forge log lines or send terminal escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def log_outcome(err: convert.ApiError, transport: str, policy: str, request_id: str | None,
                exc: BaseException | None = None) -> None:
    """The one log line of a request that did not succeed. Serve's access log cannot tell:
    it reads a failed unary gRPC call as OK (its status travels in the context)."""
    rid = request_id[:_LOGGED_ID_CHARS] if isinstance(request_id, str) and request_id else None
    level = _LOG_LEVELS.get(err.code, logging.INFO)
    logger.log(level, "request failed: status=%s policy=%s transport=%s request_id=%r: %s", err.code, policy,
               transport, rid, printable(err.message),
               exc_info=exc if level >= logging.ERROR and exc is not None else None)


def _health_refused(err: convert.ApiError) -> convert.ApiError:
    """Log a refused health call. Not counted in ``arbitrage_requests_total``: probes are not
    requests (those that succeed are not counted either), and the alerts' ratios read it."""
    log_outcome(err, "grpc", "none", None)
    return err


class Coordinator:
    """One replica runs many requests concurrently; each is one step loop."""

    def __init__(self, config: dict[str, Any], draft: Any, target: Any, router: Any | None = None,
                 prm: Any | None = None) -> None:
        # The app's args; under a Serve YAML their replica fields are stand-ins, and the real ones
        # come with the user_config (``reconfigure``), which Serve changes in place.
        self._args = self.cfg = AppConfig.model_validate(config)
        if _QUIET_GRPC_ABORTS not in logger.filters:  # Serve's replica logs on this same logger
            logger.addFilter(_QUIET_GRPC_ABORTS)
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
                                 slot_roles=slotted, pool_failed=lambda role: self.health.failed(role))
        self._load_gauges = LoadGauges() if self.load is not None else None
        self._rows_waiting = RowsWaitingGauge() if self.pools.merged else None
        # The load gauges are set at admission and at each probe too, but a probe every 2 s is
        # not enough alone. No clock when there is nothing to export.
        clocked = self.load is not None or self._rows_waiting is not None
        self._gauge_clock = GaugeClock(self._export_gauges) if clocked else None
        allowed = self.cfg.policy.allowed
        self.available = [name for name, cls in POLICIES.items()
                          if (cls.scorer is None or getattr(self.pools, cls.scorer) is not None)
                          and (allowed is None or name in allowed)]
        self.health = PoolHealth(serving_app_name(self.cfg.name), pools_needed(self.cfg.policy.default),
                                 c.health_probe_s, on_probe=self._after_probe,
                                 fail_fast_after_s=c.fail_fast_after_s)
        self._apply_scaling(self.cfg)
        self._contexts: dict[str, int] | None = None
        # Generator pools that keep a per-request prefix cache (transformers, cache not off).
        self._cached_generators = {role for role in ("draft", "target")
                                   if (m := getattr(self.cfg.pools, role).model).backend == "transformers"
                                   and m.prefix_cache_mb != 0}
        self._releases: set[asyncio.Task] = set()
        self._inflight = 0  # requests whose steps are being run (``steps_of``)
        self._watches = WatchSlots(max(1, c.max_ongoing_requests // WATCHES_PER_SLOTS), WATCH_STALE_S)
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

    async def reconfigure(self, user_config: Any) -> None:
        """Serve's in-place update (``coordinator_user_config``): every deployment's replica
        fields (none: the args'). On the event loop, so no step picks a lane meanwhile. A bad
        one is logged and the last good one kept: failing here would stop this replica, and
        with it maybe the only way in (``arbitrage config check`` refuses it beforehand)."""
        scaling = user_config.get(COORDINATOR_SCALING_KEY, {}) if isinstance(user_config, dict) else user_config
        try:
            cfg = self._args.with_scaling(scaling)
        except ValueError as exc:  # pydantic's ValidationError is one
            logger.error("reconfigure: user_config.%s refused, the last one kept: %s", COORDINATOR_SCALING_KEY,
                         printable(" ".join(str(exc).split())))
            return
        self._apply_scaling(cfg)

    def _apply_scaling(self, cfg: AppConfig) -> None:
        """What follows the pools' replica bounds: merge lanes (``PoolSpec.merge_lanes``), the
        pools readiness lets scale to zero, and the target bound the load controller waits on."""
        if self.cfg.coordinator.merge_calls:
            self.pools.set_lanes({role: spec.merge_lanes() for role, spec in cfg.pools.configured()})
        self.health.scale_to_zero = frozenset(
            role for role, spec in cfg.pools.configured()
            if spec.autoscaling_config is not None and spec.autoscaling_config.min_replicas == 0)
        target_scaling = cfg.pools.target.autoscaling_config
        self._target_max_replicas = target_scaling.max_replicas if target_scaling is not None else None
        self.cfg = cfg

    # -- shared core ---------------------------------------------------------------------
    async def open_stream(self, fields: RequestFields) -> tuple[Prepared, LoopStream]:
        """``prepare_request``, then ``start_stream``."""
        return await self.start_stream(self.prepare_request(fields))

    def prepare_request(self, fields: RequestFields) -> Prepared:
        """Validate (``InvalidArgument`` names the field) and set the threshold. Separate from
        ``start_stream`` so a failure from here on is labelled with the request's real policy."""
        prepared = prepare(fields, self.cfg)
        return self._under_load(prepared, explicit=prepared.threshold_explicit)

    async def start_stream(self, prepared: Prepared) -> tuple[Prepared, LoopStream]:
        """Admit (the prompt fits every generator's context) and bind the pools.
        A client's own gRPC deadline needs nothing here: when it passes, the proxy cancels the
        call, which cancels the loop and its pool call in flight."""
        # Retries stop in time for the request to fail before its deadline, not at it.
        deadline = time.monotonic() + prepared.request.deadline_s if prepared.request.deadline_s else None
        if _in_replica():  # the probes keep PoolHealth.failed current: calls to a failing pool fail fast
            self.health.start()
            if self._gauge_clock is not None:
                self._gauge_clock.start()
        try:
            await self._admit(prepared, deadline)
        except DeadlineExceeded as exc:  # admission calls the generators only
            await self._blame_pool_down(exc, ["draft", "target"])
        request = prepared.request
        if deadline is not None:  # the loop's clock starts at its first step: it gets what admission left
            request = dataclasses.replace(request, deadline_s=max(deadline - time.monotonic(), _MIN_DEADLINE_S))
        busiest = self.cfg.limits.step_pipelining_max_inflight
        if request.pipeline and busiest is not None and self._inflight >= busiest:
            # Busy: no spare capacity for early drafts, so the plain loop (same outputs).
            request = dataclasses.replace(request, pipeline=False)
        prepared = dataclasses.replace(prepared, request=request)
        # The server's session id, never the client's request_id (clients may reuse one): each pool
        # with affinity serves all the request's steps on one replica, and keys its cache by it.
        models = self.pools.models(prepared.session_id, deadline)
        return prepared, stream_loop(prepared.request, models)  # 'policy' if its pool is missing

    def _under_load(self, prepared: Prepared, explicit: bool) -> Prepared:
        """The request with the threshold the load controller sets now (when it is on and the
        client left the threshold to the server); the response reports the one used."""
        if self.load is None:
            return prepared
        if _in_replica():  # the health probe's loop refreshes the controller (_refresh_load)
            self.health.start()
            self._gauge_clock.start()  # there is one: the load controller is on
        used = self.load.threshold_for(prepared.policy, prepared.threshold, time.monotonic(), explicit=explicit)
        self._export_load()
        if used == prepared.threshold:
            return prepared
        policy = make_policy(prepared.policy, used, prepared.request.options.seed)
        return dataclasses.replace(prepared, threshold=used, request=dataclasses.replace(prepared.request,
                                                                                         policy=policy))

    def _after_probe(self) -> None:
        try:
            self._refresh_load()
        finally:
            if self.pools.fail_fast is not None:  # they wait for a replica that may be minutes away
                self.pools.fail_fast.end_calls_to_failed()

    def _refresh_load(self) -> None:
        """After every health probe: the controller updates without waiting for a request (its
        offset falls once traffic stops), told whether the target pool can still add replicas
        (then it only lowers the offset: the autoscaler adds capacity first); gauges follow."""
        if self.load is None:
            return
        can_scale = self.health.can_add_replicas("target", self._target_max_replicas)
        self.load.update(time.monotonic(), can_scale=can_scale)
        self._export_load()

    def _export_load(self) -> None:
        self._load_gauges.export(self.load.snapshot())

    def _export_gauges(self) -> None:
        if self.load is not None:
            self._export_load()
        if self._rows_waiting is not None:
            self._rows_waiting.export(self.pools.rows_waiting())

    def _request_ended(self, prepared: Prepared, seconds: float) -> None:
        """A request whose threshold the controller set lasted ``seconds``: the controller's loop
        delay (a client's own threshold is not controlled, so its duration does not count)."""
        if self.load is not None and self.load.applies(prepared.policy, explicit=prepared.threshold_explicit):
            self.load.observe_request(seconds, time.monotonic())

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
        """INVALID_ARGUMENT naming the prompt's field (``prompt``, ``messages[i].content``) for a
        prompt that leaves no room in a generator's context, counted in that model's own tokens;
        short prompts are let through uncounted. Within the request's deadline, like every other
        pool call it makes."""
        request = prepared.request
        timeout = asyncio.timeout(None if deadline is None else deadline - time.monotonic())
        try:
            async with timeout:
                await self._check_prompt_fits(build_prefix(request.prompt, [], request.prompt_template), deadline,
                                              prepared.prompt_field)
        except TimeoutError:
            if not timeout.expired():
                raise
            raise DeadlineExceeded(LoopResult(request.prompt, [], "deadline", Usage(), 0.0),
                                   "deadline exceeded while checking the prompt's length") from None

    async def _check_prompt_fits(self, prefix: str, deadline: float | None, field: str) -> None:
        contexts = await self._generator_contexts(deadline)
        if not contexts or len(prefix.encode()) + _SPECIAL_TOKENS_MARGIN < min(contexts.values()):
            return
        roles = list(contexts)
        counts = await asyncio.gather(*(self.pools.caller(role, "count_tokens", deadline=deadline)(prefix)
                                        for role in roles))
        for role, tokens in zip(roles, counts):
            if tokens >= contexts[role]:
                raise InvalidArgument(field, f"is {tokens} tokens for the {role} model (prompt template "
                                             f"included); its context holds {contexts[role]}")

    @staticmethod
    def policy_label(policy: str | None) -> str:
        """A bounded metrics label: a known policy name, else 'none' (a request refused before
        its policy was known, or that named an unknown one: clients cannot mint labels)."""
        return policy if isinstance(policy, str) and policy in POLICIES else "none"

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
            await self._blame_pool_down(exc, [role for role in pools_needed(policy) if role in _called(stream)])
        finally:
            self._inflight -= 1
            self._request_ended(prepared, time.perf_counter() - started)
            await stream.aclose()
            self._release(prepared, stream)

    async def _blame_pool_down(self, exc: DeadlineExceeded, called: list[str]) -> None:
        """Re-raise a missed deadline, as ``PoolDown`` when a pool the request ``called`` has no
        running replica: the request waited for it (Serve holds a call until a replica runs),
        and the client should retry later rather than raise its deadline. A pool it never
        called (the target of a draft-only request, scaled to zero) did not make it late. As
        ``PoolStalled`` when a pool has answered nothing for ``pool_stall_s`` though calls were
        out to it (``PoolProgress``): a hung replica, which counts as running until Serve's
        health checks replace it. The pool the loop waited on first, then those it called,
        then those sharing its call slots (a hung pool holds slots the others wait for)."""
        stalled = self._stalled_pool([exc.waiting_on, *called, *self.pools.slot_roles])  # now: a cut call's
        down = await self.health.down(called)  # silence is told only for a moment, and this may probe
        if down:
            raise convert.PoolDown(down[0]) from exc
        if stalled is not None:
            raise convert.PoolStalled(*stalled) from exc
        raise exc

    def _stalled_pool(self, roles: list[str | None]) -> tuple[str, float] | None:
        """The first of ``roles`` silent for ``pool_stall_s`` with calls out, and for how long."""
        stall_s = self.cfg.coordinator.pool_stall_s
        if stall_s is not None:
            for role in dict.fromkeys(roles):
                if role is not None and (silent := self.pools.progress.stalled_s(role)) >= stall_s:
                    return role, silent
        return None

    def _release(self, prepared: Prepared, stream: LoopStream) -> None:
        """Fire and forget: the pools this request called drop its cached prefix (their LRU
        evicts it anyway if this is lost). With merged calls it rides on the next call. A pool
        the request never called gets nothing: a draft-only request sends the target no
        traffic, which would count as load to its autoscaler."""
        for role in _called(stream) & ({"router", "prm"} | self._cached_generators):
            if getattr(self.pools, role) is None or self.pools.release(role, prepared.session_id):
                continue
            task = asyncio.get_running_loop().create_task(self._release_one(role, prepared.session_id))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_one(self, role: str, session: str) -> None:
        await self.pools.send_alone(role, "release", session, session)

    def fail(self, transport: str, policy: str | None, exc: BaseException,
             request_id: str | None = None) -> convert.ApiError:
        """The status of a failed request, counted and logged once."""
        return self.reject(transport, policy, convert.classify(exc), request_id, exc)

    def reject(self, transport: str, policy: str | None, err: convert.ApiError, request_id: str | None = None,
               exc: BaseException | None = None) -> convert.ApiError:
        """Count and log one request that did not succeed (``policy``: the validated one, else
        what the client named; only known names become labels)."""
        self.record(transport, policy, err.code)
        log_outcome(err, transport, self.policy_label(policy), request_id, exc)
        return err

    def cancelled(self, transport: str, policy: str | None, request_id: str | None = None) -> None:
        self.fail(transport, policy, asyncio.CancelledError(), request_id)

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

    def _grpc_failed(self, exc: Exception, policy: str | None, request_id: str | None) -> convert.ApiError:
        """Refused before reading the request (auth, size): labelled 'none', as HTTP's middleware does."""
        if isinstance(exc, _Refused):
            return self.reject("grpc", None, exc.err, request_id)
        return self.fail("grpc", policy, exc, request_id)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        started, policy, request_id = time.perf_counter(), request.policy, request.request_id
        try:
            prepared = self.prepare_request(self._grpc_fields(request, grpc_context))
            policy, request_id = prepared.policy, prepared.request_id
            prepared, stream = await self.start_stream(prepared)
            async for _ in self.steps_of(stream, prepared):
                pass
            response = convert.result_proto(stream.result, prepared)
        except asyncio.CancelledError:
            self.cancelled("grpc", policy, request_id)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            err = self._grpc_failed(exc, policy, request_id)
            if grpc_context is None:
                raise _GrpcAbort(err.message) from None
            # Unary: the status travels with the (empty, never delivered) reply; no traceback logged.
            self._set_status(grpc_context, err)
            return pb.GenerateResponse()
        self.record("grpc", policy, "ok", started)
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: Any = None) -> AsyncIterator[pb.GenerateStreamResponse]:
        started, policy, request_id = time.perf_counter(), request.policy, request.request_id
        try:
            prepared = self.prepare_request(self._grpc_fields(request, grpc_context))
            policy, request_id = prepared.policy, prepared.request_id
            prepared, stream = await self.start_stream(prepared)
            async for step in self.steps_of(stream, prepared):
                yield pb.GenerateStreamResponse(step=convert.step_proto(step))
            summary = convert.result_proto(stream.result, prepared)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled("grpc", policy, request_id)
            raise
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            self._abort(grpc_context, self._grpc_failed(exc, policy, request_id))
        self.record("grpc", policy, "ok", started)
        yield pb.GenerateStreamResponse(summary=summary)

    def _abort(self, grpc_context: Any, err: convert.ApiError) -> NoReturn:
        """Streams: set the status, then raise; Serve ends the stream with that status."""
        if grpc_context is not None:
            self._set_status(grpc_context, err)
        raise _GrpcAbort(err.message) from None

    def _set_status(self, grpc_context: Any, err: convert.ApiError) -> None:
        """A failed call's status; a retriable one (HTTP's 503) also carries ``retry-after``
        trailing metadata, whole seconds as HTTP's header: gRPC has no standard hint. (Serve's
        proxy passes it on for ``Generate``; a failed stream's trailers it drops.)"""
        grpc_context.set_code(err.grpc_code)
        grpc_context.set_details(err.message)
        if err.http_status == 503:
            grpc_context.set_trailing_metadata([("retry-after", convert.retry_after(self.cfg.coordinator.retry_after_s))])

    # -- gRPC: grpc.health.v1.Health (open: no API key) -------------------------------
    def _refuse_unparsed(self, request: Any, grpc_context: Any) -> None:
        if isinstance(request, UnparsedRequest):  # bytes that did not parse (services.proxy_status)
            self._abort(grpc_context, _health_refused(convert.invalid(
                "request", f"is not a valid {request.message_type} message: its bytes do not parse "
                           f"(check the client's serializer)")))

    def _check_service(self, request: Any, grpc_context: Any) -> None:
        self._refuse_unparsed(request, grpc_context)
        if request.service not in ("", SERVICE_NAME):
            self._abort(grpc_context, _health_refused(convert.ApiError(
                "not_found", grpc.StatusCode.NOT_FOUND, 404, f"unknown service {request.service[:64]!r}")))

    @staticmethod
    def _health_reply(serving: bool) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=_SERVING if serving else _NOT_SERVING)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):
        """SERVING while every pool the default policy needs serves (``services.health``)."""
        self._check_service(request, grpc_context)
        return self._health_reply(await self.health.current())

    async def List(self, request: health_pb2.HealthListRequest, grpc_context: Any = None):
        """Every service this server reports on (the server itself, "", and the API), with
        ``Check``'s status. Serve's proxy registers the whole Health service, so without this a
        List call would be an unknown method, which Serve answers INTERNAL."""
        self._refuse_unparsed(request, grpc_context)
        reply = self._health_reply(await self.health.current())
        return health_pb2.HealthListResponse(statuses={"": reply, SERVICE_NAME: reply})

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):
        """The current status, then a message at each change, until the client leaves. The
        status is also re-sent every ``WATCH_RESEND_S`` unchanged: Serve's proxy notices a
        client that left only when it writes, and until then the stream counts as a request
        in flight that would hold a stopping replica for its whole graceful shutdown. An
        unknown service name gets SERVICE_UNKNOWN on an open stream, as grpc.health.v1 says
        (clients that watch it wait; an error would make them retry in a loop)."""
        # Health is open (no API key) and a stream holds one of the replica's request slots
        # for as long as it lives: a share of them at most, so watches cannot starve requests.
        self._refuse_unparsed(request, grpc_context)
        slot = self._watches.take()
        if slot is None:
            self._watches_full(grpc_context)
        try:
            if request.service not in ("", SERVICE_NAME):
                while True:
                    yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if not self._watches.pulled(slot):
                        self._watches_full(grpc_context)
                    await asyncio.sleep(WATCH_RESEND_S)
            serving = await self.health.current()
            while True:
                yield self._health_reply(serving)
                if not self._watches.pulled(slot):  # silent so long its slot went to another stream
                    self._watches_full(grpc_context)
                try:
                    serving = await asyncio.wait_for(self.health.wait_change(serving), WATCH_RESEND_S)
                except TimeoutError:
                    pass
        finally:
            self._watches.release(slot)

    def _watches_full(self, grpc_context: Any) -> NoReturn:
        self._abort(grpc_context, _health_refused(convert.ApiError(
            "resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 503,
            f"too many open health watches on this replica ({self._watches.cap}); use Check, or retry")))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: the health watches open now, which
        the coordinator's policy takes off Serve's request count
        (``arbitrage_common.autoscaling.requests_policy``). Serve samples it beside its own
        count of ongoing requests, a count at that moment too."""
        return {WATCHES_METRIC: float(self._watches.open_count())}

    # -- HTTP (routes in services.http_api) ------------------------------------------------
    def __serve_build_asgi_app__(self):
        """Serve calls this on each replica after __init__: the FastAPI app bound to self."""
        from .http_api import build_http_api

        return build_http_api(self)

    def list_models(self) -> dict[str, Any]:
        """OpenAI ``/v1/models``: the default (served_model_name) and one id per runnable policy,
        each with the ``threshold`` a request of it that sets none starts from (the configured
        ``policy.threshold`` for the default policy) and, with load control on, the
        ``effective_threshold`` such a request would run with now."""
        default = {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "arbitrage-serve",
                   "policy": self.cfg.policy.default, **self._thresholds(self.cfg.policy.default)}
        per_policy = [{"id": name, "object": "model", "created": 0, "owned_by": "arbitrage-serve", "policy": name,
                       **{k: v for k, v in POLICIES[name].describe().items() if k != "name"},
                       **self._thresholds(name)}
                      for name in self.available]
        return {"object": "list", "data": [default, *per_policy]}

    def _thresholds(self, name: str) -> dict[str, float | None]:
        """Base threshold of policy ``name`` (as ``prepare`` sets it), and the effective one."""
        base = make_policy(name, self.cfg.policy.threshold if name == self.cfg.policy.default else None).threshold
        if self.load is None:
            return {"threshold": base}
        return {"threshold": base, "effective_threshold": self.load.threshold_for(name, base, time.monotonic())}
