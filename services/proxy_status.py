"""What Serve's proxies answer when the coordinator replica running a request dies.

Ray Serve 2.60's proxies map a ``RayActorError`` (the replica holding the request was
killed, lost its node, or crashed) to gRPC ``INTERNAL`` / HTTP 500 with Ray's error text.
That replica held only this request's loop: nothing was delivered, and the request is
safe to send again (``services.handles`` says why steps are pure), so the right answer is
``UNAVAILABLE`` / 503 with Retry-After, which clients and load balancers retry.

``install`` is listed among the gRPC servicer functions (``GRPC_SERVICER_FUNCTIONS``), the
one hook Serve runs inside every proxy process: it adds no servicer and wraps the proxy's
two status mappers. Every other failure keeps Serve's own mapping. If a Ray upgrade
renames the mappers, it logs a warning and changes nothing (the chaos test then fails).
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
MESSAGE = "the coordinator replica serving this request stopped before it finished; retry the request"


def _replica_died(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def install(servicer: Any = None, server: Any = None) -> None:
    """Wrap the proxy's gRPC and HTTP status mappers (idempotent). Called like every servicer
    function, with a servicer and the server, which it leaves alone."""
    import grpc

    try:
        from ray.serve._private import proxy
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError as exc:
        logger.warning("proxy_status: Serve internals moved (%s); replica deaths stay INTERNAL", exc)
        return
    grpc_status = getattr(proxy, "get_grpc_response_status", None)
    http_status = getattr(proxy, "get_http_response_status", None)
    if grpc_status is None or http_status is None:
        logger.warning("proxy_status: Serve's status mappers moved; replica deaths stay INTERNAL")
        return
    if getattr(grpc_status, "_arbitrage_wrapped", False):
        return

    def grpc_mapper(exc: BaseException, *args: Any, **kwargs: Any):
        if _replica_died(exc):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=MESSAGE)
        return grpc_status(exc, *args, **kwargs)

    def http_mapper(exc: BaseException, *args: Any, **kwargs: Any):
        if _replica_died(exc):
            return ResponseStatus(code=503, is_error=True, message=MESSAGE,
                                  headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])
        return http_status(exc, *args, **kwargs)

    grpc_mapper._arbitrage_wrapped = True  # type: ignore[attr-defined]
    proxy.get_grpc_response_status = grpc_mapper
    proxy.get_http_response_status = http_mapper
