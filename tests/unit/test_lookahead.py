"""Draft lookahead (``LoopRequest.lookahead``): the plain loop's results with fewer model calls,
the stash dropped when a step goes to the target, and its accounting."""
from __future__ import annotations

import asyncio
import random
import zlib
from collections import Counter

import pytest
from fakes import ScriptedGenerator, TableScorer, words
from test_pipeline import PROMPT, SCENARIOS, SCORED, P, _cfg, _models, _partial, _run, _scorers

from arbitrage_common.config import AppConfig, LimitsSpec, render_serve_config
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument, ScorerError
from arbitrage_common.interfaces import Generation, GenerationOptions
from arbitrage_common.lookahead import DraftAhead, chain, chain_rows
from arbitrage_common.loop import LoopRequest, Models, stream_loop
from arbitrage_common.policies import POLICY_NAMES, make_policy
from arbitrage_common.steps import build_prefix
from services.validation import RequestFields, prepare


class HistoryScorer(TableScorer):
    """A score that depends on the whole item (problem, history with sources, candidate), so
    a step scored over the wrong history gets another score."""

    async def score(self, items):
        self.calls.append(list(items))
        if self.delay:
            await asyncio.sleep(self.delay)
        return [self.table.get(it.candidate, zlib.crc32(repr(it).encode()) / 2**32) for it in items]


