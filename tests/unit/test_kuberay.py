"""KubeRay rendering as pure logic: Pod packing, worker-group bounds, pinning, bad input."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from arbitrage_common import config as C
from arbitrage_common.kuberay.render import (
    DELETION_MARGIN_S,
    DRAIN_MARGIN_S,
    SERVE_PORT_NAMES,
    cluster_app_config,
    render_kustomize,
    render_rayservice,
)
from arbitrage_common.kuberay.sizing import Demand, SizingError, group_sizes, pods_needed
from arbitrage_common.kuberay.spec import DASHBOARD_AGENT_PORT, GROUP_LABEL
from arbitrage_common.kuberay.targets import target_config, target_names
from arbitrage_common.presets import ModelPathError, check_pool_model

ROOT = Path(__file__).resolve().parents[2]


def _d(gpus: float, cpus: float = 1.0) -> Demand:
    return Demand("draft", cpus, gpus, "ray_actor_options.num_gpus")


@pytest.mark.parametrize("demands,cpus,gpus,pods", [
    ([_d(0.5)] * 3, 8, 1, 2),                 # two halves share a GPU
    ([_d(0.75), _d(0.5)], 8, 1, 2),           # a fraction never spans two GPUs
    ([_d(0.75), _d(0.5)], 8, 2, 1),
    ([_d(0.25)] * 8, 8, 2, 1),
    ([_d(2)] * 3, 8, 2, 3),                    # tensor parallel 2: one replica per 2-GPU Pod
    ([_d(1)] * 4, 8, 2, 2),
    ([_d(0, cpus=1)] * 5, 2, 0, 3),            # CPU-only: CPUs bound the Pod
    ([_d(0, cpus=0)] * 5, 2, 0, 1),            # replicas that reserve nothing share one Pod
    ([], 2, 1, 0),
])
def test_pods_needed_packs_like_ray_places(demands, cpus, gpus, pods):
    assert pods_needed(demands, cpus, gpus) == pods


def _pool(gpus: float | None = None, lo: int = 1, hi: int = 4, initial: int | None = None, **kw) -> C.PoolSpec:
    return C.PoolSpec(model=C.ModelSpec(path="m"), ray_actor_options=C.ActorOptionsSpec(num_cpus=1, num_gpus=gpus),
                      autoscaling_config=C.AutoscalingSpec(min_replicas=lo, max_replicas=hi,
                                                           initial_replicas=initial), **kw)


def _cfg(**cluster) -> C.AppConfig:
    return C.AppConfig(pools=C.PoolsSpec(draft=_pool(0.5, 1, 4), target=_pool(1, 1, 8), router=_pool(0.25, 1, 4),
                                         prm=_pool(0.25, 0, 2, initial=1)),
                       coordinator=C.CoordinatorSpec(num_replicas=3, ray_actor_options=C.ActorOptionsSpec(num_cpus=1)),
                       cluster=cluster)


def test_group_bounds_follow_the_pools_autoscaling_and_gpus_per_replica():
    sizes = {g.name: g for g in group_sizes(_cfg())}
    assert (sizes["draft"].gpus, sizes["draft"].min_pods, sizes["draft"].max_pods) == (1, 1, 2)  # 2 halves a GPU
    assert (sizes["target"].gpus, sizes["target"].min_pods, sizes["target"].max_pods) == (1, 1, 8)
    # router (1..4) and PRM (0..2, 1 at deploy) at a quarter GPU each: min 1, initial 2, max 6 replicas
    assert (sizes["scorers"].min_pods, sizes["scorers"].initial_pods, sizes["scorers"].max_pods) == (1, 1, 2)
    assert sizes["scorers"].deployments == ("router", "prm")
    assert (sizes["coordinator"].gpus, sizes["coordinator"].cpus) == (0, 2)
    # 3 fixed replicas would pack into 2 Pods of 2 CPUs; each required coordinator gets its own
    assert sizes["coordinator"].min_pods == sizes["coordinator"].max_pods == 3


def test_bigger_pods_mean_fewer_of_them():
    sizes = {g.name: g for g in group_sizes(_cfg(target={"gpus": 4, "cpus": 8}))}
    assert (sizes["target"].min_pods, sizes["target"].max_pods) == (1, 2)


def test_a_replica_bigger_than_its_groups_pod_fails_naming_both_values():
    with pytest.raises(SizingError) as exc:
        group_sizes(_cfg(target={"gpus": 0}))
    assert "pools.target" in str(exc.value) and "needs 1 GPU(s)" in str(exc.value)
    assert "offers 0 GPU(s) per Pod (cluster.target.gpus)" in str(exc.value)
    tp2 = target_config("qwen-math-1.5b-7b").model_dump(mode="json")
    tp2["cluster"]["target"] = {"gpus": 1}
    with pytest.raises(SizingError, match=r"pools.target: one replica needs 2 GPU\(s\) \(placement_group_bundles\), "
                                          r"but worker group 'target' offers 1 GPU\(s\)"):
        render_rayservice(C.AppConfig.model_validate(tp2))


def test_cluster_config_pins_every_deployment_to_its_group():
    cfg = cluster_app_config(target_config("qwen-math-1.5b-7b"))
    assert cfg.pools.draft.ray_actor_options.label_selector == {GROUP_LABEL: "draft"}
    assert cfg.pools.router.ray_actor_options.label_selector == {GROUP_LABEL: "scorers"}
    assert cfg.pools.prm.ray_actor_options.label_selector == {GROUP_LABEL: "scorers"}
    assert cfg.coordinator.ray_actor_options.label_selector == {GROUP_LABEL: "coordinator"}
    # the tensor-parallel target has bundles: each bundle is pinned, not only the replica actor
    assert cfg.pools.target.placement_group_bundle_label_selector == [{GROUP_LABEL: "target"}]
    assert cfg.pools.target.deployment_options("target")["placement_group_bundle_label_selector"] == \
        [{GROUP_LABEL: "target"}]
    assert (cfg.http.host, cfg.model_path_check) == ("0.0.0.0", "replicas")


def test_the_local_config_is_not_pinned():
    # the same preset served on one machine (`arbitrage serve --config ...`) has no labels to match
    assert not target_config("llama-1b-8b").pools.draft.ray_actor_options.label_selector
    assert "label_selector" not in target_config("llama-1b-8b").pools.draft.deployment_options("d")[
        "ray_actor_options"]


def test_base_dir_expands_environment_variables(monkeypatch, tmp_path):
    cfg = target_config("cpu-demo")
    monkeypatch.setenv("ARBITRAGE_HOME", str(tmp_path))  # what the image sets
    assert cfg.base_dir == "${ARBITRAGE_HOME}"
    assert cfg.resolve_path("models/draft") == str(tmp_path / "models" / "draft")


def test_bundle_selectors_must_match_the_bundles():
    with pytest.raises(ValueError, match="needs placement_group_bundles"):
        _pool(placement_group_bundle_label_selector=[{"a": "b"}])
    with pytest.raises(ValueError, match="2 selectors for 1 bundles"):
        _pool(placement_group_bundles=[{"CPU": 1}], placement_group_bundle_label_selector=[{"a": "b"}] * 2)


# -- upgrades and namespaces -------------------------------------------------------------------
@pytest.mark.parametrize("target", target_names())
def test_the_old_cluster_outlives_every_request_it_accepted(target):
    """NewCluster: KubeRay deletes the old cluster rayClusterDeletionDelaySeconds after switching
    the serve Service (60 s when unset); a request that reached it just before may run the
    whole deadline, 300 s in the GPU presets."""
    cfg = target_config(target)
    delay = render_rayservice(cfg)["spec"]["rayClusterDeletionDelaySeconds"]
    assert isinstance(delay, int)
    assert delay == math.ceil(cfg.limits.request_timeout_s) + DELETION_MARGIN_S
    assert delay >= cfg.limits.request_timeout_s + 30


def test_the_deletion_delay_follows_a_fractional_deadline():
    data = target_config("cpu-demo").model_dump(mode="json")
    data["limits"]["request_timeout_s"] = 120.2
    cfg = C.AppConfig.model_validate(data)
    assert render_rayservice(cfg)["spec"]["rayClusterDeletionDelaySeconds"] == 121 + DELETION_MARGIN_S


def _kustomization(files: dict[str, str], path: str) -> dict:
    import yaml

    return yaml.safe_load(files[path])


def test_the_ha_overlay_puts_its_redis_in_the_configured_namespace():
    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["cluster"]["namespace"] = "serving"
    files = render_kustomize(C.AppConfig.model_validate(data), "llama-1b-8b")
    assert _kustomization(files, "overlays/llama-1b-8b/kustomization.yaml")["namespace"] == "serving"
    # the component's Redis objects are resources of the -ha kustomization, not of the overlay
    assert _kustomization(files, "overlays/llama-1b-8b-ha/kustomization.yaml")["namespace"] == "serving"
    assert _kustomization(files, "overlays/llama-1b-8b/monitoring/kustomization.yaml")["namespace"] == "serving"
    plain = render_kustomize(target_config("llama-1b-8b"), "llama-1b-8b")  # unset: kubectl's namespace
    assert "namespace" not in _kustomization(plain, "overlays/llama-1b-8b-ha/kustomization.yaml")


# -- where model paths are checked --------------------------------------------------------------
def _missing_cfg(check: str) -> C.AppConfig:
    pool = C.PoolSpec(model=C.ModelSpec(path="/nonexistent/draft"), ray_actor_options=C.ActorOptionsSpec(num_cpus=0))
    return C.AppConfig(pools=C.PoolsSpec(draft=pool, target=pool), policy=C.PolicySpec(default="draft"),
                       model_path_check=check)


def test_cluster_configs_build_without_the_weights_on_the_building_node():
    from services.app import build_app

    with pytest.raises(ModelPathError, match="pools.draft.model.path"):
        build_app(_missing_cfg("build"))
    build_app(_missing_cfg("replicas"))  # the head Pod builds the app; it holds no weights


def test_a_pool_replica_checks_its_own_model_path_first():
    from services.pools import GeneratorPool

    with pytest.raises(ModelPathError) as exc:
        GeneratorPool(role="target", model={"path": "/nonexistent/target", "backend": "transformers"})
    assert "pools.target.model.path" in str(exc.value) and "/nonexistent/target" in str(exc.value)
    check_pool_model("draft", {"path": str(ROOT / "models" / "draft"), "backend": "transformers"})


# -- the CLI ----------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arbitrage_common.cli", "k8s", "render", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_render_of_an_unknown_preset_names_it_and_writes_nothing(tmp_path):
    proc = _cli("--preset", "cpu-demo", "--preset", "nope", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert "unknown preset 'nope'" in proc.stderr and "cpu-demo" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_render_that_fails_on_one_config_writes_no_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["cluster"]["target"]["gpus"] = 0
    import yaml

    bad.write_text(yaml.safe_dump(data))
    out = tmp_path / "k8s"
    proc = _cli("--config", str(bad), "--out", str(out))
    assert proc.returncode == 1 and "offers 0 GPU(s) per Pod" in proc.stderr and "needs 1 GPU(s)" in proc.stderr
    assert not out.exists()


def test_render_writes_and_checks(tmp_path):
    assert _cli("--preset", "cpu-demo", "--out", str(tmp_path)).returncode == 0
    assert (tmp_path / "base" / "cpu-demo" / "rayservice.yaml").is_file()
    assert _cli("--preset", "cpu-demo", "--out", str(tmp_path), "--check").returncode == 0
    (tmp_path / "base" / "cpu-demo" / "rayservice.yaml").write_text("edited\n")
    proc = _cli("--preset", "cpu-demo", "--out", str(tmp_path), "--check")
    assert proc.returncode == 1 and "rayservice.yaml differs" in proc.stderr


def test_check_reports_and_render_removes_files_no_longer_rendered(tmp_path):
    """A file an earlier render wrote for a target and this one no longer produces (a
    scheduling.yaml whose options were removed) fails --check and is deleted by the next
    render; files written by hand, and the renderings of targets a partial render leaves out,
    stay."""
    from arbitrage_common.kuberay.render import RENDERED_MARK

    assert _cli("--preset", "cpu-demo", "--out", str(tmp_path)).returncode == 0
    stray = [tmp_path / "overlays" / "cpu-demo" / "scheduling.yaml", tmp_path / "base" / "cpu-demo" / "old.yaml"]
    other_target = tmp_path / "overlays" / "llama-1b-8b" / "old.yaml"  # a target `--preset cpu-demo` leaves out
    by_hand = [tmp_path / "Dockerfile", tmp_path / "components" / "ha" / "kustomization.yaml",
               tmp_path / "overlays" / "cpu-demo" / "my-patch.yaml"]
    for path in [*stray, other_target]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{RENDERED_MARK} from the AppConfig of 'x'; do not edit by hand\nkind: X\n")
    for path in by_hand:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("kind: X\n")
    for args in [("--preset", "cpu-demo"), ()]:  # a partial render, then a full one
        proc = _cli(*args, "--out", str(tmp_path), "--check")
        assert proc.returncode == 1, proc.stderr
        assert all(f"{path} is no longer rendered" in proc.stderr for path in stray), proc.stderr
        assert not any(str(path) in proc.stderr for path in by_hand + ([other_target] if args else []))
    assert _cli("--preset", "cpu-demo", "--out", str(tmp_path)).returncode == 0
    assert not any(path.exists() for path in stray)
    assert all(path.exists() for path in [other_target, *by_hand])
    assert _cli("--preset", "cpu-demo", "--out", str(tmp_path), "--check").returncode == 0


def test_a_removed_targets_files_are_named_never_deleted_and_a_config_render_is_not_one(tmp_path):
    """A preset removed or renamed leaves its base/ and overlays/ directories behind: a render of
    the project's targets, whole or partial, names the files in them that carry a project
    target's render header, and `--check` fails on them; none is deleted (a user's --config
    rendering of an earlier version carried the same header). A --config rendering's header
    marks it the user's: never named."""
    from arbitrage_common.kuberay.render import RENDERED_MARK, TARGET_HINT

    assert _cli("--preset", "cpu-demo", "--out", str(tmp_path)).returncode == 0
    old = [tmp_path / rel for rel in ("base/old-preset/rayservice.yaml", "overlays/old-preset/kustomization.yaml",
                                      "overlays/old-preset/monitoring/autoscaling-alerts.yaml",
                                      "overlays/old-preset-ha/kustomization.yaml")]
    for path in old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{RENDERED_MARK} from the AppConfig of 'old-preset'; do not edit by hand\n{TARGET_HINT}kind: X\n")
    by_hand = tmp_path / "overlays" / "old-preset" / "my-patch.yaml"
    by_hand.write_text("kind: X\n")
    config = _cli("--config", str(ROOT / "configs" / "cpu-demo.yaml"), "--name", "mine", "--out", str(tmp_path))
    assert config.returncode == 0 and "no longer" not in config.stdout + config.stderr
    mine = tmp_path / "overlays" / "mine" / "kustomization.yaml"
    assert mine.exists()
    for args in [("--preset", "cpu-demo"), ()]:
        proc = _cli(*args, "--out", str(tmp_path), "--check")
        assert proc.returncode == 1
        assert all(f"{path} was rendered for a target that is no longer one" in proc.stderr for path in old), \
            proc.stderr
        assert str(by_hand) not in proc.stderr and "/mine/" not in proc.stderr
    proc = _cli("--preset", "cpu-demo", "--out", str(tmp_path))
    assert proc.returncode == 0 and all(f"{path} was rendered for a target" in proc.stderr for path in old)
    assert all(path.exists() for path in [*old, by_hand, mine])


