"""AppConfig -> the KubeRay RayService and its kustomize base and overlay.

``cluster_app_config`` is the one transform from a config to what runs on the cluster: every
deployment pinned to its worker group by a Ray node label, HTTP on 0.0.0.0, ``base_dir`` as
the cluster sees it, model paths checked on the replicas' nodes (the head Pod holds no
weights), and no ``cluster`` section (the Pods' shape is the RayCluster's, not the app's).
The RayService's ``serveConfigV2`` is ``render_serve_config`` of that config, unchanged. Pure
logic: yaml and pydantic only.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import yaml

from ..config import COORDINATOR, RAY_CLUSTER_ENV, AppConfig, render_serve_config
from .security import container_security_context, pod_security_context
from .sizing import GroupSize, SizingError, group_sizes, replica_demand
from .spec import (
    DASHBOARD_AGENT_PORT,
    GROUP_LABEL,
    GROUP_NAMES,
    GROUP_OF,
    METRICS_PORT,
    RAY_IMAGE_PORTS,
    RAY_LABEL_PREFIX,
    GroupSpec,
    HeadSpec,
)

SERVE_PORT_NAMES = ("serve", "serve-grpc")  # KubeRay 1.6+ puts every serve / serve-* port on the serve Service
SERVE_HTTP_PORT_NAME, SERVE_GRPC_PORT_NAME = SERVE_PORT_NAMES
# The serve Service's gRPC port speaks HTTP/2 without TLS: KubeRay builds the Service's ports as a
# name and a port only, so Gateway API implementations and meshes would take 9000 for HTTP/1.1.
# KubeRay 1.6+ takes a user `spec.serveService` port of the same name as it is, appProtocol
# included (ray-operator/controllers/ray/common/service.go, BuildServeService).
GRPC_APP_PROTOCOL = "kubernetes.io/h2c"
# Custom resource names the rendering passes to `ray start --resources='<json>'` (inside single
# quotes on KubeRay's shell command line): no quote may end them early.
_RESOURCE_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
APP_LABEL = "app.kubernetes.io/name"
# Which RayService a Pod belongs to (its config's name): the PodDisruptionBudgets and spread
# constraints select one RayService's Pods by it, never another config's in the same namespace.
INSTANCE_LABEL = "app.kubernetes.io/instance"
# The first words of every rendered file: render removes a stale file only if it starts so.
RENDERED_MARK = "# Rendered by `arbitrage k8s render`"
# The header's second line: a project target's (configs/, presets: `make k8s` renders it again)
# or a user's --config rendering, which a render of the project's targets never names as left over.
TARGET_HINT = "# (edit the config, then `make k8s`).\n"
CONFIG_HINT = "# (edit the config file, then `arbitrage k8s render --config` it again).\n"
AUTOSCALER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
# Seconds the old cluster of a NewCluster upgrade outlives the longest request it may still hold.
DELETION_MARGIN_S = 30
# /dev/shm is KubeRay's: it mounts a memory-backed emptyDir `shared-mem` there in every Ray
# container that has none, sized to the container's memory limit (KubeRay 1.6
# ray-operator/controllers/ray/common/pod.go: BuildPod -> addEmptyDir -> makeEmptyDirVolume ->
# findMemoryReqOrLimit; skipped only where rayStartParams set plasma-directory, which the rendering
# never does), big enough for NCCL between a tensor-parallel engine's ranks, vLLM's
# shared-memory queues and Ray's object store. The rendering mounts nothing there.
#
# A Pod without GPUs (the head, the coordinator, any group whose Pods ask for none): KubeRay sets
# `num-gpus` only for a Pod with a GPU limit, so `ray start` would count whatever GPUs the node's
# runtime exposes (the NVIDIA runtime as the node's default, with the CUDA image's
# NVIDIA_VISIBLE_DEVICES=all, exposes every GPU of the node), and Ray could place a GPU replica
# there. `num-gpus: "0"` keeps Ray's scheduler off them; NVIDIA_VISIBLE_DEVICES=void makes the
# NVIDIA runtime leave the container as plain runc would (no GPU, no driver libraries).
NO_GPU_START_PARAMS = {"num-gpus": "0"}
NO_GPU_ENV = [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]
# An evicted Pod (a node drain) gets SIGTERM. Ray 2.60's `ray start --block` (the PID 1 of
# KubeRay's container: bash execs the last command of its `-c` string) then marks its node
# draining, so Serve starts replacements elsewhere, drains the node's proxy and stops the
# replicas there gracefully, and it kills the node's processes once the node is idle or after
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (default 30 s; ray/_private/node.py,
# _drain_node_before_shutdown); Kubernetes kills the container terminationGracePeriodSeconds
# after the SIGTERM (default 30 s). Both would cut a coordinator replica's graceful shutdown
# (300 s in the presets) to 30 s, so the coordinator group raises both (coordinator_drain_s).
# The pool groups keep Ray's drain (written out, POOL_DRAIN_S) while their pools' graceful
# shutdown leaves a replacement POOL_REPLACEMENT_S to start within it (the pools' default, 10 s,
# does), and drain longer for a longer one; like the coordinator's, they get DRAIN_MARGIN_S of
# grace beyond it: at the default grace SIGKILL would land on the drain's deadline.
DRAIN_TIMEOUT_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
POOL_DRAIN_S = 30
POOL_REPLACEMENT_S = 20
# Seconds of a coordinator Pod's drain beyond its replicas' graceful shutdown (a replacement's
# start), and of every worker Pod's termination grace beyond its drain (`ray start` stopping its
# processes).
DRAIN_MARGIN_S = 30
# The coordinator Pods' readiness probe: KubeRay's own checks for a RayService worker (the
# raylet's health through the dashboard agent, then the Serve proxy's /-/healthz; KubeRay 1.6
# ray-operator/controllers/ray/common/pod.go, initLivenessAndReadinessProbe), which KubeRay keeps
# when the container sets one. KubeRay's gives the probe 2 s and takes one failure as not Ready,
# so one slow answer of a busy coordinator's proxy would take its Pod out of the serve Service.
PROBE_CHECK_TIMEOUT_S = 5
COORDINATOR_PROBE_FAILURES = 3
# Ray token authentication (KubeRay 1.5+, Ray 2.52+): KubeRay generates a Secret per RayCluster
# and gives every Ray container the token; the dashboard, job API and Ray Client then want it.
TOKEN_AUTH = {"mode": "token"}
# A config field at the start of an error message (`pools.target.ray_actor_options.memory: ...`).
_FIELD = re.compile(r"[\w.\[\]]+")


def _where(role: str) -> str:
    return "coordinator" if role == "coordinator" else f"pools.{role}"


def _selector_problem(selector: dict[str, str], group: str, offered: dict[str, str]) -> str | None:
    """Why a replica (or bundle) selecting ``selector`` could never land on a Pod of ``group``,
    whose Ray nodes carry ``offered`` (the group label and ``cluster.<group>.labels``), or None.
    Ray's own labels (``ray.io/...``) are Ray's to set and pass unchecked."""
    for key, value in selector.items():
        if key == GROUP_LABEL:
            if value != group:
                return (f"{key}: {value!r} conflicts with the rendering, which pins this deployment to its worker "
                        f"group with {GROUP_LABEL}: {group!r} (leave the key out)")
        elif key.startswith(RAY_LABEL_PREFIX):
            continue
        elif key not in offered:
            return (f"{key}: no Pod of worker group {group!r} carries this Ray node label (declare it in "
                    f"cluster.{group}.labels)")
        elif not value.startswith(("!", "in(")) and value != offered[key]:
            return (f"{key}: {value!r}, but worker group {group!r} carries {key}: {offered[key]!r} "
                    f"(cluster.{group}.labels)")
    return None


def _pin(spec, role: str, offered: dict[str, str]) -> dict[str, Any]:
    """The fields that pin one deployment spec to its group (bundled pools pin every bundle):
    the user's own selectors, each merged with the group label. Raises SizingError (a
    ValueError) naming the field for a selector no Pod of the group matches."""
    group = GROUP_OF[role]
    pin = {GROUP_LABEL: group}
    if (accelerator := spec.ray_actor_options.accelerator_type) is not None:
        # Ray turns it into the custom resource `accelerator_type:<type>`, which no group's
        # rayStartParams offer: the autoscaler would never launch a Pod for such a replica.
        raise SizingError(
            f"{_where(role)}.ray_actor_options.accelerator_type: {accelerator!r} becomes Ray's custom resource "
            f"'accelerator_type:{accelerator}', which no worker group offers, so the autoscaler never "
            f"adds a Pod for such a replica; select the GPU by a Ray node label instead: declare it on the group "
            f"(cluster.{group}.labels, e.g. {{gpu: h100}}, beside a node_selector on the GPU product) and select it "
            f"(ray_actor_options.label_selector, or placement_group_bundle_label_selector, e.g. {{gpu: h100}})")
    bundles = getattr(spec, "placement_group_bundles", None)
    if bundles:
        field = f"{_where(role)}.placement_group_bundle_label_selector"
        selectors = spec.placement_group_bundle_label_selector or [{}]
        for i, selector in enumerate(selectors):
            if (problem := _selector_problem(selector, group, offered)) is not None:
                raise SizingError(f"{field}[{i}]: {problem}")
        # one merged selector per selector given (1: all bundles alike), group label last: it wins
        return {"placement_group_bundle_label_selector": [{**selector, **pin} for selector in selectors]}
    options = spec.ray_actor_options
    if (problem := _selector_problem(options.label_selector, group, offered)) is not None:
        raise SizingError(f"{_where(role)}.ray_actor_options.label_selector: {problem}")
    return {"ray_actor_options": {**options.model_dump(mode="json"),
                                  "label_selector": {**options.label_selector, **pin}}}


def _group_labels(cfg: AppConfig, group: str) -> dict[str, str]:
    """The Ray node labels of a group's Pods (KubeRay's group ``labels``)."""
    return {GROUP_LABEL: group, **cfg.cluster.group(group).labels}


def cluster_app_config(cfg: AppConfig) -> AppConfig:
    """``cfg`` as it is served on its KubeRay cluster (see the module docstring)."""
    data = cfg.model_dump(mode="json")
    for role, spec in cfg.pools.configured():
        data["pools"][role].update(_pin(spec, role, _group_labels(cfg, GROUP_OF[role])))
    data["coordinator"].update(_pin(cfg.coordinator, "coordinator", _group_labels(cfg, GROUP_OF["coordinator"])))
    data["http"]["host"] = "0.0.0.0"
    data["model_path_check"] = "replicas"
    if cfg.cluster.base_dir is not None:
        data["base_dir"] = cfg.cluster.base_dir
    # The app never reads its cluster section (the pins above carry what it needs): left out, a
    # change to Pod options (tolerations, volumes, ...) leaves the app's args, and so every
    # replica, alone.
    data.pop("cluster", None)
    return AppConfig.model_validate(data)


# Kubernetes tools read YAML with go-yaml v2's YAML 1.1 rules (kubectl, kustomize, the API
# server, KubeRay's own parse of serveConfigV2: sigs.k8s.io/yaml): a plain y, n, yes, off, 1e3,
# 0x1F, 1_000 or 12:30 is no string there, though PyYAML writes it plain (it reads it back as
# one). Resolvers decide by a plain scalar's first character: one that starts with a letter or
# '/' is a string unless it is one of these words (any case); every other string is quoted.
_PLAIN_START = re.compile(r"[A-Za-z/]")
_YAML11_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def _represent_str(dumper: _ManifestDumper, s: str) -> yaml.ScalarNode:
    if "\n" in s:
        # Never plain (PyYAML quotes it, or a literal block: a string either way).
        style = "|" if dumper.literal_blocks else None
    elif _PLAIN_START.match(s) and s.lower() not in _YAML11_WORDS:
        style = None  # plain, unless PyYAML's own syntax wants quotes
    else:
        style = '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


class _ManifestDumper(yaml.SafeDumper):
    """The one dumper of every rendered file and of ``serveConfigV2``: strings a YAML 1.1 reader
    could take for another type double-quoted; multi-line strings (``serveConfigV2``) as literal
    blocks, so a manifest reads as YAML."""

    literal_blocks = True


class _NoBlocksDumper(_ManifestDumper):
    literal_blocks = False


_ManifestDumper.add_representer(str, _represent_str)


def dump_yaml(obj: Any, literal_blocks: bool = True) -> str:
    return yaml.dump(obj, Dumper=_ManifestDumper if literal_blocks else _NoBlocksDumper, sort_keys=False,
                     default_flow_style=False, width=10**6, allow_unicode=True)


def serve_config_v2(cfg: AppConfig) -> str:
    """The ``serveConfigV2`` string: the Serve YAML of ``cluster_app_config(cfg)``. KubeRay reads
    it with go-yaml before it sends it to Ray, so it is dumped as the manifests are (its own
    multi-line strings, prompt templates, quoted as PyYAML quotes them)."""
    return dump_yaml(render_serve_config(cluster_app_config(cfg)), literal_blocks=False)


def pinned_ray_version() -> str:
    """The ray version this package pins (its ``ray[serve]==X`` requirement)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("arbitrage-serve") or []
    except PackageNotFoundError:  # running from a tree that is not installed
        reqs = []
    for req in reqs:
        name, _, version = req.partition("==")
        if name.split("[")[0].strip() == "ray" and version:
            return version.split(";")[0].strip()
    raise RuntimeError("arbitrage-serve is not installed with a pinned ray[serve]==X requirement")


