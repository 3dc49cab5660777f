"""``arbitrage plan``: the fewest replicas per pool whose simulated p95 holds an SLO at an
arrival rate, then GPUs per pool and worker-group Pods for a preset, for RSD and Arbitrage
side by side at matched accuracy (the business case: fewer target GPUs)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .model import CALLS_PER_STEP, Pool, ServiceCurve, SimResult, Workload, simulate

MAX_REPLICAS = 256


@dataclass(frozen=True)
class Profile:
    """What ``arbitrage plan profile`` measured: per-pool service curves and the overheads."""

    curves: dict[str, ServiceCurve]
    max_batch: dict[str, int]
    hop_ms: float
    request_overhead_ms: float
    steps: tuple[int, ...]
    cores: float | None
    measured: dict

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        d = json.loads(Path(path).read_text())
        return cls({k: ServiceCurve(**v) for k, v in d["curves"].items()}, d["max_batch"], d["hop_ms"],
                   d["request_overhead_ms"], tuple(d["steps"]), d.get("cores"), d.get("measured", {}))

    def cpu_ms_per_request(self, policy: str, target_fraction: float) -> float:
        """Work one request puts on the cores at batch 1: pool passes, hops, overhead."""
        always, routed = CALLS_PER_STEP[policy]
        steps = sum(self.steps) / len(self.steps)
        per_step = sum(self.curves[p].ms(1) + self.hop_ms for p in always)
        if routed:
            per_step += target_fraction * (self.curves[routed].ms(1) + self.hop_ms)
        return steps * per_step + self.request_overhead_ms

    def scaled(self, k: float) -> Profile:
        """Every time multiplied by ``k`` (calibration against a measured capacity)."""
        curves = {n: ServiceCurve(c.base_ms * k, c.per_item_ms * k, c.cv) for n, c in self.curves.items()}
        return replace(self, curves=curves, hop_ms=self.hop_ms * k, request_overhead_ms=self.request_overhead_ms * k,
                       measured={**self.measured, "scaled_by": k})

    def as_dict(self) -> dict:
        return {"curves": {k: {"base_ms": v.base_ms, "per_item_ms": v.per_item_ms, "cv": v.cv}
                           for k, v in self.curves.items()},
                "max_batch": self.max_batch, "hop_ms": self.hop_ms, "request_overhead_ms": self.request_overhead_ms,
                "steps": list(self.steps), "cores": self.cores, "measured": self.measured}


def check_inputs(rate: float, slo_ms: float, target_fraction: float, profile: Profile, policy: str) -> None:
    """Reject impossible inputs, naming each."""
    if rate <= 0:
        raise ValueError(f"--rate: arrivals per second must be > 0, got {rate}")
    if not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"--target-fraction: must lie in [0, 1], got {target_fraction}")
    always, _ = CALLS_PER_STEP[policy]
    one_step = sum(profile.curves[p].ms(1) + profile.hop_ms for p in always if p in profile.curves)
    if slo_ms <= one_step:
        raise ValueError(f"--slo-ms: {slo_ms:g} ms is below the service time of one step ({one_step:.1f} ms for "
                         f"{' + '.join(always)} at batch 1)")


def workload(profile: Profile, policy: str, target_fraction: float) -> Workload:
    return Workload(policy, profile.steps, 1.0 if policy == "target" else target_fraction, profile.hop_ms,
                    profile.request_overhead_ms)


def predict(profile: Profile, policy: str, target_fraction: float, rate: float, replicas: dict[str, int],
            seed: int = 0, n_requests: int = 2000) -> SimResult:
    w = workload(profile, policy, target_fraction)
    pools = {p: Pool(profile.curves[p], replicas.get(p, 1), profile.max_batch.get(p, 16)) for p in w.pools()}
    return simulate(pools, w, rate, n_requests=n_requests, seed=seed, cores=profile.cores)


def plan(profile: Profile, policy: str, target_fraction: float, rate: float, slo_ms: float,
         seed: int = 0) -> dict:
    """Replicas per pool: start at one each; while the simulated p95 misses the SLO, add a
    replica to the busiest pool."""
    check_inputs(rate, slo_ms, target_fraction, profile, policy)
    w = workload(profile, policy, target_fraction)
    replicas = dict.fromkeys(sorted(w.pools()), 1)
    while True:
        result = predict(profile, policy, target_fraction, rate, replicas, seed)
        if result.stable and result.p(95) <= slo_ms:
            break
        busiest = max(replicas, key=lambda p: (result.utilization[p], result.mean_wait_ms[p]))
        if replicas[busiest] >= MAX_REPLICAS or (profile.cores is not None and sum(replicas.values()) > 64):
            raise ValueError(f"--slo-ms: p95 {slo_ms:g} ms at {rate:g} req/s is not reachable "
                             f"(p95 {result.p(95):.0f} ms with {replicas})")
        replicas[busiest] += 1
    return {"policy": policy, "target_fraction": round(w.target_fraction, 4), "rate": rate, "slo_p95_ms": slo_ms,
            "replicas": replicas, "predicted_p50_ms": round(result.p(50), 1),
            "predicted_p95_ms": round(result.p(95), 1),
            "utilization": {k: round(v, 3) for k, v in result.utilization.items()}}


def gpus_and_pods(replicas: dict[str, int], cfg) -> dict:
    """GPUs per pool and worker-group Pods for an AppConfig (a preset) at these replica counts."""
    from ..kuberay.sizing import group_sizes, pods_needed, replica_bounds, replica_demand

    specs = dict(cfg.pools.configured())
    gpus = {p: round(n * replica_demand(p, specs[p]).gpus, 3) for p, n in replicas.items() if p in specs}
    groups = {}
    for size in group_sizes(cfg):
        demands = [replica_demand(p, specs[p]) for p in size.deployments if p in replicas
                   for _ in range(replicas[p])]
        if demands:
            groups[size.name] = {"pods": pods_needed(demands, size.cpus, size.gpus), "gpus_per_pod": size.gpus,
                                 "cpus_per_pod": size.cpus}
    over = {p: {"planned": n, "max_replicas": replica_bounds(specs[p]).max} for p, n in replicas.items()
            if p in specs and n > replica_bounds(specs[p]).max}
    return {"gpus_per_pool": gpus, "gpus_total": round(sum(gpus.values()), 3), "worker_groups": groups,
            "above_config_max_replicas": over}
