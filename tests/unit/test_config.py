"""AppConfig: validation, defaults, and one config rendered many ways."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from arbitrage_common import config as C

ROOT = Path(__file__).resolve().parents[2]


def _pool(**kw):
    return C.PoolSpec(model=C.ModelSpec(path="models/draft"), **kw)


def _app(**kw):
    return C.AppConfig(pools=C.PoolsSpec(draft=_pool(), target=_pool(), router=_pool(), prm=_pool()), **kw)


def test_config_module_imports_no_engine():
    code = ("import sys, arbitrage_common.config as c; c.render_serve_config(c.default_config()); "
            "bad = [m for m in ('ray', 'torch', 'transformers', 'vllm') if m in sys.modules]; "
            "assert not bad, bad")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_field_has_a_description():
    missing = []

    def walk(model: type[BaseModel]):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg)

    walk(C.AppConfig)
    assert not missing


def test_default_points_at_bundled_models_and_ports():
    cfg = C.default_config()
    assert {role: Path(spec.model.path).name for role, spec in cfg.pools.configured()} == \
        {"draft": "draft", "target": "target", "router": "router", "prm": "prm"}
    assert all(spec.model.backend == "transformers" for _, spec in cfg.pools.configured())
    assert (cfg.http.port, cfg.grpc.port) == (8000, 9000)
    assert cfg.resolve_path("models/draft") == str((ROOT / "models" / "draft").resolve())


def test_shipped_local_config_is_the_embedded_default():
    assert C.load_config(ROOT / "configs" / "local-cpu.yaml") == C.default_config().model_copy(update={"base_dir": None})


def test_gpu_example_is_gpu_shaped():
    cfg = C.load_config(ROOT / "configs" / "gpu-example.yaml")
    assert cfg.pools.target.ray_actor_options.num_gpus == 1
    assert all(spec.autoscaling_config is not None for _, spec in cfg.pools.configured())
    assert cfg.http.host == "0.0.0.0"


def test_rendered_serve_yaml_equals_rendering_the_app_config():
    cfg = C.load_config(ROOT / "configs" / "local-cpu.yaml")
    shipped = yaml.safe_load((ROOT / "configs" / "serve-local-cpu.yaml").read_text())
    assert shipped == C.render_serve_config(cfg)
    assert yaml.safe_load(C.render_serve_yaml(cfg)) == shipped


def test_rendering_round_trips_through_args():
    cfg = C.load_config(ROOT / "configs" / "gpu-example.yaml")
    rendered = C.render_serve_config(cfg)
    app = rendered["applications"][0]
    assert app["import_path"] == "services.app:build_app"
    assert C.application_config(app) == cfg
    # The pools' batching knobs are deployment overrides, changed in place: the args (whose hash is
    # the code version of every deployment) do not change with them.
    data = cfg.model_dump(mode="json")
    data["pools"]["draft"]["max_batch_size"], data["pools"]["target"]["batch_wait_timeout_s"] = 7, 0.25
    faster = C.AppConfig.model_validate(data)
    moved = C.render_serve_config(faster)["applications"][0]
    assert moved["args"] == app["args"] and moved["deployments"] != app["deployments"]
    assert C.application_config(moved) == faster
    assert {d["name"]: d["user_config"].get("max_batch_size") for d in moved["deployments"]}["draft"] == 7
    # So are every deployment's replica fields: Serve resizes in place, and the coordinator's
    # user_config (its reconfigure) carries them for its lanes.
    data = cfg.model_dump(mode="json")
    data["pools"]["target"]["autoscaling_config"]["max_replicas"] += 3
    data["coordinator"]["autoscaling_config"] = None
    data["coordinator"]["num_replicas"] = 3
    scaled = C.AppConfig.model_validate(data)
    moved = C.render_serve_config(scaled)["applications"][0]
    assert moved["args"] == app["args"] and C.application_config(moved) == scaled
    by_name = {d["name"]: d for d in moved["deployments"]}
    assert by_name["target"]["autoscaling_config"]["max_replicas"] == \
        cfg.pools.target.autoscaling_config.max_replicas + 3
    assert by_name["coordinator"]["num_replicas"] == 3 and "autoscaling_config" not in by_name["coordinator"]
    assert by_name["coordinator"]["user_config"]["scaling"]["target"]["autoscaling_config"]["max_replicas"] == \
        by_name["target"]["autoscaling_config"]["max_replicas"]
    assert rendered["grpc_options"]["port"] == 9000 and rendered["http_options"]["port"] == 8000
    assert "services.proxy_status.add_arbitrage_service" in \
        rendered["grpc_options"]["grpc_servicer_functions"]


def test_batch_size_needs_enough_ongoing_requests():
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        _pool(max_ongoing_requests=4, max_batch_size=8)
    assert _pool(max_ongoing_requests=8, max_batch_size=8).max_batch_size == 8


def test_shared_call_slots_need_merged_calls():
    with pytest.raises(ValidationError, match="pool_calls_in_flight"):
        C.CoordinatorSpec(merge_calls=False, pool_calls_in_flight=2)
    with pytest.raises(ValidationError, match="pool_calls_in_flight"):
        C.CoordinatorSpec(pool_calls_in_flight=0)
    assert C.CoordinatorSpec(pool_calls_in_flight=2).pool_calls_in_flight == 2


def test_replicas_and_autoscaling_are_exclusive():
    with pytest.raises(ValidationError, match="not both"):
        _pool(num_replicas=2, autoscaling_config=C.AutoscalingSpec())
    with pytest.raises(ValidationError, match="min_replicas"):
        C.AutoscalingSpec(min_replicas=3, max_replicas=2)


def test_deployment_options():
    pool = _pool(autoscaling_config=C.AutoscalingSpec(min_replicas=1, max_replicas=4),
                 ray_actor_options=C.ActorOptionsSpec(num_cpus=0, num_gpus=0.5), max_queued_requests=10)
    opts = pool.deployment_options("draft")
    assert opts["name"] == "draft" and "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0.5}
    assert opts["max_queued_requests"] == 10
    assert opts["user_config"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}
    assert opts["logging_config"] == {"enable_access_log": False}
    assert _pool().deployment_options("x")["num_replicas"] == 1
    # Pools: a hung replica (its event loop silent for 10 s) is replaced after 3 missed checks.
    assert (opts["health_check_period_s"], opts["health_check_timeout_s"]) == (5.0, 10.0)
    coordinator = C.default_config().coordinator.deployment_options("coordinator")
    assert (coordinator["health_check_period_s"], coordinator["health_check_timeout_s"]) == (10.0, 30.0)
    tuned = _pool(health_check_period_s=2.0, health_check_timeout_s=4.0).deployment_options("x")
    assert (tuned["health_check_period_s"], tuned["health_check_timeout_s"]) == (2.0, 4.0)


def test_policy_defaults_are_validated():
    with pytest.raises(ValidationError, match="policy"):
        C.PolicySpec(default="nope")
    with pytest.raises(ValidationError, match="threshold"):
        C.PolicySpec(default="arbitrage", threshold=2.0)
    assert C.PolicySpec(default="oracle", threshold=-0.5).threshold == -0.5


def test_default_policy_needs_its_pool():
    pools = C.PoolsSpec(draft=_pool(), target=_pool())
    with pytest.raises(ValidationError, match="router"):
        C.AppConfig(pools=pools)
    assert C.AppConfig(pools=pools, policy=C.PolicySpec(default="draft")).pools.router is None


def test_limits():
    with pytest.raises(ValidationError, match="default_max_steps"):
        C.LimitsSpec(max_steps=4, default_max_steps=8)
    with pytest.raises(ValidationError):
        C.LimitsSpec(request_timeout_s=0)


def test_limits_defaults_stay_within_their_limits_and_name_the_field():
    """A default above its limit is refused from one past the edge, naming the default; the
    edge itself is accepted. The in-flight cap of step pipelining needs step pipelining."""
    with pytest.raises(ValidationError, match="default_max_steps must be <= max_steps"):
        C.LimitsSpec(max_steps=4, default_max_steps=5)
    assert C.LimitsSpec(max_steps=4, default_max_steps=4).default_max_steps == 4
    with pytest.raises(ValidationError, match="default_max_new_tokens must be <= max_new_tokens"):
        C.LimitsSpec(max_new_tokens=8, default_max_new_tokens=9)
    assert C.LimitsSpec(max_new_tokens=8, default_max_new_tokens=8).default_max_new_tokens == 8
    with pytest.raises(ValidationError, match="step_pipelining_max_inflight needs step_pipelining"):
        C.LimitsSpec(step_pipelining_max_inflight=2)
    assert C.LimitsSpec(step_pipelining=True, step_pipelining_max_inflight=2).step_pipelining_max_inflight == 2


def test_unknown_fields_and_backends_are_rejected():
    with pytest.raises(ValidationError):
        C.ModelSpec(path="x", backend="onnx")
    with pytest.raises(ValidationError):
        C.AppConfig.model_validate({**_app().model_dump(), "typo": 1})


def test_resolve_path_uses_base_dir(tmp_path):
    cfg = _app(base_dir=str(tmp_path))
    assert cfg.resolve_path("models/x") == str(tmp_path / "models" / "x")
    assert cfg.resolve_path("/abs/y") == "/abs/y"


def test_prompt_template_must_name_the_problem_and_reaches_requests():
    with pytest.raises(ValidationError, match="must contain {problem}"):
        _app(prompt={"template": "no placeholder"})
    from services.validation import RequestFields, prepare

    cfg = _app(prompt={"template": "Q: {problem}\nA:\n"})
    assert prepare(RequestFields(prompt="3 + 4", policy="draft"), cfg).request.prompt_template == "Q: {problem}\nA:\n"


def test_vllm_engine_args_and_placement_are_validated():
    with pytest.raises(ValidationError, match="engine: only for backend 'vllm'"):
        C.ModelSpec(path="m", engine={"max_model_len": 512})
    tp2 = {"path": "m", "backend": "vllm", "engine": {"tensor_parallel_size": 2}}
    with pytest.raises(ValidationError, match="tensor_parallel_size=2 needs placement_group_bundles"):
        C.PoolSpec(model=tp2)
    pool = C.PoolSpec(model=tp2, placement_group_bundles=[{"CPU": 1, "GPU": 1}, {"GPU": 1}],
                      placement_group_strategy="STRICT_PACK")
    opts = pool.deployment_options("target")
    assert opts["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}, {"GPU": 1}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    with pytest.raises(ValidationError, match="'uni' runs one worker: tensor_parallel_size=2 needs None"):
        C.EngineSpec(tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValidationError, match="distributed_executor_backend"):
        C.EngineSpec(distributed_executor_backend="ray")
    assert C.EngineSpec(tensor_parallel_size=2, distributed_executor_backend="mp").distributed_executor_backend == "mp"
    with pytest.raises(ValidationError, match="pools.prm.model.backend"):
        C.AppConfig(pools={"draft": _pool(), "target": _pool(), "prm": {"model": {"path": "p", "backend": "vllm"}}},
                    policy={"default": "rsd"})