def test_removing_stale_files_drops_the_directories_they_leave_empty(tmp_path):
    from arbitrage_common.kuberay.render import RENDERED_MARK
    from arbitrage_common.kuberay.targets import remove_stale, render_targets, stale, write_files

    files = render_targets({"cpu-demo": target_config("cpu-demo")})
    write_files(files, tmp_path)
    left = tmp_path / "overlays" / "cpu-demo" / "monitoring" / "old" / "rule.yaml"
    left.parent.mkdir(parents=True)
    left.write_text(f"{RENDERED_MARK} from the AppConfig of 'cpu-demo'\n")
    assert stale(files, tmp_path, ["cpu-demo"]) == ["overlays/cpu-demo/monitoring/old/rule.yaml"]
    assert remove_stale(files, tmp_path, ["cpu-demo"]) == [left]
    assert not left.parent.exists() and (tmp_path / "overlays" / "cpu-demo" / "monitoring").is_dir()
    assert stale(files, tmp_path, ["cpu-demo"]) == []


# -- node drains: disruption budgets and spread -------------------------------------------------
def _budgets(files: dict[str, str], name: str) -> dict[str, dict]:
    import yaml

    path = f"base/{name}/disruption-budgets.yaml"
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(files[path])} if path in files else {}


@pytest.mark.parametrize("target", target_names())
def test_groups_of_two_or_more_required_pods_get_a_disruption_budget(target):
    cfg = target_config(target)
    files = render_kustomize(cfg, target)
    budgets = _budgets(files, target)
    cluster = render_rayservice(cfg)["spec"]["rayClusterConfig"]
    resources = _kustomization(files, f"base/{target}/kustomization.yaml")["resources"]
    assert ("disruption-budgets.yaml" in resources) == bool(budgets)
    for group in cluster["workerGroupSpecs"]:
        budget = budgets.pop(f"{cfg.name}-{group['groupName']}", None)
        if group["minReplicas"] < 2:
            assert budget is None  # one required Pod: a budget would hold its node's drains for good
            continue
        assert budget["spec"]["minAvailable"] == group["minReplicas"] - 1  # drained one at a time
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
        others = [g for g in cluster["workerGroupSpecs"] if g is not group] + [cluster["headGroupSpec"]]
        assert not any(selector.items() <= g["template"]["metadata"]["labels"].items() for g in others)
    assert not budgets  # none for the head either