class ChainingGenerator(ScriptedGenerator):
    """A generator that runs the lookahead chain itself, as a served pool does (one call)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.ahead_calls: list[tuple[str, DraftAhead]] = []

    async def generate_ahead(self, prefix, options, plan):
        self.ahead_calls.append((prefix, plan))
        return await chain(self.generate, prefix, options, plan)


def _summary(result) -> tuple:
    """What lookahead must reproduce: the steps, decisions and kept-token usage (the scorer
    counts include the dropped lookahead items, so they are compared apart)."""
    u = result.usage
    return ([(s.index, s.text, s.source, s.score, s.draft_discarded, s.discarded_draft_text, s.tokens,
              s.finish_reason, s.draft_score) for s in result.steps],
            result.finish_reason, u.draft_tokens_kept, u.draft_tokens_discarded, u.target_tokens,
            dict(u.steps_by_source), u.acceptance_rate)


def _items(scorer) -> Counter:
    return Counter(item for call in scorer.calls for item in call)


def _prefixes(gen) -> Counter:
    return Counter((tuple(prefixes), options) for prefixes, options in gen.calls)


def _check_pair(build, policy, threshold=None, n=1, **kw):
    plain_models, ahead_models = build(), build()
    plain = _run(plain_models, policy, threshold, **kw)
    ahead = _run(ahead_models, policy, threshold, lookahead=n, **kw)
    assert type(plain) is type(ahead)
    assert _summary(_partial(ahead)) == _summary(_partial(plain))
    # every call the plain loop makes, the lookahead loop makes too (same prefix and options)
    assert _prefixes(ahead_models.draft) >= _prefixes(plain_models.draft)
    assert _prefixes(ahead_models.target) == _prefixes(plain_models.target)
    for role in ("router", "prm"):
        if getattr(plain_models, role) is not None:
            assert _items(getattr(ahead_models, role)) >= _items(getattr(plain_models, role))
    return _partial(plain), _partial(ahead), plain_models, ahead_models


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lookahead_loop_equals_the_plain_loop(scenario, policy, n):
    build, kw = SCENARIOS[scenario]
    _, ahead, _, _ = _check_pair(build, policy, n=n, **kw)
    if policy not in SCORED:
        assert ahead.usage.speculative_drafts_used == ahead.usage.speculative_drafts_discarded == 0


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("policy", SCORED)
@pytest.mark.parametrize("seed", range(40))
def test_lookahead_loop_equals_the_plain_loop_on_random_requests(seed, policy, n):
    rng = random.Random(seed)
    max_steps = rng.randint(1, 8)
    drafts = [f"d{i}" + "a" * rng.randint(0, 6) for i in range(max_steps)]
    draft_script = [(t, "eos") if rng.random() < 0.15 else ("", "context") if i and rng.random() < 0.05 else t
                    for i, t in enumerate(drafts)]
    target_script = [(f"t{i}" + " w" * rng.randint(0, 4), "eos") if rng.random() < 0.15
                     else f"t{i}" + " w" * rng.randint(0, 4) for i in range(max_steps)]
    chained = rng.random() < 0.5
    delays = {i: 0.0 for i in range(max_steps) if rng.random() < 0.5}
    kw = {"max_steps": max_steps, "max_new_tokens": rng.randint(1, 50), "step_max_tokens": rng.randint(2, 12)}

    def build():
        gen = ChainingGenerator if chained else ScriptedGenerator
        # scores depend on the history: a step scored over the wrong history would differ
        return Models(gen(draft_script, delays=delays), ScriptedGenerator(target_script, tokenize=words),
                      prm=HistoryScorer({}), router=HistoryScorer({}))

    _check_pair(build, policy, rng.random(), n=n, **kw)


# -- what lookahead saves and what it drops ------------------------------------------------
def test_kept_steps_come_from_the_stash_without_calls():
    plain, ahead, plain_models, m = _check_pair(lambda: _models(ChainingGenerator(["d0", "d1", "d2", ("d3", "eos")]),
                                                                **_scorers()), "arbitrage", n=1)
    assert [s.source for s in ahead.steps] == ["draft"] * 4 and ahead.finish_reason == "eos"
    # two draft calls (steps 0+1, 2+3) and two router calls of two items each, against four of each
    assert [p for p, _ in m.draft.ahead_calls] == [P, P + "d0\n\nd1\n\n"]
    assert [len(c) for c in m.router.calls] == [2, 2] and len(plain_models.router.calls) == 4
    u = ahead.usage
    assert u.speculative_drafts_used == 2 and u.speculative_drafts_discarded == 0
    assert u.router_calls == plain.usage.router_calls == 4
    # the stashed steps waited for nothing
    assert [set(s.stage_ms) for s in ahead.steps] == [{"draft", "router"}, set()] * 2


def test_a_step_routed_to_the_target_drops_the_steps_drafted_after_it():
    plain, ahead, _, m = _check_pair(lambda: _models(ChainingGenerator(["d0", "d1", "d2", ("d3", "eos")]),
                                                     **_scorers(d1=0.95)), "arbitrage", n=2)
    assert [s.source for s in ahead.steps] == ["draft", "target", "draft", "draft"]
    # the first call drafted d0, d1, d2 (d2 after d1); d1 went to the target, so d2 was dropped
    assert [p for p, _ in m.draft.ahead_calls] == [P, P + "d0\n\nt1 x\n\n"]
    assert [[it.candidate for it in c] for c in m.router.calls] == [["d0", "d1", "d2"], ["d2", "d3"]]
    u = ahead.usage
    assert u.speculative_drafts_used == 2 and u.speculative_drafts_discarded == 1
    assert u.speculative_draft_tokens_discarded == 2  # "d2"
    # not regular draft tokens: acceptance is the plain loop's
    assert u.draft_tokens_discarded == plain.usage.draft_tokens_discarded
    assert u.router_calls == plain.usage.router_calls + 1


def test_no_step_is_drafted_past_the_end_of_the_request():
    _, ahead, _, m = _check_pair(lambda: _models(ChainingGenerator(["d0", "d1", "d2", "d3"]), **_scorers()),
                                 "arbitrage", n=5, max_steps=3)
    assert len(ahead.steps) == 3 and ahead.finish_reason == "max_steps"
    assert [p for (p,), _ in m.draft.calls] == [P, P + "d0\n\n", P + "d0\n\nd1\n\n"]
    assert ahead.usage.speculative_drafts_discarded == 0


def test_a_failed_lookahead_step_ends_the_chain_not_the_request():
    class Flaky(ChainingGenerator):
        async def generate(self, prefixes, options):
            if prefixes[0].endswith("d1\n\n"):
                raise RuntimeError("boom")
            return await super().generate(prefixes, options)

    # d1 goes to the target: the plain loop never asks for the step after d1, so neither may fail
    plain, ahead, _, _ = _check_pair(lambda: _models(Flaky(["d0", "d1", "d2", ("d3", "eos")]), **_scorers(d1=0.9)),
                                     "arbitrage", n=3)
    assert ahead.finish_reason == plain.finish_reason == "eos"
    # when the plain loop does ask for it, the lookahead loop fails as it does
    for n in (0, 3):
        with pytest.raises(RuntimeError, match="boom"):
            _run(_models(Flaky(["d0", "d1", "d2"]), **_scorers()), "arbitrage", lookahead=n)


def test_a_generator_answering_more_than_one_step_is_an_error():
    with pytest.raises(ScorerError, match="returned 2 generations"):
        _run(_models(ScriptedGenerator(["d0", "d1"], count=2), **_scorers()), "arbitrage", lookahead=1)


# -- chain and chain_rows: a later step is a guess -----------------------------------------
STEP = Generation("a", 1, "delimiter", 0.0)
PLAN = DraftAhead(extra_steps=3, tokens_left=100, steps_left=8, step_max_tokens=8)
OPTS = GenerationOptions(max_new_tokens=8)


def _chain_with(answers):
    """``chain`` over a generator that answers the i-th call with ``answers[i]`` (an exception
    is raised); returns what it kept and the number of calls."""
    calls = []

    async def generate(prefixes, options):
        calls.append(prefixes)
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return asyncio.run(chain(generate, P, OPTS, PLAN)), len(calls)


def test_chain_keeps_the_first_step_when_a_later_call_fails():
    """Only the first call's failure is the request's; a later one ends the chain."""
    gens, calls = _chain_with([[STEP], RuntimeError("replica died")])
    assert gens == [STEP] and calls == 2
    with pytest.raises(RuntimeError, match="replica died"):
        _chain_with([RuntimeError("replica died")])


@pytest.mark.parametrize("later", [[STEP, STEP], [Generation("a", None, "delimiter", 0.0)]],
                         ids=["two-items", "tokens-none"])
def test_chain_stops_at_a_malformed_later_answer(later):
    """A later answer that is not one well-formed generation is dropped and ends the chain."""
    gens, calls = _chain_with([[STEP], later, [STEP], [STEP]])
    assert gens == [STEP] and calls == 2


def test_chain_refuses_a_malformed_first_answer():
    """The first answer is the step the loop asked for: two generations are the draft
    generator's fault; an ill-formed one is returned as is, unchained, for the loop to report."""
    with pytest.raises(ScorerError, match="^draft generator: returned 2 generations"):
        _chain_with([[STEP, STEP]])
    bad = Generation("a", None, "delimiter", 0.0)
    assert _chain_with([[bad], [STEP]]) == ([bad], 1)


