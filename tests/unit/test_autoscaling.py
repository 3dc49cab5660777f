"""Pool autoscaling on rows (``arbitrage_common.autoscaling``): the policy's arithmetic over a fake
AutoscalingContext, the rows a pool replica reports, and the policy in the options every rendering
builds the pools from. No cluster."""
from __future__ import annotations

import asyncio
import importlib
import math
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from arbitrage_common import autoscaling as A
from arbitrage_common import config as C
from arbitrage_common.kuberay.render import serve_config_v2
from arbitrage_common.kuberay.targets import target_config, target_names
from arbitrage_common.paths import project_home


def _ctx(target: float = 8.0, replicas: int = 1, calls: float = 0.0, queued: float = 0.0,
         rows: dict | None = None, held_calls: dict | None = None, metrics: dict | None = None):
    """A fake ``AutoscalingContext``: only the fields the policy reads."""
    if metrics is None:
        metrics = {}
        if rows is not None:
            metrics[A.ROWS_METRIC] = rows
        if held_calls is not None:
            metrics[A.CALLS_METRIC] = held_calls
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=calls,
                           total_queued_requests=queued, aggregated_metrics=metrics,
                           config=SimpleNamespace(target_ongoing_requests=target))


def test_desired_replicas_are_rows_over_target():
    # Two coordinators' lanes keep 4 merged calls out, carrying 96 rows: calls alone would ask
    # for 4/8 of a replica; rows ask for 12.
    desired, state = A.rows_policy(_ctx(target=8, replicas=2, calls=4, rows={"r1": 60.0, "r2": 36.0},
                                        held_calls={"r1": 2.0, "r2": 2.0}))
    assert desired == pytest.approx(12.0) and state == {}
    assert A.rows_policy(_ctx(target=64, replicas=1, calls=1, rows={"r1": 16.0}, held_calls={"r1": 1.0}))[0] == \
        pytest.approx(0.25)


def test_calls_queued_at_handles_count_their_rows():
    # Replicas hold 2 calls of 10 rows each on average; 3 more calls wait at the handles.
    desired, _ = A.rows_policy(_ctx(target=5, calls=5, queued=3, rows={"r1": 20.0}, held_calls={"r1": 2.0}))
    assert desired == pytest.approx((20 + 3 * 10) / 5)
    # No held calls reported (old report): a queued call counts as one row at least.
    assert A.rows_policy(_ctx(target=1, calls=3, queued=3, rows={"r1": 0.0}))[0] == pytest.approx(3.0)


def test_falls_back_to_serves_call_count_without_a_row_report():
    # Cold start (no replica has reported yet) or replicas without the hook: calls / target,
    # what Serve's default policy asks for.
    for metrics in ({}, {A.ROWS_METRIC: {}}, {"other": {"r1": 5.0}}):
        assert A.rows_policy(_ctx(target=4, replicas=2, calls=10, metrics=metrics))[0] == pytest.approx(2.5)
    assert A.rows_policy(SimpleNamespace(**{**vars(_ctx(target=4, calls=10)), "aggregated_metrics": None}))[0] == \
        pytest.approx(2.5)
    # A replica that reports no rows yet still counts by its calls: never fewer rows than calls.
    assert A.rows_policy(_ctx(target=1, replicas=2, calls=6, rows={"r1": 2.0}, held_calls={"r1": 2.0}))[0] == \
        pytest.approx(6.0)


def test_zero_rows_ask_for_zero_and_zero_replicas_keep_serves_target():
    assert A.rows_policy(_ctx(target=8, replicas=3, rows={"r1": 0.0, "r2": 0.0, "r3": 0.0}))[0] == 0.0
    assert A.rows_policy(_ctx(target=8, replicas=3))[0] == 0.0
    ctx = _ctx(target=8, replicas=0, calls=0)
    ctx.target_num_replicas = 0
    assert A.rows_policy(ctx) == (0, {})


