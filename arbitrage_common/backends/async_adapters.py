"""Async Generator / Scorer adapters over the synchronous backends, for the step loop.

``session``: the key of the backend's per-request prefix cache, when it has one (transformers
generators: ``backends.generator_cache``; causal-LM scorers: ``backends.prefix_cache``).
``bound(session)`` gives the same backend under a request's key; ``release()`` drops it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..interfaces import Generation, GenerationOptions, ScoreItem


class _Threaded:
    def __init__(self, backend, session: str | None = None):
        self.backend = backend
        self.session = session if self._caches(backend) else None

    @staticmethod
    def _caches(backend) -> bool:
        raise NotImplementedError

    def bound(self, session: str):
        """The same backend, under ``session`` (release it when the request ends)."""
        return type(self)(self.backend, session)

    def release(self) -> bool:
        return self.session is not None and bool(self.backend.release(self.session))

    async def _call(self, method, rows: list, *args):
        if self.session is None:
            return await asyncio.to_thread(method, rows, *args)
        return await asyncio.to_thread(method, rows, *args, [self.session] * len(rows))


class ThreadedGenerator(_Threaded):
    """Runs a blocking ``generate_batch`` off the event loop."""

    @staticmethod
    def _caches(backend) -> bool:
        return getattr(backend, "prefix_cache", None) is not None

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        return await self._call(self.backend.generate_batch, list(prefixes), options)


class ThreadedScorer(_Threaded):
    """Runs a blocking ``score_batch`` off the event loop."""

    @staticmethod
    def _caches(backend) -> bool:
        return hasattr(backend, "release")

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        return await self._call(self.backend.score_batch, list(items))
