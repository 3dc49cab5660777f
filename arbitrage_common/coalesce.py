"""Caller-side merging of pool calls: the step calls that many requests make to one pool at
the same time leave the coordinator as one call. Pure asyncio, no Ray.

Why: with small models a Serve handle call costs about as much CPU as the step it carries
(measured on 2 cores: ~3 ms in the caller and ~3 ms in the replica per call), and the pool
merges concurrent calls into one forward pass anyway. So each lane lets at most
``max_in_flight`` merged calls out at once; rows that arrive meanwhile queue, and leave
together as the next merged call when one returns. An idle lane sends a row at once: merging
never adds a wait.

Lanes keep affinity: a session (the server's id for one request) always maps to the same lane, and a merged
call is routed by its lane's key, so every step of a request still reaches the same replica
(and its prefix cache); only a change of the lane count (``set_lanes``: the pool's bounds
changed) moves sessions, whose next step then misses once. Each row gets its own result, or
its own exception; a failure of the merged call itself reaches every row in it. A row whose caller stops waiting (cancelled,
deadline) is dropped if still queued; a merged call whose rows were all dropped is cancelled.

Context: a merged call belongs to no single caller, so it runs in a fresh ``contextvars``
context, never in a copy of the caller's that happened to start it. Under Ray Serve the
caller's context is its request's (ids, cancellation scope): a pool call made in it counts as
that request's child. Two merged calls of one lane then share one request's id, and Serve's
router indexes pending calls by that id: a call cancelled while still pending can take its
successor's entry with it, and the successor then waits for a replica forever (measured: a
served stress with step pipelining stalled a draft lane in 4 of 7 runs).

Piggyback: small fire-and-forget messages for a session (the pools' cache ``release``: scorers,
and generators with a prefix cache) ride on the next merged call of its lane; a lane that
stays idle sends them alone after ``flush_s``. A call with rows that is cancelled hands its
messages on to the next.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

# send(lane_key, payloads, piggyback) -> one result per payload; a result that is an
# exception instance is that row's own failure.
Send = Callable[[str, list[Any], list[Any]], Awaitable[Sequence[Any]]]


def lane_index(session: str, lanes: int) -> int:
    """The lane of a session: a stable hash (never Python's salted ``hash()``), so every
    coordinator replica puts a session in the same lane."""
    if lanes <= 1 or not session:
        return 0
    return int.from_bytes(hashlib.blake2b(session.encode(), digest_size=8).digest(), "big") % lanes


class _Lane:
    def __init__(self, key: str) -> None:
        self.key = key
        self.queue: list[tuple[Any, asyncio.Future, float]] = []  # payload, future, arrival
        self.piggyback: list[Any] = []
        self.in_flight = 0
        self.flush: asyncio.TimerHandle | None = None


class CallSlots:
    """At most ``limit`` merged calls out at once over every ``Coalescer`` that shares it.

    Why: where the pools share a few cores (one node, models on CPU), more forward passes at
    once only time-slice those cores, while rows that wait meanwhile merge into bigger
    batches, which cost less per row (measured: 5.7 rows a draft batch and 7.4 a router batch
    against about 3). When a slot frees, the waiting lane whose oldest row came first goes
    next (first come, first served across pools: no pool starves), with every row it holds by
    then. A freed slot goes straight to a waiting lane, so no core idles while rows wait."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.out = 0
        self._waiting: dict[tuple[int, int], tuple[Coalescer, _Lane]] = {}

    def take(self, owner: Coalescer, lane: _Lane) -> bool:
        """A slot for a merged call of ``lane``; if none is free, ``lane`` waits for one."""
        if self.out < self.limit:
            self.out += 1
            return True
        self._waiting[(id(owner), id(lane))] = (owner, lane)
        return False

    def give_back(self) -> None:
        """Free a slot and hand it to the waiting lane whose oldest live row came first."""
        self.out -= 1
        while self.out < self.limit and self._waiting:
            key = min(self._waiting, key=lambda k: _oldest_row(self._waiting[k][1]))
            owner, lane = self._waiting.pop(key)
            owner._pump(lane)


class _SlotHold:
    """One merged call's call slot, given back once: when the call ends, or earlier when it
    waits without running (``yield_call_slot``)."""

    def __init__(self, slots: CallSlots) -> None:
        self.slots, self.held = slots, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.give_back()


# The slot of the merged call whose task this is (each runs in a context of its own).
_held_slot: contextvars.ContextVar[_SlotHold | None] = contextvars.ContextVar("held_slot", default=None)


def yield_call_slot() -> None:
    """A merged call about to wait without running a forward pass (a retry's backoff) gives its
    call slot to a waiting lane; it then goes on without one. Elsewhere, nothing."""
    hold = _held_slot.get()
    if hold is not None:
        hold.release()


def _requeue(lane: _Lane, rows: list, piggyback: list[Any]) -> None:
    """Messages that rode rows on a call that was cancelled go again, with the lane's next call
    or alone after ``flush_s``: the pool may never have read them (a pipelined step that went to
    the target cancels its early draft's call). Not those of a failed call (its retries sent them
    already, and a message the pool refuses would fail every later call), nor of a call that
    carried only them."""
    if rows and piggyback:
        lane.piggyback[:0] = piggyback


def _oldest_row(lane: _Lane) -> float:
    """When the lane's oldest live queued row arrived (inf: none left)."""
    return min((arrived for _, future, arrived in lane.queue if not future.done()), default=math.inf)


class Coalescer:
    """Merges concurrent calls per lane; ``call(session, payload)`` returns that row's result.
    ``slots``: a ``CallSlots`` shared with other coalescers (None: no shared limit)."""

    def __init__(self, send: Send, lanes: int = 1, key_prefix: str = "lane", max_in_flight: int = 1,
                 max_rows: int = 64, flush_s: float = 0.5, slots: CallSlots | None = None) -> None:
        if lanes < 1 or max_in_flight < 1 or max_rows < 1:
            raise ValueError("lanes, max_in_flight and max_rows must be >= 1")
        self._send = send
        self.slots = slots
        self._key_prefix = key_prefix
        self._lanes: list[_Lane] = []
        self.set_lanes(lanes)
        self.max_in_flight, self.max_rows, self.flush_s = max_in_flight, max_rows, flush_s
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # merged calls sent (rows / calls is the merge factor)
        self.rows = 0

    def set_lanes(self, lanes: int) -> None:
        """Map sessions over ``lanes`` lanes from now on (the pool's replica bounds changed). A
        lane left out still sends what it holds; a session that moves lane may reach another
        replica, whose cache misses and recomputes the same result."""
        if lanes < 1:
            raise ValueError("lanes must be >= 1")
        self._lanes += [_Lane(f"{self._key_prefix}-{i}") for i in range(len(self._lanes), lanes)]
        self.lanes = lanes

    def rows_waiting(self) -> int:
        """Live rows queued in every lane, not sent yet: their lane's call is out, or no call
        slot is free."""
        return sum(not future.done() for lane in self._lanes for _, future, _ in lane.queue)

    def lane(self, session: str) -> _Lane:
        return self._lanes[lane_index(session, self.lanes)]

    async def call(self, session: str, payload: Any) -> Any:
        lane = self.lane(session)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        lane.queue.append((payload, future, loop.time()))
        self._pump(lane)
        return await future  # cancelling this cancels only the row

    def attach(self, session: str, message: Any) -> None:
        """Send ``message`` with the next merged call of the session's lane (or alone, soon)."""
        lane = self.lane(session)
        lane.piggyback.append(message)
        self._schedule_flush(lane)

    def _schedule_flush(self, lane: _Lane) -> None:
        if lane.piggyback and lane.flush is None:
            lane.flush = asyncio.get_running_loop().call_later(self.flush_s, self._flush, lane)

    def _flush(self, lane: _Lane) -> None:
        lane.flush = None
        if lane.piggyback and lane.in_flight == 0:
            self._start(lane, [])

    def _pump(self, lane: _Lane) -> None:
        while lane.in_flight < self.max_in_flight:
            lane.queue = [row for row in lane.queue if not row[1].done()]
            if not lane.queue or (self.slots is not None and not self.slots.take(self, lane)):
                return
            batch, lane.queue = lane.queue[:self.max_rows], lane.queue[self.max_rows:]
            self._start(lane, [(payload, future) for payload, future, _ in batch], slot=self.slots is not None)

    def _start(self, lane: _Lane, rows: list[tuple[Any, asyncio.Future]], slot: bool = False) -> None:
        piggyback, lane.piggyback = lane.piggyback, []
        if lane.flush is not None:
            lane.flush.cancel()
            lane.flush = None
        # Messages sent alone hold no row: they never keep the lane's rows waiting (a pool that is
        # full or has no replica can hold such a call for seconds).
        lane.in_flight += bool(rows)
        self.calls += 1
        self.rows += len(rows)
        context = contextvars.Context()
        hold = _SlotHold(self.slots) if slot else None
        context.run(_held_slot.set, hold)
        task = asyncio.get_running_loop().create_task(self._run(lane, rows, piggyback), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if hold is not None:  # after _run's own pump: the lane that just finished queues for a slot like any other
            task.add_done_callback(lambda _: hold.release())

    async def _run(self, lane: _Lane, rows: list[tuple[Any, asyncio.Future]], piggyback: list[Any]) -> None:
        futures = [future for _, future in rows]
        call = asyncio.ensure_future(self._send(lane.key, [payload for payload, _ in rows], piggyback))

        def drop_if_abandoned(_: asyncio.Future) -> None:
            if futures and all(f.cancelled() for f in futures):
                call.cancel()  # nobody waits for any row: stop the pool's work too

        for future in futures:
            future.add_done_callback(drop_if_abandoned)
        try:
            results = await call
            if len(results) != len(rows):
                raise RuntimeError(f"merged pool call returned {len(results)} results for {len(rows)} rows")
        except asyncio.CancelledError:
            _requeue(lane, rows, piggyback)
            for future in futures:
                future.cancel()
        except Exception as exc:  # noqa: BLE001 (the merged call's failure is every row's)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future, result in zip(futures, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            lane.in_flight -= bool(rows)
            self._pump(lane)
            if lane.in_flight == 0:
                self._schedule_flush(lane)

    async def aclose(self) -> None:
        """Wait for the merged calls still out (tests only: shutdown does not call it)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
