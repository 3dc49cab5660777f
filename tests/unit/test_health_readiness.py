"""Readiness (services.health) from fake ``serve.status()`` answers, no Ray cluster: a pool
scaled to zero by its autoscaler still serves; one whose replicas failed does not; the probe
also says whether the target pool can still add replicas, and tells the load controller."""
from __future__ import annotations

import asyncio

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import DeploymentStatusOverview

from services.health import PoolHealth, can_add_replicas, pool_serving

NEEDED = ["draft", "target", "router"]


def _deployment(status: str, running: int = 0, starting: int = 0, stopping: int = 0,
                recovering: int = 0) -> DeploymentStatusOverview:
    states = {ReplicaState.RUNNING: running, ReplicaState.STARTING: starting, ReplicaState.STOPPING: stopping,
              ReplicaState.RECOVERING: recovering}
    return DeploymentStatusOverview(status=DeploymentStatus(status), status_trigger=DeploymentStatusTrigger.AUTOSCALING,
                                    replica_states={k: v for k, v in states.items() if v}, message="")


class _Status:
    """What ``serve.status()`` returns, for one application called 'arbitrage'."""

    def __init__(self, **deployments: DeploymentStatusOverview) -> None:
        app = type("App", (), {"deployments": deployments})()
        self.applications = {"arbitrage": app}


def _probe(monkeypatch, answers: list, scale_to_zero=()) -> tuple[PoolHealth, list[bool | None]]:
    """Probe once per answer (a ``_Status`` or an exception ``serve.status()`` raises); the
    readiness after each, and how often ``on_probe`` ran."""
    from ray import serve

    pending = list(answers)

    def status():
        answer = pending.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(serve, "status", status)
    probed: list[bool | None] = []
    health = PoolHealth("arbitrage", NEEDED, 2.0, scale_to_zero=scale_to_zero,
                        on_probe=lambda: probed.append(health.serving))

    async def run():
        for _ in answers:
            await health.probe()

    asyncio.run(run())
    return health, probed


@pytest.mark.parametrize(("running", "status", "scales_to_zero", "serving"), [
    (1, "HEALTHY", False, True),
    (2, "UNHEALTHY", False, True),      # one replica still runs: it serves
    (0, "HEALTHY", False, False),       # min_replicas >= 1 and none running: down
    (0, "HEALTHY", True, True),         # scaled to zero: the next call starts one
    (0, "UPSCALING", True, True),       # cold-starting
    (0, "UPDATING", True, False),       # deploying: its first replica may take minutes to load
    (0, "DOWNSCALING", True, True),     # on its way to zero
    (0, "UNHEALTHY", True, False),      # its replicas died
    (0, "DEPLOY_FAILED", True, False),  # they never came up
    (0, None, True, False),             # not listed by the controller
])
def test_pool_serving(running, status, scales_to_zero, serving):
    assert pool_serving(running, status, scales_to_zero) is serving


def test_a_pool_the_autoscaler_scaled_to_zero_keeps_the_replica_serving(monkeypatch):
    """Before: any pool at zero replicas made /healthz 503 and gRPC health NOT_SERVING, so a
    load balancer stopped sending and a min_replicas 0 pool never woke."""
    zero = _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 0), router=_deployment("HEALTHY", 1))
    health, _ = _probe(monkeypatch, [zero], scale_to_zero={"target"})
    assert health.serving is True and health.running["target"] == 0
    health, _ = _probe(monkeypatch, [zero])  # the same pool with min_replicas >= 1: down
    assert health.serving is False


def test_a_scale_to_zero_pool_whose_replicas_failed_is_not_serving(monkeypatch):
    answers = [_Status(draft=_deployment("HEALTHY", 1), target=_deployment("UPSCALING", 0, starting=1),
                       router=_deployment("HEALTHY", 1)),
               _Status(draft=_deployment("HEALTHY", 1), target=_deployment("DEPLOY_FAILED", 0),
                       router=_deployment("HEALTHY", 1))]
    health, probed = _probe(monkeypatch, answers, scale_to_zero={"target"})
    assert probed == [True, False] and health.serving is False


def test_failed_is_a_pool_with_no_running_replica_that_serve_reports_failing(monkeypatch):
    """Calls to a failed pool fail fast (``PoolCaller``); a pool still coming up, scaled to zero
    or with one replica left is not failed: its calls wait or run."""
    status = _Status(draft=_deployment("UNHEALTHY", 0, starting=1),  # its node lost: the new replica waits
                     target=_deployment("UNHEALTHY", 1), router=_deployment("UPDATING", 0, starting=1),
                     prm=_deployment("HEALTHY", 0), coordinator=_deployment("DEPLOY_FAILED", 0))
    health, _ = _probe(monkeypatch, [status], scale_to_zero={"prm"})
    assert [name for name in ("draft", "target", "router", "prm", "coordinator", "unlisted") if health.failed(name)] \
        == ["draft", "coordinator"]
    assert not PoolHealth("arbitrage", NEEDED, 2.0).failed("draft")  # before any probe: unknown, not failed