def _resources(cpus: int, memory: str, gpus: int) -> dict[str, Any]:
    amounts = {"cpu": str(cpus), "memory": memory}
    limits = {**amounts, **({GPU_RESOURCE: str(gpus)} if gpus else {})}
    return {"requests": dict(amounts), "limits": limits}


def auth_secret_env(cfg: AppConfig) -> list[dict[str, Any]]:
    """The container env that carries the API keys (``auth.api_key_env``) from a Secret: the
    key named like the variable in Secret ``auth.k8s_secret`` (default ``<name>-api-keys``).
    Empty when authentication is off. Every Pod gets it, so a replica finds it on any node."""
    var = cfg.auth.api_key_env
    if not var:
        return []
    secret = cfg.auth.k8s_secret or f"{cfg.name}-api-keys"
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": var}}}]


def _container(name: str, image: str, resources: dict, ports: dict[str, int],
               env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Ray node's container: the cluster's Ray environment (RAY_CLUSTER_ENV), then ``env``."""
    container: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
                                 "resources": resources,
                                 "ports": [{"name": n, "containerPort": p} for n, p in ports.items()]}
    container["env"] = [{"name": k, "value": v} for k, v in RAY_CLUSTER_ENV.items()] + [dict(e) for e in env or ()]
    container["securityContext"] = container_security_context()
    return container


def _add_pod_options(pod_spec: dict[str, Any], cfg: AppConfig, shape: GroupSpec | HeadSpec) -> dict[str, Any]:
    """``pod_spec`` with the config's own volumes and mounts (``shape``: the head or a group),
    after any the rendering set, and the cluster's serviceAccountName and imagePullSecrets (the
    workers mount no token: ``_worker``)."""
    if shape.volumes:
        pod_spec["volumes"] = pod_spec.get("volumes", []) + [dict(v) for v in shape.volumes]
    if shape.volume_mounts:
        container = pod_spec["containers"][0]
        container["volumeMounts"] = container.get("volumeMounts", []) + [dict(m) for m in shape.volume_mounts]
    if cfg.cluster.service_account_name:
        pod_spec["serviceAccountName"] = cfg.cluster.service_account_name
    if cfg.cluster.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in cfg.cluster.image_pull_secrets]
    return pod_spec


def _serve_ports(cfg: AppConfig) -> dict[str, int]:
    return {SERVE_HTTP_PORT_NAME: cfg.http.port, SERVE_GRPC_PORT_NAME: cfg.grpc.port, "metrics": METRICS_PORT}


def _head_labels(cfg: AppConfig) -> dict[str, str]:
    return {APP_LABEL: "arbitrage-serve", INSTANCE_LABEL: cfg.name}


def _group_pod_labels(cfg: AppConfig, group: str) -> dict[str, str]:
    return {APP_LABEL: "arbitrage-serve", INSTANCE_LABEL: cfg.name, GROUP_LABEL: group}


def _spread_over_nodes(labels: dict[str, str]) -> list[dict[str, Any]]:
    """A group's Pods on as many Kubernetes nodes as the scheduler can find: Serve's SPREAD
    only spreads replicas over Ray nodes (Pods), and two Pods on one node go down with one
    drain. Preferred (ScheduleAnyway): a cluster with fewer nodes than Pods still schedules."""
    return [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": dict(labels)}}]


def _head(cfg: AppConfig) -> dict[str, Any]:
    head = cfg.cluster.head
    ports = {**RAY_IMAGE_PORTS, **_serve_ports(cfg)}
    pod_spec = _add_pod_options({"containers": [_container("ray-head", cfg.cluster.image,
                                                           _resources(head.cpus, head.memory, 0),
                                                           ports, NO_GPU_ENV + auth_secret_env(cfg))],
                                 "securityContext": pod_security_context()}, cfg, head)
    return {
        # No CPUs and no GPUs for Ray's scheduler: no replica ever lands on the head.
        "rayStartParams": {"num-cpus": "0", **NO_GPU_START_PARAMS, "dashboard-host": "0.0.0.0",
                           "metrics-export-port": str(METRICS_PORT)},
        "template": {"metadata": {"labels": _head_labels(cfg)}, "spec": pod_spec},
    }


def ray_start_resources(resources: dict[str, int]) -> str:
    """``rayStartParams`` ``resources``: the JSON object in single quotes, the form KubeRay
    writes itself (it lands on the ``ray start`` shell command line) and that both KubeRay and
    the Ray autoscaler parse (they strip the outer quotes; the values must be whole numbers)."""
    return "'" + json.dumps(dict(sorted(resources.items()))) + "'"


def _resource_field(cfg: AppConfig, size: GroupSize, resource: str) -> str:
    """The config field that asks ``size``'s group for the custom resource ``resource``."""
    specs = {**dict(cfg.pools.configured()), "coordinator": cfg.coordinator}
    for name in size.deployments:
        demand = replica_demand(name, specs[name])
        if resource in demand.resources:
            return f"{_where(name)}.{demand.resources_source}"
    return f"cluster.{size.name}"


