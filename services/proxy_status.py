"""What Serve's proxies answer when the coordinator cannot take or finish a request.

Ray Serve 2.60's proxies map a ``RayActorError`` (the replica holding the request was
killed, lost its node, or crashed) to gRPC ``INTERNAL`` / HTTP 500 with Ray's error text.
That replica held only this request's loop: nothing was delivered, and the request is
safe to send again (``services.handles`` says why steps are pure), so the right answer is
``UNAVAILABLE`` / 503 with Retry-After, which clients and load balancers retry.

The proxies answer HTTP errors of their own in plain text: the coordinator's queue full
(``BackPressureError``) and no coordinator (``DeploymentUnavailableError``) too. Those,
and the replica's death, get the JSON every other error of the API has (OpenAI's shape,
``services.convert.ApiError.json``), with Retry-After, so a client reads one ``error.code``.

A stream (SSE) that had already started when the replica died cannot change its status;
Serve would cut it without its last chunk. It ends instead with the error event the
coordinator itself sends when a stream fails (``event: error``), which both the SSE clients
and the OpenAI SDK raise on. Only streams send a response in several chunks, so a started
response is one.

A gRPC message that does not parse as the method's request (a client's broken serializer) would
fail in grpc's own deserializer, which answers ``UNKNOWN`` with protobuf's exception text:
``add_arbitrage_service`` and ``add_health_service`` register the API and grpc.health.v1 with a
deserializer that hands such a message on as ``UnparsedRequest``, which the coordinator refuses
as ``INVALID_ARGUMENT`` naming ``request``.

``install`` is listed among the gRPC servicer functions (``GRPC_SERVICER_FUNCTIONS``), the
one hook Serve runs inside every proxy process: it adds no servicer and wraps the proxy's
two status mappers and its error-response writer. Every other failure keeps Serve's own
mapping. If a Ray upgrade renames them, it logs a warning and changes nothing (the chaos
test then fails).
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
MESSAGE = "the coordinator replica serving this request stopped before it finished; retry the request"
QUEUE_FULL = "overloaded: the coordinator's queue is full (max_queued_requests); retry with backoff"
NOT_DEPLOYED = "the service has no coordinator deployed; retry later"


def proxy_error(exc: BaseException):
    """The API's error (``services.convert.ApiError``) for a failure the proxy answers itself,
    or None for one Serve's own mapping keeps."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from services import convert

    if isinstance(exc, RayActorError):
        return convert.unavailable(MESSAGE)
    if isinstance(exc, BackPressureError):
        return convert.ApiError("resource_exhausted", convert.grpc.StatusCode.RESOURCE_EXHAUSTED, 503, QUEUE_FULL)
    if isinstance(exc, DeploymentUnavailableError):
        return convert.unavailable(NOT_DEPLOYED)
    return None


def install(servicer: Any = None, server: Any = None) -> None:
    """Wrap the proxy's status mappers and error writer (idempotent). Called like every
    servicer function, with a servicer and the server, which it leaves alone."""
    try:
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError as exc:
        logger.warning("proxy_status: Serve internals moved (%s); replica deaths stay INTERNAL", exc)
        return
    grpc_status = getattr(proxy, "get_grpc_response_status", None)
    http_status = getattr(proxy, "get_http_response_status", None)
    on_exception = getattr(proxy, "send_http_response_on_exception", None)
    if grpc_status is None or http_status is None or on_exception is None:
        logger.warning("proxy_status: Serve's status mappers moved; replica deaths stay INTERNAL")
        return
    if getattr(grpc_status, "_arbitrage_wrapped", False):
        return
    import grpc
    from ray.serve.exceptions import gRPCStatusError

    from services import convert

    def grpc_mapper(exc: BaseException, *args: Any, **kwargs: Any):
        err = proxy_error(exc)
        if err is not None:  # the same words as the HTTP answer's, not Serve's text
            return ResponseStatus(code=err.grpc_code, is_error=True, message=err.message)
        if isinstance(exc, gRPCStatusError) and exc.grpc_code not in (None, grpc.StatusCode.INTERNAL):
            # The coordinator's own answer (a stream it aborted: bad input, overload, a missed
            # deadline), which it counted and logged; Serve would log a traceback at ERROR for each.
            return ResponseStatus(code=exc.grpc_code, is_error=True, message=exc.grpc_details or "")
        return grpc_status(exc, *args, **kwargs)

    def http_mapper(exc: BaseException, *args: Any, **kwargs: Any):
        err = proxy_error(exc)
        if err is None:
            return http_status(exc, *args, **kwargs)
        serve_headers = http_status(exc, *args, **kwargs).headers or []  # a full queue's Retry-After
        if not any(name.lower() == b"retry-after" for name, _ in serve_headers):
            serve_headers = [*serve_headers, (b"retry-after", str(RETRY_AFTER_S).encode())]
        # A dict message: Serve's error writer sends it as JSON (convert_object_to_asgi_messages).
        return ResponseStatus(code=err.http_status, is_error=True, message=err.json(), headers=serve_headers)

    def http_on_exception(status: Any, response_started: bool, *args: Any, **kwargs: Any) -> list:
        if response_started and isinstance(status.message, dict):  # ours: a started stream's last event
            event = convert.sse(status.message, event="error").encode()
            return [{"type": "http.response.body", "body": event, "more_body": False}]
        return on_exception(status, response_started, *args, **kwargs)

    grpc_mapper._arbitrage_wrapped = True  # type: ignore[attr-defined]
    proxy.get_grpc_response_status = grpc_mapper
    proxy.get_http_response_status = http_mapper
    proxy.send_http_response_on_exception = http_on_exception


class UnparsedRequest:
    """A request message that did not parse as ``message_type`` (what the coordinator gets),
    with the fields the coordinator reads before it validates: none set, and its size."""

    policy = request_id = ""

    def __init__(self, message_type: str, size: int) -> None:
        self.message_type, self._size = message_type, size

    def ByteSize(self) -> int:  # the protobuf message method it stands in for
        return self._size


def _tolerant(handler: Any) -> Any:
    """``handler`` with a request deserializer that returns an ``UnparsedRequest`` instead of raising."""
    parse = handler.request_deserializer
    if parse is None:
        return handler
    from google.protobuf.message import DecodeError

    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)  # FromString's message class
    name = descriptor.full_name if descriptor is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return UnparsedRequest(name, len(data))

    return handler._replace(request_deserializer=deserialize)


class _TolerantRegistration:
    """The proxy's gRPC server, as the generated registration sees it: every handler it adds
    parses requests with ``_tolerant``'s deserializer."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        for generic in generic_handlers:  # grpc's method-handler table, which Serve's server reads too
            generic._method_handlers = {m: _tolerant(h) for m, h in generic._method_handlers.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        add = getattr(self._server, "add_registered_method_handlers", None)
        if add is not None:  # grpcio before 1.63 has only generic handlers
            add(service, {m: _tolerant(h) for m, h in handlers.items()})


def add_arbitrage_service(servicer: Any, server: Any) -> None:
    """The generated ``add_ArbitrageServiceServicer_to_server``, with ``_tolerant`` deserializers."""
    from protos.arbitrage.v1 import arbitrage_pb2_grpc

    arbitrage_pb2_grpc.add_ArbitrageServiceServicer_to_server(servicer, _TolerantRegistration(server))


def add_health_service(servicer: Any, server: Any) -> None:
    """grpc.health.v1's generated ``add_HealthServicer_to_server``, with ``_tolerant`` deserializers."""
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, _TolerantRegistration(server))
