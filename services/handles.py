"""Adapters from Ray Serve deployment handles to the step loop's Generator / Scorer protocols.

The coordinator runs ``arbitrage_common.loop`` unchanged over these. When the awaiting
task is cancelled (client gone, deadline hit), the in-flight pool call is cancelled too,
so the request frees its pool slot instead of finishing work nobody will read.

Affinity: ``PoolHandles.models(session_id)`` binds one request's adapters to its session
id once (``handle.options(method_name=..., session_id=...)``, a light copy sharing the
handle's router), so every step of the request reaches the same replica of each pool
whose deployment runs the session-affine router (``services.affinity``); other routers
ignore the id. Per step nothing is created but the call itself.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from arbitrage_common.interfaces import Generation, GenerationOptions, ScoreItem
from arbitrage_common.loop import Models


async def _await_cancellable(response: Any) -> Any:
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def _bind(handle: Any, method: str, session_id: str) -> Any:
    """The handle's method, with the session id when there is one."""
    if session_id:
        return handle.options(method_name=method, session_id=session_id)
    return handle.options(method_name=method)


class HandleGenerator:
    """``Generator`` over a GeneratorPool deployment handle (optionally session-bound)."""

    def __init__(self, handle: Any, session_id: str = "") -> None:
        self._call = _bind(handle, "generate", session_id)

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        return await _await_cancellable(self._call.remote(list(prefixes), options))


class HandleScorer:
    """``Scorer`` over a ScorerPool deployment handle (optionally session-bound)."""

    def __init__(self, handle: Any, session_id: str = "") -> None:
        self._call = _bind(handle, "score", session_id)

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        return await _await_cancellable(self._call.remote(list(items)))


class PoolHandles:
    """The pool handles of one coordinator replica; ``models`` binds them to a session."""

    def __init__(self, draft: Any, target: Any, router: Any | None = None, prm: Any | None = None) -> None:
        self.draft, self.target, self.router, self.prm = draft, target, router, prm

    def models(self, session_id: str = "") -> Models:
        """The loop's ``Models`` for one request; a missing scorer pool stays None."""
        return Models(
            draft=HandleGenerator(self.draft, session_id),
            target=HandleGenerator(self.target, session_id),
            router=HandleScorer(self.router, session_id) if self.router is not None else None,
            prm=HandleScorer(self.prm, session_id) if self.prm is not None else None,
        )


def models_from_handles(draft: Any, target: Any, router: Any | None = None, prm: Any | None = None) -> Models:
    """The loop's ``Models`` over pool handles, without a session."""
    return PoolHandles(draft, target, router, prm).models()
