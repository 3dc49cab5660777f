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
        data = C.AppConfig.model_validate(yaml.safe_load(path.read_text())["applications"][0]["args"])
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
    containers = _containers(render_rayservice(base))
    assert len(containers) == 5 and all(c["env"] == [proxy_grpc] for c in containers)

    secured = base.model_copy(update={"auth": C.AuthSpec(api_key_env="ARBITRAGE_API_KEYS")})
    expected = [{"name": "ARBITRAGE_API_KEYS",
                 "valueFrom": {"secretKeyRef": {"name": f"{base.name}-api-keys", "key": "ARBITRAGE_API_KEYS"}}}]
    containers = _containers(render_rayservice(secured))
    assert len(containers) == 5 and all(c["env"] == [proxy_grpc, *expected] for c in containers)

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
