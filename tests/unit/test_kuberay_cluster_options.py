"""The KubeRay rendering's cluster options and its checks: worker-group bounds a running
RayCluster needs patched (`k8s scale-patch`), Ray token auth, the Pods' volumes, mounts, service
account, pull secrets and head scheduling, one coordinator Pod per required replica, and
`config check` refusing what `k8s render` refuses, in the same lines."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from arbitrage_common import config as C
from arbitrage_common.cli.main import main
from arbitrage_common.kuberay.render import cluster_problems, render_kustomize, render_rayservice
from arbitrage_common.kuberay.scale import group_bounds_patch, scale_patch_commands
from arbitrage_common.kuberay.targets import render_targets, target_config, target_path

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "presets" / "llama-1b-8b.yaml"
MODELS_PVC = {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
MODELS_MOUNT = {"name": "models", "mountPath": "/models", "readOnly": True}


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _write(tmp_path: Path, edit, source: Path = PRESET, name: str = "edited.yaml") -> Path:
    data = yaml.safe_load(source.read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _edited(edit, target: str = "llama-1b-8b") -> C.AppConfig:
    data = target_config(target).model_dump(mode="json")
    edit(data)
    return C.AppConfig.model_validate(data)


def _cluster(cfg: C.AppConfig) -> dict:
    return render_rayservice(cfg)["spec"]["rayClusterConfig"]


def _groups(cfg: C.AppConfig) -> dict[str, dict]:
    return {g["groupName"]: g for g in _cluster(cfg)["workerGroupSpecs"]}


# -- 1. worker-group bounds: `k8s scale-patch` ----------------------------------------------
def _apply(ops: list[dict], doc: dict) -> dict:
    """A minimal JSON-patch applier (test and replace on existing paths: what the patch uses)."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        *parents, last = op["path"].strip("/").split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "test":
            assert node[key] == op["value"], f"test failed at {op['path']}"
        else:
            assert op["op"] == "replace" and key in node
            node[key] = op["value"]
    return doc


def test_the_scale_patch_sets_every_groups_bounds_to_the_rendering():
    cfg = _edited(lambda d: d["pools"]["target"]["autoscaling_config"].update(min_replicas=2, max_replicas=10))
    running = {"spec": _cluster(target_config("llama-1b-8b"))}  # the RayCluster as first created
    patched = _apply(group_bounds_patch(cfg), running)["spec"]["workerGroupSpecs"]
    assert [(g["groupName"], g["minReplicas"], g["maxReplicas"]) for g in patched] == \
        [(g["groupName"], g["minReplicas"], g["maxReplicas"]) for g in _cluster(cfg)["workerGroupSpecs"]]
    assert _groups(cfg)["target"]["maxReplicas"] == 10 != running["spec"]["workerGroupSpecs"][1]["maxReplicas"]


def test_the_scale_patch_fails_whole_when_a_group_is_not_where_it_expects():
    running = {"spec": _cluster(target_config("llama-1b-8b"))}
    running["spec"]["workerGroupSpecs"].reverse()
    with pytest.raises(AssertionError, match="test failed"):
        _apply(group_bounds_patch(target_config("llama-1b-8b")), running)


def test_the_scale_patch_commands_find_the_active_cluster_in_the_namespace():
    cfg = _edited(lambda d: d["cluster"].update(namespace="serving"))
    find, patch = scale_patch_commands(cfg)
    assert find == ("CLUSTER=$(kubectl get rayservice arbitrage-llama-1b-8b -n serving -o "
                    "jsonpath='{.status.activeServiceStatus.rayClusterName}')")
    words = shlex.split(patch)
    assert words[:6] == ["kubectl", "patch", "raycluster", "$CLUSTER", "-n", "serving"]
    assert words[6:9] == ["--type", "json", "-p"] and json.loads(words[9]) == group_bounds_patch(cfg)


