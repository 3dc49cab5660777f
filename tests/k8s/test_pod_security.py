"""Every Pod the k8s/ tree makes meets the Pod Security Standards' ``restricted`` profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/): the Ray Pods as KubeRay
creates them from each built overlay (its own containers and volumes added), and the HA Redis.
The checker is written from the standard's rules, and shown to fail on each of them."""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_k8s_manifests import built

from arbitrage_common.config import AppConfig
from arbitrage_common.kuberay.render import render_rayservice
from arbitrage_common.kuberay.targets import target_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"

# -- the restricted profile -------------------------------------------------------------------
# Volume sources the restricted profile allows (everything else, hostPath first, is refused).
RESTRICTED_VOLUME_SOURCES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                             "projected", "secret"}
ADDABLE_CAPABILITIES = {"NET_BIND_SERVICE"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _containers(spec: dict) -> list[tuple[str, dict]]:
    return [(f"{kind}[{c.get('name', i)}]", c) for kind in ("initContainers", "containers", "ephemeralContainers")
            for i, c in enumerate(spec.get(kind) or [])]


def restricted_violations(spec: dict, annotations: dict | None = None) -> list[str]:
    """What in a Pod spec the ``restricted`` profile refuses (baseline's rules included), one
    line each; empty when the API server would admit it in an ``enforce=restricted`` namespace."""
    bad: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad.append(f"{field}: true")
    for volume in spec.get("volumes") or []:
        sources = set(volume) - {"name"}
        if not sources <= RESTRICTED_VOLUME_SOURCES:
            bad.append(f"volume {volume.get('name')}: {sorted(sources - RESTRICTED_VOLUME_SOURCES)} not allowed")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl.get('name')} is not a safe one")
    for key, value in (annotations or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/"):
            bad.append(f"annotation {key}: {value}")
    # Pod-level fields (they also hold for every container that does not set its own)
    if pod_sc.get("runAsNonRoot") is False:
        bad.append("securityContext.runAsNonRoot: false")
    if pod_sc.get("runAsUser") == 0:
        bad.append("securityContext.runAsUser: 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_TYPES:
        bad.append(f"securityContext.seccompProfile.type: {pod_seccomp}")
    for where, sc in [("securityContext", pod_sc)] + [(f"{n}.securityContext", c.get("securityContext") or {})
                                                      for n, c in _containers(spec)]:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{where}.windowsOptions.hostProcess: true")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor is not None and apparmor not in APPARMOR_TYPES:
            bad.append(f"{where}.appArmorProfile.type: {apparmor}")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            bad.append(f"{where}.seLinuxOptions: {selinux}")
    for name, container in _containers(spec):
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - ADDABLE_CAPABILITIES:
            bad.append(f"{name}: capabilities.add {sorted(set(caps['add']) - ADDABLE_CAPABILITIES)}")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and pod_sc.get("runAsNonRoot")
                                               is not True):
            bad.append(f"{name}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser: 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in SECCOMP_TYPES:
            bad.append(f"{name}: seccompProfile.type: {seccomp}")
        if seccomp is None and pod_seccomp is None:
            bad.append(f"{name}: no seccompProfile (pod or container)")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount {sc['procMount']}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort {port['hostPort']}")
    return bad


# -- the Pods KubeRay 1.6 makes of a RayService -----------------------------------------------
def kuberay_pod_specs(rayservice: dict) -> dict[str, dict]:
    """The Pod specs KubeRay creates from ``rayservice``, with what it adds that touches the
    profile (ray-project/kuberay v1.6.0, ray-operator/controllers/ray/common/pod.go): on the head,
    with enableInTreeAutoscaling, an autoscaler container whose securityContext is
    ``autoscalerOptions.securityContext`` and nothing else (``mergeAutoscalerOverrides``) and an
    emptyDir ``ray-logs``; on workers, the ``wait-gcs-ready`` init container with a copy of the
    Ray container's securityContext (``DefaultWorkerPodTemplate``); an emptyDir ``shared-mem``
    where no /dev/shm is mounted (``addEmptyDir``). The GCS-FT Redis cleanup Job is the head Pod
    with its Ray container only (raycluster_controller.go), so it passes when the head does."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
    if cluster.get("enableInTreeAutoscaling"):
        autoscaler = {"name": "autoscaler", "image": head["containers"][0]["image"]}
        if (sc := (cluster.get("autoscalerOptions") or {}).get("securityContext")) is not None:
            autoscaler["securityContext"] = copy.deepcopy(sc)
        head["containers"].append(autoscaler)
        head.setdefault("volumes", []).append({"name": "ray-logs", "emptyDir": {}})
    specs = {"head": head}
    for group in cluster["workerGroupSpecs"]:
        spec = copy.deepcopy(group["template"]["spec"])
        ray = spec["containers"][0]
        wait = {"name": "wait-gcs-ready", "image": ray["image"]}
        if "securityContext" in ray:
            wait["securityContext"] = copy.deepcopy(ray["securityContext"])
        spec.setdefault("initContainers", []).append(wait)
        specs[group["groupName"]] = spec
    for spec in specs.values():
        if not any(m.get("mountPath") == "/dev/shm" for m in spec["containers"][0].get("volumeMounts") or []):
            spec.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": {"medium": "Memory"}})
    return specs



OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())


def _pods_of(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """(spec, annotations) of every Pod the built objects make, by a readable name."""
    pods = {}
    for doc in docs:
        if doc["kind"] == "RayService":
            for name, spec in kuberay_pod_specs(doc).items():
                pods[f"{doc['metadata']['name']}/{name}"] = (spec, {})
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = doc["spec"]["template"]
            pods[f"{doc['kind']}/{doc['metadata']['name']}"] = (template["spec"],
                                                               template.get("metadata", {}).get("annotations", {}))
    return pods


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_pod_of_every_overlay_meets_the_restricted_profile(overlay):
    pods = _pods_of(built(overlay))
    assert any(name.endswith("/head") for name in pods)
    if overlay.name.endswith("-ha"):
        assert "Deployment/arbitrage-redis" in pods
    problems = {name: bad for name, (spec, annotations) in pods.items()
                if (bad := restricted_violations(spec, annotations))}
    assert not problems


def test_a_configs_own_pod_options_keep_the_profile():
    """A models PVC, a ServiceAccount and pull secrets (docs/KUBERAY.md §2, §5) change nothing."""
    data = target_config("llama-1b-8b").model_dump(mode="json")
    pvc = {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    for group in ("draft", "target", "scorers"):
        data["cluster"][group].update(volumes=[pvc], volume_mounts=[{"name": "models", "mountPath": "/models",
                                                                     "readOnly": True}])
    data["cluster"].update(service_account_name="arbitrage", image_pull_secrets=["registry"])
    specs = kuberay_pod_specs(render_rayservice(AppConfig.model_validate(data)))
    assert {name: bad for name, spec in specs.items() if (bad := restricted_violations(spec))} == {}


def test_without_the_autoscaler_context_kuberays_sidecar_would_be_refused():
    """Without ``autoscalerOptions.securityContext`` KubeRay's autoscaler sidecar would have none
    and the head Pod would be refused; the workers' init container copies the Ray container's."""
    manifest = render_rayservice(target_config("cpu-demo"))
    del manifest["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    specs = kuberay_pod_specs(manifest)
    assert restricted_violations(specs["head"]) == [
        "containers[autoscaler]: allowPrivilegeEscalation is not false",
        "containers[autoscaler]: capabilities.drop lacks ALL"]
    worker = specs["draft"]
    assert worker["initContainers"][0]["securityContext"] == worker["containers"][0]["securityContext"]


def test_the_ray_pods_run_as_the_images_numeric_non_root_user():
    """The Pods set runAsNonRoot and no uid: kubelet starts an image whose USER is a non-root
    number (rayproject/ray's `USER $RAY_UID`, 1000) and refuses one that would run as root or
    names its user (it cannot check a name). k8s/Dockerfile keeps the Ray image's user: no USER
    of its own, its files owned ray:users. No fixed uid or fsGroup, so clusters that assign them
    per namespace (OpenShift's restricted-v2) can."""
    dockerfile = (K8S / "Dockerfile").read_text()
    assert not re.search(r"^\s*USER\b", dockerfile, re.MULTILINE), "a USER here must be a non-root number"
    assert re.search(r"^FROM rayproject/ray:", dockerfile, re.MULTILINE)
    assert set(re.findall(r"--chown=(\S+)", dockerfile)) == {"ray:users"}
    for spec in kuberay_pod_specs(render_rayservice(target_config("cpu-demo"))).values():
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and not {"runAsUser", "runAsGroup", "fsGroup"} & set(sc)
        for container in spec["containers"] + spec.get("initContainers", []):
            assert not {"runAsUser", "runAsGroup"} & set(container.get("securityContext", {}))


def test_the_gpu_docs_vllm_image_runs_as_a_numeric_non_root_user():
    """docs/GPU.md's image on vllm/vllm-openai (root by default) must switch to a numeric
    non-root USER, or kubelet refuses its Pods under runAsNonRoot."""
    gpu_md = (K8S.parent / "docs" / "GPU.md").read_text()
    block = gpu_md[gpu_md.index("FROM vllm/vllm-openai"):]
    block = block[:block.index("```")]
    users = re.findall(r"^USER\s+(\S+)", block, re.MULTILINE)
    assert users and users[-1].isdigit() and int(users[-1]) != 0, users


def test_the_redis_data_dir_is_a_volume_its_user_can_write():
    docs = list(yaml.safe_load_all((K8S / "components" / "ha" / "redis.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    sc = spec["securityContext"]
    assert sc["runAsUser"] == 999 and sc["fsGroup"] == 999  # the official image's redis user and group
    (redis,) = spec["containers"]
    (data,) = [m for m in redis["volumeMounts"] if m["mountPath"] == "/data"]  # the image's WORKDIR
    assert next(v for v in spec["volumes"] if v["name"] == data["name"]).keys() == {"name", "emptyDir"}


# -- the checker can fail ---------------------------------------------------------------------
def _compliant() -> dict:
    return {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "init", "securityContext": {"allowPrivilegeEscalation": False,
                                                                     "capabilities": {"drop": ["ALL"]}}}],
            "containers": [{"name": "main", "ports": [{"containerPort": 8000}],
                            "securityContext": {"allowPrivilegeEscalation": False,
                                                "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "data", "emptyDir": {}}]}


def _main(spec: dict) -> dict:
    return spec["containers"][0]["securityContext"]


BREAKS: dict[str, tuple[Callable[[dict], object], str]] = {
    "no runAsNonRoot": (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
    "pod runAsNonRoot false": (lambda s: s["securityContext"].update(runAsNonRoot=False), "runAsNonRoot: false"),
    "container runAsNonRoot false": (lambda s: _main(s).update(runAsNonRoot=False), "runAsNonRoot is not true"),
    "pod runAsUser 0": (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser: 0"),
    "container runAsUser 0": (lambda s: _main(s).update(runAsUser=0), "runAsUser: 0"),
    "no allowPrivilegeEscalation": (lambda s: _main(s).pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    "allowPrivilegeEscalation true": (lambda s: _main(s).update(allowPrivilegeEscalation=True),
                                      "allowPrivilegeEscalation"),
    "init container without context": (lambda s: s["initContainers"][0].pop("securityContext"),
                                       "initContainers[init]: allowPrivilegeEscalation"),
    "no capabilities": (lambda s: _main(s).pop("capabilities"), "capabilities.drop lacks ALL"),
    "drop without ALL": (lambda s: _main(s).update(capabilities={"drop": ["NET_RAW"]}), "capabilities.drop"),
    "add SYS_ADMIN": (lambda s: _main(s)["capabilities"].update(add=["SYS_ADMIN"]), "capabilities.add"),
    "no seccompProfile": (lambda s: s["securityContext"].pop("seccompProfile"), "no seccompProfile"),
    "pod seccomp Unconfined": (lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                               "seccompProfile.type: Unconfined"),
    "container seccomp Unconfined": (lambda s: _main(s).update(seccompProfile={"type": "Unconfined"}),
                                     "seccompProfile.type: Unconfined"),
    "privileged": (lambda s: _main(s).update(privileged=True), "privileged"),
    "hostNetwork": (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    "hostPID": (lambda s: s.update(hostPID=True), "hostPID"),
    "hostIPC": (lambda s: s.update(hostIPC=True), "hostIPC"),
    "hostPath volume": (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/models"}}), "hostPath"),
    "nfs volume": (lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), "nfs"),
    "hostPort": (lambda s: s["containers"][0]["ports"][0].update(hostPort=8000), "hostPort"),
    "procMount Unmasked": (lambda s: _main(s).update(procMount="Unmasked"), "procMount"),
    "seLinux user": (lambda s: _main(s).update(seLinuxOptions={"user": "system_u"}), "seLinuxOptions"),
    "appArmor Unconfined": (lambda s: s["securityContext"].update(appArmorProfile={"type": "Unconfined"}),
                            "appArmorProfile"),
    "hostProcess": (lambda s: _main(s).update(windowsOptions={"hostProcess": True}), "hostProcess"),
    "unsafe sysctl": (lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
                      "sysctl"),
}


def test_the_compliant_pod_passes():
    assert restricted_violations(_compliant()) == []


@pytest.mark.parametrize("name", BREAKS)
def test_the_checker_rejects_a_pod_missing_each_rule(name):
    spec = _compliant()
    breaks, expected = BREAKS[name]
    breaks(spec)
    problems = restricted_violations(spec)
    assert any(expected in p for p in problems), problems


def test_the_checker_rejects_an_unconfined_apparmor_annotation():
    annotations = {APPARMOR_ANNOTATION + "main": "unconfined"}
    assert restricted_violations(_compliant(), annotations) == [f"annotation {APPARMOR_ANNOTATION}main: unconfined"]


def _container_level_only(spec: dict) -> None:
    """runAsNonRoot and seccomp on every container instead of the Pod."""
    spec["securityContext"] = {}
    for container in spec["initContainers"] + spec["containers"]:
        container["securityContext"].update(runAsNonRoot=True,
                                            seccompProfile={"type": "Localhost", "localhostProfile": "p.json"})


@pytest.mark.parametrize("allowed", [
    lambda s: _main(s)["capabilities"].update(add=["NET_BIND_SERVICE"]),
    _container_level_only,
    lambda s: s["volumes"].append({"name": "m", "persistentVolumeClaim": {"claimName": "models"}}),
], ids=["NET_BIND_SERVICE", "container-level-only", "pvc"])
def test_the_checker_admits_what_the_profile_allows(allowed):
    spec = _compliant()
    allowed(spec)
    assert restricted_violations(spec) == []


@pytest.mark.parametrize("source,profiles", [({"hostPath": {"path": "/mnt/models"}}, "profiles 'baseline' and 'restricted'"),
                                             ({"nfs": {"server": "nfs.local", "path": "/models"}}, "profile 'restricted'")])
def test_config_check_warns_of_a_volume_that_leaves_the_profile(tmp_path, source, profiles):
    """The Pods it renders are refused where the profile is enforced; check says so, naming the field."""
    from arbitrage_common.cli.config_cmd import check_file

    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["cluster"]["target"].update(volumes=[{"name": "models", **source}],
                                     volume_mounts=[{"name": "models", "mountPath": "/models", "readOnly": True}])
    specs = kuberay_pod_specs(render_rayservice(AppConfig.model_validate(data)))
    assert [name for name, spec in specs.items() if restricted_violations(spec)] == ["target"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    result = check_file(path)
    assert result["ok"]  # a node-local model cache is a fair choice where nothing enforces the profile
    (warning,) = [w for w in result["warnings"] if "Pod Security" in w]
    assert warning.startswith(f"cluster.target.volumes[0].{next(iter(source))}: volume 'models'")
    assert f"Pod Security Standards' {profiles}:" in warning


def test_config_check_is_quiet_about_volumes_the_profile_admits(tmp_path):
    from arbitrage_common.cli.config_cmd import check_file

    data = target_config("llama-1b-8b").model_dump(mode="json")
    data["cluster"]["target"].update(volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
                                     volume_mounts=[{"name": "models", "mountPath": "/models"}])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    assert not [w for w in check_file(path)["warnings"] if "Pod Security" in w]
