import asyncio
import math

import pytest
from fakes import ScriptedGenerator, TableScorer, chars, words

from arbitrage_common.errors import DeadlineExceeded, InvalidArgument, ScorerError
from arbitrage_common.interfaces import Generation, GenerationOptions
from arbitrage_common.loop import LoopRequest, Models, run_loop, stream_loop
from arbitrage_common.policies import make_policy

DRAFT = ["d0", "d1", "d2", ("d3", "eos")]
TARGET = ["t0 x", "t1 x", "t2 x", ("t3 x", "eos")]


def run(policy, draft=None, target=None, prm=None, router=None, **kw):
    draft = draft or ScriptedGenerator(DRAFT)
    target = target or ScriptedGenerator(TARGET, tokenize=words)
    req = LoopRequest("Start with 3.", policy, **kw)
    return asyncio.run(run_loop(req, Models(draft, target, prm, router))), draft, target


# -- routing: who runs ---------------------------------------------------------------------
def test_draft_policy_never_calls_target():
    result, draft, target = run(make_policy("draft"))
    assert [s.text for s in result.steps] == ["d0", "d1", "d2", "d3"]
    assert len(draft.calls) == 4 and target.calls == []
    assert result.finish_reason == "eos"
    assert result.text == "d0\n\nd1\n\nd2\n\nd3"


def test_target_policy_never_calls_draft():
    result, draft, target = run(make_policy("target"))
    assert [s.source for s in result.steps] == ["target"] * 4
    assert draft.calls == [] and len(target.calls) == 4


def test_rsd_calls_target_only_below_threshold():
    prm = TableScorer({"d0": 0.9, "d1": 0.2, "d2": 0.5, "d3": 0.8})
    result, draft, target = run(make_policy("rsd", 0.5), prm=prm)
    assert [s.source for s in result.steps] == ["draft", "target", "draft", "draft"]
    assert [s.score for s in result.steps] == [0.9, 0.2, 0.5, 0.8]
    assert len(target.calls) == 1 and len(draft.calls) == 4
    assert result.steps[1].text == "t1 x" and result.steps[1].discarded_draft_text == "d1"
    assert result.steps[1].draft_discarded and not result.steps[0].draft_discarded
    # target continues from the kept history, including its own step
    assert target.calls[0][0] == ["Start with 3.\n\nd0\n\n"]
    assert draft.calls[2][0] == ["Start with 3.\n\nd0\n\nt1 x\n\n"]
    assert result.usage.prm_calls == 4 and result.usage.router_calls == 0


def test_arbitrage_calls_target_only_above_threshold_and_passes_history():
    router = TableScorer({"d0": 0.1, "d1": 0.95, "d2": 0.6, "d3": 0.3})
    result, _, target = run(make_policy("arbitrage", 0.5), router=router)
    assert [s.source for s in result.steps] == ["draft", "target", "target", "draft"]
    assert len(target.calls) == 2
    assert result.usage.router_calls == 4 and result.usage.prm_calls == 0
    last = router.calls[3][0]
    assert last.problem == "Start with 3."
    assert last.history == (("d0", "draft"), ("t1 x", "target"), ("t2 x", "target"))
    assert last.candidate == "d3"


def test_a_rewrite_gets_the_discarded_draft_step_as_its_proposal():
    """The target's rewrite carries the draft's step as it was written (with the delimiter if
    it ended there), and so does the oracle's target; the draft's own calls carry none."""
    draft = ScriptedGenerator(["d0", ("d1", "length"), "d2", ("d3", "eos")])
    router = TableScorer({"d0": 0.9, "d1": 0.9, "d2": 0.1, "d3": 0.1})
    _, draft, target = run(make_policy("arbitrage", 0.5), draft=draft, router=router)
    assert [o.proposal for _, o in target.calls] == ["d0\n\n", "d1"]
    assert {o.proposal for _, o in draft.calls} == {""}
    _, _, oracle_target = run(make_policy("oracle", 0.0), prm=TableScorer({}))
    assert [o.proposal for _, o in oracle_target.calls] == ["d0\n\n", "d1\n\n", "d2\n\n", "d3"]


