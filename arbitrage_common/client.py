"""The one gRPC client of the service: channel, stub, metadata, request building, error mapping.

The CLI, the benches, router-data collection and ``loadtests/`` all call the service through
this module; none of them imports ``services``. grpc and the generated protos are imported
lazily, so ``arbitrage_common`` stays importable without them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

DEFAULT_ENDPOINT = "127.0.0.1:9000"
# The key a client sends when the service has keys. Not the server's variable (auth.api_key_env,
# e.g. ARBITRAGE_API_KEYS, a comma list): a client holds one key.
API_KEY_ENV = "ARBITRAGE_API_KEY"
RETRIABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
_OPTIONAL_FIELDS = ("threshold", "max_steps", "max_new_tokens", "timeout_s", "request_id")
# grpc turns a deadline near 1e10 s away into one already passed (DEADLINE_EXCEEDED at once);
# no server runs a request for days, so a longer one is this.
MAX_DEADLINE_S = 1e6


class ServiceError(RuntimeError):
    """A call that ended with a non-OK gRPC status: ``code`` is the status name;
    ``retry_after_s``: the server's advised wait before a retry (its ``retry-after`` trailing
    metadata, sent with UNAVAILABLE and RESOURCE_EXHAUSTED), or None."""

    def __init__(self, endpoint: str, code: str, details: str, retry_after_s: float | None = None):
        self.code, self.details, self.retry_after_s = code, details, retry_after_s
        self.hint = f" (set ${API_KEY_ENV} to one of the service's API keys)" if code == "UNAUTHENTICATED" else ""
        super().__init__(f"{endpoint}: {code}: {details}{self.hint}")

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE


def retry_after_of(exc) -> float | None:
    """The ``retry-after`` trailing metadata of a failed gRPC call, in seconds, or None."""
    try:
        trailers = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 (a call that ended before any metadata: no hint)
        return None
    for key, value in trailers:
        if key == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if seconds > 0 else None
    return None


def auth_metadata(api_key: str | None = None) -> tuple[tuple[str, str], ...]:
    """``authorization: Bearer <key>`` from ``api_key`` or ``$ARBITRAGE_API_KEY``; () without one."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    return (("authorization", f"Bearer {key}"),) if key else ()


def metadata_for(app: str | None, extra: tuple[tuple[str, str], ...] = (),
                 api_key: str | None = None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata: the Serve application name when several apps share a cluster, and the
    API key when one is given or set in ``$ARBITRAGE_API_KEY``."""
    pairs = ((("application", app),) if app else ()) + auth_metadata(api_key) + tuple(extra)
    return pairs or None


def build_request(prompt: str, policy: str | None = None, temperature: float | None = None,
                  seed: int | None = None, **fields: Any):
    """A ``GenerateRequest``; fields left None keep the server's defaults."""
    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    unknown = set(fields) - set(_OPTIONAL_FIELDS)
    if unknown:
        raise TypeError(f"build_request: unknown field(s) {sorted(unknown)}")
    req = pb.GenerateRequest(prompt=prompt, policy=policy or "")
    for name, value in fields.items():
        if value is not None:
            setattr(req, name, value)
    if temperature is not None:
        req.sampling.temperature = temperature
    if seed is not None:
        req.sampling.seed = seed
    return req


def source_name(step) -> str:
    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    return "target" if step.source == pb.SOURCE_TARGET else "draft"


def to_dict(message) -> dict:
    """A reply (or stream event) as the HTTP API's JSON has it: the proto's field names, numbers
    as numbers (protobuf's JSON writes an int64 as a string), a step's ``source`` as
    ``"draft"`` / ``"target"``, an unset optional field as None, and of a oneof only the member
    that is set (a stream event is ``{"step": ...}`` or ``{"summary": ...}``)."""
    out: dict = {}
    for field in message.DESCRIPTOR.fields:
        name, value = field.name, getattr(message, field.name)
        oneof = field.containing_oneof  # a proto3 `optional` is a oneof of its own, named "_<field>"
        if oneof is not None and oneof.name != f"_{name}" and not message.HasField(name):
            continue
        if field.is_repeated:
            out[name] = [to_dict(v) if field.message_type is not None else v for v in value]
        elif field.has_presence and not message.HasField(name):
            out[name] = None
        elif field.message_type is not None:
            out[name] = to_dict(value)
        elif field.enum_type is not None:  # Source: SOURCE_DRAFT -> "draft"
            out[name] = field.enum_type.values_by_number[value].name.removeprefix(
                f"{field.enum_type.name.upper()}_").lower()
        else:
            out[name] = value
    return out


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else min(timeout, MAX_DEADLINE_S)


@dataclass
class Client:
    """A channel to one endpoint. Use as a context manager (closes the channel)."""

    endpoint: str = DEFAULT_ENDPOINT
    app: str | None = None
    channel: Any = None
    api_key: str | None = None  # None: $ARBITRAGE_API_KEY if set

    def __post_init__(self) -> None:
        import grpc

        from protos.arbitrage.v1 import arbitrage_pb2_grpc as pbg

        if self.channel is None:
            self.channel = grpc.insecure_channel(self.endpoint)
        self.stub = pbg.ArbitrageServiceStub(self.channel)
        self.metadata = metadata_for(self.app, api_key=self.api_key)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _error(self, exc) -> ServiceError:
        return ServiceError(self.endpoint, exc.code().name, exc.details() or "", retry_after_of(exc))

    def generate(self, request, timeout: float | None = None):
        """``Generate``; a non-OK status raises ``ServiceError``."""
        import grpc

        try:
            return self.stub.Generate(request, metadata=self.metadata, timeout=_deadline(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def stream(self, request, timeout: float | None = None) -> Iterator[Any]:
        """``GenerateStream`` events (steps, then the summary); a non-OK status raises ``ServiceError``."""
        import grpc

        try:
            yield from self.stub.GenerateStream(request, metadata=self.metadata, timeout=_deadline(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def healthy(self, timeout: float = 5.0) -> bool:
        """``grpc.health.v1`` Check says SERVING within ``timeout``."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(),
                                                                   metadata=self.metadata, timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
