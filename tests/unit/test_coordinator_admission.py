"""The coordinator over fake pool handles, no Ray cluster: admission (the prompt-length check
on the generator pools) runs within the request's deadline; open health watches are capped."""
from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
from fake_pools import count_records
from fakes import HandleResponse

from arbitrage_common.config import default_config
from arbitrage_common.errors import DeadlineExceeded
from arbitrage_common.interfaces import Generation
from services import convert
from services.coordinator import Coordinator, _GrpcAbort
from services.validation import RequestFields

LONG_PROMPT = "Start with 1. " * 40  # long enough that admission counts its tokens on the pools


class SlowCountPool:
    """A pool handle whose ``count_tokens`` waits ``count_s`` (a busy replica); steps answer at once."""

    def __init__(self, count_s: float, method: str | None = None) -> None:
        self.count_s, self.method = count_s, method

    def options(self, method_name: str | None = None, **kw):
        return SlowCountPool(self.count_s, method_name or self.method)

    def remote(self, *args):
        async def answer():
            if self.method == "context_info":
                return {"context": 512}
            if self.method == "count_tokens":
                await asyncio.sleep(self.count_s)
                return 100
            if self.method == "generate_rows":
                return [[Generation("Answer: 1", 3, "eos", 0.0)] for _ in args[0]]
            return None
        return HandleResponse(answer())


def _coordinator(count_s: float) -> Coordinator:
    pools = [SlowCountPool(count_s) for _ in range(4)]
    return Coordinator(default_config().model_dump(mode="json"), *pools)


def test_a_slow_admission_fails_the_request_at_its_deadline_as_deadline_exceeded():
    async def run():
        await _coordinator(count_s=30.0).open_stream(RequestFields(prompt=LONG_PROMPT, policy="draft", timeout_s=0.3))

    with pytest.raises(DeadlineExceeded, match="checking the prompt's length") as info:
        asyncio.run(run())
    assert convert.classify(info.value).http_status == 504


def test_the_loop_gets_only_the_time_admission_left():
    async def run():
        prepared, stream = await _coordinator(count_s=0.2).open_stream(
            RequestFields(prompt=LONG_PROMPT, policy="draft", timeout_s=5.0))
        await stream.aclose()
        return prepared.request.deadline_s

    assert asyncio.run(run()) <= 5.0 - 0.2


class _GrpcContext:
    code = details = None
    trailers: tuple = ()

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailers) -> None:
        self.trailers = tuple(trailers)

    def invocation_metadata(self):
        return []


def test_open_health_watches_take_at_most_an_eighth_of_the_request_slots():
    """Health needs no API key and a Watch stream holds a request slot while it lives: anyone
    could otherwise hold every slot of the replica with watches."""
    import grpc
    from grpc_health.v1 import health_pb2

    coord = _coordinator(count_s=0.0)
    records = count_records(coord)
    cap = coord.cfg.coordinator.max_ongoing_requests // 8
    unknown = health_pb2.HealthCheckRequest(service="no.such.Service")  # streams without asking Serve

    async def run():
        streams = [coord.Watch(unknown, _GrpcContext()) for _ in range(cap)]
        for stream in streams:
            assert (await anext(stream)).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        refused = _GrpcContext()
        with pytest.raises(Exception, match="too many open health watches"):
            await anext(coord.Watch(unknown, refused))
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert records == []  # logged, but not a request: the alerts' ratios read the count
        await streams[0].aclose()  # a client that leaves frees its place
        assert (await anext(coord.Watch(unknown, _GrpcContext()))).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    asyncio.run(run())


def test_a_watch_whose_client_left_without_closing_it_frees_its_slot_once_silent():
    """Serve may drop a cancelled Watch's generator parked at a `yield` without closing it (its
    `finally` then waits for the garbage collector, or forever): found live, 8 slots leaked down
    to 6 for good. A stream counts only while its client pulls; one that still pulls keeps its slot."""
    from grpc_health.v1 import health_pb2

    from services.coordinator import WATCH_STALE_S
    from services.health import WatchSlots

    now = [0.0]
    coord = _coordinator(count_s=0.0)
    coord._watches = WatchSlots(2, WATCH_STALE_S, clock=lambda: now[0])
    unknown = health_pb2.HealthCheckRequest(service="no.such.Service")

    async def run():
        left, live = coord.Watch(unknown, _GrpcContext()), coord.Watch(unknown, _GrpcContext())
        await anext(left)  # parked at its yield, never resumed nor closed: the client is gone
        await anext(live)
        with pytest.raises(Exception, match="too many open health watches"):
            await anext(coord.Watch(unknown, _GrpcContext()))
        now[0] += WATCH_STALE_S / 2
        live_next = asyncio.ensure_future(anext(live))  # the live client pulls the next message
        await asyncio.sleep(0)
        now[0] += WATCH_STALE_S / 2 + 0.1
        assert (await coord.record_autoscaling_stats())["arbitrage_health_watches"] == 1.0
        assert (await anext(coord.Watch(unknown, _GrpcContext()))).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        with pytest.raises(Exception, match="too many open health watches"):  # the live one kept its slot
            await anext(coord.Watch(unknown, _GrpcContext()))
        with pytest.raises(Exception, match="too many open health watches"):  # the silent one came back: no slot
            await anext(left)
        live_next.cancel()
        return left

    asyncio.run(run())


