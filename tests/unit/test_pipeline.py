"""Step pipelining (``LoopRequest.pipeline``): same results as the plain loop, early drafts
cancelled when dropped, no task outliving a request, and their accounting."""
from __future__ import annotations

import asyncio
import gc
import random
from collections import Counter

import pytest
from fakes import ScriptedGenerator, TableScorer, words

from arbitrage_common.accounting import LoopResult
from arbitrage_common.config import AppConfig, LimitsSpec, ModelSpec, PoolSpec, PoolsSpec, render_serve_config
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument
from arbitrage_common.loop import LoopRequest, Models, run_loop, stream_loop
from arbitrage_common.policies import POLICY_NAMES, make_policy
from services import convert
from services.validation import RequestFields, prepare

PROMPT = "Start with 3."
P = PROMPT + "\n\n"
DRAFT = ["d0", "d1", "d2", ("d3", "eos")]
TARGET = ["t0 x", "t1 x", "t2 x", ("t3 x", "eos")]
SCORED = ("rsd", "arbitrage")  # the policies that pipeline
GUARD_S = 5.0  # no test here should come near it; a hang fails fast instead


def _no_other_tasks() -> None:
    assert asyncio.all_tasks() == {asyncio.current_task()}, asyncio.all_tasks()


def _summary(result: LoopResult) -> tuple:
    """Everything the pipelined loop must reproduce: steps, decisions, kept-token usage."""
    u = result.usage
    return ([(s.index, s.text, s.source, s.score, s.draft_discarded, s.discarded_draft_text, s.tokens,
              s.finish_reason) for s in result.steps],
            result.finish_reason, u.draft_tokens_kept, u.draft_tokens_discarded, u.target_tokens,
            dict(u.steps_by_source), u.router_calls, u.prm_calls, u.acceptance_rate)


def _calls(gen: ScriptedGenerator) -> Counter:
    return Counter((tuple(prefixes), options) for prefixes, options in gen.calls)


def _models(draft=None, target=None, prm=None, router=None):
    return Models(ScriptedGenerator(DRAFT) if draft is None else draft,
                  ScriptedGenerator(TARGET, tokenize=words) if target is None else target, prm, router)


def _run(models: Models, policy: str, threshold=None, seed=0, pipeline=False, **kw):
    """One request on fresh state; returns (result or DeadlineExceeded, models). Checks
    that nothing the loop started is still running when it returns."""
    req = LoopRequest(PROMPT, make_policy(policy, threshold, seed), pipeline=pipeline, **kw)

    async def main():
        async with asyncio.timeout(GUARD_S):
            try:
                out = await run_loop(req, models)
            except DeadlineExceeded as err:
                out = err
        _no_other_tasks()
        return out

    return asyncio.run(main())


def _pair(build, policy, threshold=None, **kw):
    """Run the plain and the pipelined loop on fresh fakes from ``build()``."""
    plain_models, pipe_models = build(), build()
    plain = _run(plain_models, policy, threshold, pipeline=False, **kw)
    pipe = _run(pipe_models, policy, threshold, pipeline=True, **kw)
    return plain, pipe, plain_models, pipe_models


def _partial(out):
    return out.partial if isinstance(out, DeadlineExceeded) else out


def _assert_same(plain, pipe) -> None:
    assert type(plain) is type(pipe)
    assert _summary(_partial(pipe)) == _summary(_partial(plain))


# -- identical results ---------------------------------------------------------------------
def _scorers(delay=1e-4, **table):
    return {"router": TableScorer(table, default=0.1, delay=delay),
            "prm": TableScorer({k: 1 - v for k, v in table.items()}, default=0.9, delay=delay)}


