"""API key authentication (optional): bearer keys from an environment variable.

``AppConfig.auth.api_key_env`` names an environment variable that holds the key, or several
keys separated by commas (so a key can be rotated: add the new one, move clients, drop the
old one). The key itself never sits in a config file: each coordinator replica reads the
variable once at startup (``load_keys``), and a config that names a variable which is unset
or empty there fails that replica's startup, naming the variable. ``check_bearer`` checks one
``Authorization`` value (HTTP header or gRPC metadata) against every key in constant time.

Pure: no Ray import, so configs, tests and the gRPC and HTTP sides share it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import AuthSpec

SCHEME = "bearer"
_VISIBLE_ASCII = frozenset(range(0x21, 0x7F))  # RFC 6750 tokens are visible ASCII, no spaces


class AuthConfigError(RuntimeError):
    """Authentication is configured but its keys cannot be loaded; names the variable, never a key."""


def parse_keys(value: str, env: str = "the API key variable") -> tuple[bytes, ...]:
    """The keys of one comma-separated value (whitespace around each stripped, empties and
    duplicates dropped, order kept). Raises ``AuthConfigError`` when none is left or one is
    not visible ASCII; the message names ``env`` and the key's position, never the key."""
    keys: list[bytes] = []
    for i, part in enumerate(value.split(",")):
        key = part.strip()
        if not key:
            continue
        raw = key.encode("utf-8")
        if not set(raw) <= _VISIBLE_ASCII:
            raise AuthConfigError(f"{env}: key #{i + 1} has characters outside visible ASCII (bearer tokens are "
                                  f"letters, digits and punctuation, no spaces)")
        if raw not in keys:
            keys.append(raw)
    if not keys:
        raise AuthConfigError(f"{env} is set but holds no key (expected one key, or keys separated by commas)")
    return tuple(keys)


def load_keys(spec: AuthSpec | None, environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The API keys ``spec`` names, read from the environment (``environ``, default
    ``os.environ``): ``()`` when authentication is off (no ``api_key_env``). Raises
    ``AuthConfigError`` naming the variable when it is missing or empty: a replica must not
    serve unauthenticated because a Secret was not mounted."""
    name = spec.api_key_env if spec is not None else None
    if not name:
        return ()
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None:
        raise AuthConfigError(f"auth.api_key_env is {name!r}, but the environment variable {name} is not set on "
                              f"this replica's node (set it on every node; on KubeRay as env from a Secret: "
                              f"docs/SERVING.md, Authentication)")
    if not value.strip():
        raise AuthConfigError(f"auth.api_key_env is {name!r}, but the environment variable {name} is empty on this "
                              f"replica's node (expected one key, or keys separated by commas)")
    return parse_keys(value, env=f"environment variable {name}")


def bearer_token(header_value: str | bytes | None) -> bytes | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), else None."""
    if header_value is None:
        return None
    try:  # HTTP headers are latin-1 (ASGI), gRPC metadata ASCII: both map back to their bytes
        raw = header_value.encode("latin-1") if isinstance(header_value, str) else bytes(header_value)
    except UnicodeEncodeError:
        return None
    scheme, _, token = raw.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != SCHEME.encode() or not token:
        return None
    return token


def _digest(value: bytes) -> bytes:
    # Equal-length inputs for compare_digest: its running time then reveals no key's length.
    return hashlib.sha256(value).digest()


def check_bearer(header_value: str | bytes | None, keys: Iterable[bytes]) -> bool:
    """True when ``header_value`` is ``Bearer <token>`` and the token equals one of ``keys``.

    Every key is compared (``hmac.compare_digest`` over SHA-256 digests), with no early exit
    on a match, so the time taken says nothing about which key matched or how much of one
    did. A missing or malformed value is compared too (as an empty token) and fails. With no
    keys it is always False: callers skip the check when authentication is off
    (``load_keys`` returned ``()``)."""
    token = bearer_token(header_value)
    presented = _digest(token if token is not None else b"")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, _digest(key))
    return matched and token is not None
