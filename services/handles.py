"""Adapters from Ray Serve deployment handles to the step loop's Generator / Scorer protocols.

The coordinator runs ``arbitrage_common.loop`` unchanged over these. When the awaiting
task is cancelled (client gone, deadline hit), the in-flight pool call is cancelled too,
so the request frees its pool slot instead of finishing work nobody will read.

Affinity: ``PoolHandles.models(session_id)`` binds one request's adapters to its session
id once (``handle.options(method_name=..., session_id=...)``, a light copy sharing the
handle's router), so every step of the request reaches the same replica of each pool
whose deployment runs the session-affine router (``services.affinity``); other routers
ignore the id. Per step nothing is created but the call itself.

Retries: a pool call that fails because its replica died or went away (``RayActorError``, an
engine that died: ``EngineDeadError``, a lost replica channel: ``replica_channel_lost``), because
the pool has no replica deployed (``DeploymentUnavailableError``), or because the pool is full
(``BackPressureError``) is made again after a full-jitter backoff (``arbitrage_common.retry``),
while the request's deadline leaves room (``retry_reason``). The router then picks another
replica (Serve drops a dead one from its set; the affinity router's next rank takes the
session). That is safe because a pool call is a pure function of its input:
a greedy step depends only on the prefix, a sampled one on the prefix and the request's
seed, and a score on its items, so a retried step is the same step; a failed call
delivered nothing, so nothing is counted twice (both backends take an unset seed as 0, so an
unseeded sampled step repeats too). Not retried: failures raised by the model code itself (a
bug, a bad checkpoint) and backend timeouts.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from arbitrage_common.coalesce import CallSlots, Coalescer, yield_call_slot
from arbitrage_common.interfaces import Generation, GenerationOptions, ScoreItem
from arbitrage_common.lookahead import DraftAhead
from arbitrage_common.loop import Models
from arbitrage_common.pool_progress import PoolProgress
from arbitrage_common.retry import RetryPolicy

from .convert import PoolDown, replica_channel_lost

logger = logging.getLogger(__name__)
NO_RETRY = RetryPolicy(retries=0)
# Seconds a merged call that carries only releases may take: a pool with no replica holds it.
RELEASES_ALONE_S = 10.0
# Serve logs this at INFO for every handle call cancelled while its replica has not yet
# answered. Here nearly all are by design: step pipelining cancels the early draft of each
# step routed to the target. The rest belong to requests that ended, which the coordinator
# counts and logs itself. So the coordinator drops the line (``quiet_expected_cancels``).
SERVE_CANCEL_LOG = "Cancelling request that has already been assigned to a replica."


class _ExpectedCancels(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != SERVE_CANCEL_LOG


def quiet_expected_cancels() -> None:
    """Drop Serve's line for cancelled handle calls from Serve's logger, once per process."""
    logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _ExpectedCancels) for f in logger.filters):
        logger.addFilter(_ExpectedCancels())


async def _await_cancellable(response: Any) -> Any:
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def retry_reason(exc: BaseException) -> str | None:
    """'replica' (its replica or engine died, or the pool has none deployed), 'full' (pool
    queue full), or None (not retriable)."""
    from arbitrage_common.backends.vllm_generator import EngineDeadError

    cause = getattr(exc, "cause", None)
    if isinstance(exc, BackPressureError):
        return "full"
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, EngineDeadError)) or \
            isinstance(cause, EngineDeadError) or replica_channel_lost(exc):
        return "replica"
    return None


class FailFast:
    """Ends pool calls that wait for a replica that may be minutes away. ``failed(role)``
    (``PoolHealth.failed``): the pool has had no running replica, with Serve reporting it
    failing, for a while. ``end_calls_to_failed``, run right after each health probe, ends the
    calls waiting on such a pool: each raises ``PoolDown`` instead of holding its request until
    the deadline. Calls are still sent: refused on an older probe's word, a call could fail
    though the pool had just come back (Serve's router learns of a new replica before the
    next probe does)."""

    def __init__(self, failed: Callable[[str], bool]) -> None:
        self.failed = failed
        self._waiting: dict[str, dict[asyncio.Task, list[bool]]] = {}  # role -> task -> [ended]

    def end_calls_to_failed(self) -> None:
        for role, calls in self._waiting.items():
            if calls and self.failed(role):
                for task, ended in list(calls.items()):
                    if not ended[0]:  # once: a second cancel would outlive our uncancel
                        ended[0] = True
                        task.cancel()

    async def call(self, role: str, response: Any) -> Any:
        """``response`` awaited, or ``PoolDown`` once its pool is found failing."""
        task, ended = asyncio.current_task(), [False]
        calls = self._waiting.setdefault(role, {})
        assert task is not None
        calls[task] = ended
        try:
            return await _await_cancellable(response)
        except asyncio.CancelledError:
            # Ours alone: the task goes on to handle PoolDown. Cancelled by someone else too
            # (the client, a timeout), the cancel stands.
            if not ended[0] or task.uncancel() > 0:
                raise
            raise PoolDown(role, failed=True) from None
        finally:
            calls.pop(task, None)


class PoolCaller:
    """Calls one bound pool method with retries under a deadline (``time.monotonic``); with a
    ``fail_fast``, a call waiting on a failed pool ends at the next health probe (``PoolDown``);
    ``progress`` is told when each attempt leaves and whether the pool answered it."""

    def __init__(self, call: Any, role: str, policy: RetryPolicy, deadline: float | None,
                 on_retry: Callable[[str, str], None] | None, rng: random.Random,
                 fail_fast: FailFast | None = None, progress: PoolProgress | None = None,
                 lane: str | None = None) -> None:
        self._call, self.role, self._policy, self._deadline = call, role, policy, deadline
        self._on_retry, self._rng, self._fail_fast = on_retry, rng, fail_fast
        self._progress, self._progress_key = progress, role if lane is None else f"{role}/{lane}"

    async def _attempt(self, args: tuple) -> Any:
        token = None if self._progress is None else self._progress.sent(self._progress_key)
        answered = False
        try:
            if self._fail_fast is None:
                result = await _await_cancellable(self._call.remote(*args))
            else:
                result = await self._fail_fast.call(self.role, self._call.remote(*args))
            answered = True
            return result
        except (PoolDown, BackPressureError, DeploymentUnavailableError):
            raise  # ended here, by the health probe or this replica's own router: no replica spoke
        except Exception:
            answered = True  # the pool's (or its replica's) own error is an answer
            raise
        finally:
            if token is not None:
                self._progress.ended(self._progress_key, token, answered)

    async def __call__(self, *args: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await self._attempt(args)
            except Exception as exc:  # PoolDown is not retriable (retry_reason): it goes on up
                reason = retry_reason(exc)
                remaining = None if self._deadline is None else self._deadline - time.monotonic()
                delay = None if reason is None else self._policy.next_delay(attempt, remaining, self._rng)
                if delay is None:
                    if reason is not None:
                        try:  # so the client's message can name the pool
                            exc.pool = self.role  # type: ignore[attr-defined]
                            if attempt < self._policy.retries:  # a deadline, not the count, stopped it
                                exc.retries_cut_at = self._deadline  # type: ignore[attr-defined]
                        except AttributeError:
                            pass
                    raise
                if self._on_retry is not None:
                    self._on_retry(self.role, reason)
                yield_call_slot()  # no forward pass runs while it backs off: another pool's may
                await asyncio.sleep(delay)
                attempt += 1


def _bind(handle: Any, method: str, session_id: str) -> Any:
    """The handle's method, with the session id when there is one."""
    if session_id:
        return handle.options(method_name=method, session_id=session_id)
    return handle.options(method_name=method)