def test_through_serves_wrapper_rows_scale_where_calls_cannot():
    """The policy as Serve runs it (its wrapper adds the delays and factors; bounds come after),
    beside Serve's default on the same load: a merged pool with 16 lanes' calls and a target
    of 64 rows per replica."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config, replica_queue_length_autoscaling_policy
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=64, upscale_delay_s=0,
                               policy={"policy_function": A.POLICY_FUNCTION})
    dep = DeploymentID(name="draft", app_name="arbitrage")
    replica = ReplicaID(unique_id="r1", deployment_id=dep)

    def ctx():
        return AutoscalingContext(
            deployment_id=dep, deployment_name="draft", app_name="arbitrage", current_num_replicas=1,
            target_num_replicas=1, running_replicas=[replica], total_num_requests=16.0, total_queued_requests=0.0,
            aggregated_metrics={A.ROWS_METRIC: {replica: 16 * 40.0}, A.CALLS_METRIC: {replica: 16.0}},
            raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config)

    rows, _ = _apply_autoscaling_config(config.policy.get_policy())(ctx())  # the pickled-by-value policy
    calls, _ = _apply_autoscaling_config(replica_queue_length_autoscaling_policy)(ctx())
    assert rows == math.ceil(16 * 40 / 64) and calls == 1


def test_coordinator_replicas_count_requests_less_open_health_watches():
    # 4 requests running or queued, 3 of them watches on two replicas: 1 request of load.
    watches = {A.WATCHES_METRIC: {"c1": 2.0, "c2": 1.0}}
    assert A.requests_policy(_ctx(target=2, replicas=2, calls=4, metrics=watches)) == (0.5, {})
    # Watches alone ask for nothing (Serve then holds min_replicas); no report yet: Serve's count.
    assert A.requests_policy(_ctx(target=2, replicas=2, calls=3, metrics=watches))[0] == 0.0
    assert A.requests_policy(_ctx(target=2, replicas=1, calls=4, metrics={}))[0] == pytest.approx(2.0)
    assert A.requests_policy(SimpleNamespace(**{**vars(_ctx(target=2, calls=4)), "aggregated_metrics": None}))[0] \
        == pytest.approx(2.0)
    ctx = _ctx(target=2, replicas=0, calls=5)
    ctx.target_num_replicas = 0
    assert A.requests_policy(ctx) == (0, {})  # Serve's cold start scales up from zero


def test_through_serves_wrapper_idle_watches_hold_no_coordinator_replica():
    """What the live probe measured (docs/SERVING.md, "Autoscaling on rows"): four idle Watch
    streams on a coordinator with target 2 asked Serve's default policy for 2 replicas; the
    requests policy asks for the minimum."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config, replica_queue_length_autoscaling_policy
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=0,
                               policy={"policy_function": A.REQUESTS_POLICY_FUNCTION})
    dep = DeploymentID(name="coordinator", app_name="arbitrage")
    replica = ReplicaID(unique_id="c1", deployment_id=dep)
    ctx = AutoscalingContext(
        deployment_id=dep, deployment_name="coordinator", app_name="arbitrage", current_num_replicas=1,
        target_num_replicas=1, running_replicas=[replica], total_num_requests=4.0, total_queued_requests=0.0,
        aggregated_metrics={A.WATCHES_METRIC: {replica: 4.0}}, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=2, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=config)
    ours, _ = _apply_autoscaling_config(config.policy.get_policy())(ctx)
    serves, _ = _apply_autoscaling_config(replica_queue_length_autoscaling_policy)(ctx)
    assert ours == 1 and serves == 2


def test_held_rows_are_time_means_between_samples():
    now = [0.0]
    held = A.HeldRows(clock=lambda: now[0])
    with held.hold(10):
        now[0] = 1.0
        with held.hold(30):
            assert (held.rows, held.calls) == (40, 2)
            now[0] = 2.0
        now[0] = 3.0
    now[0] = 4.0
    # 0-1: 10 rows; 1-2: 40; 2-3: 10; 3-4: 0 -> 60 row-seconds over 4 s; calls 1+2+1+0 = 4 over 4 s
    assert held.sample() == {A.ROWS_METRIC: 15.0, A.CALLS_METRIC: 1.0}
    assert (held.rows, held.calls) == (0, 0)
    now[0] = 6.0
    assert held.sample() == {A.ROWS_METRIC: 0.0, A.CALLS_METRIC: 0.0}  # a new window
    with held.hold(5):
        assert held.sample() == {A.ROWS_METRIC: 5.0, A.CALLS_METRIC: 1.0}  # no time passed: the value now


def test_a_call_that_fails_stops_counting():
    held = A.HeldRows()
    with pytest.raises(RuntimeError), held.hold(3):
        raise RuntimeError("dead engine")
    assert (held.rows, held.calls) == (0, 0)


def test_pool_replicas_count_the_rows_of_merged_calls():
    from services import pools

    seen = []

    def fake(cls):
        pool = object.__new__(cls)
        pool._stats, pool._held, pool.cached = {"calls": 0}, A.HeldRows(), False
        return pool

    scorer = fake(pools.ScorerPool)

    async def score(items, session):
        seen.append((scorer._held.rows, scorer._held.calls))
        await asyncio.sleep(0)
        return [0.0] * len(items)

    scorer._score = score
    assert asyncio.run(scorer.score_rows([["a", "b"], ["c"]], [None, None])) == [[0.0, 0.0], [0.0]]
    assert seen == [(3, 1), (3, 1)] and (scorer._held.rows, scorer._held.calls) == (0, 0)
    stats = asyncio.run(scorer.record_autoscaling_stats())
    assert set(stats) == {A.ROWS_METRIC, A.CALLS_METRIC} and all(isinstance(v, float) for v in stats.values())

    generator, seen = fake(pools.GeneratorPool), []

    async def generate(prefixes, options, session, ahead):
        seen.append(generator._held.rows)
        return [None] * len(prefixes)

    generator._generate_ahead = generate
    asyncio.run(generator.generate_rows([["p1", "p2"], ["p3"], ["p4"]], [None] * 3))
    asyncio.run(generator.generate(["p5"], None))
    assert seen == [4, 4, 4, 1] and generator._held.rows == 0