def test_a_pool_is_failed_only_once_it_has_been_failing_for_fail_fast_after_s(monkeypatch):
    """A replica restarting in place is waited for: the pool counts as failed only after it
    has been failing (no running replica, UNHEALTHY) at every answered probe for the grace."""
    from ray import serve

    import services.health as health_module

    clock = [100.0]
    monkeypatch.setattr(health_module.time, "monotonic", lambda: clock[0])
    failing = _Status(draft=_deployment("UNHEALTHY", 0, starting=1), target=_deployment("HEALTHY", 1),
                      router=_deployment("HEALTHY", 1))
    back = _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 1), router=_deployment("HEALTHY", 1))
    health = PoolHealth("arbitrage", NEEDED, 2.0, fail_fast_after_s=10.0)
    seen = []
    for at, answer in [(100.0, failing), (105.0, failing), (110.0, RuntimeError("controller restarting")),
                       (111.0, failing), (113.0, back), (114.0, failing), (125.0, failing)]:
        clock[0] = at

        def status(answer=answer):
            if isinstance(answer, Exception):
                raise answer
            return answer
        monkeypatch.setattr(serve, "status", status)
        asyncio.run(health.probe())
        seen.append(health.failed("draft"))
    # failing from 100 on: failed at 110 (the last answer stands) and 111; back at 113 resets it
    assert seen == [False, False, True, True, False, False, True]


def test_on_probe_runs_after_every_probe_even_when_the_controller_cannot_answer(monkeypatch):
    ok = _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 2), router=_deployment("HEALTHY", 1))
    health, probed = _probe(monkeypatch, [ok, RuntimeError("controller restarting"), ok])
    assert probed == [True, True, True]  # the last answer stands while the controller restarts
    assert health.statuses["target"] == "HEALTHY" and health.replicas["target"] == 2


def test_a_failing_on_probe_does_not_stop_readiness(monkeypatch):
    from ray import serve

    ok = _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 1), router=_deployment("HEALTHY", 1))
    monkeypatch.setattr(serve, "status", lambda: ok)

    def broken() -> None:
        raise ValueError("a bug in the refresh")

    health = PoolHealth("arbitrage", NEEDED, 2.0, on_probe=broken)
    asyncio.run(health.probe())
    assert health.serving is True


@pytest.mark.parametrize(("placed", "status", "max_replicas", "can"), [
    (3, "HEALTHY", 8, True),        # below its max: the autoscaler can add replicas
    (8, "HEALTHY", 8, False),       # at its max
    (6, "UPSCALING", 8, True),      # an upscale under way, room for more
    (8, "UPSCALING", 8, False),     # every replica up to the max placed, some still starting
    (1, "HEALTHY", None, False),    # fixed size (num_replicas)
    (3, "UNHEALTHY", 8, False),     # replicas failing: no capacity is coming
    (0, "DEPLOY_FAILED", 8, False),
    (0, None, 8, False),            # not listed (or no probe yet)
])
def test_can_add_replicas(placed, status, max_replicas, can):
    assert can_add_replicas(placed, status, max_replicas) is can


def test_a_replica_restarting_at_the_max_leaves_no_room_to_grow(monkeypatch):
    """A target pool at max_replicas that loses a replica (restarting: STARTING) cannot add
    capacity: the controller must keep shedding load, not stand down."""
    restarting = _Status(draft=_deployment("HEALTHY", 1), target=_deployment("UPSCALING", 3, starting=1, stopping=1),
                         router=_deployment("HEALTHY", 1))
    health, _ = _probe(monkeypatch, [restarting])
    assert health.placed["target"] == 4 and health.replicas["target"] == 3
    assert not health.can_add_replicas("target", 4) and health.can_add_replicas("target", 5)


def test_the_probe_tells_whether_the_target_pool_can_grow(monkeypatch):
    answers = [_Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 3), router=_deployment("HEALTHY", 1)),
               _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 4), router=_deployment("HEALTHY", 1))]
    health, _ = _probe(monkeypatch, answers[:1])
    assert health.can_add_replicas("target", 4) and not health.can_add_replicas("target", None)
    health, _ = _probe(monkeypatch, answers)
    assert not health.can_add_replicas("target", 4)
    assert not PoolHealth("arbitrage", NEEDED, 2.0).can_add_replicas("target", 4)  # before any probe


