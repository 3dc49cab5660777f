"""Worker-group sizes from the pools: what one replica needs, how replicas pack into Pods,
and the ``minReplicas`` / ``replicas`` / ``maxReplicas`` of each group.

A Pod offers ``cpus`` CPUs, ``gpus`` whole GPU devices and its ``memory`` (KubeRay passes the
container's memory limit to ``ray start --memory``). A replica needing a fraction of a GPU must
fit on one device (Ray never splits a fraction across devices); one needing ``n >= 1`` GPUs
takes ``n`` whole devices. A replica with placement bundles packs all of them into one Pod
(PACK / STRICT_PACK: a tensor-parallel engine's ranks on one node). Replicas are packed
first-fit decreasing, so the Pod counts are what Ray's scheduler can really place. Custom
resources a replica asks for (``ray_actor_options.resources``, or a bundle's own keys) are
offered by its group's Pods (``GroupSize.resources``), enough for every replica that fits a
Pod, so they pin without ever being what limits the packing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .spec import GROUP_NAMES, GROUP_OF, ClusterSpec, GroupName, quantity_bytes

RAY_DEFAULT_REPLICA_CPUS = 1.0  # Serve's default num_cpus per replica
_EPS = 1e-9
# Bundle keys Ray accounts for itself; any other key is a custom resource.
_BUILTIN_BUNDLE_KEYS = ("CPU", "GPU", "memory", "object_store_memory")


class SizingError(ValueError):
    """A pool that no Pod of its worker group can hold; the message names both values."""


@dataclass(frozen=True)
class Demand:
    """Resources of one replica of one deployment."""

    deployment: str
    cpus: float
    gpus: float
    source: str  # the config field the GPUs come from, for error messages
    memory: float = 0.0  # bytes (Ray's memory resource)
    memory_source: str = "ray_actor_options.memory"
    resources: dict[str, float] = field(default_factory=dict)  # custom resources
    resources_source: str = "ray_actor_options.resources"


@dataclass(frozen=True)
class Bounds:
    """Replica counts of one deployment: fewest, at deploy time, most."""

    min: int
    initial: int
    max: int


@dataclass(frozen=True)
class GroupSize:
    """One worker group: its Pod shape and Pod counts, and the custom resources each Pod
    offers (``rayStartParams`` ``resources``; whole numbers, as the Ray autoscaler reads them)."""

    name: GroupName
    deployments: tuple[str, ...]
    cpus: int
    gpus: int
    min_pods: int
    initial_pods: int
    max_pods: int
    resources: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pod:
    cpus: float
    devices: list[float] = field(default_factory=list)  # free fraction of each GPU
    memory: float = math.inf  # free bytes

    def place(self, d: Demand) -> bool:
        if d.cpus > self.cpus + _EPS or d.memory > self.memory * (1 + _EPS):
            return False
        if 0 < d.gpus < 1:
            fits = [i for i, free in enumerate(self.devices) if free + _EPS >= d.gpus]
            if not fits:
                return False
            best = min(fits, key=lambda i: self.devices[i])  # tightest device: keeps whole ones whole
            self.devices[best] -= d.gpus
        elif d.gpus >= 1:
            whole = [i for i, free in enumerate(self.devices) if free >= 1 - _EPS]
            need = math.ceil(d.gpus - _EPS)
            if len(whole) < need:
                return False
            for i in whole[:need]:
                self.devices[i] = 0.0
        self.cpus -= d.cpus
        self.memory -= d.memory
        return True


def replica_demand(deployment: str, spec) -> Demand:
    """What one replica of a pool or coordinator spec (``config.DeploymentSpec``) takes."""
    bundles = getattr(spec, "placement_group_bundles", None)
    if bundles:
        strategy = getattr(spec, "placement_group_strategy", None) or "PACK"
        if strategy not in ("PACK", "STRICT_PACK"):
            raise SizingError(f"pools.{deployment}.placement_group_strategy: {strategy} spreads a replica over "
                              f"Pods; the renderer sizes PACK and STRICT_PACK replicas (one Pod each)")
        custom: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                if name not in _BUILTIN_BUNDLE_KEYS:
                    custom[name] = custom.get(name, 0.0) + amount
        return Demand(deployment, sum(b.get("CPU", 0.0) for b in bundles), sum(b.get("GPU", 0.0) for b in bundles),
                      "placement_group_bundles", memory=float(sum(b.get("memory", 0.0) for b in bundles)),
                      memory_source="placement_group_bundles", resources=custom,
                      resources_source="placement_group_bundles")
    opts = spec.ray_actor_options
    cpus = RAY_DEFAULT_REPLICA_CPUS if opts.num_cpus is None else opts.num_cpus
    return Demand(deployment, cpus, opts.num_gpus or 0.0, "ray_actor_options.num_gpus",
                  memory=float(opts.memory or 0), resources=dict(opts.resources))


def gpus_per_replica(spec) -> float:
    return replica_demand("?", spec).gpus


def replica_bounds(spec) -> Bounds:
    auto = spec.autoscaling_config
    if auto is None:
        n = spec.num_replicas or 1
        return Bounds(n, n, n)
    initial = auto.min_replicas if auto.initial_replicas is None else auto.initial_replicas
    return Bounds(auto.min_replicas, initial, auto.max_replicas)


def pods_needed(demands: list[Demand], cpus: int, gpus: int, memory: float = math.inf) -> int:
    """Pods of (cpus, gpus, memory bytes) that hold every replica in ``demands`` (first-fit
    decreasing)."""
    pods: list[_Pod] = []
    for d in sorted(demands, key=lambda d: (d.gpus, d.cpus, d.memory), reverse=True):
        if not any(p.place(d) for p in pods):
            pod = _Pod(float(cpus), [1.0] * gpus, memory)
            if not pod.place(d):  # checked by _check_fits; kept as a guard
                where = "coordinator" if d.deployment == "coordinator" else f"pools.{d.deployment}"
                raise SizingError(f"{where}: one replica does not fit an empty Pod")
            pods.append(pod)
    return len(pods)


def _per_pod(d: Demand, cpus: int, gpus: int, memory: float, most: int) -> int:
    """How many replicas like ``d`` one empty Pod holds, at most ``most``."""
    pod, n = _Pod(float(cpus), [1.0] * gpus, memory), 0
    while n < most and pod.place(d):
        n += 1
    return n


def _default_gpus(demands: list[Demand]) -> int:
    return max((math.ceil(d.gpus - _EPS) for d in demands), default=0)


def _default_cpus(demands: list[Demand], gpus: int) -> int:
    """1 + the CPUs of the replicas of one deployment that fill a Pod's GPUs (one replica for
    CPU-only deployments), at least 2."""
    def per_pod(d: Demand) -> int:
        if d.gpus <= 0 or gpus == 0:
            return 1
        return gpus * math.floor(1 / d.gpus + _EPS) if d.gpus < 1 else gpus // math.ceil(d.gpus - _EPS)
    return max(2, 1 + math.ceil(max((d.cpus * per_pod(d) for d in demands), default=0)))


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _check_fits(d: Demand, group: GroupName, cpus: int, gpus: int, memory: float, memory_text: str) -> None:
    where = "coordinator" if d.deployment == "coordinator" else f"pools.{d.deployment}"
    if math.ceil(d.gpus - _EPS) > gpus:
        raise SizingError(f"{where}: one replica needs {d.gpus:g} GPU(s) ({d.source}), but worker group "
                          f"{group!r} offers {gpus} GPU(s) per Pod (cluster.{group}.gpus)")
    if d.cpus > cpus + _EPS:
        raise SizingError(f"{where}: one replica needs {d.cpus:g} CPU(s), but worker group {group!r} offers "
                          f"{cpus} CPU(s) per Pod (cluster.{group}.cpus)")
    if d.memory > memory * (1 + _EPS):
        raise SizingError(f"{where}.{d.memory_source}: one replica needs {d.memory:.0f} bytes ({_gib(d.memory)}) "
                          f"of memory, but worker group {group!r} offers {memory_text} ({_gib(memory)}) per Pod "
                          f"(cluster.{group}.memory)")


def _group_resources(demands: dict[str, Demand], bounds: dict[str, Bounds], cpus: int, gpus: int,
                     memory: float) -> dict[str, int]:
    """Custom resources one Pod of a group offers: for each name, what every replica that can
    share one Pod asks for together (each deployment's replicas per Pod, at most its
    max_replicas), rounded up to a whole number."""
    total: dict[str, float] = {}
    for name, d in demands.items():
        n = _per_pod(d, cpus, gpus, memory, bounds[name].max)
        for resource, amount in d.resources.items():
            if amount > 0:
                total[resource] = total.get(resource, 0.0) + n * amount
    return {resource: max(1, math.ceil(amount - _EPS)) for resource, amount in sorted(total.items())}


def coordinator_pods(pods: int, coordinator) -> int:
    """Pods of the coordinator group (first-fit found ``pods``), at least the coordinator's
    ``min_replicas``: every request passes through a coordinator, so its required replicas get
    a Pod each (first-fit would pack them onto one, and one node drain would take every request
    path down). Serve spreads them over those Pods by itself: without
    RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY its scheduler places replicas with
    ``default_scheduling_strategy="SPREAD"`` (ray/serve/_private/deployment_scheduler.py,
    ``_schedule_with_spread_strategy``; Ray 2.60), a soft spread over the nodes that fit."""
    return max(pods, replica_bounds(coordinator).min)


def group_sizes(cfg) -> list[GroupSize]:
    """The worker groups of ``cfg`` (an AppConfig), in GROUP_NAMES order; groups with no
    deployment are left out. Raises SizingError for a replica no Pod of its group can hold."""
    specs = {role: spec for role, spec in cfg.pools.configured()}
    specs["coordinator"] = cfg.coordinator
    cluster: ClusterSpec = cfg.cluster
    out = []
    for group in GROUP_NAMES:
        members = [name for name in specs if GROUP_OF[name] == group]
        if not members:
            continue
        shape = cluster.group(group)
        demands = {name: replica_demand(name, specs[name]) for name in members}
        if group == "coordinator" and any(d.gpus for d in demands.values()):
            raise SizingError("coordinator.ray_actor_options.num_gpus: the coordinator holds no model; its worker "
                              "group has no GPUs")
        gpus = _default_gpus(list(demands.values())) if shape.gpus is None else shape.gpus
        cpus = _default_cpus(list(demands.values()), gpus) if shape.cpus is None else shape.cpus
        memory = quantity_bytes(shape.memory)
        for d in demands.values():
            _check_fits(d, group, cpus, gpus, memory, shape.memory)
        bounds = {name: replica_bounds(specs[name]) for name in members}
        pods = [pods_needed([demands[n] for n in members for _ in range(getattr(bounds[n], attr))], cpus, gpus,
                            memory)
                for attr in ("min", "initial", "max")]
        if group == "coordinator":
            pods = [coordinator_pods(n, cfg.coordinator) for n in pods]
        out.append(GroupSize(group, tuple(members), cpus, gpus, *pods,
                             resources=_group_resources(demands, bounds, cpus, gpus, memory)))
    return out