def _worker(cfg: AppConfig, size: GroupSize) -> dict[str, Any]:
    shape = cfg.cluster.group(size.name)
    start_params = {**({} if size.gpus else NO_GPU_START_PARAMS), "metrics-export-port": str(METRICS_PORT)}
    if size.resources:
        # The custom resources the group's pools ask for (ray_actor_options.resources, bundle
        # keys): without them on the group's nodes such replicas could never be placed.
        bad = next((r for r in size.resources if not _RESOURCE_NAME.fullmatch(r)), None)
        if bad is not None:
            raise SizingError(f"{_resource_field(cfg, size, bad)}: {bad!r} is a custom resource of worker group "
                              f"{size.name!r} that the rendering cannot pass to `ray start --resources` (letters, "
                              f"digits, '_', '.', ':', '/', '-' only)")
        start_params["resources"] = ray_start_resources(size.resources)
    coordinator = size.name == GROUP_OF["coordinator"]
    drain_s = coordinator_drain_s(cfg) if coordinator else pool_drain_s(cfg, size.deployments)
    env = (([] if size.gpus else NO_GPU_ENV) + [{"name": DRAIN_TIMEOUT_ENV, "value": str(drain_s)}]
           + auth_secret_env(cfg))
    container = _container("ray-worker", cfg.cluster.image, _resources(size.cpus, shape.memory, size.gpus),
                           _serve_ports(cfg), env)
    if coordinator:
        container["readinessProbe"] = coordinator_readiness_probe(cfg)
    pod_spec: dict[str, Any] = {"containers": [container], "securityContext": pod_security_context(),
                                # A worker never calls the Kubernetes API (KubeRay's autoscaler runs on
                                # the head; its init container and probes ask Ray): no token for the
                                # replicas' code, trust_remote_code models included, to use with the
                                # rights KubeRay binds to the ServiceAccount (its autoscaler Role). The
                                # account stays: a cloud identity (IRSA, Workload Identity) needs no
                                # Kubernetes API token, and the pools may need it to read weights.
                                "automountServiceAccountToken": False,
                                "terminationGracePeriodSeconds": drain_s + DRAIN_MARGIN_S}
    pod_spec["topologySpreadConstraints"] = _spread_over_nodes(_group_pod_labels(cfg, size.name))
    if size.gpus:
        pod_spec["tolerations"] = [dict(GPU_TOLERATION)]
    _add_pod_options(pod_spec, cfg, shape)
    group: dict[str, Any] = {
        "groupName": size.name,
        "replicas": size.initial_pods,
        "minReplicas": size.min_pods,
        "maxReplicas": size.max_pods,
        # Ray node labels (KubeRay 1.5+): the deployments of this group select them.
        "labels": _group_labels(cfg, size.name),
        "rayStartParams": start_params,
        "template": {"metadata": {"labels": _group_pod_labels(cfg, size.name)}, "spec": pod_spec},
    }
    if shape.idle_timeout_s is not None:
        group["idleTimeoutSeconds"] = shape.idle_timeout_s
    return group