def test_random_runs_only_the_chosen_model():
    result, draft, target = run(make_policy("random", 0.5, seed=3))
    expected = make_policy("random", 0.5, seed=3)
    sources = ["target" if expected.route_to_target() else "draft" for _ in range(4)]
    assert [s.source for s in result.steps] == sources
    assert len(target.calls) == sources.count("target") and len(draft.calls) == sources.count("draft")
    never, _, target2 = run(make_policy("random", 0.0, seed=3))
    assert target2.calls == [] and never.usage.steps_by_source == {"draft": 4, "target": 0}


def test_oracle_runs_both_and_keeps_target_on_positive_advantage():
    prm = TableScorer({"d0": 0.9, "t0 x": 0.5, "d1": 0.2, "t1 x": 0.8, "d2": 0.5, "t2 x": 0.5,
                       "d3": 0.1, "t3 x": 0.3})
    result, draft, target = run(make_policy("oracle"), prm=prm)
    assert len(draft.calls) == 4 and len(target.calls) == 4
    assert [s.source for s in result.steps] == ["draft", "target", "draft", "target"]
    assert [round(s.score, 6) for s in result.steps] == [-0.4, 0.6, 0.0, 0.2]
    assert [i.candidate for i in prm.calls[0]] == ["d0", "t0 x"]
    u = result.usage
    assert u.prm_calls == 8
    assert u.target_tokens == 8  # all four 2-word target steps, kept or not
    assert u.draft_tokens_kept == 4 and u.draft_tokens_discarded == 4
    assert result.finish_reason == "eos"


def test_steps_carry_the_prm_score_of_the_draft_step():
    # Oracle: PRM(draft), so PRM(target) = draft_score + score; RSD: its score; Arbitrage: none.
    prm = TableScorer({"d0": 0.9, "t0 x": 0.5, "d1": 0.2, "t1 x": 0.8, "d2": 0.5, "t2 x": 0.5,
                       "d3": 0.1, "t3 x": 0.3})
    oracle, _, _ = run(make_policy("oracle"), prm=prm)
    assert [s.draft_score for s in oracle.steps] == [0.9, 0.2, 0.5, 0.1]
    rsd, _, _ = run(make_policy("rsd", 0.5), prm=prm)
    assert [s.draft_score for s in rsd.steps] == [0.9, 0.2, 0.5, 0.1]
    router = TableScorer({"d0": 0.1, "d1": 0.95, "d2": 0.6, "d3": 0.3})
    arb, _, _ = run(make_policy("arbitrage", 0.5), router=router)
    assert [s.draft_score for s in arb.steps] == [None] * 4


def test_oracle_threshold_moves_the_decision():
    prm = TableScorer({"d1": 0.2, "t1 x": 0.8})
    result, _, _ = run(make_policy("oracle", 0.7), prm=prm)
    assert [s.source for s in result.steps] == ["draft"] * 4


# -- stop reasons --------------------------------------------------------------------------
def test_stop_max_steps():
    result, draft, _ = run(make_policy("draft"), max_steps=2)
    assert result.finish_reason == "max_steps" and len(result.steps) == 2 and len(draft.calls) == 2


def test_stop_length_when_budget_used_exactly():
    draft = ScriptedGenerator(["abcd"] * 5)
    result, _, _ = run(make_policy("draft"), draft=draft, max_new_tokens=8, step_max_tokens=4)
    assert result.finish_reason == "length"
    assert [s.finish_reason for s in result.steps] == ["delimiter", "delimiter"]
    assert draft.asked_tokens == [4, 4]


def test_stop_length_budget_cuts_last_step():
    draft = ScriptedGenerator(["abcd"] * 5)
    result, _, _ = run(make_policy("draft"), draft=draft, max_new_tokens=10, step_max_tokens=4)
    assert draft.asked_tokens == [4, 4, 2]
    assert result.finish_reason == "length" and result.steps[-1].text == "ab"


def test_stop_length_when_step_hits_step_limit():
    draft = ScriptedGenerator(["abcdef", "x"])
    result, _, _ = run(make_policy("draft"), draft=draft, max_new_tokens=100, step_max_tokens=3)
    assert result.finish_reason == "length" and len(result.steps) == 1
    assert result.steps[0].finish_reason == "length" and result.steps[0].tokens == 3