def test_the_scale_patch_command_prints_the_patch(capsys, tmp_path):
    assert main(["k8s", "scale-patch", "llama-1b-8b"]) == 0
    out = capsys.readouterr().out
    assert "kubectl patch raycluster" in out and "/spec/workerGroupSpecs/3/minReplicas" in out
    assert "kubectl apply -k k8s/overlays/llama-1b-8b/monitoring" in out  # the at-max alert's bounds
    assert main(["k8s", "scale-patch"]) == 1
    assert "name one target" in _err(capsys)
    assert main(["k8s", "scale-patch", "nope"]) == 1  # a positional NAME: no --preset option to blame
    err = _err(capsys)
    assert "unknown preset 'nope'" in err and "scale-patch NAME" in err and "--preset" not in err
    bad = _write(tmp_path, lambda d: d["pools"]["target"]["ray_actor_options"].update(accelerator_type="H100"))
    assert main(["k8s", "scale-patch", "--config", str(bad)]) == 1
    assert f"arbitrage: error: {bad}: pools.target.ray_actor_options.accelerator_type: " in _err(capsys)


def test_render_refuses_a_name_without_a_config(tmp_path, capsys):
    """--name names a --config file's directories; a target's are named after it."""
    for args in (["--name", "foo"], ["--preset", "cpu-demo", "--name", "foo"]):
        assert main(["k8s", "render", *args, "--out", str(tmp_path / "k8s")]) == 1
        assert "--name: only with --config" in _err(capsys)
    assert not (tmp_path / "k8s").exists()


def test_render_reminds_that_apply_leaves_the_bounds_of_a_running_cluster(tmp_path, capsys):
    assert main(["k8s", "render", "--preset", "cpu-demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "coordinator  Pods 1-1" in out and "arbitrage k8s scale-patch <name>" in out


# -- 2. Ray token auth -----------------------------------------------------------------------
def test_ray_token_auth_is_on_by_default_and_can_be_turned_off():
    assert _cluster(target_config("cpu-demo"))["authOptions"] == {"mode": "token"}
    off = _edited(lambda d: d["cluster"].update(ray_token_auth=False), "cpu-demo")
    assert "authOptions" not in _cluster(off)


def test_the_auth_switch_leaves_the_serve_config_alone():
    """The cluster section rides in serveConfigV2's args: a default switch must not show there
    (a changed args hash restarts every replica)."""
    cfg = target_config("cpu-demo")
    assert "ray_token_auth" not in cfg.model_dump(mode="json")["cluster"]
    off = _edited(lambda d: d["cluster"].update(ray_token_auth=False), "cpu-demo")
    assert off.model_dump(mode="json")["cluster"]["ray_token_auth"] is False


# -- 3. volumes, mounts, service account, pull secrets, head scheduling ----------------------
def _with_models_volume(d: dict) -> None:
    for group in ("draft", "target"):
        d["cluster"][group].update(volumes=[MODELS_PVC], volume_mounts=[MODELS_MOUNT])
    d["cluster"].update(service_account_name="arbitrage", image_pull_secrets=["registry"])
    d["cluster"]["head"].update(node_selector={"pool": "system"},
                                tolerations=[{"key": "system", "operator": "Exists", "effect": "NoSchedule"}])


def test_a_models_volume_is_mounted_on_the_groups_that_ask():
    groups = _groups(_edited(_with_models_volume))
    target = groups["target"]["template"]["spec"]
    assert target["volumes"] == [MODELS_PVC]
    assert target["containers"][0]["volumeMounts"] == [MODELS_MOUNT]
    assert "volumes" not in groups["coordinator"]["template"]["spec"]


def test_the_service_account_and_pull_secrets_go_on_every_pod_and_only_the_head_mounts_a_token():
    """KubeRay binds its autoscaler Role (Pods get/list/watch/patch, rayclusters get/patch) to
    the head's ServiceAccount (common/rbac.go BuildRole, utils.GetHeadGroupServiceAccountName):
    a worker's token would hand those rights to the replicas' code, remote model code included.
    The account itself stays on the workers: a cloud identity (IRSA, Workload Identity) for
    reading weights needs no Kubernetes API token."""
    cluster = _cluster(_edited(_with_models_volume))
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "arbitrage" and head["imagePullSecrets"] == [{"name": "registry"}]
    assert "automountServiceAccountToken" not in head  # KubeRay's autoscaler sidecar uses the token
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert spec["serviceAccountName"] == "arbitrage", group["groupName"]
        assert spec["automountServiceAccountToken"] is False and spec["imagePullSecrets"] == [{"name": "registry"}]


@pytest.mark.parametrize("name", ["cpu-demo", "llama-1b-8b"])
def test_worker_pods_mount_no_service_account_token(name):
    """Workers never call the Kubernetes API (KubeRay's autoscaler runs on the head; the workers'
    wait-gcs-ready init container and probes ask Ray), so their Pods mount no token, with or
    without a configured ServiceAccount."""
    for cfg in (target_config(name), _edited(lambda d: d["cluster"].update(service_account_name="arbitrage"), name)):
        cluster = _cluster(cfg)
        assert "automountServiceAccountToken" not in cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            assert group["template"]["spec"]["automountServiceAccountToken"] is False, group["groupName"]


def test_the_heads_scheduling_knobs_go_into_the_overlay():
    files = render_kustomize(_edited(_with_models_volume), "x")
    ops = yaml.safe_load(files["overlays/x/scheduling.yaml"])
    head = "/spec/rayClusterConfig/headGroupSpec/template/spec"
    assert {"op": "add", "path": f"{head}/nodeSelector", "value": {"pool": "system"}} in ops
    assert {"op": "add", "path": f"{head}/tolerations",
            "value": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}]} in ops