def _rows_run(answers):
    """A ``chain_rows`` ``run`` whose i-th round answers ``answers[i]`` for every live row (an
    exception is raised); records the rows of each round."""
    rounds = []

    def run(rows, prefixes, options):
        rounds.append(list(rows))
        answer = answers[len(rounds) - 1]
        if isinstance(answer, Exception):
            raise answer
        return [answer for _ in rows]

    return run, rounds


def test_chain_rows_keeps_the_first_round_when_a_later_round_fails():
    """As ``chain``: a later round's failure returns what the earlier rounds wrote; only the
    first round's is raised."""
    run, rounds = _rows_run([STEP, RuntimeError("replica died")])
    out = chain_rows(run, [P, P], [OPTS, OPTS], [PLAN, PLAN])
    assert out == [[STEP], [STEP]] and rounds == [[0, 1], [0, 1]]
    run, _ = _rows_run([RuntimeError("replica died")])
    with pytest.raises(RuntimeError, match="replica died"):
        chain_rows(run, [P], [OPTS], [PLAN])


def test_chain_rows_stops_a_row_at_a_malformed_answer():
    """A row whose step has no usable token count is not planned from (nor does it fail the
    batch): the chain ends there."""
    bad = Generation("a", None, "delimiter", 0.0)
    run, rounds = _rows_run([STEP, bad, STEP, STEP])
    out = chain_rows(run, [P], [OPTS], [PLAN])
    assert out[0][0] == STEP and rounds == [[0], [0]]


def test_a_deadline_past_ends_the_request_before_a_stashed_step():
    async def main():
        m = _models(ChainingGenerator(["d0", "d1", "d2", ("d3", "eos")]), **_scorers())
        stream = stream_loop(LoopRequest(PROMPT, make_policy("arbitrage"), lookahead=1, deadline_s=0.5), m)
        assert (await stream.__anext__()).text == "d0"
        await asyncio.sleep(0.6)  # step 1 is stashed, but the deadline has passed
        with pytest.raises(DeadlineExceeded) as err:
            await stream.__anext__()
        return err.value.partial

    partial = asyncio.run(main())
    assert [s.text for s in partial.steps] == ["d0"] and partial.finish_reason == "deadline"
    assert partial.usage.speculative_drafts_discarded == 1 and partial.usage.speculative_drafts_used == 0


