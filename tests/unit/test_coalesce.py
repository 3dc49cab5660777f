"""Merged pool calls (arbitrage_common.coalesce) against a fake pool: what leaves as one call,
which row gets which result, cancellation, lanes and piggybacked messages."""
from __future__ import annotations

import asyncio
import contextvars

import pytest

from arbitrage_common.coalesce import CallSlots, Coalescer, lane_index, yield_call_slot


class FakePool:
    """Records each merged call; answers row -> row * 10 once ``gate`` opens."""

    def __init__(self, fail_rows: frozenset = frozenset(), fail_call: Exception | None = None) -> None:
        self.calls: list[tuple[str, list, list]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = 0
        self.fail_rows, self.fail_call = fail_rows, fail_call

    async def send(self, key: str, rows: list, piggyback: list) -> list:
        self.calls.append((key, list(rows), list(piggyback)))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_call is not None:
            raise self.fail_call
        return [ValueError(f"row {r}") if r in self.fail_rows else r * 10 for r in rows]


async def settle() -> None:
    """Let every ready task run (calls start, merged calls leave)."""
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_an_idle_lane_sends_each_call_at_once():
    async def main():
        pool = FakePool()
        merged = Coalescer(pool.send)
        assert await merged.call("a", 1) == 10
        assert await merged.call("b", 2) == 20
        return pool.calls

    assert [rows for _, rows, _ in run(main())] == [[1], [2]]


def test_calls_that_arrive_while_the_lane_is_busy_leave_as_one_call_with_their_own_results():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        merged = Coalescer(pool.send, max_in_flight=1)
        first = asyncio.ensure_future(merged.call("s0", 0))
        await settle()
        rest = [asyncio.ensure_future(merged.call(f"s{i}", i)) for i in range(1, 6)]
        await settle()
        assert len(pool.calls) == 1  # the others wait for the call in flight
        pool.gate.set()
        return await first, await asyncio.gather(*rest), pool.calls, merged

    first, rest, calls, merged = run(main())
    assert first == 0 and rest == [10, 20, 30, 40, 50]
    assert [rows for _, rows, _ in calls] == [[0], [1, 2, 3, 4, 5]]
    assert (merged.calls, merged.rows) == (2, 6)


def test_rows_waiting_counts_live_queued_rows_behind_a_call_or_a_slot():
    async def main():
        draft, router = FakePool(), FakePool()
        draft.gate.clear()
        slots = CallSlots(1)
        d, r = Coalescer(draft.send, slots=slots), Coalescer(router.send, slots=slots)
        out = asyncio.ensure_future(d.call("a", 1))  # sent: not waiting
        await settle()
        behind_call = [asyncio.ensure_future(d.call(s, 2)) for s in ("b", "c")]
        behind_slot = asyncio.ensure_future(r.call("x", 3))
        await settle()
        seen = [(d.rows_waiting(), r.rows_waiting())]
        behind_call[0].cancel()  # a cancelled row is dropped, not counted
        await settle()
        seen.append((d.rows_waiting(), r.rows_waiting()))
        draft.gate.set()
        await asyncio.gather(out, behind_call[1], behind_slot)
        seen.append((d.rows_waiting(), r.rows_waiting()))
        return seen

    assert run(main()) == [(2, 1), (1, 1), (0, 0)]


def test_max_rows_splits_a_long_queue():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        merged = Coalescer(pool.send, max_in_flight=1, max_rows=2)
        tasks = [asyncio.ensure_future(merged.call("s", i)) for i in range(5)]
        await settle()
        pool.gate.set()
        return await asyncio.gather(*tasks), pool.calls

    results, calls = run(main())
    assert results == [0, 10, 20, 30, 40]
    assert [rows for _, rows, _ in calls] == [[0], [1, 2], [3, 4]]  # the first left at once


def test_a_rows_own_failure_reaches_only_that_row():
    """The failing row's call raises its exception (a returned exception instance would look
    the same through gather(return_exceptions=True)); the other rows get their results."""
    async def main():
        pool = FakePool(fail_rows=frozenset({2}))
        pool.gate.clear()
        merged = Coalescer(pool.send, max_in_flight=1)
        tasks = [asyncio.ensure_future(merged.call("s", i)) for i in range(4)]
        await settle()
        pool.gate.set()
        await asyncio.wait(tasks)
        return tasks

    tasks = run(main())
    assert [tasks[i].result() for i in (0, 1, 3)] == [0, 10, 30]
    failure = tasks[2].exception()
    assert isinstance(failure, ValueError) and str(failure) == "row 2"
    with pytest.raises(ValueError, match="^row 2$"):
        tasks[2].result()


def test_cancelling_one_row_of_a_merged_call_in_flight_leaves_the_others_their_results():
    """A merged call [1, 2, 3] is out; row 1's caller stops waiting. The call goes on (others
    still wait for it) and rows 2 and 3 get their results: the cancelled row is skipped, not
    answered (which would fail and leave the rest hanging)."""
    async def main():
        pool = FakePool()
        pool.gate.clear()
        merged = Coalescer(pool.send, max_in_flight=1)
        first = asyncio.ensure_future(merged.call("s", 0))
        await settle()
        rows = [asyncio.ensure_future(merged.call("s", i)) for i in (1, 2, 3)]
        await settle()
        pool.gate.set()
        await first
        pool.gate.clear()
        await settle()
        assert [r for _, r, _ in pool.calls] == [[0], [1, 2, 3]]  # out as one merged call
        rows[0].cancel()
        await settle()
        pool.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*rows[1:]), 5)  # hang guard
        await merged.aclose()
        return results, pool.cancelled

    assert run(main()) == ([20, 30], 0)