def test_the_new_fields_stay_out_of_the_serve_config_while_unset():
    assert target_config("llama-1b-8b").model_dump(mode="json")["cluster"]["head"] == {"cpus": 4, "memory": "16Gi"}
    dumped = target_config("llama-1b-8b").model_dump(mode="json")["cluster"]
    assert not {"service_account_name", "image_pull_secrets"} & set(dumped)
    assert not {"volumes", "volume_mounts"} & set(dumped["target"])


@pytest.mark.parametrize("group,value,field,text", [
    ("target", {"volumes": [{"name": "models"}]}, "cluster.target.volumes[0]", "one source mapping"),
    ("target", {"volumes": [{"name": "Models", "emptyDir": {}}]}, "cluster.target.volumes[0]", "DNS-1123"),
    ("target", {"volumes": [MODELS_PVC], "volume_mounts": [{"name": "models", "mountPath": "/dev/shm"}]},
     "cluster.target.volume_mounts[0]", "/dev/shm"),
    ("target", {"volumes": [MODELS_PVC, MODELS_PVC]}, "cluster.target.volumes", "repeat"),
    ("draft", {"volume_mounts": [MODELS_MOUNT]}, "cluster.draft.volume_mounts", "mounts volume 'models'"),
    ("draft", {"volumes": [MODELS_PVC], "volume_mounts": [{"name": "models", "mount_path": "/m"}]},
     "cluster.draft.volume_mounts[0]", "not VolumeMount fields"),
    ("draft", {"volumes": [MODELS_PVC], "volume_mounts": [{"name": "models", "mountPath": "models"}]},
     "cluster.draft.volume_mounts[0]", "absolute"),
    ("head", {"volumes": [MODELS_PVC], "volume_mounts": [{"name": "models", "mountPath": "/dev/shm"}]},
     "cluster.head.volume_mounts[0]", "/dev/shm"),
    # KubeRay's own: it would mount a volume of these names at /dev/shm or Ray's log path
    ("coordinator", {"volumes": [{"name": "shared-mem", "persistentVolumeClaim": {"claimName": "x"}}]},
     "cluster.coordinator.volumes[0]", "/dev/shm"),
    ("head", {"volumes": [{"name": "ray-logs", "emptyDir": {}}]}, "cluster.head.volumes[0]", "/tmp/ray"),
    ("head", {"volumes": [MODELS_PVC], "volume_mounts": [{"name": "models", "mountPath": "/tmp/ray/"}]},
     "cluster.head.volume_mounts[0]", "/tmp/ray"),
])
def test_a_bad_volume_or_mount_is_refused_naming_the_field(group, value, field, text):
    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["cluster"][group].update(value)
    with pytest.raises(ValidationError) as exc:
        C.AppConfig.model_validate(data)
    problems = C.validation_problems(exc.value)
    assert [f for f, _ in problems] == [field] and text in problems[0][1], problems