def coordinator_readiness_probe(cfg: AppConfig) -> dict[str, Any]:
    """The coordinator container's readinessProbe: KubeRay's checks for a RayService worker, as
    KubeRay 1.6 writes them, given ``PROBE_CHECK_TIMEOUT_S`` each and ``COORDINATOR_PROBE_FAILURES``
    failures in a row before the Pod leaves the serve Service (KubeRay's: 2 s for the probe, 1)."""
    check = "wget --tries 1 -T {t} -q -O- http://localhost:{port}/{path} | grep success"
    commands = [check.format(t=PROBE_CHECK_TIMEOUT_S, port=DASHBOARD_AGENT_PORT, path="api/local_raylet_healthz"),
                check.format(t=PROBE_CHECK_TIMEOUT_S, port=cfg.http.port, path="-/healthz")]
    return {"exec": {"command": ["bash", "-c", " && ".join(commands)]},
            "initialDelaySeconds": 10, "periodSeconds": 5, "successThreshold": 1,
            "timeoutSeconds": PROBE_CHECK_TIMEOUT_S * len(commands), "failureThreshold": COORDINATOR_PROBE_FAILURES}


def serve_service(cfg: AppConfig) -> dict[str, Any]:
    """``spec.serveService``: the serve Service's ports with the gRPC one's appProtocol. KubeRay
    1.6+ keeps its own name (``<name>-serve-svc``), namespace, selector, labels and type for it (it
    replaces a user's selector, fills in what is unset) and takes each port of a name it would
    have built as the user wrote it."""
    return {"spec": {"ports": [{"name": SERVE_HTTP_PORT_NAME, "port": cfg.http.port},
                               {"name": SERVE_GRPC_PORT_NAME, "port": cfg.grpc.port,
                                "appProtocol": GRPC_APP_PROTOCOL}]}}