def _options(cfg: C.AppConfig) -> dict:
    return {role: cfg.pool_options(role) for role, _ in cfg.pools.configured()}


@pytest.mark.parametrize("name", target_names())
def test_every_rendering_autoscales_merged_pools_on_rows(name):
    """The RayService's serveConfigV2 (and so the Serve YAML: the same args) builds every
    autoscaling pool with the rows policy, whose import path resolves; an autoscaling
    coordinator with the requests policy (its open health watches are no load)."""
    serve_config = yaml.safe_load(serve_config_v2(target_config(name)))
    cfg = C.application_config(serve_config["applications"][0])
    assert cfg.coordinator.merge_calls
    autoscaled = {role: opts for role, opts in _options(cfg).items() if "autoscaling_config" in opts}
    assert autoscaled
    for opts in autoscaled.values():
        assert opts["autoscaling_config"]["policy"] == {"policy_function": A.POLICY_FUNCTION}
        assert "load_metric" not in opts["autoscaling_config"]
    module, _, function = A.POLICY_FUNCTION.partition(":")
    assert getattr(importlib.import_module(module), function) is A.rows_policy
    coordinator = cfg.coordinator.deployment_options("coordinator")
    if "autoscaling_config" in coordinator:  # the coordinator: requests less its health watches
        assert coordinator["autoscaling_config"]["policy"] == {"policy_function": A.REQUESTS_POLICY_FUNCTION}
        (rendered,) = [d for d in serve_config["applications"][0]["deployments"] if d["name"] == "coordinator"]
        assert rendered["autoscaling_config"]["policy"] == {"policy_function": A.REQUESTS_POLICY_FUNCTION}
    module, _, function = A.REQUESTS_POLICY_FUNCTION.partition(":")
    assert getattr(importlib.import_module(module), function) is A.requests_policy


def test_ray_serve_accepts_the_options():
    from ray import serve
    from ray.serve.config import AutoscalingConfig

    cfg = C.load_config(project_home() / "configs" / "gpu-example.yaml")
    for opts in _options(cfg).values():
        config = AutoscalingConfig(**opts["autoscaling_config"])
        assert config.policy.policy_function == A.POLICY_FUNCTION and not config.policy.is_default_policy_function()
        assert config.policy.get_policy()(_ctx(target=2, rows={"r": 6.0}))[0] == pytest.approx(3.0)

        class Probe:
            pass

        serve.deployment(Probe, **opts)


def test_load_metric_chooses_the_policy():
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}

    def app(load_metric=None, merge=True, **auto_kw):
        pool = C.PoolSpec(model=C.ModelSpec(path="m"), autoscaling_config={**auto, **auto_kw,
                                                                          "load_metric": load_metric})
        return C.AppConfig(pools=C.PoolsSpec(draft=pool, target=C.PoolSpec(model=C.ModelSpec(path="m"))),
                           policy=C.PolicySpec(default="draft"), coordinator=C.CoordinatorSpec(merge_calls=merge))

    def policy(cfg):
        return cfg.pool_options("draft")["autoscaling_config"].get("policy")

    assert policy(app()) == {"policy_function": A.POLICY_FUNCTION}
    assert policy(app(merge=False)) is None  # one call per step: Serve's default counts steps already
    assert policy(app("calls")) is None
    assert policy(app("rows", merge=False)) == {"policy_function": A.POLICY_FUNCTION}
    assert "autoscaling_config" not in app().pool_options("target")  # fixed replicas: no autoscaler
    # Unset, it is left out of renderings (they stay as they were); set, it round-trips.
    # (The replica fields ride in the coordinator's user_config: AppConfig.scaling.)
    def scaling(cfg):
        (coordinator,) = [d for d in C.render_serve_config(cfg)["applications"][0]["deployments"]
                          if d["name"] == C.COORDINATOR]
        return coordinator["user_config"]["scaling"]["draft"]["autoscaling_config"]

    assert "load_metric" not in scaling(app()) and scaling(app("calls"))["load_metric"] == "calls"
    rendered = C.render_serve_config(app("calls"))["applications"][0]
    assert C.application_config(rendered).pools.draft.autoscaling_config.load_metric == "calls"
    with pytest.raises(ValidationError, match="load_metric"):
        C.CoordinatorSpec(autoscaling_config={**auto, "load_metric": "rows"})
    with pytest.raises(ValidationError, match="load_metric"):
        C.AutoscalingSpec(load_metric="tokens")