def _healthy() -> _Status:
    return _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY", 2), router=_deployment("HEALTHY", 1),
                   coordinator=_deployment("HEALTHY", 1))


def _restarted(**running: int) -> _Status:
    """A restarted controller's answer from its checkpoint: every deployment UPDATING, the live
    replicas it found RECOVERING until they answer it (those named in ``running`` have)."""
    sizes = {"draft": 1, "target": 2, "router": 1, "coordinator": 1}
    return _Status(**{name: _deployment("UPDATING", running.get(name, 0), recovering=n - running.get(name, 0))
                      for name, n in sizes.items()})


class _NoApp:
    """A controller that lists no application yet."""

    def __init__(self) -> None:
        self.applications: dict = {}


def test_a_restarted_controller_that_has_not_recovered_its_replicas_keeps_the_replica_serving(monkeypatch):
    """Before: after the controller's kill -9, /healthz read 503 with every pool at 0 running
    replicas for ~2 s while every request succeeded: the restarted controller answered before
    it had re-attached to the replicas, and that answer was believed."""
    catching_up = [
        _restarted(),                                     # every replica RECOVERING
        _NoApp(),                                         # the application not listed yet
        _Status(),                                        # listed, with no deployment
        _Status(draft=_deployment("UPDATING"), target=_deployment("UPDATING"),
                router=_deployment("UPDATING"), coordinator=_deployment("UPDATING")),  # no replica in any state
        _restarted(router=1, coordinator=1, target=1),    # part way: draft still RECOVERING
    ]
    health, probed = _probe(monkeypatch, [_healthy(), *catching_up, _healthy()])
    assert probed == [True] * 7
    assert health.running == {"draft": 1, "target": 2, "router": 1}
    assert health.statuses["target"] == "HEALTHY" and not health.failed("draft")


def test_after_a_controller_restart_a_pool_that_lost_its_replicas_is_not_serving_at_once(monkeypatch):
    """Keeping the last answer is for the restarted controller's first answers only: a pool
    whose replicas died (STARTING again, or none listed) while the others run is down at once."""
    lost = _Status(draft=_deployment("UNHEALTHY", 0, starting=1), target=_deployment("HEALTHY", 2),
                   router=_deployment("HEALTHY", 1), coordinator=_deployment("HEALTHY", 1))
    health, probed = _probe(monkeypatch, [_healthy(), _restarted(), lost])
    assert probed == [True, True, False] and health.running["draft"] == 0
    gone = _Status(draft=_deployment("UPDATING"), target=_deployment("UPDATING", 2), router=_deployment("UPDATING", 1),
                   coordinator=_deployment("UPDATING", 1))  # died before the controller could recover them
    health, probed = _probe(monkeypatch, [_healthy(), _restarted(), gone])
    assert probed == [True, True, False]
    scaled = _Status(draft=_deployment("HEALTHY", 1), target=_deployment("HEALTHY"), router=_deployment("HEALTHY", 1),
                     coordinator=_deployment("HEALTHY", 1))  # a scale-to-zero pool at zero still serves
    health, probed = _probe(monkeypatch, [_healthy(), _restarted(), scaled], scale_to_zero={"target"})
    assert probed == [True, True, True]


def test_answers_from_a_controller_catching_up_are_believed_after_the_grace(monkeypatch):
    """The last answer stands for ``recovery_grace_s`` of such answers in a row, then they are
    believed; with no last answer (the first probe) at once."""
    from ray import serve

    import services.health as health_module

    clock = [100.0]
    monkeypatch.setattr(health_module.time, "monotonic", lambda: clock[0])
    health = PoolHealth("arbitrage", NEEDED, 2.0)
    health.recovery_grace_s = 30.0
    seen = []
    for at, answer in [(100.0, _healthy()), (101.0, _restarted()), (120.0, _NoApp()), (130.9, _restarted()),
                       (131.0, _restarted()), (133.0, _healthy()), (140.0, _restarted())]:
        clock[0] = at
        monkeypatch.setattr(serve, "status", lambda answer=answer: answer)
        asyncio.run(health.probe())
        seen.append(health.serving)
    # believed at 131 (30 s after 101); back at 133, which starts the grace anew at 140
    assert seen == [True, True, True, True, False, True, True]
    monkeypatch.setattr(serve, "status", _restarted)
    first = PoolHealth("arbitrage", NEEDED, 2.0)
    asyncio.run(first.probe())
    assert first.serving is False