class HandleGenerator:
    """``Generator`` over a GeneratorPool deployment handle; the session id also keys the
    pool's prefix cache. ``called``: a call was made (the pool may hold the session)."""

    def __init__(self, caller: PoolCaller, session_id: str = "") -> None:
        self._call, self._session = caller, session_id or None
        self.called = False

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        self.called = True
        return await self._call(list(prefixes), options, self._session)

    async def generate_ahead(self, prefix: str, options: GenerationOptions, plan: DraftAhead) -> list[Generation]:
        """Draft lookahead: the step and the steps planned after it, in one pool call."""
        self.called = True
        return await self._call([prefix], options, self._session, plan)


class TimedGenerator:
    """A target ``Generator`` whose calls feed the load-aware threshold controller
    (``arbitrage_common.threshold_control``): in flight while they run; their wall time
    (queueing in the pool included) is a latency sample unless cancelled or failed for a
    reason that says nothing about load."""

    def __init__(self, inner: HandleGenerator | MergedGenerator, load: Any) -> None:
        self._inner, self._load = inner, load

    @property
    def called(self) -> bool:
        return self._inner.called

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        started, sample = time.monotonic(), False
        self._load.call_started(started)
        try:
            out = await self._inner.generate(prefixes, options)
            sample = True
            return out
        except Exception as exc:
            sample = retry_reason(exc) == "full"  # a pool that stayed full is evidence of load
            raise
        finally:
            self._load.call_finished(started, time.monotonic(), sample=sample)


