"""Adapters from Ray Serve deployment handles to the step loop's Generator / Scorer protocols.

The coordinator runs ``arbitrage_common.loop`` unchanged over these. When the awaiting
task is cancelled (client gone, deadline hit), the in-flight pool call is cancelled too,
so the request frees its pool slot instead of finishing work nobody will read.
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


class HandleGenerator:
    """``Generator`` over a GeneratorPool deployment handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        return await _await_cancellable(self.handle.generate.remote(list(prefixes), options))


class HandleScorer:
    """``Scorer`` over a ScorerPool deployment handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        return await _await_cancellable(self.handle.score.remote(list(items)))


def models_from_handles(draft: Any, target: Any, router: Any | None = None, prm: Any | None = None) -> Models:
    """The loop's ``Models`` over pool handles; a missing scorer pool stays None."""
    return Models(
        draft=HandleGenerator(draft),
        target=HandleGenerator(target),
        router=HandleScorer(router) if router is not None else None,
        prm=HandleScorer(prm) if prm is not None else None,
    )
