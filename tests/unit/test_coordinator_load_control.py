"""The coordinator's use of the load controller, in-process over fake pool handles (no Ray
cluster): the threshold a request runs with and reports, target calls timed by
``TimedGenerator``, request durations, the refresh from the health probe and its gauges, and
the thresholds ``/v1/models`` lists."""
from __future__ import annotations

import asyncio
import time

import pytest
from fakes import HandleResponse

from arbitrage_common.config import default_config
from arbitrage_common.interfaces import Generation, GenerationOptions
from arbitrage_common.threshold_control import LoadController
from services.coordinator import Coordinator
from services.handles import TimedGenerator
from services.load_metrics import LOAD_GAUGES, LoadGauges
from services.validation import RequestFields

BUDGET_MS = 100.0


class FakePool:
    """A pool handle: one 'Answer: 1' step per generator row (eos), router/PRM score 0.9."""

    def __init__(self, method: str | None = None) -> None:
        self.method = method

    def options(self, method_name: str | None = None, **kw):
        return FakePool(method_name or self.method)

    def remote(self, *args):
        async def answer():
            if self.method == "context_info":
                return {"context": 4096}
            if self.method == "generate_rows":
                return [[Generation("Answer: 1", 3, "eos", 0.0) for _ in prefixes] for prefixes in args[0]]
            if self.method == "score_rows":
                return [[0.9 for _ in items] for items in args[0]]
            return None
        return HandleResponse(answer())


class FakeGauge:
    def __init__(self, name: str, description: str = "") -> None:
        self.name, self.value = name, None

    def set(self, value: float) -> None:
        self.value = value


def _coordinator(load_control: dict | None = None, threshold: float | None = 0.6, **target) -> Coordinator:
    data = default_config().model_dump(mode="json")
    data["policy"]["threshold"] = threshold
    if load_control is not None:
        data["policy"]["load_control"] = load_control
    data["pools"]["target"].update(target)
    coord = Coordinator(data, *(FakePool() for _ in range(4)))
    if coord.load is not None:
        coord._load_gauges = LoadGauges(gauge=FakeGauge)
    return coord


def _on() -> dict:
    return {"enabled": True, "latency_budget_ms": BUDGET_MS}


def _overloaded(coord: Coordinator) -> float:
    """Ten seconds of target calls at four times the budget, ending now (the controller's clock
    is time.monotonic(), as in the service): the offset is at its max. Returns it."""
    ctl, now = coord.load, time.monotonic()
    ctl.update(now - 10.0)
    for i in range(100):
        ctl.observe_latency(4 * BUDGET_MS, now - 10.0 + i * 0.1)
    ctl.update(now)
    assert ctl.offset > 0.25
    return ctl.offset


def _run_threshold(coord: Coordinator, **fields) -> float | None:
    """The threshold a request runs with and reports (its policy object agrees)."""
    async def run():
        prepared, stream = await coord.open_stream(RequestFields(prompt="Start with 1. Add 2.", **fields))
        await stream.aclose()
        assert prepared.request.policy.threshold == prepared.threshold
        return prepared.threshold

    return asyncio.run(run())


def test_a_request_without_a_threshold_runs_its_configured_base_moved_by_the_offset():
    coord = _coordinator(_on())
    _overloaded(coord)
    used = _run_threshold(coord)               # default policy arbitrage, configured base 0.6
    assert used == pytest.approx(min(1.0, 0.6 + coord.load.offset)) and used > 0.6
    assert _run_threshold(coord, policy="arbitrage") == used  # model=arbitrage: the same base


def test_an_explicit_threshold_is_run_as_sent():
    coord = _coordinator(_on())
    _overloaded(coord)
    assert _run_threshold(coord, threshold=0.6) == 0.6
    assert _run_threshold(coord, policy="rsd", threshold=0.6) == 0.6


def test_rsd_moves_the_other_way_from_its_own_default():
    coord = _coordinator(_on())
    _overloaded(coord)
    used = _run_threshold(coord, policy="rsd")  # not the default policy: base 0.5, rsd's default
    assert used == pytest.approx(max(0.0, 0.5 - coord.load.offset)) and used < 0.5


def test_uncontrolled_policies_and_a_controller_off_keep_the_base():
    coord = _coordinator(_on())
    _overloaded(coord)
    assert _run_threshold(coord, policy="random") == 0.5
    assert _run_threshold(_coordinator(None)) == 0.6