class HandleScorer:
    """``Scorer`` over a ScorerPool deployment handle; the session id also keys the pool's
    prefix cache (the same replica serves every step of the session)."""

    def __init__(self, caller: PoolCaller, session_id: str = "") -> None:
        self._call, self._session = caller, session_id or None
        self.called = False

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        self.called = True
        return await self._call(list(items), self._session)


class MergedGenerator:
    """``Generator`` whose calls leave through the pool's ``Coalescer`` (merged with other
    requests' concurrent calls into one ``generate_rows``)."""

    def __init__(self, merged: Coalescer, session_id: str, deadline: float | None) -> None:
        self._merged, self._session, self._deadline = merged, session_id, deadline
        self.called = False

    async def generate(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        return await self._row(list(prefixes), options, None)

    async def generate_ahead(self, prefix: str, options: GenerationOptions, plan: DraftAhead) -> list[Generation]:
        """Draft lookahead: the step and the steps planned after it, in one merged row."""
        return await self._row([prefix], options, plan)

    async def _row(self, prefixes: list[str], options: GenerationOptions, plan: DraftAhead | None) -> list[Generation]:
        self.called = True
        return await merged_row(self._merged, self._session, (prefixes, options, self._session or None, plan),
                                self._deadline)


class MergedScorer:
    """``Scorer`` over the pool's ``Coalescer``; each row keeps its session (prefix cache)."""

    def __init__(self, merged: Coalescer, session_id: str, deadline: float | None) -> None:
        self._merged, self._session, self._deadline = merged, session_id, deadline
        self.called = False

    async def score(self, items: Sequence[ScoreItem]) -> list[float]:
        self.called = True
        return await merged_row(self._merged, self._session, (list(items), self._session or None), self._deadline)


async def merged_row(merged: Coalescer, session: str, args: tuple, deadline: float | None) -> Any:
    """One request's row of a merged call. The call retries only until the earliest deadline
    among its rows (``_earliest``); when that ends it, a row whose own deadline is later sends
    itself again, so another request's short deadline never costs this one its retries."""
    while True:
        try:
            return await merged.call(session, (args, deadline))
        except Exception as exc:
            cut_at = getattr(exc, "retries_cut_at", None)
            if cut_at is None or deadline is None or deadline <= cut_at or time.monotonic() >= deadline:
                raise


def _earliest(deadlines: list[float | None]) -> float | None:
    """A merged call retries until the earliest of its rows' deadlines, as that row alone would:
    a row still waiting on a full pool when its own deadline passed would read as the client's
    deadline (504), not as the overload it is (503, Retry-After). The rows with later deadlines
    then send themselves again (``merged_row``). None if no row has one."""
    bounded = [d for d in deadlines if d is not None]
    return min(bounded) if bounded else None


class PoolHandles:
    """The pool handles of one coordinator replica; ``models`` binds them to a session.
    ``on_retry(role, reason)`` is told of every retry (metrics). ``lanes`` ({role: n}) turns
    on merged calls for those pools (``arbitrage_common.coalesce``); ``calls_in_flight``
    caps their merged calls out at once with one ``CallSlots`` shared by the pools in
    ``slot_roles`` (None: all of them); ``over_grpc`` sends the calls over Serve's direct gRPC
    channel between replicas (``_by_reference=False``); ``pool_failed`` (``FailFast``) ends
    the calls waiting on a failed pool."""

    def __init__(self, draft: Any, target: Any, router: Any | None = None, prm: Any | None = None,
                 retry: RetryPolicy = NO_RETRY, on_retry: Callable[[str, str], None] | None = None,
                 load: Any = None, lanes: dict[str, int] | None = None, over_grpc: bool = False,
                 calls_in_flight: int | None = None, slot_roles: Collection[str] | None = None,
                 pool_failed: Callable[[str], bool] | None = None) -> None:
        if over_grpc:  # every call below: Serve's direct gRPC channel to the replica, not an actor task
            draft, target, router, prm = (h if h is None else h.options(_by_reference=False)
                                          for h in (draft, target, router, prm))
        self.draft, self.target, self.router, self.prm = draft, target, router, prm
        self.retry, self.on_retry = retry, on_retry
        self.fail_fast = FailFast(pool_failed) if pool_failed is not None else None
        self.progress = PoolProgress()  # whether each pool answers (a missed deadline blames a hung one)
        quiet_expected_cancels()
        self.load = load  # a LoadController told of every target call, or None
        self._rng = random.Random()  # jitter only: it never touches a request's output
        slots = CallSlots(calls_in_flight) if calls_in_flight else None
        self.merged: dict[str, Coalescer] = {
            role: Coalescer(self._merged_send(role), lanes=n, key_prefix=f"{role}-lane",
                            slots=slots if slot_roles is None or role in slot_roles else None)
            for role, n in (lanes or {}).items() if getattr(self, role) is not None}

    @property
    def slot_roles(self) -> list[str]:
        """The pools whose merged calls wait for the shared call slots."""
        return [role for role, merged in self.merged.items() if merged.slots is not None]

    def rows_waiting(self) -> dict[str, int]:
        """Rows queued for a merged call, by pool (``Coalescer.rows_waiting``)."""
        return {role: merged.rows_waiting() for role, merged in self.merged.items()}

    def set_lanes(self, lanes: dict[str, int]) -> None:
        """New lane counts of merged pools (``Coalescer.set_lanes``); others are ignored."""
        for role, n in lanes.items():
            if role in self.merged:
                self.merged[role].set_lanes(n)

    def _merged_send(self, role: str):
        method, arity = ("generate_rows", 4) if role in ("draft", "target") else ("score_rows", 2)

        async def send(lane_key: str, rows: list[Any], piggyback: list[Any]) -> Any:
            # rows: (args, deadline) each; the pool method takes one list per argument (empty
            # lists when only piggybacked releases travel)
            columns = [[args[k] for args, _ in rows] for k in range(arity)]
            if not rows:
                await self.send_alone(role, method, lane_key, *columns, piggyback)
                return []
            deadline = _earliest([deadline for _, deadline in rows])
            return await self.caller(role, method, lane_key, deadline, lane=lane_key)(*columns, piggyback)
        return send

    async def send_alone(self, role: str, method: str, key: str, *args: Any) -> None:
        """Cache releases sent on their own: best effort (the pools' LRU bounds the caches), so
        once, within ``RELEASES_ALONE_S`` (a pool with no replica would hold the call), and a
        failure is only logged."""
        try:
            await asyncio.wait_for(self.caller(role, method, key, retry=NO_RETRY)(*args), RELEASES_ALONE_S)
        except Exception as exc:  # noqa: BLE001
            logger.debug("release on %s failed: %s", role, type(exc).__name__)

    def release(self, role: str, session_id: str) -> bool:
        """Queue a finished session's cache release on a merged pool (it rides on the lane's
        next call); False when the pool does not merge calls."""
        merged = self.merged.get(role)
        if merged is None:
            return False
        merged.attach(session_id, session_id)
        return True

    def caller(self, role: str, method: str, session_id: str = "", deadline: float | None = None,
               retry: RetryPolicy | None = None, lane: str | None = None) -> PoolCaller:
        """``lane``: a merged call's lane, whose progress is told apart (one replica's)."""
        return PoolCaller(_bind(getattr(self, role), method, session_id), role, retry or self.retry, deadline,
                          self.on_retry, self._rng, self.fail_fast, self.progress, lane)

    def models(self, session_id: str = "", deadline: float | None = None) -> Models:
        """The loop's ``Models`` for one request (``deadline``: ``time.monotonic()`` seconds
        by which retries stop); a missing scorer pool stays None."""
        def scorer(role: str) -> MergedScorer | HandleScorer | None:
            if getattr(self, role) is None:
                return None
            if role in self.merged:
                return MergedScorer(self.merged[role], session_id, deadline)
            return HandleScorer(self.caller(role, "score", session_id, deadline), session_id)

        def generator(role: str) -> MergedGenerator | HandleGenerator:
            if role in self.merged:
                return MergedGenerator(self.merged[role], session_id, deadline)
            return HandleGenerator(self.caller(role, "generate", session_id, deadline), session_id)

        target = generator("target")
        return Models(
            draft=generator("draft"),
            target=TimedGenerator(target, self.load) if self.load is not None else target,
            router=scorer("router"),
            prm=scorer("prm"),
        )
