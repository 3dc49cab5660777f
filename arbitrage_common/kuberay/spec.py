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

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

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


def _memory_quantity(v: str) -> str:
    match = QUANTITY.fullmatch(v)
    if match is None:
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. '8Gi', '512Mi', '16G')")
    if match[1] == "-" or float(match[2]) == 0:
        raise ValueError(f"{v!r}: a Pod's memory must be more than 0")
    return v


MemoryQuantity = Annotated[str, AfterValidator(_memory_quantity)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupSpec(_Strict):
    """One worker group's Pod shape and scheduling knobs."""

    gpus: NonNegativeInt | None = Field(None, description="nvidia.com/gpu per Pod (None: the most whole GPUs one "
                                                          "replica of the group needs; 0 when none needs a GPU).")
    cpus: PositiveInt | None = Field(None, description="CPUs per Pod (None: 1 per replica that fits a Pod, plus "
                                                       "1 for Ray's own processes; at least 2).")
    memory: MemoryQuantity = Field("8Gi", description="Memory request and limit per Pod (a Kubernetes quantity, "
                                                       "e.g. '8Gi').")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector (rendered into the "
                                                                            "overlay, not the base).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations (rendered into the "
                                                                                "overlay). GPU groups always "
                                                                                "tolerate nvidia.com/gpu.")
    idle_timeout_s: PositiveInt | None = Field(None, description="Seconds an idle Pod of this group lives before "
                                                                 "the autoscaler removes it (None: the cluster's).")


class HeadSpec(_Strict):
    """The head Pod: GCS, dashboard, Serve controller and a proxy; rayStartParams num-cpus 0."""

    cpus: PositiveInt = Field(2, description="CPUs of the head Pod (Ray's own processes only).")
    memory: MemoryQuantity = Field("8Gi", description="Memory of the head Pod (a Kubernetes quantity, e.g. "
                                                       "'8Gi').")


class ClusterSpec(_Strict):
    """How ``arbitrage k8s render`` lays this config out as a KubeRay RayService."""

    image: str = Field("arbitrage-serve:0.1.0-gpu", description="Container image of every Pod (k8s/Dockerfile; "
                                                                "the same image on head and workers).")
    namespace: str | None = Field(None, description="metadata.namespace of the manifests (None: kubectl's).")
    base_dir: str | None = Field(None, description="base_dir of the served config on the cluster (None: the "
                                                   "config's own). '${ARBITRAGE_HOME}' means the bundle the "
                                                   "image carries; the pool replicas resolve it on their node.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = Field(
        "Default", description="Ray autoscaler upscaling mode (Default: as many Pods as pending replicas need, "
                               "bounded by the groups' maxReplicas).")
    idle_timeout_s: PositiveInt = Field(300, description="Seconds an idle worker Pod lives before it is removed "
                                                         "(above the pools' downscale delays, so a Pod is not "
                                                         "torn down between bursts).")
    head: HeadSpec = Field(default_factory=HeadSpec, description="The head Pod.")
    draft: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the draft pool.")
    target: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the target pool.")
    scorers: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the router and PRM pools.")
    coordinator: GroupSpec = Field(default_factory=GroupSpec, description="Worker group of the coordinator "
                                                                          "(CPU only).")

    def group(self, name: GroupName) -> GroupSpec:
        return getattr(self, name)