def test_a_request_times_its_target_calls_and_reports_its_duration():
    coord = _coordinator(_on(), threshold=0.5)   # router scores 0.9 > 0.5: the target writes the step

    async def run():
        prepared, stream = await coord.open_stream(RequestFields(prompt="Start with 1. Add 2.", max_steps=1))
        assert isinstance(stream.models.target, TimedGenerator) and stream.models.target._load is coord.load
        async for _ in coord.steps_of(stream, prepared):
            pass
        return stream.result

    result = asyncio.run(run())
    assert [step.source for step in result.steps] == ["target"]
    assert coord.load.in_flight == 0 and coord.load.latency_ewma_ms is not None  # one target call, timed
    assert coord.load.request_s_ewma is not None and coord.load.request_s_ewma >= 0


def test_only_requests_whose_threshold_the_controller_set_count_toward_the_loop_delay():
    coord = _coordinator(_on())
    coord._request_ended(coord.prepare_request(RequestFields(prompt="x", policy="draft")), 99.0)
    assert coord.load.request_s_ewma is None
    # a client's own threshold is not controlled: its (long) request must not slow the loop
    coord._request_ended(coord.prepare_request(RequestFields(prompt="x", policy="arbitrage", threshold=0.0)), 99.0)
    assert coord.load.request_s_ewma is None
    coord._request_ended(coord.prepare_request(RequestFields(prompt="x", policy="arbitrage")), 42.0)
    assert coord.load.request_s_ewma == 42.0


class _Inner:
    """A target generator whose calls wait until released."""

    called = False

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def generate(self, prefixes, options):
        await self.release.wait()
        return [Generation("x", 1, "eos", 0.0)]


def test_timed_generator_counts_calls_in_flight_and_skips_cancelled_ones():
    ctl = LoadController(default_config().policy.load_control.model_copy(update=_on()))

    async def run():
        inner = _Inner()
        timed = TimedGenerator(inner, ctl)
        done = asyncio.create_task(timed.generate(["a"], GenerationOptions()))
        dropped = asyncio.create_task(timed.generate(["b"], GenerationOptions()))
        await asyncio.sleep(0)
        assert ctl.in_flight == 2
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert ctl.in_flight == 1 and ctl.latency_ewma_ms is None  # cancelled: counted out, no sample
        inner.release.set()
        await done
        assert ctl.in_flight == 0 and ctl.latency_ewma_ms is not None

    asyncio.run(run())


class _Health:
    def __init__(self, can: bool) -> None:
        self.can, self.asked = can, []

    def can_add_replicas(self, name: str, max_replicas: int | None) -> bool:
        self.asked.append((name, max_replicas))
        return self.can


def test_the_health_probe_refreshes_the_offset_and_its_gauges_after_traffic_stops():
    """Before: the offset gauge was set only at admission, so after traffic stopped it showed
    the last offset forever, and the controller itself waited for the next request."""
    coord = _coordinator(_on())
    ctl, now = coord.load, time.monotonic()
    ctl.update(now - 30.0)
    for i in range(50):  # 5 s of overload, then 25 s without a target call
        ctl.observe_latency(4 * BUDGET_MS, now - 30.0 + i * 0.1)
    ctl.update(now - 25.0)
    raised = ctl.offset
    coord._load_gauges.export(ctl.snapshot())  # as the last admission left them
    gauges = coord._load_gauges.gauges
    assert gauges["offset"].value == raised > 0 and gauges["latency_ewma_ms"].value > 0
    coord.health = _Health(can=False)
    coord._refresh_load()                      # what each health probe runs
    assert gauges["offset"].value == ctl.offset < raised
    assert gauges["latency_ewma_ms"].value == 0.0 and gauges["error"].value == -1.0  # idle
    assert gauges["in_flight"].value == 0.0


