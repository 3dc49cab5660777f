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