SCENARIOS = {
    # name: (build, request kwargs); scorers: router P(target better), prm = 1 - that
    "all_kept": (lambda: _models(**_scorers()), {}),
    "routed_to_target": (lambda: _models(**_scorers(d1=0.95, d2=0.8)), {}),
    "last_routed": (lambda: _models(**_scorers(d3=0.9)), {}),
    "eos_on_a_discarded_draft": (
        lambda: _models(ScriptedGenerator(["d0", ("d1", "eos"), "d2", ("d3", "eos")]),
                        ScriptedGenerator(["t0", "t1 y", "t2", ("t3", "eos")], tokenize=words), **_scorers(d1=0.9)), {}),
    "max_steps": (lambda: _models(**_scorers(d0=0.9)), {"max_steps": 2}),
    "budget_used_exactly": (lambda: _models(ScriptedGenerator(["abcd"] * 5), **_scorers()),
                            {"max_new_tokens": 8, "step_max_tokens": 4}),
    "budget_cuts_last_step": (lambda: _models(ScriptedGenerator(["abcd"] * 5), **_scorers()),
                              {"max_new_tokens": 10, "step_max_tokens": 4}),
    "budget_mixes_tokenizers": (
        lambda: _models(ScriptedGenerator(["aaaa", "bbbbbbbbbb", "cccccccccc"]),
                        ScriptedGenerator(["-", "one two three", "a b c", "d e f", "g"], tokenize=words), **_scorers(bbbbbb=0.9)),
        {"max_new_tokens": 10, "step_max_tokens": 100}),
    "step_cut_by_step_limit": (lambda: _models(ScriptedGenerator(["abcdef", "x"]), **_scorers()),
                               {"step_max_tokens": 3}),
    "context_full_in_early_draft": (lambda: _models(ScriptedGenerator(["d0", "d1", ("", "context")]), **_scorers()),
                                    {}),
    "scorers_answer_without_yielding": (lambda: _models(**_scorers(delay=0.0, d1=0.95)), {}),
    "slow_models": (lambda: _models(ScriptedGenerator(DRAFT, delays={i: 0.002 for i in range(4)}),
                                    **_scorers(delay=0.001, d2=0.9)), {}),
}


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_pipelined_loop_equals_the_plain_loop(policy, scenario):
    build, kw = SCENARIOS[scenario]
    plain, pipe, plain_models, pipe_models = _pair(build, policy, **kw)
    _assert_same(plain, pipe)
    u = pipe.usage
    # the pipelined loop makes every call the plain loop makes, with the same options
    assert _calls(pipe_models.draft) >= _calls(plain_models.draft)
    assert _calls(pipe_models.target) == _calls(plain_models.target)
    extra = sum((_calls(pipe_models.draft) - _calls(plain_models.draft)).values())
    assert extra <= u.speculative_drafts_discarded
    if policy not in SCORED:
        assert u.speculative_drafts_used == u.speculative_drafts_discarded == 0 and extra == 0
    assert plain.usage.speculative_drafts_used == plain.usage.speculative_drafts_discarded == 0


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("seed", range(40))
def test_pipelined_loop_equals_the_plain_loop_on_random_requests(policy, seed):
    rng = random.Random(seed)
    max_steps = rng.randint(1, 8)
    drafts = [f"d{i}" + "a" * rng.randint(0, 6) for i in range(max_steps)]
    draft_script = [(t, "eos") if rng.random() < 0.15 else t for t in drafts]
    target_script = [(f"t{i}" + " w" * rng.randint(0, 4), "eos") if rng.random() < 0.15
                     else f"t{i}" + " w" * rng.randint(0, 4) for i in range(max_steps)]
    table = {t: rng.random() for t in drafts}
    table.update({t if isinstance(t, str) else t[0]: rng.random() for t in target_script})
    scorer_delay = rng.choice([0.0, 1e-4])
    draft_delays = {i: 0.0 for i in range(max_steps) if rng.random() < 0.5}  # yield once
    kw = {"max_steps": max_steps, "max_new_tokens": rng.randint(1, 50), "step_max_tokens": rng.randint(2, 12)}
    threshold = rng.random() if policy != "oracle" else rng.uniform(-0.5, 0.5)

    def build():
        return Models(ScriptedGenerator(draft_script, delays=draft_delays),
                      ScriptedGenerator(target_script, tokenize=words),
                      prm=TableScorer(table, default=0.5, delay=scorer_delay),
                      router=TableScorer(table, default=0.5, delay=scorer_delay))

    plain, pipe, plain_models, pipe_models = _pair(build, policy, threshold if policy not in ("draft", "target")
                                                   else None, **kw)
    _assert_same(plain, pipe)
    assert _calls(pipe_models.draft) >= _calls(plain_models.draft)
    assert _calls(pipe_models.target) == _calls(plain_models.target)


