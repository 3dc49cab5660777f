"""The Coordinator: gRPC servicer and HTTP ingress. It validates a request, runs the
engine's step loop (``arbitrage_common.loop``) over adapters on the pool handles, streams
steps as they are decided, and records metrics. It holds no model.

No ``@serve.deployment`` here; ``services.app`` wraps the class with ``serve.ingress()``
(the FastAPI app is built per replica by ``__serve_build_asgi_app__``) and
``serve.deployment`` from the AppConfig.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.metrics import Counter, Histogram

from arbitrage_common.config import AppConfig
from arbitrage_common.loop import LoopStream, stream_loop
from arbitrage_common.policies import POLICIES
from protos.arbitrage.v1 import arbitrage_pb2 as pb

from . import convert
from .handles import PoolHandles
from .validation import Prepared, RequestFields, fields_from_proto, prepare

logger = logging.getLogger("ray.serve")
SERVICE_NAME = "arbitrage.v1.ArbitrageService"
_LATENCY_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


class _GrpcAbort(Exception):
    """Raised after setting the gRPC status on the context: Serve returns that status."""


class Coordinator:
    """One replica runs many requests concurrently; each is one step loop."""

    def __init__(self, config: dict[str, Any], draft: Any, target: Any, router: Any | None = None,
                 prm: Any | None = None) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.pools = PoolHandles(draft, target, router, prm)
        self.available = [name for name, cls in POLICIES.items()
                          if cls.scorer is None or getattr(self.pools, cls.scorer) is not None]
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
    def open_stream(self, fields: RequestFields) -> tuple[Prepared, LoopStream]:
        prepared = prepare(fields, self.cfg)
        # The request id is the session id: each pool with affinity serves all its steps on one replica.
        models = self.pools.models(prepared.request_id)
        return prepared, stream_loop(prepared.request, models)  # 'policy' if its pool is missing

    def record(self, transport: str, policy: str, status: str, started: float | None = None) -> None:
        self._requests.inc(tags={"transport": transport, "policy": policy or "?", "status": status})
        if started is not None and status == "ok":
            self._latency.observe((time.perf_counter() - started) * 1000.0,
                                  tags={"transport": transport, "policy": policy})

    async def steps_of(self, stream: LoopStream, policy: str) -> AsyncIterator[Any]:
        """The stream's steps, counted by source and (validated) policy; the first one also
        records time to first step."""
        started, first = time.perf_counter(), True
        try:
            async for step in stream:
                if first:
                    self._first_step.observe((time.perf_counter() - started) * 1000.0, tags={"policy": policy})
                    first = False
                self._steps.inc(tags={"source": step.source, "policy": policy})
                yield step
        finally:
            await stream.aclose()

    def fail(self, transport: str, policy: str, exc: BaseException) -> convert.ApiError:
        err = convert.classify(exc)
        self.record(transport, policy, err.code)
        if err.code == "internal":
            logger.exception("request failed", exc_info=exc)
        return err

    # -- gRPC: arbitrage.v1.ArbitrageService -------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        started, policy = time.perf_counter(), request.policy
        try:
            prepared, stream = self.open_stream(fields_from_proto(request))
            policy = prepared.policy
            async for _ in self.steps_of(stream, policy):
                pass
            response = convert.result_proto(stream.result, prepared)
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            err = self.fail("grpc", policy, exc)
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
            prepared, stream = self.open_stream(fields_from_proto(request))
            policy = prepared.policy
            async for step in self.steps_of(stream, policy):
                yield pb.GenerateStreamResponse(step=convert.step_proto(step))
            summary = convert.result_proto(stream.result, prepared)
        except Exception as exc:  # noqa: BLE001 (every failure maps to a status)
            self._abort(grpc_context, self.fail("grpc", policy, exc))
        self.record("grpc", policy, "ok", started)
        yield pb.GenerateStreamResponse(summary=summary)

    @staticmethod
    def _abort(grpc_context: Any, err: convert.ApiError) -> NoReturn:
        """Streams: set the status, then raise; Serve ends the stream with that status."""
        if grpc_context is not None:
            grpc_context.set_code(err.grpc_code)
            grpc_context.set_details(err.message)
        raise _GrpcAbort(err.message) from None

    # -- gRPC: grpc.health.v1.Health ---------------------------------------------------
    def _health(self, request: Any, grpc_context: Any) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            self._abort(grpc_context, convert.ApiError("not_found", grpc.StatusCode.NOT_FOUND, 404,
                                                       f"unknown service {request.service!r}"))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):
        return self._health(request, grpc_context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):
        yield self._health(request, grpc_context)

    # -- HTTP (routes in services.http_api) ------------------------------------------------
    def __serve_build_asgi_app__(self):
        """Serve calls this on each replica after __init__: the FastAPI app bound to self."""
        from .http_api import build_http_api

        return build_http_api(self)

    def list_models(self) -> dict[str, Any]:
        """OpenAI ``/v1/models``: the default (served_model_name) and one id per runnable policy."""
        default = {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "arbitrage-serve",
                   "policy": self.cfg.policy.default, "threshold": self.cfg.policy.threshold}
        per_policy = [{"id": name, "object": "model", "created": 0, "owned_by": "arbitrage-serve", "policy": name,
                       **{k: v for k, v in POLICIES[name].describe().items() if k != "name"}}
                      for name in self.available]
        return {"object": "list", "data": [default, *per_policy]}