def test_the_presets_two_coordinator_pods_are_drained_one_at_a_time():
    budgets = _budgets(render_kustomize(target_config("llama-1b-8b"), "llama-1b-8b"), "llama-1b-8b")
    assert {name: b["spec"]["minAvailable"] for name, b in budgets.items()} == \
        {"arbitrage-llama-1b-8b-coordinator": 1}


@pytest.mark.parametrize("target", target_names())
def test_every_groups_pods_prefer_distinct_nodes(target):
    for group in render_rayservice(target_config(target))["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (spread,) = group["template"]["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a preference: never leaves a Pod pending
        assert spread["labelSelector"]["matchLabels"] == group["template"]["metadata"]["labels"]


# -- the per-config autoscaling alert ----------------------------------------------------------------
def _at_max_rule(cfg: C.AppConfig) -> dict:
    from arbitrage_common.kuberay.render import autoscaling_at_max_rule

    (rule,) = autoscaling_at_max_rule(cfg)["spec"]["groups"][0]["rules"]
    return rule


@pytest.mark.parametrize("target", target_names())
def test_the_at_max_alert_holds_each_autoscaling_deployments_own_max(target):
    import re

    cfg = target_config(target)
    autos = {name: auto for name, spec in [*cfg.pools.configured(), ("coordinator", cfg.coordinator)]
             if (auto := spec.autoscaling_config) is not None and auto.min_replicas < auto.max_replicas}
    rule = _at_max_rule(cfg)
    found = re.findall(r'ray_serve_autoscaling_target_replicas\{application="([^"]+)",deployment="(\w+)"\}\) >= (\d+)',
                       rule["expr"])
    assert sorted((a, d, int(m)) for a, d, m in found) == sorted((cfg.name, n, a.max_replicas) for n, a in autos.items())
    # longer than any downscale delay, which holds a target up after its load fell
    assert int(rule["for"].removesuffix("m")) * 60 > max(a.downscale_delay_s for a in autos.values())


def test_the_at_max_alert_of_a_preset_names_every_autoscaled_deployment_at_its_max():
    """configs/presets/llama-1b-8b.yaml's bounds, written out: every deployment autoscales."""
    import re

    expr = _at_max_rule(target_config("llama-1b-8b"))["expr"]
    found = re.findall(r'deployment="(\w+)"\}\) >= (\d+)', expr)
    assert dict(found) == {"draft": "4", "target": "8", "router": "4", "prm": "2", "coordinator": "16"}


def test_the_at_max_alert_waits_out_a_long_downscale_delay():
    data = target_config("cpu-demo").model_dump(mode="json")
    data["pools"]["target"]["autoscaling_config"]["downscale_delay_s"] = 1800
    assert _at_max_rule(C.AppConfig.model_validate(data))["for"] == "35m"


def test_the_at_max_alert_matches_the_configs_namespace_when_it_names_one():
    """Another namespace's application of the same name has bounds of its own."""
    import re

    data = target_config("cpu-demo").model_dump(mode="json")
    data["cluster"]["namespace"] = "serving-a"
    terms = re.findall(r"ray_serve_autoscaling_target_replicas\{([^}]*)\}",
                       _at_max_rule(C.AppConfig.model_validate(data))["expr"])
    assert terms and all(t.startswith('namespace="serving-a",application=') for t in terms)
    unset = _at_max_rule(target_config("cpu-demo"))["expr"]  # kubectl's namespace: not known when rendering
    assert "namespace=" not in unset


def test_a_config_without_autoscaling_renders_no_alert():
    from arbitrage_common.kuberay.render import autoscaling_at_max_rule

    data = target_config("cpu-demo").model_dump(mode="json")
    for spec in [*data["pools"].values(), data["coordinator"]]:
        if spec and spec.get("autoscaling_config"):
            spec["autoscaling_config"] = None
            spec["num_replicas"] = 1
    cfg = C.AppConfig.model_validate(data)
    assert autoscaling_at_max_rule(cfg) is None
    assert not [f for f in render_kustomize(cfg, "x") if "/monitoring/" in f]


# -- custom resources and memory --------------------------------------------------------------
def _groups(cfg: C.AppConfig) -> dict[str, dict]:
    return {g["groupName"]: g for g in render_rayservice(cfg)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _offered(group: dict) -> dict[str, int]:
    """A group's custom resources as the Ray autoscaler reads them from rayStartParams."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    return _get_custom_resources(group.get("resources", {}), group["rayStartParams"], group["groupName"])


def test_a_pool_pinned_by_a_custom_resource_gets_it_from_its_group():
    """configs/gpu-example.yaml pins each pool with ray_actor_options.resources (as PRESETS.md
    recommends): every group must offer its pools' resource, or no replica could ever land."""
    cfg = C.load_config(ROOT / "configs" / "gpu-example.yaml")
    groups = _groups(cfg)
    sizes = {g.name: g for g in group_sizes(cfg)}
    for role, resource in (("draft", "pool_draft"), ("target", "pool_target"), ("router", "pool_scorer"),
                           ("prm", "pool_scorer")):
        group = "scorers" if role in ("router", "prm") else role
        offered = _offered(groups[group])
        assert set(offered) == {resource}, (group, groups[group]["rayStartParams"])
        assert offered == sizes[group].resources
    assert _offered(groups["coordinator"]) == {}  # asks for none, offers none
    # enough for every replica a Pod holds: 4 quarter-GPU drafts on the draft group's one GPU
    assert _offered(groups["draft"]) == {"pool_draft": 4}
    assert _offered(groups["target"]) == {"pool_target": 1}  # one whole-GPU target per 1-GPU Pod
    assert _offered(groups["scorers"]) == {"pool_scorer": 8}  # 4 routers + 4 PRMs at a quarter GPU each


def test_the_offered_amount_is_a_whole_number_covering_fractional_asks():
    data = target_config("cpu-demo").model_dump(mode="json")
    data["pools"]["draft"]["ray_actor_options"].update(num_cpus=0.5, resources={"pool_draft": 0.3})
    data["cluster"]["draft"]["cpus"] = 1  # 2 replicas of 0.5 CPU per Pod: 0.6 -> 1
    group = _groups(C.AppConfig.model_validate(data))["draft"]
    assert group["rayStartParams"]["resources"] == "'{\"pool_draft\": 1}'"
    assert _offered(group) == {"pool_draft": 1}


def test_bundle_custom_resources_are_offered_too():
    data = target_config("qwen-math-1.5b-7b").model_dump(mode="json")
    data["pools"]["target"]["placement_group_bundles"] = [{"CPU": 1, "GPU": 1, "tp_rank": 1}, {"GPU": 1, "tp_rank": 1}]
    assert _offered(_groups(C.AppConfig.model_validate(data))["target"]) == {"tp_rank": 2}


@pytest.mark.parametrize("grace", [300.0, 450.5])
def test_an_evicted_coordinator_pod_drains_for_the_replicas_graceful_shutdown(grace):
    """On SIGTERM, Ray 2.60's `ray start --block` drains its node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
    (30 s by default) and Kubernetes kills the container terminationGracePeriodSeconds after it (30 s
    by default): both must outlast a stopping coordinator replica's graceful_shutdown_timeout_s, or a
    node drain cuts its requests at 30 s. Pools (10 s) keep Ray's drain; the head keeps the defaults."""
    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["coordinator"]["graceful_shutdown_timeout_s"] = grace
    specs = _pod_specs(C.AppConfig.model_validate(data))
    coordinator = specs["coordinator"]["template"]["spec"]
    assert _drain_s(coordinator) >= grace + 30 and coordinator["terminationGracePeriodSeconds"] >= _drain_s(coordinator) + 30
    head = specs.pop("head")["template"]["spec"]
    assert "terminationGracePeriodSeconds" not in head and _drain_s(head) is None
    for group, spec in specs.items():
        if group != "coordinator":
            assert _drain_s(spec["template"]["spec"]) == 30, group  # Ray's default, written out


@pytest.mark.parametrize("grace", [10.0, 45.0, 90.5])
def test_a_pool_group_drains_for_its_pools_graceful_shutdown(grace):
    """A pool replica on a draining node stops at the latest its graceful_shutdown_timeout_s before
    the drain's deadline: a pool that shuts down for longer than 10 s would have its calls cut, or
    no time left for a replacement, at Ray's 30 s. Its group drains that timeout plus 20 s; the
    other pool groups keep 30 s."""
    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["pools"]["target"]["graceful_shutdown_timeout_s"] = grace
    specs = _pod_specs(C.AppConfig.model_validate(data))
    target = specs["target"]["template"]["spec"]
    assert _drain_s(target) == max(30, math.ceil(grace) + 20)
    assert target["terminationGracePeriodSeconds"] == _drain_s(target) + DRAIN_MARGIN_S
    for group in ("draft", "scorers"):
        assert _drain_s(specs[group]["template"]["spec"]) == 30, group


def _drain_s(pod: dict) -> float | None:
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    drain = env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S")
    return None if drain is None else float(drain)


@pytest.mark.parametrize("target", target_names())
def test_every_worker_pod_outlives_its_drain(target):
    """Kubernetes SIGKILLs a Pod terminationGracePeriodSeconds (30 s by default) after its SIGTERM;
    `ray start` drains for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default) and then stops
    its processes. At the defaults the kill lands on the drain's deadline: every worker group gets
    a grace DRAIN_MARGIN_S beyond its drain (pools: 30 s and 60 s; coordinator: 330 s and 360 s)."""
    for group in render_rayservice(target_config(target))["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == _drain_s(pod) + DRAIN_MARGIN_S, group["groupName"]


def test_the_serve_service_marks_its_grpc_port_h2c():
    """KubeRay builds the serve Service's ports as a name and a port only (service.go,
    BuildServeService), so Gateway API implementations and meshes took 9000 for HTTP/1.1. KubeRay
    1.6+ takes a spec.serveService port whose name it would have built as written (appProtocol
    kept) and sets the Service's name, selector and labels itself: so the rendering gives ports
    only, named as the head container's serve ports."""
    data = target_config("cpu-demo").model_dump(mode="json")
    data["http"]["port"], data["grpc"]["port"] = 8001, 9001
    spec = render_rayservice(C.AppConfig.model_validate(data))["spec"]
    assert spec["serveService"] == {"spec": {"ports": [
        {"name": "serve", "port": 8001},
        {"name": "serve-grpc", "port": 9001, "appProtocol": "kubernetes.io/h2c"}]}}
    head_ports = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    serve_ports = {p["name"]: p["containerPort"] for p in head_ports if p["name"] in SERVE_PORT_NAMES}
    assert {p["name"]: p["port"] for p in spec["serveService"]["spec"]["ports"]} == serve_ports


@pytest.mark.parametrize("target", ["cpu-demo", "llama-1b-8b"])
def test_a_busy_coordinator_pod_survives_one_slow_proxy_health_check(target):
    """KubeRay's readiness probe for a RayService worker (pod.go, initLivenessAndReadinessProbe)
    gives the probe 2 s and takes one failure as not Ready, so one slow /-/healthz of a busy
    coordinator's proxy took its Pod out of the serve Service. KubeRay keeps a probe the container
    sets: the coordinator's runs KubeRay's checks with more time and 3 failures in a row."""
    cfg = target_config(target)
    specs = _pod_specs(cfg)
    probe = specs.pop("coordinator")["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["timeoutSeconds"] >= 5 and probe["failureThreshold"] == 3 and probe["periodSeconds"] == 5
    command = probe["exec"]["command"]
    assert command[:2] == ["bash", "-c"]
    assert f"http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep success" in command[2]
    assert f"http://localhost:{cfg.http.port}/-/healthz | grep success" in command[2]
    for timeout in re.findall(r"-T (\d+)", command[2]):
        assert int(timeout) * 2 <= probe["timeoutSeconds"]
    for group, spec in specs.items():  # KubeRay's own elsewhere
        assert "readinessProbe" not in spec["template"]["spec"]["containers"][0], group


def test_groups_without_custom_resources_render_as_before():
    for group in _groups(target_config("llama-1b-8b")).values():
        no_gpu = {} if group["groupName"] != "coordinator" else {"num-gpus": "0"}  # CPU only
        assert group["rayStartParams"] == {**no_gpu, "metrics-export-port": "8080"}


def test_a_replica_asking_more_memory_than_its_pod_is_refused_naming_the_field():
    data = target_config("cpu-demo").model_dump(mode="json")
    data["pools"]["target"]["ray_actor_options"]["memory"] = 8 * 2**30  # the target Pod has 2Gi
    with pytest.raises(SizingError) as exc:
        render_rayservice(C.AppConfig.model_validate(data))
    assert str(exc.value).startswith("pools.target.ray_actor_options.memory: one replica needs 8589934592 bytes")
    assert "offers 2Gi" in str(exc.value) and "(cluster.target.memory)" in str(exc.value)
    data["cluster"]["target"]["memory"] = "8Gi"  # exactly enough
    assert _groups(C.AppConfig.model_validate(data))["target"]["maxReplicas"] == 2


def test_memory_packs_replicas_like_cpus_do():
    three_gib = Demand("draft", 0.0, 0.0, "ray_actor_options.num_gpus", memory=3 * 2**30)
    assert pods_needed([three_gib] * 4, 8, 0, 4 * 2**30) == 4  # one 3 GiB replica per 4 GiB Pod
    assert pods_needed([three_gib] * 4, 8, 0, 6 * 2**30) == 2
    assert pods_needed([three_gib] * 4, 8, 0) == 1  # no memory asked of the Pod: CPUs alone


def test_bundle_memory_is_checked_against_the_pod():
    data = target_config("qwen-math-1.5b-7b").model_dump(mode="json")
    data["pools"]["target"]["placement_group_bundles"][0]["memory"] = 200 * 2**30  # the target Pod has 96Gi
    with pytest.raises(SizingError, match=r"pools.target.placement_group_bundles: one replica needs "):
        render_rayservice(C.AppConfig.model_validate(data))


# -- the user's own label selectors ------------------------------------------------------------
def _with_zone(data: dict, group: str) -> dict:
    data["cluster"][group]["labels"] = {"zone": "a"}
    return data


def test_a_users_label_selector_is_merged_with_the_group_label():
    data = _with_zone(target_config("cpu-demo").model_dump(mode="json"), "draft")
    data["pools"]["draft"]["ray_actor_options"]["label_selector"] = {"zone": "a", "ray.io/accelerator-type": "H100"}
    cfg = C.AppConfig.model_validate(data)
    pinned = cluster_app_config(cfg)
    assert pinned.pools.draft.ray_actor_options.label_selector == \
        {"zone": "a", "ray.io/accelerator-type": "H100", GROUP_LABEL: "draft"}
    assert _groups(cfg)["draft"]["labels"] == {GROUP_LABEL: "draft", "zone": "a"}  # what the selector needs
    assert _groups(cfg)["target"]["labels"] == {GROUP_LABEL: "target"}


def test_a_selector_on_rays_own_labels_is_kept_beside_the_group_label():
    """Nothing but the selector itself: the rendering used to replace it with the group label."""
    data = target_config("qwen-math-1.5b-7b").model_dump(mode="json")
    data["pools"]["draft"]["ray_actor_options"]["label_selector"] = {"ray.io/accelerator-type": "H100"}
    data["pools"]["target"]["placement_group_bundle_label_selector"] = [{"ray.io/accelerator-type": "H100"},
                                                                      {"ray.io/accelerator-type": "A100"}]
    pinned = cluster_app_config(C.AppConfig.model_validate(data))
    assert pinned.pools.draft.ray_actor_options.label_selector == \
        {"ray.io/accelerator-type": "H100", GROUP_LABEL: "draft"}
    assert pinned.pools.target.placement_group_bundle_label_selector == \
        [{"ray.io/accelerator-type": "H100", GROUP_LABEL: "target"},
         {"ray.io/accelerator-type": "A100", GROUP_LABEL: "target"}]


def test_bundle_selectors_are_merged_per_bundle():
    data = _with_zone(target_config("qwen-math-1.5b-7b").model_dump(mode="json"), "target")
    data["pools"]["target"]["placement_group_bundle_label_selector"] = [{"zone": "a"}, {"ray.io/market-type": "spot"}]
    pinned = cluster_app_config(C.AppConfig.model_validate(data))
    assert pinned.pools.target.placement_group_bundle_label_selector == \
        [{"zone": "a", GROUP_LABEL: "target"}, {"ray.io/market-type": "spot", GROUP_LABEL: "target"}]
    data["pools"]["target"]["placement_group_bundle_label_selector"] = [{"zone": "a"}]  # one for all bundles
    pinned = cluster_app_config(C.AppConfig.model_validate(data))
    assert pinned.pools.target.placement_group_bundle_label_selector == [{"zone": "a", GROUP_LABEL: "target"}]


@pytest.mark.parametrize("selector,field,text", [
    ({GROUP_LABEL: "target"}, "pools.draft.ray_actor_options.label_selector",
     f"{GROUP_LABEL}: 'target' conflicts with the rendering"),
    ({"zone": "b"}, "pools.draft.ray_actor_options.label_selector", "zone: 'b', but worker group 'draft' carries"),
    ({"rack": "r1"}, "pools.draft.ray_actor_options.label_selector", "rack: no Pod of worker group 'draft'"),
])
def test_a_selector_no_pod_of_the_group_matches_is_refused(selector, field, text):
    data = _with_zone(target_config("cpu-demo").model_dump(mode="json"), "draft")
    data["pools"]["draft"]["ray_actor_options"]["label_selector"] = selector
    with pytest.raises(SizingError) as exc:
        render_rayservice(C.AppConfig.model_validate(data))
    assert str(exc.value).startswith(f"{field}: ") and text in str(exc.value)


def test_a_bundle_selector_on_the_group_key_is_refused_naming_the_bundle():
    data = target_config("qwen-math-1.5b-7b").model_dump(mode="json")
    data["pools"]["target"]["placement_group_bundle_label_selector"] = [{}, {GROUP_LABEL: "draft"}]
    with pytest.raises(SizingError, match=r"^pools.target.placement_group_bundle_label_selector\[1\]: "):
        render_rayservice(C.AppConfig.model_validate(data))


def test_the_same_group_label_a_user_wrote_is_kept():
    data = target_config("cpu-demo").model_dump(mode="json")
    data["coordinator"]["ray_actor_options"]["label_selector"] = {GROUP_LABEL: "coordinator"}
    assert cluster_app_config(C.AppConfig.model_validate(data)).coordinator.ray_actor_options.label_selector == \
        {GROUP_LABEL: "coordinator"}


@pytest.mark.parametrize("labels,text", [({GROUP_LABEL: "x"}, "sets arbitrage-serve.io/group itself"),
                                         ({"ray.io/zone": "a"}, "Ray reserves ray.io/"),
                                         ({"zone": "a b"}, "not a label value"),
                                         ({"bad key!": "a"}, "not a label key")])
def test_group_labels_are_ray_node_labels_of_the_users_own(labels, text):
    data = target_config("cpu-demo").model_dump(mode="json")
    data["cluster"]["draft"]["labels"] = labels
    with pytest.raises(ValidationError) as exc:
        C.AppConfig.model_validate(data)
    (field, message), = C.validation_problems(exc.value)
    assert field == "cluster.draft.labels" and text in message


# -- /dev/shm and CPU-only Pods ---------------------------------------------------------------
def _pod_specs(cfg: C.AppConfig) -> dict[str, dict]:
    cluster = render_rayservice(cfg)["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


@pytest.mark.parametrize("name", ["cpu-demo", "qwen-math-1.5b-7b"])
def test_dev_shm_is_left_to_kuberays_shared_mem(name):
    """KubeRay 1.6 mounts a memory emptyDir `shared-mem` at /dev/shm in every Ray container that
    mounts nothing there, sized to the container's memory limit, unless rayStartParams set
    plasma-directory (pod.go, BuildPod/addEmptyDir): as large as a volume of the rendering's own
    could be (its pages count against the same limit), so the rendering mounts none."""
    for group, spec in _pod_specs(target_config(name)).items():
        pod = spec["template"]["spec"]
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert "/dev/shm" not in mounts and "volumes" not in pod, group
        assert "plasma-directory" not in spec["rayStartParams"], group


@pytest.mark.parametrize("name", ["cpu-demo", "llama-1b-8b", "qwen-math-1.5b-7b"])
def test_pods_without_a_gpu_limit_offer_ray_no_gpu_and_see_none(name):
    """KubeRay sets num-gpus only for a Pod with a GPU limit; without it `ray start` counts the
    GPUs the NVIDIA runtime exposes (all of the node's where it is the default runtime: the CUDA
    image sets NVIDIA_VISIBLE_DEVICES=all), and Ray could place a GPU replica on the head or a
    coordinator Pod. Every Pod without a GPU limit says num-gpus 0 and hides the node's GPUs."""
    no_gpu = {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}
    specs = _pod_specs(target_config(name))
    assert "nvidia.com/gpu" not in specs["coordinator"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for group, spec in specs.items():
        (container,) = spec["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if gpus is None:
            assert spec["rayStartParams"]["num-gpus"] == "0", group
            assert no_gpu in container["env"], group
        else:  # KubeRay passes the limit to `ray start --num-gpus`; the device plugin picks the GPUs
            assert "num-gpus" not in spec["rayStartParams"], group
            assert not [e for e in container["env"] if e["name"] == "NVIDIA_VISIBLE_DEVICES"], group


# -- YAML as Kubernetes tools read it -----------------------------------------------------------
# Plain scalars go-yaml v2 (kubectl, kustomize, the API server and KubeRay's parse of
# serveConfigV2: sigs.k8s.io/yaml) or PyYAML reads as no string (YAML 1.1): bool and null words,
# ints (0x, 0o, 0b, old octal, '_'), floats (exponents, .inf, .nan), timestamps, sexagesimals.
_YAML11_WORDS = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE", "false", "False",
                 "FALSE", "on", "On", "ON", "off", "Off", "OFF", "null", "Null", "NULL", "~", ""}
_YAML11_NOT_STR = re.compile(
    r"[-+]?(0b[01_]+|0o?[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*(:[0-5]?[0-9])*"
    r"|(\.[0-9_]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?|\.(inf|Inf|INF|nan|NaN|NAN))"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?")
TRICKY = ["y", "Y", "n", "N", "yes", "No", "ON", "off", "True", "FALSE", "null", "~", "", "1e3", "1E-3", "0x1F",
          "0o17", "0b101", "017", "1_000", "-1", "+1", ".5", "1.", ".inf", "-.Inf", ".NaN", "12:30", "2024-01-02",
          "2024-01-02T03:04:05Z", "<<"]


def _not_a_string_when_plain(value: str) -> bool:
    return value in _YAML11_WORDS or value == "<<" or bool(_YAML11_NOT_STR.fullmatch(value))


def _plain_strings(text: str) -> list[str]:
    """Every plain (unquoted) string scalar of a YAML stream, serveConfigV2's own included."""
    import yaml

    out, stack = [], list(yaml.compose_all(text))
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            stack += [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
        elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            if node.style is None:
                out.append(node.value)
            elif node.style == "|":
                out += _plain_strings(node.value)
    return out


def test_the_yaml_11_check_catches_what_it_should():
    assert all(_not_a_string_when_plain(v) for v in TRICKY)
    assert not any(_not_a_string_when_plain(v) for v in ["8Gi", "arbitrage-serve:0.1.0-gpu", "ray.io/v1", "yy",
                                                          "NoSchedule", "/spec/x", "nvidia.com/gpu"])


@pytest.mark.parametrize("value", TRICKY)
def test_a_string_a_yaml_11_reader_would_retype_is_double_quoted(value):
    import yaml

    from arbitrage_common.kuberay.render import dump_yaml

    assert dump_yaml({"k": value}) == f'k: "{value}"\n'
    if value:  # an empty key takes PyYAML's explicit form (`? ""`)
        assert dump_yaml({value: "v"}) == f'"{value}": v\n'
    assert yaml.safe_load(dump_yaml({"k": value, value: "v"})) == {"k": value, value: "v"}


def test_rendered_files_leave_no_string_plain_that_a_yaml_11_reader_retypes():
    """The reviewer's case: a node selector `example.com/fast: "y"` written plain became a boolean
    in kubectl, and the CRD refused the RayService. Node selectors, Ray node labels, tolerations
    and the user's label selectors (inside serveConfigV2) of such values, and every target."""
    def edit(d: dict) -> None:
        d["cluster"]["draft"].update(node_selector={"example.com/fast": "y", "example.com/n": "1e3"},
                                     labels={"spot": "n", "rev": "0x1F"},
                                     tolerations=[{"key": "example.com/on", "value": "on", "effect": "NoSchedule"}])
        d["pools"]["draft"]["ray_actor_options"]["label_selector"] = {"spot": "n"}

    data = target_config("cpu-demo").model_dump(mode="json")
    edit(data)
    renderings = [render_kustomize(C.AppConfig.model_validate(data), "yn")]
    renderings += [render_kustomize(target_config(name), name) for name in target_names()]
    for files in renderings:
        for rel, text in files.items():
            retyped = [v for v in _plain_strings(text) if _not_a_string_when_plain(v)]
            assert not retyped, f"{rel}: {retyped}"
    assert 'example.com/fast: "y"' in renderings[0]["overlays/yn/scheduling.yaml"]