def test_watch_slots_count_a_stream_while_its_client_pulls():
    from services.health import WatchSlots

    now = [0.0]
    slots = WatchSlots(2, 15.0, clock=lambda: now[0])
    a, b = slots.take(), slots.take()
    assert slots.take() is None and slots.open_count() == 2
    now[0] = 10.0
    slots.pulled(a)
    now[0] = 15.5  # b silent 15.5 s, a 5.5 s
    assert slots.open_count() == 1
    c = slots.take()
    assert c is not None and slots.take() is None
    assert slots.pulled(b) is False and slots.open_count() == 2  # b's client came back: no slot for it
    slots.release(c)
    assert slots.pulled(b) is True and slots.open_count() == 2  # a slot is free again: b takes it
    slots.release(b)
    c = slots.take()
    slots.release(a)
    slots.release(a)  # a closed stream's finally after its slot went stale: no harm
    assert slots.open_count() == 1 and slots.take() is not None and b not in (a, c)


def test_a_health_check_of_an_unknown_service_is_not_found_and_logged(caplog):
    import grpc
    from grpc_health.v1 import health_pb2

    coord = _coordinator(count_s=0.0)
    records, context = count_records(coord), _GrpcContext()
    with caplog.at_level("INFO", logger="services"), pytest.raises(Exception, match="unknown service 'nope'"):
        asyncio.run(coord.Check(health_pb2.HealthCheckRequest(service="nope"), context))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert records == []  # health probes are not requests: ok or not, arbitrage_requests_total skips them
    assert "request failed: status=not_found policy=none transport=grpc" in caplog.text, caplog.text


def test_health_list_reports_the_server_and_the_api_as_check_does():
    from grpc_health.v1 import health_pb2

    from services.coordinator import SERVICE_NAME

    coord = _coordinator(count_s=0.0)

    async def serving() -> bool:
        return True

    coord.health.current = serving
    check = asyncio.run(coord.Check(health_pb2.HealthCheckRequest(), _GrpcContext()))
    listed = asyncio.run(coord.List(health_pb2.HealthListRequest(), _GrpcContext()))
    assert set(listed.statuses) == {"", SERVICE_NAME}
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert all(reply.status == check.status for reply in listed.statuses.values())


def test_open_health_watches_are_reported_to_the_autoscaler_as_no_load():
    """The coordinator's autoscaling hook reports the watches open now (Serve samples it beside
    its count of ongoing requests), which its policy takes off that count
    (arbitrage_common.autoscaling.requests_policy)."""
    from grpc_health.v1 import health_pb2

    from arbitrage_common.autoscaling import WATCHES_METRIC

    coord = _coordinator(count_s=0.0)
    unknown = health_pb2.HealthCheckRequest(service="no.such.Service")

    async def run():
        seen = [await coord.record_autoscaling_stats()]
        streams = [coord.Watch(unknown, _GrpcContext()) for _ in range(3)]
        for stream in streams:
            await anext(stream)
        seen.append(await coord.record_autoscaling_stats())
        await streams[0].aclose()
        seen.append(await coord.record_autoscaling_stats())
        for stream in streams[1:]:
            await stream.aclose()
        seen.append(await coord.record_autoscaling_stats())
        return seen

    assert asyncio.run(run()) == [{WATCHES_METRIC: n} for n in (0.0, 3.0, 2.0, 0.0)]


