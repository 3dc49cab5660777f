"""``AppConfig.cluster``: the shape of a KubeRay cluster for one config.

Four worker groups, one per pool kind: ``draft``, ``target``, ``scorers`` (router and PRM
share one group: both are small transformers scorers) and ``coordinator`` (CPU only: it holds
no model, so it never takes a GPU node). Each Serve deployment is pinned to its group by a Ray
node label (``GROUP_LABEL``); replicas-per-pod and ``minReplicas``/``maxReplicas`` are derived
from the pools (``sizing``). No Ray imports: a config validates anywhere.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    StrictInt,
    ValidationInfo,
    field_validator,
)

GroupName = Literal["draft", "target", "scorers", "coordinator"]
GROUP_NAMES: tuple[GroupName, ...] = ("draft", "target", "scorers", "coordinator")
# Which group hosts each deployment (the coordinator deployment is named "coordinator").
GROUP_OF: dict[str, GroupName] = {"draft": "draft", "target": "target", "router": "scorers", "prm": "scorers",
                                  "coordinator": "coordinator"}
# Ray node label (KubeRay copies a worker group's `labels` onto its Ray nodes and Pods). Not
# under ray.io/: Ray reserves that prefix for its own labels.
GROUP_LABEL = "arbitrage-serve.io/group"
# A Kubernetes resource quantity: the pattern of `resources.limits`/`requests` in KubeRay's
# RayService CRD (shared/schemas/ray.io_rayservices.yaml). Group 2 is the number.
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                      r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_SUFFIX_FACTOR = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                  "E": 1e18, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50,
                  "Ei": 2.0**60}
# The least memory a Pod of this project may have: a Ray node (raylet, object store, a worker)
# does not start in less. Catches '100' (100 bytes) and '1m' (a thousandth of a byte), which the
# quantity pattern accepts.
MIN_POD_MEMORY = "64Mi"
# The Ray head's fixed ports on a rendered cluster (KubeRay's defaults), every Pod's metrics
# port (rayStartParams metrics-export-port) and every Pod's dashboard agent port (KubeRay sets
# dashboard-agent-listen-port 52365 on every Pod and probes it: ray-operator/controllers/ray/
# common/pod.go, utils.DefaultDashboardAgentListenPort): the Serve proxies' ports must differ from them.
RAY_IMAGE_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
METRICS_PORT = 8080
DASHBOARD_AGENT_PORT = 52365
RESERVED_PORTS: dict[int, str] = {**{p: n for n, p in RAY_IMAGE_PORTS.items()}, METRICS_PORT: "metrics",
                                  DASHBOARD_AGENT_PORT: "dashboard-agent"}
# A Kubernetes namespace name: a DNS-1123 label.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Ray node label keys and values (a Kubernetes label's syntax); Ray reserves the ray.io/ prefix.
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
RAY_LABEL_PREFIX = "ray.io/"
# Volumes KubeRay adds itself (ray-operator/controllers/ray/common/pod.go: shared-mem at /dev/shm
# in every Ray container without a mount there, sized to its memory limit; ray-logs at /tmp/ray on
# the head). It skips creating a volume whose name is taken but still mounts it: a config's volume
# of that name would land there. A config's own mount at /dev/shm would replace shared-mem.
RESERVED_VOLUMES = {"shared-mem": "/dev/shm", "ray-logs": "/tmp/ray"}
# The fields of a Kubernetes VolumeMount (core/v1): an unknown one would be pruned silently.
_VOLUME_MOUNT_KEYS = ("name", "mountPath", "readOnly", "subPath", "subPathExpr", "mountPropagation",
                      "recursiveReadOnly")
# A Kubernetes object name (ServiceAccount, Secret): a DNS-1123 subdomain.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def quantity_bytes(v: str) -> float:
    """The number a Kubernetes quantity stands for (``'8Gi'`` -> 8 * 2**30); ValueError when
    ``v`` is not one."""
    match = QUANTITY.fullmatch(v)
    if match is None:
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. '8Gi', '512Mi', '16G')")
    number = float(v[:match.end(2)])
    suffix = v[match.end(2):]
    if len(suffix) > 1 and suffix[0] in ("e", "E"):  # an exponent; a lone 'E' is exa
        return number * 10.0 ** float(suffix[1:])
    return number * _SUFFIX_FACTOR[suffix]


def _memory_quantity(v: str) -> str:
    amount = quantity_bytes(v)
    if amount < quantity_bytes(MIN_POD_MEMORY):
        raise ValueError(f"{v!r} is {amount:g} bytes; a Pod needs at least {MIN_POD_MEMORY} (e.g. '8Gi', "
                         f"'512Mi': a plain number means bytes, a trailing 'm' thousandths)")
    return v


def _label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if not _LABEL_KEY.fullmatch(key) or len(name) > 63 or len(prefix) > 253:
        return (f"{key!r} is not a label key (an optional DNS prefix and '/', then up to 63 letters, digits, "
                f"'-', '_', '.')")
    return None


def _label_value_problem(value: str) -> str | None:
    if not _LABEL_VALUE.fullmatch(value):
        return f"{value!r} is not a label value (up to 63 letters, digits, '-', '_', '.')"
    return None


def _node_labels(v: dict[str, str]) -> dict[str, str]:
    for key, value in v.items():
        if (problem := _label_key_problem(key)) is not None:
            raise ValueError(problem)
        if key == GROUP_LABEL or key.startswith(RAY_LABEL_PREFIX):
            raise ValueError(f"{key!r}: the rendering sets {GROUP_LABEL} itself, and Ray reserves "
                             f"{RAY_LABEL_PREFIX}")
        if (problem := _label_value_problem(value)) is not None:
            raise ValueError(f"{key}: {problem}")
    return v


def _node_selector(v: dict[str, str]) -> dict[str, str]:
    """A Pod nodeSelector: Kubernetes labels (the API server refuses a Pod with any other)."""
    for key, value in v.items():
        if (problem := _label_key_problem(key)) is not None:
            raise ValueError(problem)
        if (problem := _label_value_problem(value)) is not None:
            raise ValueError(f"{key}: {problem}")
    return v


def _volume(v: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes Volume: a ``name`` (a DNS-1123 label) and exactly one source (a mapping)."""
    name = v.get("name")
    if not isinstance(name, str) or len(name) > 63 or not _DNS1123_LABEL.fullmatch(name):
        raise ValueError(f"name: {name!r} is not a volume name (a DNS-1123 label: lowercase letters, digits, '-')")
    if name in RESERVED_VOLUMES:
        raise ValueError(f"name: {name!r} is KubeRay's or the rendering's own volume (at {RESERVED_VOLUMES[name]}); "
                         f"pick another name")
    sources = [k for k in v if k != "name"]
    if len(sources) != 1 or not isinstance(v[sources[0]], dict):
        raise ValueError(f"a Kubernetes Volume is a name and one source mapping, e.g. {{'name': 'models', "
                         f"'persistentVolumeClaim': {{'claimName': 'models', 'readOnly': true}}}}; got {sorted(v)}")
    return v