# -- what the early draft does ---------------------------------------------------------
def test_kept_steps_use_the_early_draft_instead_of_a_new_call():
    _, pipe, plain_models, pipe_models = _pair(lambda: _models(**_scorers()), "arbitrage")
    assert [s.source for s in pipe.steps] == ["draft"] * 4 and pipe.finish_reason == "eos"
    assert pipe_models.draft.calls == plain_models.draft.calls  # 4 calls, same prefixes and options
    u = pipe.usage
    # steps 1-3 were written while steps 0-2 were scored; none after the eos step
    assert u.speculative_drafts_used == 3 and u.speculative_drafts_discarded == 0
    assert u.speculative_draft_tokens_discarded == 0
    assert all(set(s.stage_ms) == {"draft", "router"} for s in pipe.steps)


def test_routed_step_discards_the_early_draft_and_books_its_tokens_apart():
    plain, pipe, _, pipe_models = _pair(lambda: _models(**_scorers(d1=0.95)), "arbitrage")
    assert [s.source for s in pipe.steps] == ["draft", "target", "draft", "draft"]
    # the early draft of step 2 continued "d1", which the target replaced
    assert [p for p, _ in pipe_models.draft.calls] == [[P], [P + "d0\n\n"], [P + "d0\n\nd1\n\n"],
                                                         [P + "d0\n\nt1 x\n\n"], [P + "d0\n\nt1 x\n\nd2\n\n"]]
    u = pipe.usage
    assert u.speculative_drafts_used == 2 and u.speculative_drafts_discarded == 1
    assert u.speculative_draft_tokens_discarded == 2  # "d2", written before the router answered
    # not counted as regular draft tokens: acceptance is the plain loop's
    assert u.draft_tokens_discarded == plain.usage.draft_tokens_discarded == 2
    assert u.draft_tokens == plain.usage.draft_tokens and u.acceptance_rate == plain.usage.acceptance_rate
    d = u.to_dict()
    assert d["speculative_draft_tokens_discarded"] == 2 and d["speculative_drafts_used"] == 2


@pytest.mark.parametrize("policy,scorer", [("arbitrage", "router"), ("rsd", "prm")])
def test_an_early_draft_in_flight_is_cancelled_when_the_step_goes_to_the_target(policy, scorer):
    score = {"router": 0.95, "prm": 0.05}[scorer]

    class Target(ScriptedGenerator):
        async def generate(self, prefixes, options):
            self.calls_seen_cancelled.append(bool(self.draft.cancelled_prefixes))
            return await super().generate(prefixes, options)

    def build():
        draft = ScriptedGenerator(DRAFT, delays={"d1": 60.0})  # any call continuing "d1" hangs
        target = Target(TARGET, tokenize=words)
        target.draft, target.calls_seen_cancelled = draft, []
        return _models(draft, target, **{scorer: TableScorer({"d1": score}, default=1 - score, delay=0.001)})

    plain, pipe, _, pipe_models = _pair(build, policy)
    _assert_same(plain, pipe)
    assert pipe_models.draft.cancelled_prefixes == [P + "d0\n\nd1\n\n"]
    # cancelled before the target was asked, not left running beside it
    assert pipe_models.target.calls_seen_cancelled == [True]
    u = pipe.usage
    assert u.speculative_drafts_discarded == 1 and u.speculative_draft_tokens_discarded == 0  # cut short: none known


def test_no_early_draft_when_keeping_the_step_ends_the_request():
    # eos, max_steps, a spent token budget, a step cut by its limit: nothing to write next
    for build, kw in [(lambda: _models(**_scorers()), {}),
                      (lambda: _models(**_scorers()), {"max_steps": 1}),
                      (lambda: _models(ScriptedGenerator(["abcd"] * 3), **_scorers()), {"max_new_tokens": 4}),
                      (lambda: _models(ScriptedGenerator(["abcdef"] * 3), **_scorers()), {"step_max_tokens": 3})]:
        plain, pipe, plain_models, pipe_models = _pair(build, "arbitrage", **kw)
        _assert_same(plain, pipe)
        assert pipe_models.draft.calls == plain_models.draft.calls
        assert pipe.usage.speculative_drafts_discarded == 0


