"""The gRPC side: gevent-patched grpc, an interceptor that fires locust request events, and a
user that calls Generate or GenerateStream through the project's one client module.

A stream fires three kinds of entries: ``GenerateStream TTFS`` (time to the first step),
``GenerateStream step`` (each gap between steps) and ``GenerateStream end`` (the whole call). A
stream that ends OK without its summary is cut short: ``STREAM_INCOMPLETE``, a failure."""
from __future__ import annotations

import time

import grpc
import grpc.experimental.gevent as grpc_gevent

from arbitrage_common.client import Client, ServiceError, build_request

from . import records
from .backoff import Outcome

grpc_gevent.init_gevent()  # grpc's event loop must cooperate with locust's greenlets


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Fires ``environment.events.request`` for every call and records each request."""

    def __init__(self, environment, transport: str):
        self.fire = environment.events.request.fire
        self.transport = transport

    def intercept_unary_unary(self, continuation, details, request):
        started, t0 = records.request_start()
        call = continuation(details, request)
        name = details.method.rsplit("/", 1)[-1]
        try:
            reply = call.result()
        except grpc.RpcError as exc:
            self.fire(request_type="grpc", name=name, response_time=_ms(started), response_length=0, exception=exc)
            records.add(records.Record(self.transport, t0, _ms(started), exc.code().name, policy=request.policy))
            return call
        self.fire(request_type="grpc", name=name, response_time=_ms(started), response_length=reply.ByteSize())
        rec = records.Record(self.transport, t0, _ms(started), "OK", steps=len(reply.steps),
                             target_steps=reply.usage.target_steps, policy=reply.policy)
        records.grade(rec, request.prompt, reply)
        records.add(rec)
        return call

    def intercept_unary_stream(self, continuation, details, request):
        return self._timed(continuation(details, request), details.method.rsplit("/", 1)[-1], request)

    def _timed(self, stream, name: str, request):
        started, t0 = records.request_start()
        rec = records.Record(self.transport, t0, 0.0, "OK", policy=request.policy)
        last, summarized = started, False
        try:
            for event in stream:
                if event.WhichOneof("event") == "step":
                    now = time.perf_counter()
                    if rec.ttfs_ms is None:
                        rec.ttfs_ms = _ms(started)
                        self.fire(request_type="grpc", name=f"{name} TTFS", response_time=rec.ttfs_ms,
                                  response_length=0)
                    else:
                        gap = (now - last) * 1000.0
                        rec.step_ms.append(gap)
                        self.fire(request_type="grpc", name=f"{name} step", response_time=gap, response_length=0)
                    last = now
                    rec.steps += 1
                elif event.WhichOneof("event") == "summary":
                    summarized = True
                    rec.target_steps = event.summary.usage.target_steps
                    rec.policy = event.summary.policy
                    records.grade(rec, request.prompt, event.summary)
                yield event
        except grpc.RpcError as exc:
            rec.status, rec.e2e_ms = exc.code().name, _ms(started)
            self.fire(request_type="grpc", name=f"{name} end", response_time=rec.e2e_ms, response_length=0,
                      exception=exc)
            records.add(rec)
            raise
        rec.e2e_ms = _ms(started)
        cut = None
        if not summarized:  # the service ends every finished stream with its summary: this one is cut short
            rec.status = "STREAM_INCOMPLETE"
            cut = RuntimeError(f"STREAM_INCOMPLETE: the stream ended OK after {rec.steps} step(s) without its summary")
        self.fire(request_type="grpc", name=f"{name} end", response_time=rec.e2e_ms, response_length=0, exception=cut)
        records.add(rec)


def make_client(environment, settings) -> Client:
    channel = grpc.intercept_channel(grpc.insecure_channel(settings.host_grpc),
                                     LocustInterceptor(environment, settings.transport))
    return Client(settings.host_grpc, settings.app, channel=channel)


def call_grpc(client: Client, settings, prompt: str) -> Outcome:
    """One request; failures are already counted by the interceptor. Its gRPC status and the
    service's ``retry-after`` trailer (unary calls only), for the closed loop's backoff."""
    mix = settings.mix
    request = build_request(prompt, mix.policy, threshold=mix.threshold, max_steps=mix.max_steps)
    try:
        if settings.transport == "grpc-stream":
            for _ in client.stream(request, timeout=settings.timeout_s):
                pass
        else:
            client.generate(request, timeout=settings.timeout_s)
    except ServiceError as exc:
        return Outcome(exc.code, exc.retry_after_s)
    return Outcome("OK")