class _StepsHang(SlowCountPool):
    """Admission answers at once; every step call waits."""

    def options(self, method_name: str | None = None, **kw):
        return _StepsHang(0.0, method_name or self.method)

    def remote(self, *args):
        if self.method in ("generate_rows", "generate"):  # merged or direct
            self.hung.append(args)
            return HandleResponse(asyncio.sleep(3600))
        return super().remote(*args)

    hung: ClassVar[list] = []


class _PoolsDown:
    """``PoolHealth`` as the controller would answer it: ``down`` have no running replica;
    ``failing`` also have none, and Serve reports them failing (``PoolHealth.failed``)."""

    def __init__(self, *down: str, failing: tuple[str, ...] = ()) -> None:
        self.down_pools, self.failing, self.asked = [*down, *failing], failing, []

    async def down(self, names):
        self.asked.append(list(names))
        return [name for name in names if name in self.down_pools]

    def failed(self, name: str) -> bool:
        return name in self.failing


@pytest.mark.parametrize("where", ["admission", "loop"])
@pytest.mark.parametrize("down", [(), ("draft",), ("target",)])
def test_a_deadline_missed_waiting_on_a_pool_with_no_replica_is_unavailable(where, down):
    """Serve holds a call to a pool with no running replica until one runs: the request's
    deadline then passes. With the pool down that is UNAVAILABLE (503, retry later), not the
    client's DEADLINE_EXCEEDED with its advice to raise timeout_s. Only a pool the request
    called counts: admission asks both generators for their contexts, but a draft-only loop
    never calls the target, so a target scaled to zero did not make it late (504, not 503)."""
    coord = _coordinator(count_s=30.0 if where == "admission" else 0.0)
    coord.health = _PoolsDown(*down)
    _StepsHang.hung.clear()
    if where == "loop":
        coord.pools.draft = _StepsHang(0.0)  # every draft step waits, as Serve holds one for a missing replica

    async def run():
        prepared, stream = await coord.open_stream(RequestFields(prompt=LONG_PROMPT, policy="draft", timeout_s=0.3))
        async for _ in coord.steps_of(stream, prepared):
            pass

    with pytest.raises(Exception) as info:
        asyncio.run(run())
    err = convert.classify(info.value)
    called = ["draft", "target"] if where == "admission" else ["draft"]
    blamed = [pool for pool in down if pool in called]
    assert (err.code, err.http_status) == (("unavailable", 503) if blamed else ("deadline_exceeded", 504)), err
    assert coord.health.asked == [called]
    assert bool(_StepsHang.hung) == (where == "loop")  # the loop's case failed in the loop
    if blamed:
        assert f"{blamed[0]} pool has no running replica" in err.message


class _StepsSlow(SlowCountPool):
    """Admission answers at once; every step call takes ``step_s`` (a long request of quick steps)."""

    def __init__(self, step_s: float, method: str | None = None) -> None:
        super().__init__(0.0, method)
        self.step_s = step_s

    def options(self, method_name: str | None = None, **kw):
        return _StepsSlow(self.step_s, method_name or self.method)

    def remote(self, *args):
        async def answer():
            await asyncio.sleep(self.step_s)
            return [[Generation("Step.", 3, "delimiter", 0.0)] for _ in args[0]]
        if self.method == "generate_rows":
            return HandleResponse(answer())
        return super().remote(*args)