def test_early_draft_asks_for_the_budget_left_after_the_kept_step():
    def build():
        return _models(ScriptedGenerator(["abcd"] * 5), **_scorers())

    _, pipe, plain_models, pipe_models = _pair(build, "rsd", max_new_tokens=10, step_max_tokens=4)
    assert pipe_models.draft.asked_tokens == plain_models.draft.asked_tokens == [4, 4, 2]
    assert pipe.usage.speculative_drafts_used == 2


def test_an_error_in_a_discarded_early_draft_is_ignored_and_retrieved():
    class Failing(ScriptedGenerator):
        async def generate(self, prefixes, options):
            if prefixes[0].endswith("d1\n\n"):
                raise RuntimeError("draft pool broke")
            return await super().generate(prefixes, options)

    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        req = LoopRequest(PROMPT, make_policy("arbitrage"), pipeline=True)
        result = await run_loop(req, _models(Failing(DRAFT), **_scorers(d1=0.95)))
        gc.collect()  # an exception never retrieved would be reported here
        _no_other_tasks()
        return result

    result = asyncio.run(main())
    assert [s.source for s in result.steps] == ["draft", "target", "draft", "draft"] and errors == []
    # kept: the same error as the plain loop's next draft call, at the same step
    for pipeline in (False, True):
        with pytest.raises(RuntimeError, match="draft pool broke"):
            _run(_models(Failing(DRAFT), **_scorers()), "arbitrage", pipeline=pipeline)


# -- ending early: deadline, cancellation, aclose --------------------------------------
def test_deadline_while_waiting_for_the_early_draft():
    def build():
        return _models(ScriptedGenerator(DRAFT, delays={"d0": 60.0}), **_scorers(delay=0.001))

    plain, pipe, plain_models, pipe_models = _pair(build, "arbitrage", deadline_s=0.1)
    assert isinstance(pipe, DeadlineExceeded)
    _assert_same(plain, pipe)
    assert [s.text for s in pipe.partial.steps] == ["d0"] and pipe.partial.finish_reason == "deadline"
    assert pipe_models.draft.cancelled_prefixes == plain_models.draft.cancelled_prefixes == [P + "d0\n\n"]
    assert pipe.partial.usage.speculative_drafts_used == 1


def test_deadline_while_scoring_drops_the_early_draft():
    def build():
        return _models(**_scorers(delay=60.0))

    plain, pipe, _, _ = _pair(build, "arbitrage", deadline_s=0.05)
    _assert_same(plain, pipe)
    u = pipe.partial.usage
    assert pipe.partial.steps == [] and u.draft_tokens_discarded == 2  # as the plain loop: d0 spent
    assert u.speculative_drafts_discarded == 1 and u.speculative_draft_tokens_discarded == 2  # "d1" had finished
    assert u.speculative_drafts_used == 0


