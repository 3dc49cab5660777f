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
    def __init__(self, backend):
        self.backend = backend

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        return await asyncio.to_thread(self.backend.score_batch, list(items))
