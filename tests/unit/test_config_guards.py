"""AppConfig guards of issue #11: drain time vs request deadline, size limits, auth, and the
KubeRay rendering of the API key Secret."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from arbitrage_common import config as C
from arbitrage_common.kuberay.render import auth_secret_env, render_rayservice

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/presets/*.yaml")])


def _pools():
    pool = C.PoolSpec(model=C.ModelSpec(path="models/draft"))
    return C.PoolsSpec(draft=pool, target=pool, router=pool, prm=pool)


def test_a_coordinator_that_drains_faster_than_a_request_may_run_is_refused():
    with pytest.raises(ValidationError, match=r"coordinator\.graceful_shutdown_timeout_s \(30\) must be >= "
                                              r"limits\.request_timeout_s \(60\)"):
        C.AppConfig(pools=_pools(), coordinator=C.CoordinatorSpec(graceful_shutdown_timeout_s=30))
    with pytest.raises(ValidationError, match="graceful_shutdown_timeout_s"):
        C.AppConfig(pools=_pools(), limits=C.LimitsSpec(request_timeout_s=301))
    ok = C.AppConfig(pools=_pools(), coordinator=C.CoordinatorSpec(graceful_shutdown_timeout_s=60))
    assert ok.coordinator.graceful_shutdown_timeout_s == ok.limits.request_timeout_s  # equal is enough


def test_the_default_drain_covers_the_longest_bundled_deadline():
    assert C.CoordinatorSpec().graceful_shutdown_timeout_s >= 300
    assert C.default_config().coordinator.deployment_options("coordinator")["graceful_shutdown_timeout_s"] >= \
        C.default_config().limits.request_timeout_s
    assert C.PoolSpec(model=C.ModelSpec(path="m")).graceful_shutdown_timeout_s == 10.0  # pools serve short steps


@pytest.mark.parametrize("path", BUNDLED, ids=[p.name for p in BUNDLED])
def test_every_bundled_config_validates(path):
    if path.name.startswith("serve-"):  # a rendered Serve config: its app's args are the AppConfig
        data = C.application_config(yaml.safe_load(path.read_text())["applications"][0])
    else:
        data = C.load_config(path)
    assert data.coordinator.graceful_shutdown_timeout_s >= data.limits.request_timeout_s


def test_size_limits_default_to_one_mib_and_must_be_positive():
    limits = C.LimitsSpec()
    assert limits.max_body_bytes == 1024 * 1024 == limits.max_grpc_message_bytes
    for field in ("max_body_bytes", "max_grpc_message_bytes"):
        with pytest.raises(ValidationError, match=field):
            C.LimitsSpec(**{field: 0})


def test_auth_is_off_by_default_and_names_a_variable():
    assert C.default_config().auth.api_key_env is None
    cfg = C.AppConfig(pools=_pools(), auth=C.AuthSpec(api_key_env="ARBITRAGE_API_KEYS"))
    assert C.render_serve_config(cfg)["applications"][0]["args"]["auth"] == \
        {"api_key_env": "ARBITRAGE_API_KEYS", "k8s_secret": None}  # the variable's name travels, never a key


def _containers(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


def test_kuberay_pods_get_the_key_variable_from_a_secret_only_with_auth():
    base = C.load_config(ROOT / "configs" / "cpu-demo.yaml")
    assert auth_secret_env(base) == []
    proxy_grpc = {"name": "RAY_SERVE_PROXY_USE_GRPC", "value": "1"}  # every Pod: proxy -> coordinator over gRPC
    no_gpu = {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}  # cpu-demo: no Pod has a GPU limit
    drain = {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "330"}  # the coordinator group's
    pool_drain = {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "30"}  # the pool groups' (Ray's)
    containers = _containers(render_rayservice(base))  # head, draft, target, scorers, coordinator
    assert [c["env"] for c in containers] == \
        [[proxy_grpc, no_gpu]] + [[proxy_grpc, no_gpu, pool_drain]] * 3 + [[proxy_grpc, no_gpu, drain]]

    secured = base.model_copy(update={"auth": C.AuthSpec(api_key_env="ARBITRAGE_API_KEYS")})
    expected = [{"name": "ARBITRAGE_API_KEYS",
                 "valueFrom": {"secretKeyRef": {"name": f"{base.name}-api-keys", "key": "ARBITRAGE_API_KEYS"}}}]
    containers = _containers(render_rayservice(secured))
    assert [c["env"] for c in containers] == \
        [[proxy_grpc, no_gpu, *expected]] + [[proxy_grpc, no_gpu, pool_drain, *expected]] * 3 \
        + [[proxy_grpc, no_gpu, drain, *expected]]

    named = base.model_copy(update={"auth": C.AuthSpec(api_key_env="K", k8s_secret="prod-keys")})
    assert auth_secret_env(named)[0]["valueFrom"]["secretKeyRef"] == {"name": "prod-keys", "key": "K"}


def test_prefix_cache_size_travels_to_the_replicas_and_is_refused_on_vllm():
    pools = _pools()
    router = pools.router.model_copy(update={"model": pools.router.model.model_copy(update={"prefix_cache_mb": 64})})
    draft = pools.draft.model_copy(update={"model": pools.draft.model.model_copy(update={"prefix_cache_mb": 8})})
    cfg = C.AppConfig(pools=pools.model_copy(update={"router": router, "draft": draft}))
    args = C.render_serve_config(cfg)["applications"][0]["args"]
    assert args["pools"]["router"]["model"]["prefix_cache_mb"] == 64
    assert args["pools"]["draft"]["model"]["prefix_cache_mb"] == 8
    assert C.default_config().pools.prm.model.prefix_cache_mb is None  # the backend's default bound
    with pytest.raises(ValidationError, match="prefix_cache_mb"):
        C.ModelSpec(path="m", prefix_cache_mb=-1)
    with pytest.raises(ValidationError, match="prefix_cache_mb: not for backend 'vllm'"):
        C.ModelSpec(path="m", backend="vllm", prefix_cache_mb=8)


# -- the name is the RayService's metadata.name ------------------------------------------------
@pytest.mark.parametrize("name", ["Arbitrage_Demo", "arbitrage_demo", "Arbitrage", "9lives", "-arbitrage",
                                  "arbitrage-", "arbitrage.demo", "", "a" * 48])
def test_a_name_kuberay_refuses_is_refused_naming_the_field(name):
    with pytest.raises(ValidationError) as exc:
        C.AppConfig(name=name, pools=_pools())
    (err,) = exc.value.errors()
    assert err["loc"] == ("name",) and "DNS-1035 label of at most 47 characters" in err["msg"]


@pytest.mark.parametrize("name", ["arbitrage", "a", "arbitrage-qwen-math-1-5b-7b", "a" * 47, "x9-y"])
def test_dns_1035_names_of_up_to_47_characters_are_accepted(name):
    assert C.AppConfig(name=name, pools=_pools()).name == name


def test_config_check_and_k8s_render_refuse_a_bad_name(tmp_path):
    import subprocess
    import sys

    from arbitrage_common.cli.config_cmd import check_file

    data = C.load_config(ROOT / "configs" / "cpu-demo.yaml").model_dump(mode="json")
    data["name"] = "Arbitrage_Demo"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = check_file(bad)
    assert not result["ok"] and any(e.startswith("name: 'Arbitrage_Demo' is not a DNS-1035 label")
                                    for e in result["errors"]), result["errors"]
    out = tmp_path / "k8s"
    proc = subprocess.run([sys.executable, "-m", "arbitrage_common.cli", "k8s", "render", "--config", str(bad),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "name" in proc.stderr and "DNS-1035" in proc.stderr, proc.stderr
    assert not out.exists()


# -- values Ray or KubeRay would refuse later, refused here naming the field ----------------
def _cpu_demo() -> dict:
    return C.load_config(ROOT / "configs" / "cpu-demo.yaml").model_dump(mode="json")


def _field_errors(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as exc:
        C.AppConfig.model_validate(data)
    return C.validation_problems(exc.value)


@pytest.mark.parametrize("where", ["pools.draft", "coordinator"])
@pytest.mark.parametrize("queued", [0, -2])
def test_a_queue_bound_ray_serve_refuses_is_refused_naming_the_field(where, queued):
    data = _cpu_demo()
    section = data["coordinator"] if where == "coordinator" else data["pools"]["draft"]
    section["max_queued_requests"] = queued
    (field, message), = _field_errors(data)
    assert field == f"{where}.max_queued_requests" and "-1 (no limit) or at least 1" in message


@pytest.mark.parametrize("queued", [-1, 1, 256])
def test_unbounded_and_positive_queue_bounds_are_accepted(queued):
    data = _cpu_demo()
    data["pools"]["draft"]["max_queued_requests"] = queued
    assert C.AppConfig.model_validate(data).pools.draft.deployment_options("draft")["max_queued_requests"] == queued


@pytest.mark.parametrize("section", ["http", "grpc"])
@pytest.mark.parametrize("port,name", [(8080, "metrics"), (8265, "dashboard"), (6379, "gcs-server"),
                                       (10001, "client"), (52365, "dashboard-agent")])
def test_a_proxy_port_on_one_of_rays_fixed_ports_is_refused(section, port, name):
    data = _cpu_demo()
    data[section]["port"] = port
    (field, message), = _field_errors(data)
    assert field == f"{section}.port" and f"{port} is Ray's {name} port" in message


@pytest.mark.parametrize("namespace", ["Bad_NS", "serving.prod", "-serving", "serving-", "a" * 64, ""])
def test_the_namespace_must_be_a_dns_1123_label(namespace):
    data = _cpu_demo()
    data["cluster"]["namespace"] = namespace
    (field, message), = _field_errors(data)
    assert field == "cluster.namespace" and "DNS-1123 label" in message


@pytest.mark.parametrize("namespace", ["serving", "a", "9serving", "team-a-1", "a" * 63])
def test_dns_1123_namespaces_are_accepted(namespace):
    data = _cpu_demo()
    data["cluster"]["namespace"] = namespace
    assert C.AppConfig.model_validate(data).cluster.namespace == namespace


@pytest.mark.parametrize("group", ["head", "draft", "coordinator"])
@pytest.mark.parametrize("memory", ["100", "1m", "1e3", "63Mi", "0.05Gi"])
def test_pod_memory_below_the_floor_is_refused_naming_the_field(group, memory):
    data = _cpu_demo()
    data["cluster"][group]["memory"] = memory
    (field, message), = _field_errors(data)
    assert field == f"cluster.{group}.memory" and "at least 64Mi" in message


@pytest.mark.parametrize("gpus", [1, 4])
def test_the_coordinator_group_takes_no_gpus(gpus):
    data = _cpu_demo()
    data["cluster"]["coordinator"]["gpus"] = gpus
    (field, message), = _field_errors(data)
    assert field == "cluster.coordinator.gpus" and "CPU only" in message
    data["cluster"]["coordinator"]["gpus"] = 0
    assert C.AppConfig.model_validate(data).cluster.coordinator.gpus == 0


@pytest.mark.parametrize("probe", [0.0, 1e-9, 0.05])
def test_a_health_probe_faster_than_the_floor_is_refused(probe):
    data = _cpu_demo()
    data["coordinator"]["health_probe_s"] = probe
    (field, _), = _field_errors(data)
    assert field == "coordinator.health_probe_s"
    data["coordinator"]["health_probe_s"] = C.MIN_HEALTH_PROBE_S
    assert C.AppConfig.model_validate(data).coordinator.health_probe_s == 0.1


@pytest.mark.parametrize("resources,text", [({"CPU": 1}, "use num_cpus"), ({"gpu": 1}, "use num_cpus"),
                                            ({"pool_draft": -1}, "not an amount")])
def test_actor_resources_hold_custom_resources_only(resources, text):
    data = _cpu_demo()
    data["pools"]["draft"]["ray_actor_options"]["resources"] = resources
    (field, message), = _field_errors(data)
    assert field == "pools.draft.ray_actor_options.resources" and text in message


def test_bundle_keys_that_miscase_rays_own_resources_are_refused():
    data = _cpu_demo()
    data["pools"]["target"]["ray_actor_options"] = {"num_cpus": 0}
    data["pools"]["target"]["placement_group_bundles"] = [{"cpu": 1, "gpu": 1}]
    (field, message), = _field_errors(data)
    assert field == "pools.target.placement_group_bundles" and "cpu: not Ray's 'CPU'" in message
    data["pools"]["target"]["placement_group_bundles"] = [{"CPU": 1, "pool_target": 1}]
    assert C.AppConfig.model_validate(data).pools.target.placement_group_bundles == [{"CPU": 1, "pool_target": 1}]


def test_the_coordinators_queue_is_bounded_by_default_so_overload_is_answered():
    """Unbounded, overload would only lengthen the proxies' queue (timeout_s starts when a
    coordinator replica takes a request), never answer RESOURCE_EXHAUSTED / 503."""
    options = C.default_config().coordinator.deployment_options("coordinator")
    assert options["max_queued_requests"] >= 1
    assert C.default_config().pools.draft.deployment_options("draft")["max_queued_requests"] == -1  # the pools'
    # callers are the coordinator's merged calls, which retry a full pool themselves


@pytest.mark.parametrize("role", ["draft", "target"])
@pytest.mark.parametrize("field,value", [("annotate_history", True), ("annotate_history", False), ("device", "cpu"),
                                         ("device", "cuda")])
def test_scorer_only_model_fields_are_refused_on_a_generator_pool(role, field, value):
    generator = C.PoolSpec(model=C.ModelSpec(path="models/draft", **{field: value}))
    pools = _pools().model_copy(update={role: generator})
    with pytest.raises(ValidationError, match=rf"pools\.{role}\.model\.{field}: only router and PRM pools"):
        C.AppConfig(pools=pools)
    scorer = C.PoolSpec(model=C.ModelSpec(path="models/router", **{field: value}))
    assert getattr(C.AppConfig(pools=_pools().model_copy(update={"router": scorer})).pools.router.model, field) == value


@pytest.mark.parametrize("name", ["target", "arbitrage", "draft"])
def test_a_served_model_name_that_is_a_policy_name_is_refused(name):
    with pytest.raises(ValidationError, match=rf"served_model_name\n.*'{name}' is a policy name"):
        C.AppConfig(pools=_pools(), served_model_name=name)
    assert C.AppConfig(pools=_pools(), served_model_name="math-reasoner").served_model_name == "math-reasoner"