def test_the_refresh_tells_the_controller_whether_the_target_pool_can_grow():
    coord = _coordinator(_on(), autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    coord.health = _Health(can=True)
    coord._refresh_load()
    assert coord.health.asked == [("target", 4)]
    assert coord.load.can_scale and coord._load_gauges.gauges["can_scale"].value == 1.0
    fixed = _coordinator(_on())
    fixed.health = _Health(can=False)
    fixed._refresh_load()
    assert fixed.health.asked == [("target", None)] and not fixed.load.can_scale


def test_the_coordinator_wires_its_health_probe():
    coord = _coordinator(_on(), autoscaling_config={"min_replicas": 0, "max_replicas": 2})
    assert coord.health.scale_to_zero == {"target"} and coord.health.on_probe == coord._after_probe
    assert _coordinator(_on()).health.scale_to_zero == frozenset()
    _coordinator(None)._refresh_load()  # off: nothing to refresh


def test_load_gauges_follow_the_arbitrage_naming_and_carry_no_labels():
    gauges = LoadGauges(gauge=FakeGauge)
    assert all(g.name.startswith("arbitrage_") for g in gauges.gauges.values())
    assert gauges.gauges["offset"].name == "arbitrage_threshold_offset"
    gauges.export({"offset": 0.1, "error": None, "latency_ewma_ms": None, "in_flight": 3, "request_s": 12.5,
                   "can_scale": 0, "max_offset": 0.3})
    assert {k: g.value for k, g in gauges.gauges.items()} == {
        "offset": 0.1, "error": 0.0, "latency_ewma_ms": 0.0, "in_flight": 3.0, "request_s": 12.5, "can_scale": 0.0,
        "max_offset": 0.3}
    assert set(LOAD_GAUGES) <= set(LoadController(default_config().policy.load_control).snapshot())


def test_models_list_shows_each_policys_configured_base_and_the_threshold_in_effect():
    coord = _coordinator(_on())
    offset = _overloaded(coord)
    models = {m["id"]: m for m in coord.list_models()["data"]}
    served = models[coord.cfg.served_model_name]
    assert served["threshold"] == 0.6 and models["arbitrage"]["threshold"] == 0.6  # configured, not 0.5
    assert models["arbitrage"]["default_threshold"] == 0.5                       # the policy's own, still listed
    assert models["rsd"]["threshold"] == 0.5 and models["draft"]["threshold"] is None
    effective = models["arbitrage"]["effective_threshold"]
    assert effective == served["effective_threshold"] == pytest.approx(min(1.0, 0.6 + coord.load.offset))
    assert effective > 0.6 and offset > 0
    assert models["rsd"]["effective_threshold"] == pytest.approx(0.5 - coord.load.offset)
    assert models["random"]["effective_threshold"] == 0.5
    off = {m["id"]: m for m in _coordinator(None).list_models()["data"]}
    assert off["arbitrage"]["threshold"] == 0.6 and "effective_threshold" not in off["arbitrage"]


def test_models_list_without_a_configured_threshold_shows_the_policy_default():
    models = {m["id"]: m for m in _coordinator(None, threshold=None).list_models()["data"]}
    assert models["arbitrage"]["threshold"] == 0.5 == models[default_config().served_model_name]["threshold"]



def test_admission_outside_a_replica_starts_no_health_probe_even_with_ray_initialized(monkeypatch):
    """A process with Ray initialized (a test session after the serve tests, a script) is not a
    replica: admission must not start the probe loop (there may be no event loop at all)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    coord = _coordinator(_on())
    prepared = coord.prepare_request(RequestFields(prompt="x", policy="arbitrage"))
    assert prepared.policy == "arbitrage" and coord.health._task is None
    assert coord._gauge_clock.task is None


def test_in_a_replica_the_load_gauges_are_set_again_on_a_clock_while_idle(monkeypatch):
    """Ray drops a gauge not set again within two export intervals (2 s at 1 s): admissions and
    2 s probes alone let an idle replica's gauges drop out."""
    import services.coordinator as coordinator_module
    from services.gauge_clock import GAUGE_EXPORT_S

    monkeypatch.setattr(coordinator_module, "_in_replica", lambda: True)
    coord = _coordinator(_on())
    monkeypatch.setattr(coord.health, "start", lambda: None)  # no probes: only admission and the clock
    sets = []
    coord._load_gauges.gauges["offset"].set = sets.append

    async def admit_then_idle():
        coord.prepare_request(RequestFields(prompt="x", policy="arbitrage"))
        admitted = len(sets)
        await asyncio.sleep(4.5 * GAUGE_EXPORT_S)
        coord._gauge_clock.task.cancel()
        return admitted

    admitted = asyncio.run(admit_then_idle())
    assert admitted >= 1 and len(sets) >= admitted + 4


def test_in_a_replica_the_rows_waiting_by_pool_are_exported_on_the_clock(monkeypatch):
    """Rows the coordinator holds for a merged call or a call slot never reach Serve's queue
    metrics: the clock exports them per pool, load control on or off."""
    import fake_pools

    import services.coordinator as coordinator_module
    from services.gauge_clock import GAUGE_EXPORT_S

    monkeypatch.setattr(coordinator_module, "_in_replica", lambda: True)
    coord = fake_pools.coordinator()
    monkeypatch.setattr(coord.health, "start", lambda: None)
    sets: list[tuple[str, float]] = []
    coord._rows_waiting.gauge.set = lambda value, tags: sets.append((tags["role"], value))

    async def one_request_then_idle():
        prepared, stream = await coord.start_stream(coord.prepare_request(
            RequestFields(prompt="Start with 2. Add 3.", policy="arbitrage")))
        async for _ in coord.steps_of(stream, prepared):
            pass
        await asyncio.sleep(2.5 * GAUGE_EXPORT_S)
        coord._gauge_clock.task.cancel()

    asyncio.run(one_request_then_idle())
    assert {role for role, _ in sets} == set(coord.pools.merged) >= {"draft", "router", "target"}
    assert all(value == 0.0 for _, value in sets[-len(coord.pools.merged):])  # idle: nothing waits
