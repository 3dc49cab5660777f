"""Memoized sweeps (evaluation/memo.py): one output per distinct call, each request charged
the time of the calls it made, a target proposal's cheaper rewrite included."""
from __future__ import annotations

import asyncio

import pytest

from arbitrage_common.evaluation.memo import Charge, GenerationCache
from arbitrage_common.evaluation.runners import InProcessRunner
from arbitrage_common.evaluation.tasks import Task, TaskProblem
from arbitrage_common.interfaces import Generation, GenerationOptions

FULL, WITH_PROPOSAL = 1.0, 0.6  # seconds of a target call without / with the draft's step as proposal


class TimedGenerator:
    """A sync backend: the i-th step of a prefix is ``{name}{i}``; a call with a proposal takes
    less time and writes the same (as the transformers backend's verified rewrite)."""

    def __init__(self, name: str, seconds: float = FULL, proposed: float = WITH_PROPOSAL, steps: int = 3):
        self.name, self.full, self.proposed, self.steps = name, seconds, proposed, steps
        self.calls: list[tuple[str, str]] = []

    def generate_batch(self, prefixes, options: GenerationOptions):
        (prefix,) = prefixes
        self.calls.append((prefix, options.proposal))
        index = prefix.count("\n\n") - 1
        finish = "eos" if index >= self.steps - 1 else "delimiter"
        return [Generation(f"{self.name}{index}", 2, finish, self.proposed if options.proposal else self.full)]


class ConstScorer:
    def __init__(self, score: float):
        self.score = score

    def score_batch(self, items):
        return [self.score for _ in items]


def _charged(cache: GenerationCache, prefix: str, proposal: str = "") -> tuple[Generation, float]:
    charge = Charge()
    (gen,) = asyncio.run(cache.view(charge).generate([prefix], GenerationOptions(max_new_tokens=8, proposal=proposal)))
    return gen, charge.seconds


def test_a_proposal_is_charged_its_own_time_but_shares_the_output():
    backend = TimedGenerator("t")
    cache = GenerationCache(backend, "target")
    plain, seconds = _charged(cache, "p\n\n")          # the target-only point: no proposal
    assert seconds == FULL
    rewrite, seconds = _charged(cache, "p\n\n", "d0")   # a routed rewrite of the same step
    assert seconds == pytest.approx(WITH_PROPOSAL)
    assert (rewrite.text, rewrite.tokens, rewrite.finish_reason) == (plain.text, plain.tokens, plain.finish_reason)
    again, seconds = _charged(cache, "p\n\n", "d0")     # replayed, not run again
    assert seconds == pytest.approx(WITH_PROPOSAL) and again.seconds == pytest.approx(WITH_PROPOSAL)
    assert _charged(cache, "p\n\n")[1] == FULL
    assert backend.calls == [("p\n\n", ""), ("p\n\n", "d0")]


class _Task(Task):
    name, max_steps = "fake", 5

    def __init__(self):
        self.problems = [TaskProblem("0", "Start.", None)]

    def grade(self, problem, text):
        return True


def _runner() -> InProcessRunner:
    return InProcessRunner({"draft": TimedGenerator("d", seconds=0.1, proposed=0.1),
                            "target": TimedGenerator("t"),
                            "prm": ConstScorer(0.0), "router": ConstScorer(1.0)})  # every step routed


@pytest.mark.parametrize(("policy", "threshold"), [("arbitrage", 0.5), ("rsd", 0.5), ("oracle", -0.5)])
def test_a_request_costs_the_same_whatever_the_sweep_ran_before(policy, threshold):
    """The sweep runs the target-only point first: its calls must not set the time charged to
    the routed rewrites of the same prefixes."""
    task = _Task()
    alone = _runner().run(task, policy, threshold)[0]
    runner = _runner()
    runner.run(task, "target", None)
    after_target = runner.run(task, policy, threshold)[0]
    assert alone.target_steps == after_target.target_steps == 3
    # Scorer calls are timed for real (microseconds here): hence the absolute tolerance.
    assert after_target.seconds == pytest.approx(alone.seconds, abs=1e-3)
    assert alone.seconds == pytest.approx(3 * (0.1 + WITH_PROPOSAL), abs=1e-3)
    assert after_target.text == alone.text