def coordinator_drain_s(cfg: AppConfig) -> int:
    """``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` of the coordinator group's Pods: how long an
    evicted one's Ray node drains. Serve stops a replica on a draining node once its replacement
    runs elsewhere, and at the latest its ``graceful_shutdown_timeout_s`` before the drain's
    deadline, so that timeout, rounded up, plus ``DRAIN_MARGIN_S`` for the replacement to start
    lets a stopping coordinator replica finish its requests as a downscale does. The Pods'
    ``terminationGracePeriodSeconds`` is this plus ``DRAIN_MARGIN_S``."""
    return math.ceil(cfg.coordinator.graceful_shutdown_timeout_s) + DRAIN_MARGIN_S


def pool_drain_s(cfg: AppConfig, deployments: Iterable[str]) -> int:
    """``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` of a pool group's Pods: Ray's 30 s, or longer
    where a pool of the group shuts down gracefully for more than 10 s, so that a stopping
    replica still finishes its calls and a replacement has ``POOL_REPLACEMENT_S`` to start."""
    pools = dict(cfg.pools.configured())
    grace = max((pools[name].graceful_shutdown_timeout_s for name in deployments if name in pools), default=0.0)
    return max(POOL_DRAIN_S, math.ceil(grace) + POOL_REPLACEMENT_S)


