"""GeneratorPool's Serve batch without Ray: calls with different decoding options share one
forward pass, and each call gets what it gets alone (issue #13). The pool method is run
undecorated over the bundled draft model; no cluster is started."""
import asyncio
from pathlib import Path

from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.counter_deltas import CounterDeltas
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.steps import build_prefix
from arbitrage_common.synthetic import generate_problems
from services import pools

MODELS = Path(__file__).resolve().parents[2] / "models"


class _Recorder:
    """A counter: ``inc`` records."""

    def __init__(self) -> None:
        self.added: list[float] = []

    def inc(self, value: float) -> None:
        self.added.append(value)


class _PoolSelf:
    """The attributes ``_generate_batched`` uses, with a real backend; the pool's own
    ``_export_speculation`` and ``_export_prefix_cache`` feed counters that record."""

    _export_speculation = pools.GeneratorPool._export_speculation
    _export_prefix_cache = pools.GeneratorPool._export_prefix_cache

    def __init__(self, backend):
        self.backend = backend
        self.cached = backend.prefix_cache is not None
        self.passes: list[int] = []
        self._prefix_seen = CounterDeltas()
        self._prefix_tokens = {name: _Recorder() for name in ("hits", "queries")}  # the counters
        self._speculation_seen = CounterDeltas(backend.speculation)
        self._proposal_tokens = self  # the counter: ``inc`` records
        self.exported: dict[str, float] = {}

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.exported[tags["outcome"]] = self.exported.get(tags["outcome"], 0) + value

    def _count(self, items: int) -> None:
        self.passes.append(items)  # rows of one forward pass

    async def _run(self, fn, *args):
        return await asyncio.to_thread(fn, *args)


def test_calls_with_different_options_share_one_pass_and_keep_their_results():
    backend = HFStepGenerator(MODELS / "draft")
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(5, 99)]
    calls = [
        ([prefixes[0]], GenerationOptions(max_new_tokens=64)),
        ([prefixes[1], prefixes[2]], GenerationOptions(max_new_tokens=40, temperature=1.0, seed=3)),
        (["Start with 1. " * 50], GenerationOptions(max_new_tokens=64)),  # longer than the context
        ([prefixes[3]], GenerationOptions(max_new_tokens=5)),
        ([prefixes[4]], GenerationOptions(max_new_tokens=64, temperature=0.7, seed=9)),
    ]
    fake = _PoolSelf(backend)
    sessions = ["a", "b", None, "d", "e"]  # the second pass runs over the sessions' cached prefixes
    passes = [asyncio.run(pools.GeneratorPool._generate_batched.__wrapped__(
        fake, [p for p, _ in calls], [o for _, o in calls], sessions, [None] * 5)) for _ in range(2)]
    assert fake.passes == [6, 6]  # one forward pass for all five calls
    # the second pass reuses something on every row with a session (both of "b"'s rows share
    # the prompt template's tokens)
    assert backend.prefix_cache.info()["requests"] == 10 and backend.prefix_cache.info()["misses"] == 5
    # the counters hold the cache's token totals: nothing reused by the first pass, some by the second
    tokens = {name: counter.added for name, counter in fake._prefix_tokens.items()}
    assert tokens == {"hits": [backend.prefix_cache.info()["hits"]],
                      "queries": [backend.prefix_cache.info()["queries"] // 2] * 2}
    assert 0 < tokens["hits"][0] < tokens["queries"][1]
    alone = [HFStepGenerator(MODELS / "draft", prefix_cache_bytes=0).generate_batch(p, o) for p, o in calls]
    as_triples = lambda gens: [(g.text, g.tokens, g.finish_reason) for g in gens]
    for merged in passes:
        assert [as_triples(m) for m in merged] == [as_triples(a) for a in alone]
    assert as_triples(merged[2]) == [("", 0, "context")]
    assert (merged[3][0].tokens, merged[3][0].finish_reason) == (5, "length")
    assert fake.exported == {}  # no call carried a proposal


def test_the_proposal_tokens_of_each_pass_reach_the_counter():
    """A target pass whose calls carry the draft's steps as proposals adds exactly the tokens
    the backend ran and kept to the pool's counter, pass by pass."""
    draft, target = HFStepGenerator(MODELS / "draft"), HFStepGenerator(MODELS / "target")
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(4, 5)]
    guesses = [g.text for g in draft.generate_batch(prefixes, GenerationOptions(max_new_tokens=64))]
    fake = _PoolSelf(target)
    totals = []
    for _ in range(2):
        asyncio.run(pools.GeneratorPool._generate_batched.__wrapped__(
            fake, [[p] for p in prefixes], [GenerationOptions(max_new_tokens=64, proposal=g) for g in guesses],
            [None] * 4, [None] * 4))
        totals.append(dict(fake.exported))
    assert totals[0]["proposed"] > 0 and 0 < totals[0]["accepted"] <= totals[0]["proposed"]
    assert totals[1] == {k: 2 * v for k, v in totals[0].items()}  # the same pass again: counted again, once
    assert fake.exported == target.speculation


def test_context_info_and_count_tokens():
    backend = HFStepGenerator(MODELS / "target")
    fake = _PoolSelf(backend)
    assert asyncio.run(pools.GeneratorPool.context_info(fake)) == {"context": 512}
    assert asyncio.run(pools.GeneratorPool.count_tokens(fake, "Start with 3.")) == 1 + len("Start with 3.")


def test_calls_with_a_lookahead_plan_chain_their_next_steps_in_shared_passes():
    """Draft lookahead in the pool's batch: the first pass runs every call's step, each later
    pass the next step of the calls still planned; each chain equals the calls made one by
    one on the prefix with the steps before kept."""
    from arbitrage_common.lookahead import DraftAhead
    from arbitrage_common.steps import STEP_DELIMITER

    backend = HFStepGenerator(MODELS / "draft")
    problems = generate_problems(3, 77)
    calls = [([build_prefix(p.prompt, [])], GenerationOptions(max_new_tokens=48)) for p in problems]
    plans = [DraftAhead(2, 400, 8, 48), None, DraftAhead(1, 400, 8, 48)]
    fake = _PoolSelf(backend)
    chained = asyncio.run(pools.GeneratorPool._generate_batched.__wrapped__(
        fake, [p for p, _ in calls], [o for _, o in calls], ["x", "y", "z"], plans))
    alone_backend = HFStepGenerator(MODELS / "draft", prefix_cache_bytes=0)
    as_triples = lambda gens: [(g.text, g.tokens, g.finish_reason) for g in gens]
    for (prefixes, options), plan, got in zip(calls, plans, chained):
        prefix, want = prefixes[0], []
        for _ in range(1 + (plan.extra_steps if plan else 0)):
            (gen,) = alone_backend.generate_batch([prefix], options)
            want.append(gen)
            if gen.finish_reason != "delimiter":
                break
            prefix += gen.text + STEP_DELIMITER
        assert as_triples(got) == as_triples(want)
    assert [len(c) for c in chained] == [3, 1, 2], "these problems' first steps all end at the delimiter"
    assert fake.passes == [3, 2, 1]  # every call, then both planned ones, then the one planned twice
