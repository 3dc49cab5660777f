"""Fake generators and scorers for unit tests only (never imported by the library)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from arbitrage_common.interfaces import FinishReason, Generation, GenerationOptions, ScoreItem

Step = str | tuple[str, FinishReason]


def chars(text: str) -> list[str]:
    return list(text)


def words(text: str) -> list[str]:
    return text.split()


class ScriptedGenerator:
    """Writes ``script[i]`` for the i-th step of the prefix (derived from the prefix, so it
    does not matter which steps this model wrote before). Tokens follow ``tokenize``; a step
    longer than ``max_new_tokens`` is cut and finishes with 'length'. ``delays`` waits
    (cancellably) before answering: an int key is a step index, a str key a prefix whose
    last kept step is that text."""

    def __init__(self, script: Sequence[Step], tokenize: Callable[[str], list[str]] = chars,
                 delays: dict[int | str, float] | None = None, count: int = 1) -> None:
        self.script = list(script)
        self.tokenize = tokenize
        self.delays = delays or {}
        self.count = count  # generations returned per call (1 is correct)
        self.calls: list[tuple[list[str], GenerationOptions]] = []
        self.cancelled = False
        self.cancelled_prefixes: list[str] = []  # calls cancelled while waiting out a delay

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        self.calls.append((list(prefixes), options))
        index = prefixes[0].count("\n\n") - 1
        delay = self.delays.get(index)
        if delay is None:
            delay = next((d for key, d in self.delays.items()
                          if isinstance(key, str) and prefixes[0].endswith("\n\n" + key + "\n\n")), None)
        if delay is not None:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.cancelled = True
                self.cancelled_prefixes.append(prefixes[0])
                raise
        entry = self.script[index]
        text, finish = (entry, "delimiter") if isinstance(entry, str) else entry
        toks = self.tokenize(text)
        if len(toks) > options.max_new_tokens:
            toks, finish = toks[: options.max_new_tokens], "length"
            text = ("" if self.tokenize is chars else " ").join(toks)
        return [Generation(text=text, tokens=len(toks), finish_reason=finish, seconds=0.0)] * self.count

    @property
    def asked_tokens(self) -> list[int]:
        return [options.max_new_tokens for _, options in self.calls]


class TableScorer:
    """Scores a candidate by looking its text up in ``table`` (default for unknown text)."""

    def __init__(self, table: dict[str, float], default: float = 0.5, extra: int = 0, delay: float = 0.0) -> None:
        self.table = table
        self.delay = delay  # seconds awaited before answering (0: answers without yielding)
        self.default = default
        self.extra = extra  # scores added (or removed, if negative) to the correct count
        self.calls: list[list[ScoreItem]] = []

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        self.calls.append(list(items))
        if self.delay:
            await asyncio.sleep(self.delay)
        scores = [self.table.get(item.candidate, self.default) for item in items]
        if self.extra > 0:
            scores += [0.5] * self.extra
        elif self.extra < 0:
            scores = scores[: self.extra]
        return scores


class HandleResponse:
    """What a fake Serve handle's ``remote()`` returns: awaitable, cancellable."""

    def __init__(self, coro) -> None:
        self._coro = coro

    def __await__(self):
        return self._coro.__await__()

    def cancel(self) -> None:
        pass