def cluster_deletion_delay_s(cfg: AppConfig) -> int:
    """``spec.rayClusterDeletionDelaySeconds``: how long KubeRay keeps the old RayCluster after a
    NewCluster upgrade switched the serve Service to the new one. A request that reached the old
    cluster just before the switch may run ``limits.request_timeout_s``; KubeRay's default (60 s)
    would cut it. So: the deadline, rounded up, plus ``DELETION_MARGIN_S``."""
    return math.ceil(cfg.limits.request_timeout_s) + DELETION_MARGIN_S


_POD_OPTIONS = ("node_selector", "tolerations", "labels", "volumes", "volume_mounts")


def _refuse_options_of_absent_groups(cfg: AppConfig, sizes: list[GroupSize]) -> None:
    """Pod options on a group no deployment of ``cfg`` runs in would be dropped without a word."""
    present = {size.name for size in sizes}
    for name in GROUP_NAMES:
        if name not in present:
            given = [option for option in _POD_OPTIONS if getattr(cfg.cluster.group(name), option)]
            if given:
                raise SizingError(f"cluster.{name}.{given[0]}: set on a group no pool of this config runs in "
                                  f"(it renders no Pods); remove it")


def render_rayservice(cfg: AppConfig) -> dict[str, Any]:
    """The RayService manifest of ``cfg`` as a dict (``dump_yaml`` it)."""
    sizes = group_sizes(cfg)
    _refuse_options_of_absent_groups(cfg, sizes)
    cluster = cfg.cluster
    metadata: dict[str, Any] = {"name": cfg.name, "labels": {APP_LABEL: "arbitrage-serve",
                                                             "app.kubernetes.io/instance": cfg.name}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            # A rayClusterConfig change (image, groups) starts a new cluster beside the old one and
            # switches traffic once its app is ready; a serveConfigV2-only change updates in place.
            "upgradeStrategy": {"type": "NewCluster"},
            # The old cluster then lives on until every request it accepted has met its deadline.
            "rayClusterDeletionDelaySeconds": cluster_deletion_delay_s(cfg),
            "serveConfigV2": serve_config_v2(cfg),
            "serveService": serve_service(cfg),
            "rayClusterConfig": {
                "rayVersion": pinned_ray_version(),
                **({"authOptions": dict(TOKEN_AUTH)} if cluster.ray_token_auth else {}),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "upscalingMode": cluster.upscaling_mode,
                                      "idleTimeoutSeconds": cluster.idle_timeout_s,
                                      "resources": {"requests": dict(AUTOSCALER_RESOURCES),
                                                    "limits": dict(AUTOSCALER_RESOURCES)},
                                      # KubeRay's autoscaler sidecar on the head takes its
                                      # securityContext from here only, none by default.
                                      "securityContext": container_security_context()},
                "headGroupSpec": _head(cfg),
                "workerGroupSpecs": [_worker(cfg, s) for s in sizes],
            },
        },
    }


def _disruption_budget(cfg: AppConfig, name: str, labels: dict[str, str], min_available: int) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "labels": {APP_LABEL: "arbitrage-serve",
                                                                     INSTANCE_LABEL: cfg.name}},
            # Not Ready Pods serve nothing: evicting them never blocks a drain.
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": dict(labels)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


