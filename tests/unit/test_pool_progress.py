"""``PoolProgress``: how long a pool has answered nothing while a call was out to it (a hung
replica), over a clock the tests move; and ``PoolCaller`` telling it of every attempt."""
from __future__ import annotations

import asyncio
import random

import pytest
from fakes import HandleResponse
from ray.exceptions import ActorDiedError

from arbitrage_common.pool_progress import CUT_FRESH_S, PoolProgress
from arbitrage_common.retry import RetryPolicy
from services.convert import PoolDown
from services.handles import PoolCaller


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_silence_counts_only_while_a_call_is_out_and_since_the_last_answer():
    clock = Clock()
    progress = PoolProgress(clock)
    assert progress.stalled_s("draft") == 0.0  # nothing out
    first = progress.sent("draft")
    clock.now = 10.0
    assert progress.stalled_s("draft") == 10.0  # out since 0, no answer
    assert progress.stalled_s("target") == 0.0  # per pool
    later = progress.sent("draft")
    clock.now = 12.0
    progress.ended("draft", later, answered=True)  # the pool answers another call: not hung
    clock.now = 13.0
    assert progress.stalled_s("draft") == 1.0  # first still out, but an answer came at 12
    progress.ended("draft", first, answered=True)
    clock.now = 100.0
    assert progress.stalled_s("draft") == 0.0  # idle: nothing out


def test_a_call_cut_by_the_caller_tells_its_silence_for_a_moment():
    """The deadline cancels the calls a request waited on before it looks for a pool to blame:
    a cut call still says how long the pool had been silent, for ``CUT_FRESH_S``; an answer, or
    a later short cut (a cancelled early draft), does not hide a longer fresh one."""
    clock = Clock()
    progress = PoolProgress(clock)
    hung = progress.sent("draft")
    clock.now = 30.0
    progress.ended("draft", hung, answered=False)
    assert progress.stalled_s("draft") == 30.0
    early = progress.sent("draft")
    clock.now = 30.1
    progress.ended("draft", early, answered=False)
    assert progress.stalled_s("draft") == 30.0
    clock.now = 30.0 + CUT_FRESH_S + 0.5
    assert progress.stalled_s("draft") == 0.0  # stale: the pool may be idle, not hung
    progress.ended("target", progress.sent("target"), answered=False)
    again = progress.sent("draft")
    clock.now += 5.0
    progress.ended("draft", again, answered=False)
    progress.ended("draft", progress.sent("draft"), answered=True)
    assert progress.stalled_s("draft") == 0.0  # answered since


class Gated:
    """``.remote()`` answers ``answer`` (or raises it) once released; never, unless released."""

    def __init__(self, answer=None) -> None:
        self.answer, self.gate = answer, asyncio.Event()

    def remote(self, *args):
        async def reply():
            await self.gate.wait()
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer
        return HandleResponse(reply())


@pytest.mark.parametrize("outcome, answered", [
    ("result", True), ("pool error", True), ("cancelled", False), ("pool down", False)])
def test_every_attempt_is_told_to_the_progress_and_only_replies_count_as_answers(outcome, answered):
    """A result or the pool's own error is an answer; the caller's cancel and a fail-fast end
    (``PoolDown``, on the health probe's word) are not: the pool said nothing."""
    async def main():
        clock = Clock()
        progress = PoolProgress(clock)
        answer = {"result": 7, "pool error": KeyError("bug"), "pool down": PoolDown("draft", failed=True),
                  "cancelled": None}[outcome]
        call = Gated(answer)
        caller = PoolCaller(call, "draft", RetryPolicy(retries=0), None, None, random.Random(0), progress=progress)
        task = asyncio.ensure_future(caller("p"))
        await asyncio.sleep(0)
        progress.sent("draft")  # another request's call, out since 0 too, never ended
        clock.now = 50.0
        assert progress.stalled_s("draft") == 50.0  # out, unanswered
        if outcome == "cancelled":
            task.cancel()
        else:
            call.gate.set()
        await asyncio.gather(task, return_exceptions=True)
        clock.now = 60.0  # past any cut's freshness
        return progress.stalled_s("draft")

    assert asyncio.run(main()) == (10.0 if answered else 60.0)  # silent since the answer at 50, or since 0


def test_a_retried_attempt_is_a_new_call_out():
    async def main():
        clock = Clock()
        progress = PoolProgress(clock)

        class DiesOnce:
            calls = 0

            def remote(self, *args):
                self.calls += 1

                async def reply():
                    if self.calls == 1:
                        raise ActorDiedError()
                    return "ok"
                return HandleResponse(reply())
        caller = PoolCaller(DiesOnce(), "draft", RetryPolicy(retries=2, base_s=0.001), None, None,
                            random.Random(0), progress=progress)
        assert await caller("p") == "ok"
        return progress.stalled_s("draft")

    assert asyncio.run(main()) == 0.0  # both attempts ended: nothing out


def test_an_idle_pool_is_silent_only_since_its_next_call_left():
    clock = Clock()
    progress = PoolProgress(clock)
    progress.ended("draft", progress.sent("draft"), answered=True)  # answered at 0
    clock.now = 100.0
    progress.sent("draft")  # idle 100 s, then one call
    clock.now = 105.0
    assert progress.stalled_s("draft") == 5.0


def test_the_oldest_call_out_tells():
    clock = Clock()
    progress = PoolProgress(clock)
    progress.sent("draft")
    clock.now = 35.0
    progress.sent("draft")
    clock.now = 40.0
    assert progress.stalled_s("draft") == 40.0


def test_a_cut_call_is_silent_only_since_the_last_answer():
    clock = Clock()
    progress = PoolProgress(clock)
    long = progress.sent("draft")
    clock.now = 30.0
    progress.ended("draft", progress.sent("draft"), answered=True)
    clock.now = 35.0
    progress.ended("draft", long, answered=False)
    assert progress.stalled_s("draft") == 5.0


def test_one_silent_lane_stalls_its_pool_though_other_lanes_answer():
    """Affinity sends a merged lane to one replica: a lane silent for 40 s while the pool's
    other lanes answer is one hung replica of several. Another pool's lanes do not count."""
    clock = Clock()
    progress = PoolProgress(clock)
    progress.sent("target/target-lane-0")
    for t in range(1, 40):
        clock.now = float(t)
        progress.ended("target/target-lane-1", progress.sent("target/target-lane-1"), answered=True)
        progress.ended("draft", progress.sent("draft"), answered=True)
    clock.now = 40.0
    assert progress.stalled_s("target") == 40.0
    assert progress.stalled_s("draft") == 0.0
    assert progress.stalled_s("target-lane") == 0.0  # a pool's name, never a prefix of another's


@pytest.mark.parametrize("refusal", ["backpressure", "unavailable"])
def test_a_refusal_by_the_callers_own_router_is_no_answer(refusal):
    """``BackPressureError`` (the caller's queue for the pool is full) and
    ``DeploymentUnavailableError`` are raised on this side: no replica spoke."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    async def main():
        clock = Clock()
        progress = PoolProgress(clock)
        error = (BackPressureError(num_queued_requests=1, max_queued_requests=1) if refusal == "backpressure"
                 else DeploymentUnavailableError("draft"))
        call = Gated(error)
        call.gate.set()
        progress.sent("draft")  # a call out since 0, never answered
        caller = PoolCaller(call, "draft", RetryPolicy(retries=0), None, None, random.Random(0), progress=progress)
        clock.now = 50.0
        await asyncio.gather(caller("p"), return_exceptions=True)
        return progress.stalled_s("draft")

    assert asyncio.run(main()) == 50.0