def test_stop_eos_on_kept_step_only():
    # the discarded draft step says eos, the kept target step does not: keep going
    draft = ScriptedGenerator(["d0", ("d1", "eos")])
    target = ScriptedGenerator(["t0", ("t1 y", "eos")], tokenize=words)
    router = TableScorer({"d0": 1.0}, default=0.0)
    result, _, _ = run(make_policy("arbitrage"), draft=draft, target=target, router=router)
    assert [s.text for s in result.steps] == ["t0", "d1"] and result.finish_reason == "eos"


def test_deadline_raises_with_partial_result():
    draft = ScriptedGenerator(DRAFT, delays={2: 10.0})
    req = LoopRequest("P", make_policy("draft"), deadline_s=0.05)
    with pytest.raises(DeadlineExceeded) as err:
        asyncio.run(run_loop(req, Models(draft, ScriptedGenerator(TARGET))))
    partial = err.value.partial
    assert partial.finish_reason == "deadline"
    assert [s.text for s in partial.steps] == ["d0", "d1"]
    assert partial.usage.draft_tokens_kept == 4
    assert draft.cancelled  # the slow call was cancelled, not left running
    assert err.value.waiting_on == "draft"  # the call the loop waited for at the deadline


def test_deadline_checked_before_each_call():
    class SlowRouter(TableScorer):
        async def score(self, items):
            import time
            time.sleep(0.03)  # blocks: the timeout cannot fire, the next call's check must  # noqa: ASYNC251 (deliberate)
            return await super().score(items)

    target = ScriptedGenerator(TARGET)
    req = LoopRequest("P", make_policy("arbitrage"), deadline_s=0.02)
    with pytest.raises(DeadlineExceeded) as err:
        asyncio.run(run_loop(req, Models(ScriptedGenerator(DRAFT), target, router=SlowRouter({}, 0.9))))
    assert target.calls == []
    # the abandoned draft step was spent, not kept
    assert err.value.partial.usage.draft_tokens_discarded == 2 and err.value.partial.steps == []
    assert err.value.waiting_on is None  # refused before a call: none was out


def test_model_timeout_error_is_not_a_deadline():
    class TimingOut(ScriptedGenerator):
        async def generate(self, prefixes, options):
            raise TimeoutError("backend")

    req = LoopRequest("P", make_policy("draft"), deadline_s=5.0)
    with pytest.raises(TimeoutError) as err:
        asyncio.run(run_loop(req, Models(TimingOut([]), ScriptedGenerator(TARGET))))
    assert not isinstance(err.value, DeadlineExceeded)


def test_cancellation_propagates():
    draft = ScriptedGenerator(DRAFT, delays={1: 10.0})

    async def main():
        task = asyncio.create_task(run_loop(LoopRequest("P", make_policy("draft")),
                                            Models(draft, ScriptedGenerator(TARGET))))
        await asyncio.sleep(0.01)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    assert draft.cancelled and len(draft.calls) == 2


# -- accounting ----------------------------------------------------------------------------
def test_accounting_with_different_tokenizers():
    # draft counts characters, target counts words
    draft = ScriptedGenerator(["aaaa", "bbbbbb", "cc", ("ddd", "eos")], tokenize=chars)
    target = ScriptedGenerator(["x", "one two three", "y", "z"], tokenize=words)
    router = TableScorer({"bbbbbb": 0.9}, default=0.1)
    result, _, _ = run(make_policy("arbitrage"), draft=draft, target=target, router=router)
    u = result.usage
    assert [s.tokens for s in result.steps] == [4, 3, 2, 3]
    assert u.draft_tokens_kept == 9 and u.draft_tokens_discarded == 6 and u.target_tokens == 3
    assert u.steps_by_source == {"draft": 3, "target": 1}
    assert u.acceptance_rate == pytest.approx(9 / 15)
    assert u.target_step_fraction == pytest.approx(0.25)
    assert u.router_calls == 4 and u.prm_calls == 0
    assert set(result.steps[1].stage_ms) == {"draft", "router", "target"}
    assert set(result.steps[0].stage_ms) == {"draft", "router"}
    assert u.stage_seconds["prm"] == 0.0 and u.stage_seconds["draft"] > 0.0
    d = u.to_dict()
    assert d["acceptance_rate"] == pytest.approx(0.6) and d["draft_tokens"] == 15
    assert result.to_dict()["steps"][1]["discarded_draft_text"] == "bbbbbb"