def render_disruption_budgets(cfg: AppConfig) -> list[dict[str, Any]]:
    """A PodDisruptionBudget per worker group of two or more required Pods, ``minAvailable``
    one less than its ``minReplicas``: a drain takes them one at a time, never all at once
    (KubeRay Pods have no scale subresource, so Kubernetes takes only an integer
    ``minAvailable`` for them, not ``maxUnavailable``). None for a single-Pod group or the
    head: a budget of 1 would hold every drain of their node, and with it managed node
    upgrades and the cluster autoscaler, until someone steps in (KUBERAY.md §5).
    Old and new cluster's Pods of a NewCluster upgrade both count: a budget only eases then."""
    return [_disruption_budget(cfg, f"{cfg.name}-{size.name}", _group_pod_labels(cfg, size.name), size.min_pods - 1)
            for size in group_sizes(cfg) if size.min_pods >= 2]


AT_MAX_ALERT = "ArbitrageAutoscalingAtMax"
# The Helm release kube-prometheus-stack selects PrometheusRules by (k8s/monitoring's label).
PROMETHEUS_RELEASE = "kube-prometheus-stack"
AT_MAX_MIN_FOR_S = 15 * 60
AT_MAX_FOR_MARGIN_S = 5 * 60


def autoscaling_at_max_rule(cfg: AppConfig) -> dict[str, Any] | None:
    """A PrometheusRule with ``AT_MAX_ALERT``: an autoscaling deployment whose autoscaler target
    (``serve_autoscaling_target_replicas``, already clamped to the bounds) has sat at this
    config's ``max_replicas`` for longer than its ``downscale_delay_s``. Serve scales down only
    after the policy has asked for fewer than the target on every tick of that delay, so the
    policy asked for the max or more at least once per delay. No metric carries the bounds, so
    they are rendered in, one term per deployment. None when no deployment autoscales."""
    specs = [*cfg.pools.configured(), (COORDINATOR, cfg.coordinator)]
    autoscaled = [(name, auto) for name, spec in specs
                  if (auto := spec.autoscaling_config) is not None and auto.min_replicas < auto.max_replicas]
    if not autoscaled:
        return None
    by = "namespace, application, deployment"
    # The bounds are this config's: with its namespace known, another namespace's application of
    # the same name (other bounds) is left out. Unset, the namespace is kubectl's, unknown here.
    scope = f'namespace="{cfg.cluster.namespace}",' if cfg.cluster.namespace else ""
    expr = "\nor\n".join(
        f'max by ({by}) (ray_serve_autoscaling_target_replicas{{{scope}application="{cfg.name}",'
        f'deployment="{name}"}}) >= {auto.max_replicas}' for name, auto in autoscaled)
    for_s = max(AT_MAX_MIN_FOR_S, math.ceil(max(a.downscale_delay_s for _, a in autoscaled)) + AT_MAX_FOR_MARGIN_S)
    for_m = math.ceil(for_s / 60)
    bounds = ", ".join(f"{name} {auto.max_replicas}" for name, auto in autoscaled)
    rule = {
        "alert": AT_MAX_ALERT, "expr": expr + "\n", "for": f"{for_m}m", "labels": {"severity": "warning"},
        "annotations": {
            "summary": f"{{{{ $labels.namespace }}}}/{{{{ $labels.application }}}}: {{{{ $labels.deployment }}}} "
                       f"held at its max_replicas ({{{{ $value }}}}) for {for_m} minutes",
            "description": (
                f"For {for_m} minutes Serve's autoscaler has held {{{{ $labels.deployment }}}} at its "
                f"autoscaling_config.max_replicas ({bounds}, rendered from the config): its policy asked for at "
                f"least that many replicas at least once in every downscale_delay_s (a lower ask for that "
                f"long would have scaled it down), so it has no room left for a burst and more load queues. Check the dashboard's \"Queue length per pool\" "
                f"(rows waiting in the coordinator included) and ArbitrageOverloaded. Raise max_replicas in the config, "
                f"`make k8s`, apply, and patch the running RayCluster's worker group bounds (docs/KUBERAY.md §6 "
                f"(Upgrade, scale, roll back), \"Scale a pool\"); then re-apply this rule "
                f"(`kubectl apply -k k8s/overlays/<preset>/monitoring`): its bounds are written in, so until then it "
                f"fires at the old max. Check the cluster can host the added Pods (§7 (GPU sizing per preset)).")},
    }
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": f"{cfg.name}-autoscaling",
                         "labels": {APP_LABEL: "arbitrage-serve", INSTANCE_LABEL: cfg.name,
                                    "release": PROMETHEUS_RELEASE}},
            "spec": {"groups": [{"name": f"{cfg.name}-autoscaling", "rules": [rule]}]}}


