"""Async Generator / Scorer adapters over the synchronous backends, for the step loop."""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..interfaces import Generation, GenerationOptions, ScoreItem


class ThreadedGenerator:
    """Runs a blocking ``generate_batch`` off the event loop."""

    def __init__(self, backend):
        self.backend = backend

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        return await asyncio.to_thread(self.backend.generate_batch, list(prefixes), options)


class ThreadedScorer:
    """Runs a blocking ``score_batch`` off the event loop. ``session``: the key of the
    backend's per-request prefix cache, when it has one (``backends.prefix_cache``)."""

    def __init__(self, backend, session: str | None = None):
        self.backend = backend
        self.session = session if hasattr(backend, "release") else None

    def bound(self, session: str) -> ThreadedScorer:
        """The same backend, scoring under ``session`` (release it when the request ends)."""
        return ThreadedScorer(self.backend, session)

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        if self.session is None:
            return await asyncio.to_thread(self.backend.score_batch, list(items))
        return await asyncio.to_thread(self.backend.score_batch, list(items), [self.session] * len(items))