@pytest.mark.parametrize("value", [{"service_account_name": "Not_A_Name"}, {"image_pull_secrets": ["a b"]}])
def test_object_names_are_kubernetes_names(value):
    data = target_config("cpu-demo").model_dump(mode="json")
    data["cluster"].update(value)
    with pytest.raises(ValidationError, match="DNS-1123 subdomain"):
        C.AppConfig.model_validate(data)


# Kubernetes' Pod validation of tolerations (core/v1: key, operator, value, effect,
# tolerationSeconds): KubeRay would create Pods the API server refuses.
@pytest.mark.parametrize("toleration,field,text", [
    ({"key": "x", "operator": "Exists", "value": "y"}, "value", "must be empty"),
    ({"key": "x", "operator": "In"}, "operator", "'Equal', 'Exists' or ''"),
    ({"key": "x", "operator": "Exists", "effect": "NoSchedul"}, "effect", "'NoExecute'"),
    ({"key": "x", "operator": "Exists", "bogus": 1}, "bogus", "Extra inputs"),
    ({"key": "x", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}, "tolerationSeconds",
     "only with effect NoExecute"),
    ({"key": "x", "operator": "Exists", "tolerationSeconds": 60}, "tolerationSeconds", "only with effect NoExecute"),
    ({"key": "x", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": "60"}, "tolerationSeconds",
     "integer"),
    ({"operator": "Equal", "value": "a"}, "operator", "needs a key"),
    ({"key": "", "value": "a"}, "operator", "needs a key"),  # Equal, Kubernetes' default
    ({"key": "bad key!", "operator": "Exists"}, "key", "not a label key"),
    ({"key": "x", "value": "not a value"}, "value", "not a label value"),
    ({"key": "x", "value": 1}, "value", "string"),
])
@pytest.mark.parametrize("group", ["draft", "head"])
def test_a_toleration_kubernetes_refuses_is_refused_naming_the_field(group, toleration, field, text):
    data = target_config("cpu-demo").model_dump(mode="json")
    data["cluster"][group]["tolerations"] = [{"key": "ok", "operator": "Exists"}, toleration]
    with pytest.raises(ValidationError) as exc:
        C.AppConfig.model_validate(data)
    problems = C.validation_problems(exc.value)
    assert [f for f, _ in problems] == [f"cluster.{group}.tolerations[1].{field}"] and text in problems[0][1], problems


@pytest.mark.parametrize("toleration", [
    {"operator": "Exists"},  # every taint
    {"key": "x", "operator": "Exists", "value": "", "effect": "NoSchedule"},
    {"key": "x", "value": "a", "effect": ""},
    {"key": "x", "operator": "", "value": "a"},  # '' is Equal, as Kubernetes reads it
    {"key": "example.com/spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30},
])
def test_a_toleration_kubernetes_takes_renders_as_written(toleration):
    cfg = _edited(lambda d: d["cluster"]["draft"].update(tolerations=[toleration]), "cpu-demo")
    ops = yaml.safe_load(render_kustomize(cfg, "x")["overlays/x/scheduling.yaml"])
    assert ops == [{"op": "add", "path": "/spec/rayClusterConfig/workerGroupSpecs/0/template/spec/tolerations",
                    "value": [toleration]}]
    assert cfg.model_dump(mode="json")["cluster"]["draft"]["tolerations"] == [toleration]  # round-trips


@pytest.mark.parametrize("selector,text", [
    ({"bad key!": "a"}, "not a label key"),
    ({"example.com/" + "a" * 64: "a"}, "not a label key"),
    ({"zone": "a b"}, "not a label value"),
    ({"zone": "a" * 64}, "not a label value"),
    ({"zone": "-a"}, "not a label value"),
])
@pytest.mark.parametrize("group", ["target", "head"])
def test_a_node_selector_that_is_not_kubernetes_labels_is_refused(group, selector, text):
    data = target_config("cpu-demo").model_dump(mode="json")
    data["cluster"][group]["node_selector"] = selector
    with pytest.raises(ValidationError) as exc:
        C.AppConfig.model_validate(data)
    problems = C.validation_problems(exc.value)
    assert [f for f, _ in problems] == [f"cluster.{group}.node_selector"] and text in problems[0][1], problems


def test_config_check_and_render_refuse_a_bad_toleration_in_the_same_lines(tmp_path, capsys):
    path = _write(tmp_path, lambda d: d["cluster"]["draft"].update(
        tolerations=[{"key": "x", "operator": "Exists", "value": "y", "effect": "NoSchedul"}]))
    assert main(["config", "check", str(path)]) == 1
    checked = [line for line in _err(capsys).splitlines() if line.startswith(f"{path}: ")]
    assert [line.split(": ")[1] for line in checked] == ["cluster.draft.tolerations[0].value",
                                                         "cluster.draft.tolerations[0].effect"]
    assert main(["k8s", "render", "--config", str(path), "--out", str(tmp_path / "k8s")]) == 1
    assert _err(capsys).splitlines() == [f"arbitrage: error: {line}" for line in checked]
    assert not (tmp_path / "k8s").exists()


# -- 4. one coordinator Pod per required coordinator replica --------------------------------
@pytest.mark.parametrize("target", ["llama-1b-8b", "llama-8b-awq-8b", "qwen-math-1.5b-7b"])
def test_every_required_coordinator_gets_its_own_pod(target):
    cfg = target_config(target)
    coordinator = _groups(cfg)["coordinator"]
    required = cfg.coordinator.autoscaling_config.min_replicas
    assert required == 2 and cfg.cluster.coordinator.cpus >= 2  # one Pod could hold both: packing would
    assert coordinator["minReplicas"] >= required and coordinator["replicas"] >= required
    assert coordinator["maxReplicas"] >= coordinator["minReplicas"]


def test_pools_keep_their_first_fit_packing():
    # two draft replicas of half a GPU each share one Pod: only the coordinator is spread
    cfg = _edited(lambda d: d["pools"]["draft"]["autoscaling_config"].update(min_replicas=2))
    assert _groups(cfg)["draft"]["minReplicas"] == 1


# -- 5. accelerator_type ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["pools.target", "coordinator"])
def test_accelerator_type_is_refused_pointing_to_label_selectors(where):
    def edit(d):
        section = d["coordinator"] if where == "coordinator" else d["pools"]["target"]
        section["ray_actor_options"]["accelerator_type"] = "H100"
    ((field, message),) = cluster_problems(_edited(edit))
    assert field == f"{where}.ray_actor_options.accelerator_type"
    assert "accelerator_type:H100" in message and "labels" in message and "label_selector" in message


def test_config_check_and_render_refuse_accelerator_type_in_the_same_line(tmp_path, capsys):
    path = _write(tmp_path, lambda d: d["pools"]["target"]["ray_actor_options"].update(accelerator_type="H100"))
    assert main(["config", "check", str(path)]) == 1
    checked = [line for line in _err(capsys).splitlines() if line.startswith(f"{path}: ")]
    assert len(checked) == 1 and checked[0].startswith(f"{path}: pools.target.ray_actor_options.accelerator_type: ")
    assert main(["k8s", "render", "--config", str(path), "--out", str(tmp_path / "k8s")]) == 1
    assert _err(capsys).splitlines() == [f"arbitrage: error: {checked[0]}"]
    assert not (tmp_path / "k8s").exists()


# -- 6. config check runs the cluster checks; render's lines name the file ------------------
@pytest.mark.parametrize("edit,field", [
    (lambda d: (d["pools"]["target"]["ray_actor_options"].update(memory=2**31),
                d["cluster"]["target"].update(memory="1Gi")), "pools.target.ray_actor_options.memory"),
    (lambda d: d["pools"]["draft"]["ray_actor_options"].update(label_selector={"zone": "a"}),
     "pools.draft.ray_actor_options.label_selector"),
], ids=["memory-fit", "undeclared-label"])
def test_config_check_refuses_what_render_refuses_in_the_same_lines(tmp_path, capsys, edit, field):
    path = _write(tmp_path, edit)
    assert main(["config", "check", str(path)]) == 1
    checked = [line for line in _err(capsys).splitlines() if line.startswith(f"{path}: ")]
    assert [line.split(": ")[1] for line in checked] == [field]
    assert main(["k8s", "render", "--config", str(path), "--out", str(tmp_path / "k8s")]) == 1
    assert _err(capsys).splitlines() == [f"arbitrage: error: {line}" for line in checked]


def test_config_check_skips_the_cluster_checks_of_a_config_without_a_cluster_section(tmp_path, capsys):
    """A local config (no `cluster:`) keeps what only a KubeRay cluster refuses; `k8s render
    --config` of it still runs them, naming the file."""
    local = ROOT / "configs" / "local-cpu.yaml"
    assert "cluster" not in yaml.safe_load(local.read_text())
    path = _write(tmp_path, lambda d: d["pools"]["target"]["ray_actor_options"].update(accelerator_type="CPU-X"),
                  source=local)
    assert main(["config", "check", str(path)]) == 0
    capsys.readouterr()
    assert main(["k8s", "render", "--config", str(path), "--out", str(tmp_path / "k8s")]) == 1
    assert _err(capsys).startswith(f"arbitrage: error: {path}: pools.target.ray_actor_options.accelerator_type: ")


def test_a_rendering_error_names_the_config_file_first():
    bad = _edited(lambda d: d["pools"]["target"]["ray_actor_options"].update(accelerator_type="H100"))
    with pytest.raises(ValueError, match=r"^/x/bad\.yaml: pools\.target\.ray_actor_options\.accelerator_type: "):
        render_targets({"bad": bad}, {"bad": Path("/x/bad.yaml")})
    with pytest.raises(ValueError) as exc:
        render_targets({"llama-1b-8b": bad})
    assert str(exc.value).startswith(f"{target_path('llama-1b-8b')}: pools.target.")


def test_pod_options_on_a_group_no_pool_runs_in_are_refused_not_dropped():
    data = target_config("cpu-demo").model_dump(mode="json")
    data["pools"]["router"] = data["pools"]["prm"] = None  # no scorer pools: no 'scorers' group
    data["policy"] = {"default": "draft"}
    data["cluster"].setdefault("scorers", {})["node_selector"] = {"pool": "scorers"}
    problems = cluster_problems(C.AppConfig.model_validate(data))
    assert problems == [("cluster.scorers.node_selector", problems[0][1])] and "no pool" in problems[0][1]


def test_pod_options_stay_out_of_the_apps_args_so_changing_them_restarts_no_replica():
    """serveConfigV2's args are every deployment's code version: a cluster section there made a
    tolerations or volume change replace every replica."""
    from arbitrage_common.kuberay.render import serve_config_v2

    data = target_config("llama-1b-8b").model_dump(mode="json")
    before = serve_config_v2(C.AppConfig.model_validate(data))
    data["cluster"]["target"].update(tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                     volumes=[MODELS_PVC], volume_mounts=[MODELS_MOUNT])
    data["cluster"]["head"]["node_selector"] = {"pool": "system"}
    assert serve_config_v2(C.AppConfig.model_validate(data)) == before
    assert "cluster" not in yaml.safe_load(before)["applications"][0]["args"]