def cluster_problems(cfg: AppConfig) -> list[tuple[str, str]]:
    """(field, message) of what keeps ``cfg`` from rendering (``render_rayservice``'s refusal: a
    replica its group's Pod cannot hold, a selector no Pod matches, ...); empty when it renders.
    `arbitrage config check` reports it as one of its own lines."""
    try:
        render_rayservice(cfg)
    except ValueError as exc:  # SizingError: the message starts with the field
        field, sep, message = str(exc).partition(": ")
        return [(field, message)] if sep and _FIELD.fullmatch(field) else [("cluster", str(exc))]
    return []


def _overlay_patch(cfg: AppConfig) -> list[dict[str, Any]]:
    """JSON 6902 ops that add the head's and each group's nodeSelector and tolerations (the
    overlay knobs)."""
    ops = []
    head, head_base = cfg.cluster.head, "/spec/rayClusterConfig/headGroupSpec/template/spec"
    if head.node_selector:
        ops.append({"op": "add", "path": f"{head_base}/nodeSelector", "value": dict(head.node_selector)})
    if head.tolerations:
        ops.append({"op": "add", "path": f"{head_base}/tolerations",
                    "value": [t.model_dump() for t in head.tolerations]})
    for i, size in enumerate(group_sizes(cfg)):
        shape = cfg.cluster.group(size.name)
        base = f"/spec/rayClusterConfig/workerGroupSpecs/{i}/template/spec"
        if shape.node_selector:
            ops.append({"op": "add", "path": f"{base}/nodeSelector", "value": dict(shape.node_selector)})
        if shape.tolerations:
            existing = [dict(GPU_TOLERATION)] if size.gpus else []
            ops.append({"op": "add", "path": f"{base}/tolerations",
                        "value": existing + [t.model_dump() for t in shape.tolerations]})
    return ops


def render_kustomize(cfg: AppConfig, overlay: str, target: bool = True) -> dict[str, str]:
    """Files (path relative to k8s/ -> text) of this config's base and its overlay ``overlay``
    (``target``: a project target's config, else a user's --config file)."""
    header = (f"{RENDERED_MARK} from the AppConfig of {overlay!r}; do not edit by hand\n"
              + (TARGET_HINT if target else CONFIG_HINT))
    dump = lambda obj: header + dump_yaml(obj)
    dump_all = lambda objs: header + "---\n".join(dump_yaml(obj) for obj in objs)
    base = f"base/{overlay}"
    files = {f"{base}/rayservice.yaml": dump(render_rayservice(cfg))}
    resources = ["rayservice.yaml"]
    if budgets := render_disruption_budgets(cfg):
        files[f"{base}/disruption-budgets.yaml"] = dump_all(budgets)
        resources.append("disruption-budgets.yaml")
    files[f"{base}/kustomization.yaml"] = dump({"apiVersion": "kustomize.config.k8s.io/v1beta1",
                                                "kind": "Kustomization", "resources": resources})
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                     "resources": [f"../../{base}"]}
    if cfg.cluster.namespace:
        kustomization["namespace"] = cfg.cluster.namespace
    ops = _overlay_patch(cfg)
    if ops:
        files[f"overlays/{overlay}/scheduling.yaml"] = dump(ops)
        kustomization["patches"] = [{"path": "scheduling.yaml",
                                     "target": {"group": "ray.io", "version": "v1", "kind": "RayService",
                                                "name": cfg.name}}]
    files[f"overlays/{overlay}/kustomization.yaml"] = dump(kustomization)
    if (rule := autoscaling_at_max_rule(cfg)) is not None:
        # Its own kustomization (`kubectl apply -k overlays/<name>/monitoring`): the overlay
        # itself must apply on a cluster without the Prometheus Operator's CRDs.
        monitoring: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                      "resources": ["autoscaling-alerts.yaml"]}
        if cfg.cluster.namespace:
            monitoring["namespace"] = cfg.cluster.namespace
        files[f"overlays/{overlay}/monitoring/autoscaling-alerts.yaml"] = dump(rule)
        files[f"overlays/{overlay}/monitoring/kustomization.yaml"] = dump(monitoring)
    ha: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                          "resources": [f"../{overlay}"], "components": ["../../components/ha"]}
    if cfg.cluster.namespace:
        # The component's Redis Service and Deployment are resources of this kustomization, not
        # of the overlay it includes: without its own namespace they would land in kubectl's
        # current one, where the head (redis://arbitrage-redis:6379) cannot resolve them.
        ha["namespace"] = cfg.cluster.namespace
    files[f"overlays/{overlay}-ha/kustomization.yaml"] = dump(ha)
    return files