class FakeClock:
    """The loop's ``time``: ``perf_counter`` stands still until a fake model moves it, so a
    deadline passes exactly where a test says (no real sleeping, no race on a loaded box)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    from arbitrage_common import loop

    fake = FakeClock()
    monkeypatch.setattr(loop, "time", fake)
    return fake


def _router_past_the_deadline(clock: FakeClock, default: float) -> TableScorer:
    """A router that moves the clock past any deadline below 100 s while it scores, without
    yielding: the call's own timeout cannot fire, only the next call's check can."""
    class SlowRouter(TableScorer):
        async def score(self, items):
            clock.now += 100.0
            return await super().score(items)

    return SlowRouter({}, default)


def test_deadline_checked_before_each_call(clock):
    plain, pipe, _, pipe_models = _pair(lambda: _models(router=_router_past_the_deadline(clock, 0.9)), "arbitrage",
                                        deadline_s=60.0)
    _assert_same(plain, pipe)
    assert pipe_models.target.calls == [] and pipe.partial.usage.speculative_drafts_discarded == 1


def test_deadline_passed_before_the_early_draft_is_awaited(clock):
    # The router blocks past the deadline and keeps d0; step 1's early draft never ran. The
    # next step's deadline check refuses to wait for it: it must still be cancelled.
    plain, pipe, _, _ = _pair(lambda: _models(router=_router_past_the_deadline(clock, 0.1)), "arbitrage",
                              deadline_s=60.0)
    _assert_same(plain, pipe)
    assert [s.text for s in pipe.partial.steps] == ["d0"]
    assert pipe.partial.usage.speculative_drafts_discarded == 1 and pipe.partial.usage.speculative_drafts_used == 0


def test_no_early_draft_starts_once_the_deadline_has_passed(clock):
    """The deadline passes during step 0's draft call: the scorer call is refused next, so no
    early draft for step 1 is started (it could only be discarded)."""
    class SlowDraft(ScriptedGenerator):
        async def generate(self, prefixes, options):
            clock.now += 100.0
            return await super().generate(prefixes, options)

    plain, pipe, _, pipe_models = _pair(lambda: _models(SlowDraft(DRAFT), **_scorers()), "arbitrage", deadline_s=60.0)
    _assert_same(plain, pipe)
    assert pipe.partial.steps == [] and pipe.partial.finish_reason == "deadline"
    assert [p for p, _ in pipe_models.draft.calls] == [[P]]
    assert pipe.partial.usage.speculative_drafts_discarded == 0


def test_a_finished_early_draft_past_the_deadline_is_discarded_with_its_tokens():
    # The router yields (step 1's early draft "d1" runs and finishes), then blocks past the
    # deadline and keeps d0. The plain loop's step-1 draft call would be refused: the request
    # ended first, so the early draft is discarded with its tokens, not counted used.
    class SlowRouter(TableScorer):
        async def score(self, items):
            import time
            await asyncio.sleep(0.01)  # the early draft finishes meanwhile
            time.sleep(0.15)  # noqa: ASYNC251 (deliberate: past the deadline without a timeout)
            return await super().score(items)

    plain, pipe, _, pipe_models = _pair(lambda: _models(router=SlowRouter({}, 0.1)), "arbitrage", deadline_s=0.1)
    _assert_same(plain, pipe)
    u = pipe.partial.usage
    assert [s.text for s in pipe.partial.steps] == ["d0"] and pipe_models.draft.cancelled_prefixes == []
    assert [p for p, _ in pipe_models.draft.calls] == [[P], [P + "d0\n\n"]]  # the early draft ran
    assert u.speculative_drafts_used == 0 and u.speculative_drafts_discarded == 1
    assert u.speculative_draft_tokens_discarded == 2  # "d1" had finished
    assert (u.draft_tokens_kept, u.draft_tokens_discarded) == (2, 0)  # as the plain loop: only d0


def test_deadline_passed_while_the_consumer_holds_a_step():
    draft = ScriptedGenerator(DRAFT, delays={"d0": 60.0})
    models = Models(draft, ScriptedGenerator(TARGET), router=TableScorer({}, default=0.1, delay=0.001))

    async def main():
        stream = stream_loop(LoopRequest(PROMPT, make_policy("arbitrage"), pipeline=True, deadline_s=0.05), models)
        assert (await stream.__anext__()).text == "d0"
        await asyncio.sleep(0.1)  # past the deadline, the early draft still running
        with pytest.raises(DeadlineExceeded) as err:
            await stream.__anext__()
        _no_other_tasks()
        return err.value.partial

    partial = asyncio.run(main())
    assert [s.text for s in partial.steps] == ["d0"] and draft.cancelled_prefixes == [P + "d0\n\n"]
    # Never waited for as step 1's draft (the deadline had passed): discarded, not used.
    u = partial.usage
    assert (u.speculative_drafts_used, u.speculative_drafts_discarded, u.speculative_draft_tokens_discarded) \
        == (0, 1, 0)


@pytest.mark.parametrize("draft_delays", [{}, {"d0": 60.0}])
def test_cancellation_cancels_the_early_draft(draft_delays):
    draft = ScriptedGenerator(DRAFT, delays=draft_delays)
    router = TableScorer({}, default=0.1, delay=60.0)

    async def main():
        task = asyncio.create_task(run_loop(LoopRequest(PROMPT, make_policy("arbitrage"), pipeline=True),
                                            Models(draft, ScriptedGenerator(TARGET), router=router)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        _no_other_tasks()

    asyncio.run(main())
    assert draft.cancelled == bool(draft_delays)
    assert len(draft.calls) == 2  # step 0's draft and step 1's early draft


def test_aclose_mid_stream_cancels_the_early_draft():
    draft = ScriptedGenerator(DRAFT, delays={"d0": 60.0})
    models = Models(draft, ScriptedGenerator(TARGET), router=TableScorer({}, default=0.1, delay=0.001))

    async def main():
        stream = stream_loop(LoopRequest(PROMPT, make_policy("arbitrage"), pipeline=True), models)
        first = await stream.__anext__()  # step 1's early draft is running now
        assert first.text == "d0" and len(draft.calls) == 2 and not draft.cancelled
        await stream.aclose()
        _no_other_tasks()
        return stream

    stream = asyncio.run(main())
    assert draft.cancelled_prefixes == [P + "d0\n\n"]
    assert stream.usage.speculative_drafts_discarded == 1 and stream.usage.speculative_drafts_used == 0


def test_streamed_steps_equal_the_plain_stream():
    async def collect(pipeline):
        stream = stream_loop(LoopRequest(PROMPT, make_policy("arbitrage"), pipeline=pipeline),
                             _models(**_scorers(d1=0.9)))
        seen = [(s.index, s.text, s.source, stream.result is not None) async for s in stream]
        _no_other_tasks()
        return seen, stream.result.finish_reason

    assert asyncio.run(collect(True)) == asyncio.run(collect(False))


# -- request, config, wire -------------------------------------------------------------
def test_pipeline_must_be_a_bool():
    with pytest.raises(InvalidArgument) as err:
        LoopRequest(PROMPT, make_policy("draft"), pipeline="yes")
    assert err.value.field == "pipeline"
    assert LoopRequest(PROMPT, make_policy("draft")).pipeline is False


def _cfg(**limits) -> AppConfig:
    pool = PoolSpec(model=ModelSpec(path="m"))
    return AppConfig(pools=PoolsSpec(draft=pool, target=pool, router=pool), limits=LimitsSpec(**limits))


def test_config_switch_reaches_the_loop_request():
    assert prepare(RequestFields(prompt=PROMPT), _cfg()).request.pipeline is False
    assert prepare(RequestFields(prompt=PROMPT), _cfg(step_pipelining=True)).request.pipeline is True
    # left out of renderings while off (the shipped YAML stays as it is), rendered when on
    off = render_serve_config(_cfg())["applications"][0]["args"]["limits"]
    on = render_serve_config(_cfg(step_pipelining=True))["applications"][0]["args"]["limits"]
    assert "step_pipelining" not in off and on["step_pipelining"] is True
    assert AppConfig(**render_serve_config(_cfg(step_pipelining=True))["applications"][0]["args"]) \
        .limits.step_pipelining is True


def test_speculative_usage_in_json_and_proto():
    models = _models(**_scorers(d1=0.95))
    result = _run(models, "arbitrage", pipeline=True)
    prepared = prepare(RequestFields(prompt=PROMPT), _cfg(step_pipelining=True))
    usage = convert.result_json(result, prepared)["usage"]
    assert (usage["speculative_drafts_used"], usage["speculative_drafts_discarded"],
            usage["speculative_draft_tokens_discarded"]) == (2, 1, 2)
    msg = convert.result_proto(result, prepared)
    assert (msg.usage.speculative_drafts_used, msg.usage.speculative_drafts_discarded,
            msg.usage.speculative_draft_tokens_discarded) == (2, 1, 2)
    assert msg.usage.draft_tokens_discarded == 2