def test_empty_usage_ratios_are_zero():
    from arbitrage_common.accounting import Usage
    assert Usage().acceptance_rate == 0.0 and Usage().target_step_fraction == 0.0


def test_budget_mixes_each_writers_tokens():
    # target step "one two three" is 3 tokens (words) against a 10-token budget
    draft = ScriptedGenerator(["aaaa", "bbbbbbbbbb", "cccccccccc"], tokenize=chars)
    target = ScriptedGenerator(["-", "one two three"], tokenize=words)
    router = TableScorer({"bbbbbb": 0.9}, default=0.1)  # the draft step as cut to 6 chars
    result, draft, target = run(make_policy("arbitrage"), draft=draft, target=target, router=router,
                                max_new_tokens=10, step_max_tokens=100)
    assert draft.asked_tokens == [10, 6, 3] and target.asked_tokens == [6]
    assert [s.text for s in result.steps] == ["aaaa", "one two three", "ccc"]
    assert result.finish_reason == "length"


def test_options_pass_through():
    draft = ScriptedGenerator(DRAFT)
    run(make_policy("draft"), draft=draft, options=GenerationOptions(temperature=0.7, seed=11))
    assert {(o.temperature, o.seed) for _, o in draft.calls} == {(0.7, 11)}


# -- streaming -----------------------------------------------------------------------------
def test_stream_yields_steps_and_result():
    async def main():
        stream = stream_loop(LoopRequest("P", make_policy("draft")), Models(ScriptedGenerator(DRAFT),
                                                                           ScriptedGenerator(TARGET)))
        seen = []
        async for step in stream:
            seen.append((step.index, step.text, stream.result is not None))
        return seen, stream.result

    seen, result = asyncio.run(main())
    assert seen == [(0, "d0", False), (1, "d1", False), (2, "d2", False), (3, "d3", True)]
    assert result.finish_reason == "eos" and len(result.steps) == 4


# -- validation and bad model output -------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    ({"prompt": "  \n"}, "prompt"), ({"max_steps": 0}, "max_steps"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"step_max_tokens": -1}, "step_max_tokens"), ({"deadline_s": 0}, "deadline_s"),
    ({"deadline_s": math.nan}, "deadline_s"), ({"options": GenerationOptions(temperature=-1)}, "temperature"),
    ({"policy": "draft"}, "policy"),
])
def test_invalid_request(kw, field):
    args = {"prompt": "P", "policy": make_policy("draft"), **kw}
    with pytest.raises(InvalidArgument) as err:
        LoopRequest(**args)
    assert err.value.field == field and str(err.value).startswith(field + ":")


@pytest.mark.parametrize("name", ["rsd", "oracle", "arbitrage"])
def test_missing_scorer(name):
    with pytest.raises(InvalidArgument, match="scorer") as err:
        stream_loop(LoopRequest("P", make_policy(name)), Models(ScriptedGenerator(DRAFT), ScriptedGenerator(TARGET)))
    assert err.value.field == "policy"


def test_nan_score_is_an_error():
    with pytest.raises(ScorerError, match="^prm: .*non-finite") as err:
        run(make_policy("rsd"), prm=TableScorer({"d0": math.nan}))
    assert err.value.role == "prm"


@pytest.mark.parametrize("extra", [1, -1])
def test_wrong_score_count_is_an_error(extra):
    with pytest.raises(ScorerError, match="^router: returned") as err:
        run(make_policy("arbitrage"), router=TableScorer({}, extra=extra))
    assert err.value.role == "router"


def test_oracle_wrong_score_count():
    with pytest.raises(ScorerError, match="returned 1 scores for 2 items"):
        run(make_policy("oracle"), prm=TableScorer({}, extra=-1))


@pytest.mark.parametrize("count", [0, 2])
def test_wrong_generation_count_is_an_error(count):
    with pytest.raises(ScorerError, match=f"^target generator: returned {count} generations") as err:
        run(make_policy("target"), target=ScriptedGenerator(TARGET, count=count))
    assert err.value.role == "target generator"


