"""PoolCaller's retries over a fake handle (pure logic: no cluster), and readiness arithmetic."""
import asyncio
import random
import time
from types import SimpleNamespace

import pytest
from fakes import HandleResponse
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from arbitrage_common.retry import RetryPolicy
from services.handles import PoolCaller, retry_reason
from services.health import pools_needed, running_pools


class FlakyCall:
    """``.remote(*args)`` fails with ``errors`` in turn, then answers ``args``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def remote(self, *args):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None

        async def answer():
            if error is not None:
                raise error
            return args
        return HandleResponse(answer())


def _caller(call, retries=3, deadline=None, seen=None):
    on_retry = (lambda role, reason: seen.append((role, reason))) if seen is not None else None
    return PoolCaller(call, "draft", RetryPolicy(retries=retries, base_s=0.001), deadline, on_retry, random.Random(0))


def test_a_dead_replica_and_a_full_pool_are_retried_and_the_answer_is_the_same_call():
    seen: list = []
    call = FlakyCall(ActorDiedError(), BackPressureError(num_queued_requests=1, max_queued_requests=1))
    assert asyncio.run(_caller(call, seen=seen)(["p"], "opts")) == (["p"], "opts")
    assert call.calls == 3 and seen == [("draft", "replica"), ("draft", "full")]


def test_a_bug_is_not_retried():
    call = FlakyCall(KeyError("bug"))
    with pytest.raises(KeyError):
        asyncio.run(_caller(call)(["p"]))
    assert call.calls == 1


def test_retries_stop_at_the_limit_and_name_the_pool():
    call = FlakyCall(*[ActorDiedError() for _ in range(5)])
    with pytest.raises(ActorDiedError) as info:
        asyncio.run(_caller(call, retries=2)(["p"]))
    assert call.calls == 3 and info.value.pool == "draft"


def test_no_retry_once_the_deadline_leaves_no_room():
    call = FlakyCall(ActorDiedError(), ActorDiedError())
    with pytest.raises(ActorDiedError):
        asyncio.run(_caller(call, deadline=time.monotonic() + 0.01)(["p"]))
    assert call.calls == 1


def _rpc_error(code):
    import grpc

    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="replica shutting down")


def test_retry_reasons():
    import grpc
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    assert retry_reason(ActorDiedError()) == "replica"
    assert retry_reason(BackPressureError(num_queued_requests=1, max_queued_requests=1)) == "full"
    # a pool that failed to deploy is no evidence of load (the threshold controller reads "full" as load)
    assert retry_reason(DeploymentUnavailableError(DeploymentID(name="draft", app_name="a"))) == "replica"
    # a replica's gRPC server that shut down under the call (pool_calls_over_grpc): Serve passes it on raw
    assert retry_reason(_rpc_error(grpc.StatusCode.CANCELLED)) == "replica"
    assert retry_reason(_rpc_error(grpc.StatusCode.UNAVAILABLE)) == "replica"
    assert retry_reason(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert retry_reason(TimeoutError()) is None
    assert retry_reason(ValueError()) is None


def test_pools_needed_by_each_policy():
    assert pools_needed("arbitrage") == ["draft", "target", "router"]
    assert pools_needed("rsd") == ["draft", "target", "prm"]
    assert pools_needed("oracle") == ["draft", "target", "prm"]
    assert pools_needed("draft") == ["draft", "target"]


def test_running_pools_counts_running_replicas_only():
    deployments = {"draft": SimpleNamespace(replica_states={"RUNNING": 2, "STARTING": 1}),
                   "target": SimpleNamespace(replica_states={"STARTING": 1})}
    assert running_pools(deployments, ["draft", "target", "router"]) == {"draft": 2, "target": 0, "router": 0}


def test_pool_handles_drop_serves_cancelled_call_line_and_keep_the_rest(caplog):
    import logging

    from services.handles import SERVE_CANCEL_LOG, PoolHandles, _ExpectedCancels

    serve_logger = logging.getLogger("ray.serve")
    before = list(serve_logger.filters)
    serve_logger.filters[:] = [f for f in before if not isinstance(f, _ExpectedCancels)]  # as a fresh process
    try:
        PoolHandles(object(), object())
        PoolHandles(object(), object())  # a second coordinator in the process adds no second filter
        assert sum(isinstance(f, _ExpectedCancels) for f in serve_logger.filters) == 1
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            serve_logger.info(SERVE_CANCEL_LOG)
            serve_logger.info("Cancelling something else.")
        assert [r.getMessage() for r in caplog.records] == ["Cancelling something else."]
    finally:
        serve_logger.filters[:] = before


def test_serve_still_logs_the_cancel_line_the_coordinator_drops():
    """The filter matches Ray Serve's text exactly: if Ray rewords it, this fails first."""
    import inspect

    from ray.serve._private import replica_result

    from services.handles import SERVE_CANCEL_LOG

    assert f'"{SERVE_CANCEL_LOG}"' in inspect.getsource(replica_result)


class _AlwaysFull:
    """A deployment handle whose pool queue is always full."""

    def options(self, **kw):
        return self

    def remote(self, *args):
        async def full():
            raise BackPressureError(num_queued_requests=9, max_queued_requests=8)
        return HandleResponse(full())