def test_a_merged_call_answering_too_few_results_fails_its_rows_instead_of_hanging():
    """A pool that answers fewer results than rows is a broken contract: every row of the call
    gets a RuntimeError saying so, none waits forever."""
    async def main():
        async def short(key, rows, piggyback):
            return rows[:-1]

        merged = Coalescer(short)
        call = asyncio.ensure_future(merged.call("s", 1))
        await asyncio.wait_for(asyncio.wait([call]), 5)  # hang guard
        return call

    call = run(main())
    with pytest.raises(RuntimeError, match="returned 0 results for 1 rows"):
        call.result()


def test_a_failed_merged_call_fails_every_row_in_it():
    async def main():
        pool = FakePool(fail_call=ConnectionError("replica died"))
        merged = Coalescer(pool.send, max_in_flight=1)
        return await asyncio.gather(*(merged.call("s", i) for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, ConnectionError) for r in run(main()))


def test_a_cancelled_queued_row_never_leaves_and_an_abandoned_call_is_cancelled():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        merged = Coalescer(pool.send, max_in_flight=1)
        alone = asyncio.ensure_future(merged.call("s", 1))
        await settle()
        queued = asyncio.ensure_future(merged.call("s", 2))
        kept = asyncio.ensure_future(merged.call("s", 3))
        await settle()
        queued.cancel()
        alone.cancel()  # the only row of the call in flight: the call itself stops
        await settle()
        pool.gate.set()
        result = await kept
        await merged.aclose()
        return result, pool

    result, pool = run(main())
    assert result == 30
    assert [rows for _, rows, _ in pool.calls] == [[1], [3]]
    assert pool.cancelled == 1


REQUEST = contextvars.ContextVar("request", default=None)  # stands for Serve's request context


def test_merged_calls_never_run_in_a_callers_context():
    # Under Serve a call made in a request's context is that request's child, with its id. A
    # merged call carries other requests' rows, and the call that follows an abandoned one
    # (started from the abandoned call's own task) must not inherit the id either: two
    # calls with one id confuse Serve's router (a lane stalled).
    async def caller(name: str, session: str, payload: int) -> int:
        REQUEST.set(name)
        return await merged.call(session, payload)

    seen: list = []

    async def send(key: str, rows: list, piggyback: list) -> list:
        seen.append((list(rows), list(piggyback), REQUEST.get()))
        await gate.wait()
        return [r * 10 for r in rows]

    async def main():
        nonlocal merged, gate
        gate = asyncio.Event()
        merged = Coalescer(send, max_in_flight=1, flush_s=0.01)
        abandoned = asyncio.ensure_future(caller("a", "s", 1))
        await settle()
        kept = asyncio.ensure_future(caller("b", "s", 2))
        await settle()
        abandoned.cancel()  # its call stops; the queued row leaves from that call's task
        await settle()
        gate.set()
        result = await kept
        REQUEST.set("c")
        merged.attach("s", "done")  # sent alone after flush_s, from a timer
        await asyncio.sleep(0.05)
        await merged.aclose()
        return result

    merged = gate = None
    assert run(main()) == 20
    assert seen == [([1], [], None), ([2], [], None), ([], ["done"], None)]


def test_a_session_keeps_its_lane_and_sessions_spread_over_lanes():
    assert all(lane_index(f"req-{i}", 8) == lane_index(f"req-{i}", 8) for i in range(50))
    assert {lane_index(f"req-{i}", 8) for i in range(200)} == set(range(8))
    assert lane_index("anything", 1) == 0 and lane_index("", 8) == 0

    async def main():
        pool = FakePool()
        merged = Coalescer(pool.send, lanes=4, key_prefix="router-lane")
        for i in range(20):
            await merged.call(f"req-{i}", i)
        return pool.calls

    keys = {f"req-{rows[0]}": key for key, rows, _ in run(main())}
    assert all(keys[s] == f"router-lane-{lane_index(s, 4)}" for s in keys)