# -- the plan ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_the_plan_asks_what_the_plain_loop_would(seed):
    rng = random.Random(seed)
    texts = ["".join(rng.choice("ab \n") for _ in range(rng.randint(0, 6))).strip() for _ in range(rng.randint(0, 4))]
    step = rng.choice(["x", "y z", ""])
    options = GenerationOptions(max_new_tokens=7, temperature=rng.choice([0.0, 0.7]), seed=rng.choice([None, 3]))
    plan = DraftAhead(extra_steps=1, tokens_left=20, steps_left=5, step_max_tokens=8)
    nxt = plan.after(build_prefix(PROMPT, texts), options, Generation(step, 15, "delimiter", 0.0))
    assert nxt is not None
    assert nxt[0] == build_prefix(PROMPT, [*texts, step])
    assert nxt[1] == GenerationOptions(max_new_tokens=5, temperature=options.temperature, seed=options.seed)
    assert nxt[2] == DraftAhead(0, 5, 4, 8)


@pytest.mark.parametrize("gen,plan", [
    (Generation("x", 1, "eos", 0.0), DraftAhead(1, 10, 5, 8)),
    (Generation("x", 1, "length", 0.0), DraftAhead(1, 10, 5, 8)),
    (Generation("x", 1, "context", 0.0), DraftAhead(1, 10, 5, 8)),
    (Generation("x", 10, "delimiter", 0.0), DraftAhead(1, 10, 5, 8)),  # no budget left
    (Generation("x", 1, "delimiter", 0.0), DraftAhead(1, 10, 1, 8)),  # the last step allowed
    (Generation("x", 1, "delimiter", 0.0), DraftAhead(0, 10, 5, 8)),  # no step planned
])
def test_the_plan_stops_where_the_plain_loop_stops(gen, plan):
    assert plan.after(P, GenerationOptions(), gen) is None


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_a_bad_lookahead_names_the_field(bad):
    with pytest.raises(InvalidArgument) as err:
        LoopRequest(PROMPT, make_policy("arbitrage"), lookahead=bad)
    assert err.value.field == "lookahead"


def test_lookahead_and_pipelining_do_not_combine():
    with pytest.raises(InvalidArgument, match="pipeline"):
        LoopRequest(PROMPT, make_policy("arbitrage"), lookahead=1, pipeline=True)
    with pytest.raises(ValueError, match="draft_lookahead"):
        LimitsSpec(draft_lookahead=1, step_pipelining=True)
    with pytest.raises(ValueError, match="draft_lookahead"):
        LimitsSpec(draft_lookahead=-1)


def test_the_limit_reaches_requests_and_renderings():
    cfg = _cfg(draft_lookahead=2)
    assert prepare(RequestFields(prompt=PROMPT), cfg).request.lookahead == 2
    rendered = render_serve_config(cfg)["applications"][0]["args"]
    assert rendered["limits"]["draft_lookahead"] == 2
    assert AppConfig(**rendered).limits.draft_lookahead == 2
    off = render_serve_config(_cfg())["applications"][0]["args"]
    assert "draft_lookahead" not in off.get("limits", {})


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_a_deadline_while_the_router_scores_books_the_draft_as_discarded_with_or_without_lookahead(lookahead):
    """The first step's draft is written and the router is still scoring it when the deadline
    passes: its tokens were spent, so the partial usage books them, as the plain loop does."""
    from arbitrage_common.loop import LoopRequest, Models, run_loop
    from arbitrage_common.policies import make_policy

    draft = ScriptedGenerator(["a b c", "d e", ("f", "eos")], tokenize=words)
    target = ScriptedGenerator(["x", "y", "z"], tokenize=words)
    request = LoopRequest("p", make_policy("arbitrage", 0.5), deadline_s=0.05, lookahead=lookahead)
    with pytest.raises(DeadlineExceeded) as info:
        asyncio.run(run_loop(request, Models(draft=draft, target=target, router=TableScorer({}, delay=0.5))))
    usage = info.value.partial.usage
    assert usage.draft_tokens_discarded == 3, usage  # "a b c"; steps drafted ahead book as speculative