@pytest.mark.parametrize("lanes", [{"draft": 1, "target": 1}, None], ids=["merged", "alone"])
def test_a_full_pool_fails_every_row_as_overload_before_its_deadline_merged_or_not(lanes):
    """The first request's row leaves alone; the next two, queued behind it, leave as one merged
    call. Its nearer-deadline row must get RESOURCE_EXHAUSTED (503, retry), as it would alone,
    not DEADLINE_EXCEEDED for a wait on a full pool."""
    from arbitrage_common.loop import LoopRequest, stream_loop
    from arbitrage_common.policies import make_policy
    from services import convert
    from services.handles import PoolHandles

    async def one(pools, rid: str, deadline_s: float, delay_s: float) -> str:
        await asyncio.sleep(delay_s)
        request = LoopRequest(prompt="Start with 12.", policy=make_policy("draft", None, None), deadline_s=deadline_s)
        try:
            async for _ in stream_loop(request, pools.models(rid, time.monotonic() + deadline_s)):
                pass
        except Exception as exc:  # noqa: BLE001 (the status is what is checked)
            return convert.classify(exc).code
        return "ok"

    async def three():
        pools = PoolHandles(_AlwaysFull(), _AlwaysFull(), retry=RetryPolicy(retries=50, base_s=0.05, cap_s=0.2),
                            lanes=lanes)
        return await asyncio.gather(one(pools, "first", 0.3, 0.0), one(pools, "near", 1.0, 0.01),
                                    one(pools, "far", 1.5, 0.01))

    assert asyncio.run(three()) == ["resource_exhausted"] * 3


def test_releases_sent_alone_to_a_full_pool_go_once_and_never_cost_a_request_its_status():
    """A release-only merged call had no deadline: it ran all its retries against the full pool
    while holding the lane, and the next request's row, never sent, missed its deadline
    (DEADLINE_EXCEEDED) where alone it gets RESOURCE_EXHAUSTED (503, retry)."""
    from arbitrage_common.loop import LoopRequest, stream_loop
    from arbitrage_common.policies import make_policy
    from services import convert
    from services.handles import PoolHandles

    class Counted(_AlwaysFull):
        calls = 0

        def remote(self, *args):
            Counted.calls += 1
            return super().remote(*args)

    async def run() -> str:
        pools = PoolHandles(Counted(), _AlwaysFull(), retry=RetryPolicy(retries=8, base_s=0.05, cap_s=1.0),
                            lanes={"draft": 1})
        pools.merged["draft"].flush_s = 0.0
        pools.release("draft", "finished-session")
        await asyncio.sleep(0.01)  # the release leaves alone
        released = Counted.calls
        request = LoopRequest(prompt="Start with 12.", policy=make_policy("draft", None, None), deadline_s=0.8)
        try:
            async for _ in stream_loop(request, pools.models("next", time.monotonic() + 0.8)):
                pass
        except Exception as exc:  # noqa: BLE001 (the status is what is checked)
            return released, convert.classify(exc).code
        finally:
            await pools.merged["draft"].aclose()
        return released, "ok"

    released, status = asyncio.run(run())
    assert (released, status) == (1, "resource_exhausted")


class _DiesOnSecondCall:
    """A generator pool handle whose second ``generate_rows`` call finds its replica dead;
    every call takes ``hold_s`` (so rows queue behind the first and merge)."""

    def __init__(self, hold_s: float = 0.05) -> None:
        self.calls: list[list[str]] = []
        self.hold_s = hold_s

    def options(self, **kw):
        return self

    def remote(self, prefix_lists, option_list, sessions, aheads, release):
        from arbitrage_common.interfaces import Generation

        self.calls.append([p[0] for p in prefix_lists])
        dies = len(self.calls) == 2

        async def answer():
            await asyncio.sleep(self.hold_s)
            if dies:
                raise ActorDiedError()
            return [[Generation(p[0] + "!", 1, "eos", 0.0)] for p in prefix_lists]
        return HandleResponse(answer())


@pytest.mark.parametrize("with_short_neighbour", [False, True])
def test_a_short_deadline_in_a_merged_call_does_not_cost_its_neighbours_their_retries(with_short_neighbour):
    """B (30 s) queues behind C's call; with A (60 ms) beside it, their merged call dies and
    A has no time left to retry. B must still get its step, as it does alone."""
    from arbitrage_common.interfaces import GenerationOptions
    from services.handles import PoolHandles

    async def scenario():
        handle = _DiesOnSecondCall()
        pools = PoolHandles(handle, handle, retry=RetryPolicy(retries=3, base_s=0.001), lanes={"draft": 1})
        now, options = time.monotonic(), GenerationOptions()
        first = asyncio.create_task(pools.models("C", now + 30).draft.generate(["c"], options))
        await asyncio.sleep(0)
        rows = {"B": asyncio.create_task(pools.models("B", now + 30).draft.generate(["b"], options))}
        if with_short_neighbour:
            rows["A"] = asyncio.create_task(pools.models("A", now + 0.06).draft.generate(["a"], options))
        await first
        outcomes = {}
        for name, task in rows.items():
            try:
                outcomes[name] = (await task)[0].text
            except ActorDiedError as exc:
                outcomes[name] = f"{type(exc).__name__} ({exc.pool})"
        return outcomes, handle.calls

    outcomes, calls = asyncio.run(scenario())
    assert outcomes["B"] == "b!", (outcomes, calls)
    if with_short_neighbour:
        assert outcomes["A"] == "ActorDiedError (draft)" and ["b", "a"] in calls, (outcomes, calls)