def test_piggybacked_messages_ride_the_next_call_of_their_lane_or_leave_alone_when_idle():
    async def main():
        pool = FakePool()
        merged = Coalescer(pool.send, flush_s=0.05)
        merged.attach("done-1", "done-1")
        await merged.call("next", 1)  # carries the release
        merged.attach("done-2", "done-2")
        await asyncio.sleep(0.15)  # nothing else comes: it leaves alone
        return pool.calls

    calls = run(main())
    assert calls == [("lane-0", [1], ["done-1"]), ("lane-0", [], ["done-2"])]


def test_messages_that_rode_a_cancelled_call_go_again():
    """A pipelined step that goes to the target cancels its early draft's call, and with it the
    releases that rode on it: they go with the next call, or alone."""
    async def main():
        pool = FakePool()
        pool.gate.clear()
        merged = Coalescer(pool.send, flush_s=0.01)
        merged.attach("done", "release-done")
        row = asyncio.ensure_future(merged.call("b", 1))  # carries the release
        await settle()
        row.cancel()  # its only row: the call is abandoned
        await asyncio.gather(row, return_exceptions=True)
        pool.gate.set()
        await asyncio.sleep(0.05)  # past flush_s: the lane is idle, the release goes alone
        await merged.aclose()
        return pool.calls

    assert run(main()) == [("lane-0", [1], ["release-done"]), ("lane-0", [], ["release-done"])]


def test_messages_of_a_failed_call_never_ride_the_calls_after_it():
    """A failed call's retries already carried its messages; one the pool refuses would
    otherwise fail every later call of the lane."""
    async def main():
        pool = FakePool(fail_call=RuntimeError("refused"))
        merged = Coalescer(pool.send, flush_s=0.01)
        merged.attach("done", "bad")
        with pytest.raises(RuntimeError):
            await merged.call("b", 1)
        pool.fail_call = None
        later = [await merged.call(f"c{i}", i) for i in range(3)]
        await asyncio.sleep(0.05)
        await merged.aclose()
        return later, pool.calls

    later, calls = run(main())
    assert later == [0, 10, 20] and [piggyback for _, _, piggyback in calls] == [["bad"], [], [], []]


def test_messages_sent_alone_in_a_call_that_fails_are_not_sent_again():
    async def main():
        pool = FakePool(fail_call=RuntimeError("no replica"))
        merged = Coalescer(pool.send, flush_s=0.01)
        merged.attach("done", "release-done")
        await asyncio.sleep(0.05)  # sent alone, failed
        await merged.aclose()
        await asyncio.sleep(0.05)  # a re-queued one would go again, and again
        return pool.calls

    assert run(main()) == [("lane-0", [], ["release-done"])]


def test_messages_sent_alone_never_keep_a_row_waiting():
    """A release-only call held by its pool (full, or with no replica) held the lane's one call
    out, so the next request's row was not even sent."""
    async def main():
        pool = FakePool()
        merged = Coalescer(pool.send, flush_s=0.0)
        pool.gate.clear()  # the pool answers nothing yet
        merged.attach("done-1", "done-1")
        await asyncio.sleep(0.01)  # the release leaves alone, and waits
        row = asyncio.ensure_future(merged.call("next", 1))
        await settle()
        sent = list(pool.calls)
        pool.gate.set()
        return sent, await row

    sent, result = run(main())
    assert sent == [("lane-0", [], ["done-1"]), ("lane-0", [1], [])] and result == 10


@pytest.mark.parametrize("bad", [{"lanes": 0}, {"max_in_flight": 0}, {"max_rows": 0}])
def test_bounds_are_checked(bad):
    with pytest.raises(ValueError):
        Coalescer(FakePool().send, **bad)


# -- CallSlots: one limit on merged calls out over several pools ------------------------------
def test_shared_slots_hold_another_pools_call_until_a_slot_frees():
    async def main():
        draft, router = FakePool(), FakePool()
        draft.gate.clear()
        slots = CallSlots(1)
        d, r = Coalescer(draft.send, slots=slots), Coalescer(router.send, slots=slots)
        first = asyncio.ensure_future(d.call("a", 1))
        await settle()
        second = asyncio.ensure_future(r.call("b", 2))
        await settle()
        held = len(router.calls)  # the one slot is the draft's
        draft.gate.set()
        return held, await first, await second, slots.out

    held, first, second, out = run(main())
    assert (held, first, second, out) == (0, 10, 20, 0)


