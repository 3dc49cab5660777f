"""Memoizing Generator / Scorer adapters for threshold sweeps.

Greedy decoding makes every call a pure function of its input, so a sweep computes
each distinct call once (at batch 1, timed) and replays it. A per-request ``Charge``
adds up the measured seconds of every call that request made, cached or not: that
is the request's latency as if it had run alone.

A generator call's output is keyed by (prefix, max_new_tokens); its time also by the
target's ``proposal``, which leaves the output alone but not the cost (a rewrite that
verifies the draft's step in the prefill decodes less). So every policy of a sweep sees one
output per step, and each is charged the time of the call it made: a routed rewrite the
time with its proposal even when the target-only point, which sends none, ran that prefix
first.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..interfaces import Generation, GenerationOptions, ScoreItem


@dataclass
class Charge:
    seconds: float = 0.0
    by_stage: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds += seconds
        self.by_stage[stage] = self.by_stage.get(stage, 0.0) + seconds


class GenerationCache:
    """(prefix, max_new_tokens) -> Generation, from a sync backend at batch 1; its seconds
    per (prefix, max_new_tokens, proposal), each measured by a call of its own."""

    def __init__(self, backend, stage: str):
        self.backend, self.stage = backend, stage
        self.entries: dict[tuple[str, int], Generation] = {}
        self.seconds: dict[tuple[str, int, str], float] = {}

    def view(self, charge: Charge) -> MemoGenerator:
        return MemoGenerator(self, charge)

    def lookup(self, prefix: str, options: GenerationOptions) -> Generation:
        """The output of the first call at (prefix, max_new_tokens), with the seconds of a
        call with this very proposal (run once, when it is the first with it)."""
        key = (prefix, options.max_new_tokens)
        timed = (*key, options.proposal)
        if timed not in self.seconds:
            gen = self.backend.generate_batch([prefix], options)[0]
            self.seconds[timed] = gen.seconds
            # The proposal does not change the output: the first one stands for all.
            self.entries.setdefault(key, gen)
        return replace(self.entries[key], seconds=self.seconds[timed])


class MemoGenerator:
    def __init__(self, cache: GenerationCache, charge: Charge):
        self.cache, self.charge = cache, charge

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        if options.temperature > 0:
            raise ValueError("temperature: memoized sweeps need greedy decoding (temperature 0)")
        out = []
        for prefix in prefixes:
            gen = self.cache.lookup(prefix, options)
            self.charge.add(self.cache.stage, gen.seconds)
            out.append(gen)
        return out


class ScoreCache:
    """scored item -> (score, seconds measured at batch 1). Items that read the same to the
    scorer share an entry: writers' tags only matter to a scorer that annotates history."""

    def __init__(self, backend, stage: str):
        self.backend, self.stage = backend, stage
        self.entries: dict[ScoreItem, tuple[float, float]] = {}

    def view(self, charge: Charge) -> MemoScorer:
        return MemoScorer(self, charge)

    def _key(self, item: ScoreItem) -> ScoreItem:
        if getattr(self.backend, "annotate_history", False):
            return item
        return ScoreItem(item.problem, tuple((text, "draft") for text, _ in item.history), item.candidate)

    def lookup(self, item: ScoreItem) -> tuple[float, float]:
        key = self._key(item)
        if key not in self.entries:
            t0 = time.perf_counter()
            score = self.backend.score_batch([item])[0]
            self.entries[key] = (score, time.perf_counter() - t0)
        return self.entries[key]


class MemoScorer:
    def __init__(self, cache: ScoreCache, charge: Charge):
        self.cache, self.charge = cache, charge

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        scores, seconds = [], []
        for item in items:
            s, t = self.cache.lookup(item)
            scores.append(s)
            seconds.append(t)
        # One call scores its items as one batch: charge the slowest item, not the sum.
        self.charge.add(self.cache.stage, max(seconds, default=0.0))
        return scores