@pytest.mark.parametrize("stall_s", [0.3, 5.0, None])
@pytest.mark.parametrize("pool", ["hung", "slow"])
def test_a_deadline_missed_on_a_pool_that_answers_nothing_for_pool_stall_s_is_unavailable(pool, stall_s):
    """A hung replica still counts as running (Serve replaces it only after its health checks
    fail), so ``_PoolsDown`` finds nothing: what tells is a pool that has answered nothing for
    ``pool_stall_s`` though a call was out to it. Then UNAVAILABLE naming the pool (retry
    later), not the client's DEADLINE_EXCEEDED. A pool that keeps answering quick steps that
    merely add up past the deadline stays 504, as does a stall shorter than the bound, or any
    with the bound off (None)."""
    data = default_config().model_dump(mode="json")
    data["coordinator"]["pool_stall_s"] = stall_s
    coord = Coordinator(data, *[SlowCountPool(0.0) for _ in range(4)])
    coord.health = _PoolsDown()
    coord.pools.draft = _StepsHang(0.0) if pool == "hung" else _StepsSlow(0.02)

    async def run():
        prepared, stream = await coord.open_stream(RequestFields(prompt="Start with 4. Add 3.", policy="draft",
                                                                 timeout_s=0.9, max_steps=64))
        async for _ in coord.steps_of(stream, prepared):
            pass

    with pytest.raises(Exception) as info:
        asyncio.run(asyncio.wait_for(run(), 60))  # a guard against a hang, not a timing
    err = convert.classify(info.value)
    stalled = pool == "hung" and stall_s == 0.3
    assert (err.code, err.http_status) == (("unavailable", 503) if stalled else ("deadline_exceeded", 504)), err
    if stalled:
        assert "the draft pool answered no call for" in err.message and "retry" in err.message


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("waiting_on, stalled, blamed", [
    ("draft", {"draft"}, "draft"),  # the pool the loop waited on
    ("draft", {"target"}, "target"),  # its rows wait for call slots that a hung target holds
    ("draft", {"draft", "target"}, "draft"),  # the one waited on first
    (None, {"router"}, "router"),  # admission, or between calls: any pool sharing the slots
    ("draft", set(), None),  # every pool answers: the client's deadline
])
def test_a_missed_deadline_blames_a_pool_that_answered_nothing_for_pool_stall_s(waiting_on, stalled, blamed):
    """``_blame_pool_down`` over ``PoolProgress`` with a clock the test moves: a pool with a call
    out since t=0 and no answer since is stalled at t=40 (bound 30). Pools that answered at
    t=39 are not. A request waits on the pool of its own call first, then on those sharing
    the call slots (the embedded default's transformers pools share two)."""
    from arbitrage_common.accounting import LoopResult, Usage
    from arbitrage_common.pool_progress import PoolProgress

    coord = _coordinator(count_s=0.0)
    coord.health = _PoolsDown()
    clock = _Clock()
    progress = coord.pools.progress = PoolProgress(clock)
    for role in ("draft", "target", "router"):
        token = progress.sent(role)
        if role not in stalled:
            clock.now = 39.0
            progress.ended(role, token, answered=True)
            progress.sent(role)  # and one more call out since
        clock.now = 0.0
    clock.now = 40.0
    exc = DeadlineExceeded(LoopResult("p", [], "deadline", Usage(), 0.0), waiting_on=waiting_on)
    with pytest.raises(Exception) as info:
        asyncio.run(coord._blame_pool_down(exc, ["draft"]))
    if blamed is None:
        assert info.value is exc
    else:
        assert isinstance(info.value, convert.PoolStalled) and info.value.pool == blamed
        assert info.value.waited_s == 40.0


def test_a_cut_call_is_judged_before_the_down_probe_runs():
    """The deadline cuts the hung call (its silence is told for ``CUT_FRESH_S``) before the
    request looks for a pool to blame; ``health.down`` may then probe the controller for up to
    ``DOWN_PROBE_S``. The stall is read first, or a slow probe would turn a hung pool into 504."""
    from arbitrage_common.accounting import LoopResult, Usage
    from arbitrage_common.pool_progress import PoolProgress
    from services.health import DOWN_PROBE_S

    coord = _coordinator(count_s=0.0)
    clock = _Clock()
    progress = coord.pools.progress = PoolProgress(clock)
    token = progress.sent("draft")
    clock.now = 40.0
    progress.ended("draft", token, answered=False)  # the deadline cut the hung call

    class SlowProbe:
        async def down(self, names):
            clock.now += DOWN_PROBE_S + 0.01  # the probe timed out
            return []

    coord.health = SlowProbe()
    exc = DeadlineExceeded(LoopResult("p", [], "deadline", Usage(), 0.0), waiting_on="draft")
    with pytest.raises(convert.PoolStalled):
        asyncio.run(coord._blame_pool_down(exc, ["draft"]))


@pytest.mark.parametrize("stall_s", [0.1, None])
def test_a_deadline_missed_in_admission_on_a_stalled_pool_is_unavailable(stall_s):
    """Admission asks the generators for their contexts and token counts: a pool that answers
    none of it for ``pool_stall_s`` is named, UNAVAILABLE, as in the loop (a hung draft met a
    service's first request there); with the bound off, DEADLINE_EXCEEDED."""
    data = default_config().model_dump(mode="json")
    data["coordinator"]["pool_stall_s"] = stall_s
    coord = Coordinator(data, SlowCountPool(30.0), SlowCountPool(0.0), SlowCountPool(0.0), SlowCountPool(0.0))
    coord.health = _PoolsDown()

    async def run():
        prepared, stream = await coord.open_stream(RequestFields(prompt=LONG_PROMPT, policy="draft", timeout_s=0.3))
        async for _ in coord.steps_of(stream, prepared):
            pass

    with pytest.raises(Exception) as info:
        asyncio.run(asyncio.wait_for(run(), 60))  # a guard against a hang, not a timing
    err = convert.classify(info.value)
    if stall_s is None:
        assert (err.code, err.http_status) == ("deadline_exceeded", 504), err
    else:
        assert (err.code, err.http_status) == ("unavailable", 503), err
        assert "the draft pool answered no call for" in err.message