def _volume_mount(v: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes VolumeMount: ``name`` and an absolute ``mountPath``, VolumeMount fields only."""
    unknown = sorted(set(v) - set(_VOLUME_MOUNT_KEYS))
    if unknown:
        raise ValueError(f"{unknown}: not VolumeMount fields (known: {', '.join(_VOLUME_MOUNT_KEYS)})")
    if not isinstance(v.get("name"), str) or not isinstance(v.get("mountPath"), str):
        raise ValueError("a VolumeMount needs name (a volume of the same Pod) and mountPath (a string)")  # noqa: TRY004
    if not v["mountPath"].startswith("/"):
        raise ValueError(f"mountPath: {v['mountPath']!r} is not an absolute path")
    if v["mountPath"].rstrip("/") in RESERVED_VOLUMES.values() or v["name"] in RESERVED_VOLUMES:
        raise ValueError(f"{v['mountPath']} ({v['name']}): {', '.join(sorted(set(RESERVED_VOLUMES.values())))} and "
                         f"the volumes {', '.join(RESERVED_VOLUMES)} are KubeRay's or the rendering's own")
    return v


def _unique_volumes(v: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = [volume["name"] for volume in v]
    if len(set(names)) != len(names):
        raise ValueError(f"volume names repeat: {names}")
    return v


def _mounts_of_declared_volumes(mounts: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
    """Every mount names a volume of the same spec (``volumes``, declared before ``volume_mounts``)."""
    if "volumes" not in info.data:  # volumes failed its own validation, which says why
        return mounts
    declared = [volume["name"] for volume in info.data["volumes"]]
    for i, mount in enumerate(mounts):
        if mount["name"] not in declared:
            raise ValueError(f"entry {i} mounts volume {mount['name']!r}, which volumes (beside it) does not "
                             f"declare (declared: {declared or 'none'})")
    paths = [mount["mountPath"] for mount in mounts]
    if len(set(paths)) != len(paths):
        raise ValueError(f"mount paths repeat: {paths}")
    return mounts


def _object_name(v: str | None) -> str | None:
    if v is not None and (len(v) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(v)):
        raise ValueError(f"{v!r} is not a Kubernetes object name (a DNS-1123 subdomain: lowercase letters, digits, "
                         f"'-' and '.')")
    return v


MemoryQuantity = Annotated[str, AfterValidator(_memory_quantity)]
NodeLabels = Annotated[dict[str, str], AfterValidator(_node_labels)]
NodeSelector = Annotated[dict[str, str], AfterValidator(_node_selector)]
Volumes = Annotated[list[Annotated[dict[str, Any], AfterValidator(_volume)]], AfterValidator(_unique_volumes)]
VolumeMounts = list[Annotated[dict[str, Any], AfterValidator(_volume_mount)]]
ObjectName = Annotated[str, AfterValidator(_object_name)]
_VOLUMES_DOC = ("Kubernetes Volumes of this group's Pods (each a name and one source, e.g. {'name': 'models', "
                "'persistentVolumeClaim': {'claimName': 'models', 'readOnly': true}}), rendered into the base. "
                "Not 'shared-mem' or 'ray-logs' (KubeRay's own). Left out of renderings while empty.")
_MOUNTS_DOC = ("VolumeMounts of the Ray container (name: one of volumes; mountPath absolute; not /dev/shm), e.g. "
               "{'name': 'models', 'mountPath': '/models', 'readOnly': true}. Left out of renderings while empty.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _unset(v: Any) -> bool:
    return v is None


class Toleration(_Strict):
    """A Pod toleration (Kubernetes core/v1), checked as the API server checks a Pod's: KubeRay
    would create Pods it refuses (the RayService never comes up), and the CRD drops an unknown
    field without a word. Fields left unset are left out of the rendering."""

    key: str | None = Field(None, exclude_if=_unset, description="Taint key (a label key); empty only with "
                                                                 "operator Exists (then every taint).")
    operator: Literal["Equal", "Exists", ""] | None = Field(
        None, exclude_if=_unset, validate_default=True,
        description="Equal (None or '': Kubernetes' default) or Exists (any value of the key; value empty).")
    value: str | None = Field(None, exclude_if=_unset, description="Taint value to equal (a label value); empty "
                                                                   "with operator Exists.")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, exclude_if=_unset, description="Taint effect to match (empty or None: every effect).")
    tolerationSeconds: StrictInt | None = Field(
        None, exclude_if=_unset, description="Seconds the Pod stays on a node after a matching NoExecute taint "
                                             "appears (None: for good); only with effect NoExecute.")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v and (problem := _label_key_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("operator")
    @classmethod
    def _operator(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Fields validate in order: key is in info.data unless it failed (its own error says why).
        if "key" in info.data and not info.data["key"] and v != "Exists":
            raise ValueError(f"{v or 'Equal (the default)'} needs a key: only operator Exists may leave key empty "
                             f"(it then tolerates every taint)")
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("operator") == "Exists":
            if v:
                raise ValueError(f"{v!r}: with operator Exists the value must be empty (Exists matches every value "
                                 f"of the key)")
        elif v is not None and (problem := _label_value_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("tolerationSeconds")
    @classmethod
    def _seconds(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and "effect" in info.data and (effect := info.data["effect"]) != "NoExecute":
            raise ValueError(f"{v}: only with effect NoExecute (effect is {'unset' if effect is None else repr(effect)}"
                             f"): only a NoExecute taint evicts a running Pod")
        return v


class GroupSpec(_Strict):
    """One worker group's Pod shape and scheduling knobs."""

    gpus: NonNegativeInt | None = Field(None, description="nvidia.com/gpu per Pod (None: the most whole GPUs one "
                                                          "replica of the group needs; 0 when none needs a GPU).")
    cpus: PositiveInt | None = Field(None, description="CPUs per Pod (None: 1 per replica that fits a Pod, plus "
                                                       "1 for Ray's own processes; at least 2).")
    memory: MemoryQuantity = Field("8Gi", description="Memory request and limit per Pod (a Kubernetes quantity, "
                                                       "e.g. '8Gi').")
    node_selector: NodeSelector = Field(default_factory=dict, description="Pod nodeSelector (rendered into the "
                                                                          "overlay, not the base): label keys and "
                                                                          "values.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations (rendered into the "
                                                                            "overlay). GPU groups always tolerate "
                                                                            "nvidia.com/gpu.")
    idle_timeout_s: PositiveInt | None = Field(None, description="Seconds an idle Pod of this group lives before "
                                                                 "the autoscaler removes it (None: the cluster's).")
    labels: NodeLabels = Field(
        default_factory=dict, exclude_if=lambda v: not v,
        description=f"Ray node labels of this group's Pods besides {GROUP_LABEL} (the group's `labels`), for a "
                    "pool's own label_selector to select, e.g. {'zone': 'a'} beside node_selector "
                    f"{{'topology.kubernetes.io/zone': 'a'}}. Not {GROUP_LABEL}, nothing under {RAY_LABEL_PREFIX}. "
                    "Left out of renderings while empty.")
    volumes: Volumes = Field(default_factory=list, exclude_if=lambda v: not v, description=_VOLUMES_DOC)
    volume_mounts: VolumeMounts = Field(default_factory=list, exclude_if=lambda v: not v, description=_MOUNTS_DOC)

    _mounts = field_validator("volume_mounts")(_mounts_of_declared_volumes)


class CoordinatorGroupSpec(GroupSpec):
    """The coordinator's worker group: CPU only (the coordinator holds no model)."""

    gpus: NonNegativeInt | None = Field(None, description="nvidia.com/gpu per Pod: 0 or None (the coordinator "
                                                          "holds no model, so its group never takes a GPU node).")

    @field_validator("gpus")
    @classmethod
    def _cpu_only(cls, v: int | None) -> int | None:
        if v:
            raise ValueError(f"{v}: the coordinator group is CPU only (the coordinator holds no model); leave it "
                             f"unset or 0")
        return v


class HeadSpec(_Strict):
    """The head Pod: GCS, dashboard, Serve controller and a proxy; rayStartParams num-cpus 0."""

    cpus: PositiveInt = Field(2, description="CPUs of the head Pod (Ray's own processes only).")
    memory: MemoryQuantity = Field("8Gi", description="Memory of the head Pod (a Kubernetes quantity, e.g. "
                                                       "'8Gi').")
    node_selector: NodeSelector = Field(default_factory=dict, exclude_if=lambda v: not v,
                                        description="Head Pod nodeSelector (rendered into the overlay): label keys "
                                                    "and values.")
    tolerations: list[Toleration] = Field(default_factory=list, exclude_if=lambda v: not v,
                                          description="Head Pod tolerations (rendered into the overlay).")
    volumes: Volumes = Field(default_factory=list, exclude_if=lambda v: not v,
                             description=_VOLUMES_DOC.replace("this group's Pods", "the head Pod"))
    volume_mounts: VolumeMounts = Field(default_factory=list, exclude_if=lambda v: not v, description=_MOUNTS_DOC)

    _mounts = field_validator("volume_mounts")(_mounts_of_declared_volumes)


class ClusterSpec(_Strict):
    """How ``arbitrage k8s render`` lays this config out as a KubeRay RayService."""

    image: str = Field("arbitrage-serve:0.1.0-gpu", description="Container image of every Pod (k8s/Dockerfile; "
                                                                "the same image on head and workers).")
    namespace: str | None = Field(None, description="metadata.namespace of the manifests (None: kubectl's): a "
                                                    "DNS-1123 label of at most 63 characters.")
    base_dir: str | None = Field(None, description="base_dir of the served config on the cluster (None: the "
                                                   "config's own). '${ARBITRAGE_HOME}' means the bundle the "
                                                   "image carries; the pool replicas resolve it on their node.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = Field(
        "Default", description="Ray autoscaler upscaling mode (Default: as many Pods as pending replicas need, "
                               "bounded by the groups' maxReplicas).")
    idle_timeout_s: PositiveInt = Field(300, description="Seconds an idle worker Pod lives before it is removed "
                                                         "(above the pools' downscale delays, so a Pod is not "
                                                         "torn down between bursts).")
    ray_token_auth: bool = Field(True, exclude_if=lambda v: v is True,
                                 description="Ray token authentication (KubeRay authOptions mode: token): the "
                                             "dashboard, job API, Ray Client and Ray's internal RPCs want the "
                                             "token in the Secret KubeRay generates per RayCluster. The Serve "
                                             "routes are unaffected (they use auth). False: no authOptions.")
    service_account_name: ObjectName | None = Field(
        None, exclude_if=lambda v: v is None,
        description="serviceAccountName of every Pod (None: KubeRay's for the head, which it creates, and the "
                    "namespace's default for the workers). It must exist in the namespace; KubeRay binds its "
                    "autoscaler Role (Pods, RayClusters) to it, so worker Pods mount no token (a cloud identity "
                    "such as IRSA or Workload Identity still works).")
    image_pull_secrets: list[ObjectName] = Field(default_factory=list, exclude_if=lambda v: not v,
                                                 description="Names of the Secrets every Pod pulls cluster.image "
                                                             "with (imagePullSecrets).")
    head: HeadSpec = Field(default_factory=HeadSpec, description="The head Pod.")
    draft: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the draft pool.")
    target: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the target pool.")
    scorers: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the router and PRM pools.")
    coordinator: CoordinatorGroupSpec = Field(default_factory=CoordinatorGroupSpec,
                                              description="Worker group of the coordinator (CPU only: gpus 0).")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 63 or not _DNS1123_LABEL.fullmatch(v)):
            raise ValueError(f"{v!r} is not a Kubernetes namespace (a DNS-1123 label of at most 63 characters: "
                             f"lowercase letters, digits and '-', starting and ending with a letter or digit)")
        return v

    def group(self, name: GroupName) -> GroupSpec:
        return getattr(self, name)