def test_a_freed_slot_goes_to_the_lane_whose_oldest_row_came_first_and_rows_merge_meanwhile():
    async def main():
        pools = {name: FakePool() for name in ("draft", "router", "target")}
        pools["draft"].gate.clear()
        slots = CallSlots(1)
        merged = {name: Coalescer(pool.send, slots=slots) for name, pool in pools.items()}
        order: list[str] = []
        for name, pool in pools.items():
            send = pool.send

            async def recording(key, rows, piggyback, name=name, send=send):
                order.append(name)
                return await send(key, rows, piggyback)
            merged[name]._send = recording
        busy = asyncio.ensure_future(merged["draft"].call("s0", 0))
        await settle()
        first = [asyncio.ensure_future(merged["target"].call("t9", 9))]
        await settle()
        later = [asyncio.ensure_future(merged["router"].call(f"r{i}", i)) for i in range(3)]
        await settle()
        held = list(order)
        pools["draft"].gate.set()
        await asyncio.gather(busy, *first, *later)
        return held, order, [rows for _, rows, _ in pools["router"].calls]

    held, order, router_calls = run(main())
    assert held == ["draft"]
    assert order == ["draft", "target", "router"]  # one row that came first beats three that came later
    assert router_calls == [[0, 1, 2]]  # rows that waited for a slot leave as one call


def test_a_slot_comes_back_after_a_failed_call_and_after_its_rows_were_cancelled():
    async def main():
        bad, slow, other = FakePool(fail_call=RuntimeError("replica died")), FakePool(), FakePool()
        slots = CallSlots(1)
        with pytest.raises(RuntimeError):
            await Coalescer(bad.send, slots=slots).call("a", 1)
        await settle()
        after_failure = slots.out
        slow.gate.clear()
        s, o = Coalescer(slow.send, slots=slots), Coalescer(other.send, slots=slots)
        running = asyncio.ensure_future(s.call("b", 2))
        await settle()
        waiting = asyncio.ensure_future(o.call("c", 3))
        await settle()
        waiting.cancel()  # its row leaves the queue; nothing must wait on its behalf
        await settle()
        running.cancel()  # the only row of the call in flight: the call is cancelled too
        await settle()
        after_cancel = slots.out
        return after_failure, after_cancel, await o.call("d", 4), len(other.calls)

    assert run(main()) == (0, 0, 40, 1)


def test_a_call_that_backs_off_gives_its_slot_to_another_pool_once():
    """A merged call waiting out a retry's backoff ran no forward pass but held its slot, so an
    idle pool's call waited for it (seconds, with a full pool's retries)."""
    async def main():
        slots, backing_off, sent = CallSlots(1), asyncio.Event(), []

        async def retrying(key, rows, piggyback):
            yield_call_slot()  # what PoolCaller does before its backoff sleep
            yield_call_slot()  # twice: the slot is given back once only
            await backing_off.wait()
            return [r for r in rows]

        async def healthy(key, rows, piggyback):
            sent.append(rows)
            return [r for r in rows]

        full, idle = Coalescer(retrying, slots=slots), Coalescer(healthy, slots=slots)
        stuck = asyncio.ensure_future(full.call("a", 1))
        await settle()
        answer = await asyncio.wait_for(idle.call("b", 2), 5)  # a guard against a hang, not a timing
        out_while_backing_off = slots.out
        backing_off.set()
        await stuck
        await settle()
        return answer, sent, out_while_backing_off, slots.out

    answer, sent, during, after = run(main())
    assert (answer, sent, during, after) == (2, [[2]], 0, 0)


def test_call_slots_need_a_positive_limit():
    with pytest.raises(ValueError, match="limit"):
        CallSlots(0)


def test_set_lanes_remaps_sessions_and_a_lane_left_out_still_sends_what_it_holds():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        merged = Coalescer(pool.send, lanes=4, key_prefix="draft-lane")
        session = next(f"req-{i}" for i in range(100) if lane_index(f"req-{i}", 4) == 3)
        first = asyncio.create_task(merged.call(session, 1))
        await settle()
        queued = asyncio.create_task(merged.call(session, 2))  # lane 3 is busy: this row waits there
        await settle()
        merged.set_lanes(2)  # lane 3 is out of the mapping now
        moved = asyncio.create_task(merged.call(session, 3))
        await settle()
        pool.gate.set()
        return await asyncio.gather(first, queued, moved), pool.calls, merged

    results, calls, merged = run(main())
    assert results == [10, 20, 30]
    session_lane = lane_index(next(f"req-{i}" for i in range(100) if lane_index(f"req-{i}", 4) == 3), 2)
    assert [(key, rows) for key, rows, _ in calls] == [
        ("draft-lane-3", [1]), (f"draft-lane-{session_lane}", [3]), ("draft-lane-3", [2])]
    assert merged.lanes == 2
    with pytest.raises(ValueError):
        merged.set_lanes(0)