@pytest.mark.parametrize("stream", [False, True])
def test_a_retriable_grpc_failure_carries_retry_after_and_others_do_not(stream):
    """HTTP's 503 has Retry-After; gRPC has no standard hint, so UNAVAILABLE and
    RESOURCE_EXHAUSTED carry ``retry-after`` trailing metadata (whole seconds, the same
    ``coordinator.retry_after_s``), which the shared client reads. A deadline or a bad request
    carries none: retrying it as it is would fail again."""
    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    data = default_config().model_dump(mode="json")
    data["coordinator"].update(pool_stall_s=0.1, retry_after_s=2.5)
    coord = Coordinator(data, *[SlowCountPool(0.0) for _ in range(4)])
    coord.health = _PoolsDown()
    coord.pools.draft = _StepsHang(0.0)

    async def call(request):
        context = _GrpcContext()
        if stream:
            with pytest.raises(_GrpcAbort):
                async for _ in coord.GenerateStream(request, context):
                    pass
        else:
            await coord.Generate(request, context)
        return context

    hung = asyncio.run(call(pb.GenerateRequest(prompt="Start with 4. Add 3.", policy="draft", timeout_s=0.3)))
    bad = asyncio.run(call(pb.GenerateRequest(prompt="", policy="draft")))
    assert hung.code.name == "UNAVAILABLE" and hung.trailers == (("retry-after", "3"),)
    assert bad.code.name == "INVALID_ARGUMENT" and bad.trailers == ()


@pytest.mark.parametrize("already", [False, True])  # the pool fails under the call, or failed before it
@pytest.mark.parametrize("merged", [True, False])  # the Coalescer's send task, or the request's own task
def test_a_call_waiting_on_a_failed_pool_ends_at_the_next_probe(merged, already):
    """A call waits for a replica while its pool has none; once the pool has been failing long
    enough (its Pod's node was lost, say: a replica may be minutes away), the next health
    probe ends it (``FailFast``): UNAVAILABLE, naming the pool, long before the request's
    deadline (an hour here), and the request's task is left with no cancel pending. A call
    to a pool already failed is still sent: the pool may have just come back."""
    data = default_config().model_dump(mode="json")
    if not merged:
        data["coordinator"].update(merge_calls=False, pool_calls_in_flight=None)
    coord = Coordinator(data, *[SlowCountPool(0.0) for _ in range(4)])
    health = coord.health = _PoolsDown(failing=("draft",) if already else ())
    _StepsHang.hung.clear()
    coord.pools.draft = _StepsHang(0.0)

    async def run():
        prepared, stream = await coord.open_stream(RequestFields(prompt="Start with 4. Add 3.", policy="draft",
                                                                 timeout_s=3600))

        async def consume():
            async for _ in coord.steps_of(stream, prepared):
                pass
        request = asyncio.ensure_future(consume())
        while not _StepsHang.hung:  # the draft call is out, waiting
            await asyncio.sleep(0.01)
        if not already:
            coord._after_probe()  # a probe before the pool fails ends nothing
            await asyncio.sleep(0.05)
            assert not request.done()
        health.failing = ("draft",)
        coord._after_probe()  # what the next health probe runs
        coord._after_probe()  # and the one after it, before the request ran again: one cancel only
        try:
            await request
        finally:
            assert request.cancelling() == 0

    with pytest.raises(Exception) as info:
        asyncio.run(asyncio.wait_for(run(), 60))  # a guard against a hang, not a timing
    err = convert.classify(info.value)
    assert (err.code, err.http_status) == ("unavailable", 503), err
    assert "draft pool has no running replica (its replicas died or cannot start" in err.message


def test_models_list_reports_the_threshold_requests_run_with():
    """The served model's entry shows the threshold a request without one gets (the policy's
    default when the config sets none), not null."""
    coord = _coordinator(count_s=0.0)
    default = coord.list_models()["data"][0]
    assert coord.cfg.policy.threshold is None and default["policy"] == "arbitrage"
    assert default["threshold"] == 0.5  # ArbitragePolicy.default_threshold