class _OneAnswer:
    """A generator that answers every call with the same single generation."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen

    async def generate(self, prefixes, options):
        return [self.gen]


@pytest.mark.parametrize("gen", [Generation("x", -1, "delimiter", 0.0), Generation("x", True, "delimiter", 0.0),
                                 Generation("x", 1, "stop", 0.0)], ids=["negative", "bool", "unknown-reason"])
def test_a_generators_malformed_answer_is_a_scorer_error(gen):
    """A negative or bool token count and a finish reason outside the contract are the
    generator's fault, named by its role, not booked as a step."""
    with pytest.raises(ScorerError, match="^draft generator: ") as err:
        run(make_policy("draft"), draft=_OneAnswer(gen))
    assert err.value.role == "draft generator"


def test_prompt_template_reaches_generators_but_not_scorers():
    router = TableScorer({"d0": 0.0, "d1": 0.0, "d2": 0.0, "d3": 0.0})
    _, draft, _ = run(make_policy("arbitrage", 0.5), router=router, prompt_template="<q>{problem}</q>\n\n")
    assert draft.calls[0][0] == ["<q>Start with 3.</q>\n\n"]
    assert draft.calls[1][0] == ["<q>Start with 3.</q>\n\nd0\n\n"]
    assert router.calls[0][0].problem == "Start with 3."
    with pytest.raises(InvalidArgument, match="prompt_template"):
        LoopRequest("P", make_policy("draft"), prompt_template="none")


# -- context: a generator with no room left ---------------------------------------------
def test_context_full_mid_request_ends_with_length_and_keeps_steps():
    draft = ScriptedGenerator(["d0", "d1", ("", "context")])
    result, _, _ = run(make_policy("draft"), draft=draft)
    assert result.finish_reason == "length"
    assert [s.text for s in result.steps] == ["d0", "d1"]


def test_context_full_in_target_after_draft_drops_the_step():
    # RSD: the draft's step scores low, the target has no room: the request ends before it.
    draft = ScriptedGenerator(["d0", "bad"])
    target = ScriptedGenerator(["t0", ("", "context")])
    result, _, _ = run(make_policy("rsd", 0.5), draft=draft, target=target,
                       prm=TableScorer({"d0": 0.9, "bad": 0.1}))
    assert result.finish_reason == "length"
    assert [s.text for s in result.steps] == ["d0"]


def test_prompt_that_does_not_fit_is_invalid_argument():
    draft = ScriptedGenerator([("", "context")])
    with pytest.raises(InvalidArgument) as err:
        run(make_policy("draft"), draft=draft)
    assert err.value.field == "prompt" and "draft" in str(err.value)


def test_a_prompt_that_does_not_fit_is_named_by_the_field_the_client_sent():
    """A chat request's problem is its last user message: the error names that, not 'prompt'."""
    with pytest.raises(InvalidArgument) as err:
        run(make_policy("draft"), draft=ScriptedGenerator([("", "context")]), prompt_field="messages[1].content")
    assert err.value.field == "messages[1].content" and "draft model's context" in str(err.value)


def test_oracle_scores_a_target_step_identical_to_the_draft_as_exactly_no_advantage():
    """In a batch, two identical items can score a few 1e-8 apart (padding, other rows): the
    same step is still no advantage, or other requests' rows would flip its source."""
    class NoisyPRM:
        calls = 0

        async def score(self, items):
            NoisyPRM.calls += 1
            return [0.5 + 1e-8 * i for i in range(len(items))]  # the later item a hair higher

    same = ["s0", "s1", ("s2", "eos")]
    req = LoopRequest(prompt="Start with 3.", policy=make_policy("oracle"))
    result = asyncio.run(run_loop(req, Models(ScriptedGenerator(same), ScriptedGenerator(same), NoisyPRM(), None)))
    assert [s.source for s in result.steps] == ["draft"] * 3 and [s.score for s in result.steps] == [0.0] * 3
    assert result.usage.draft_tokens_kept == sum(len(s.text) for s in result.steps) and NoisyPRM.calls == 3
