"""`kubectl patch` commands that carry a rendering's worker-group bounds to a running RayCluster.

KubeRay leaves each worker group's ``replicas``, ``minReplicas`` and ``maxReplicas`` (and the
Pods' tolerations) out of the hash by which it compares a RayService's ``rayClusterConfig`` with
its RayCluster (``GenerateHashWithoutReplicasAndWorkersToDelete``; kuberay PR #2333, issue
#4568): a `kubectl apply` that changes only them updates the RayService object and never its
running RayCluster. These commands patch the active RayCluster itself (docs/KUBERAY.md §6).
"""
from __future__ import annotations

import json
from typing import Any

from ..config import AppConfig
from .render import render_rayservice

# Where the RayService names the RayCluster that serves its traffic.
ACTIVE_CLUSTER_JSONPATH = "{.status.activeServiceStatus.rayClusterName}"


def group_bounds_patch(cfg: AppConfig) -> list[dict[str, Any]]:
    """JSON 6902 ops setting each rendered worker group's minReplicas and maxReplicas on the
    RayCluster (whose workerGroupSpecs KubeRay copies from the RayService, in order). A ``test``
    of each group's name comes first, so the whole patch fails rather than bound the wrong group.
    ``replicas`` is the autoscaler's, and KubeRay clamps it to the new bounds by itself."""
    ops: list[dict[str, Any]] = []
    for i, group in enumerate(render_rayservice(cfg)["spec"]["rayClusterConfig"]["workerGroupSpecs"]):
        path = f"/spec/workerGroupSpecs/{i}"
        ops.append({"op": "test", "path": f"{path}/groupName", "value": group["groupName"]})
        ops += [{"op": "replace", "path": f"{path}/{key}", "value": group[key]} for key in ("minReplicas", "maxReplicas")]
    return ops


def scale_patch_commands(cfg: AppConfig) -> list[str]:
    """Shell lines: find the RayService's active RayCluster, then patch its group bounds."""
    namespace = f" -n {cfg.cluster.namespace}" if cfg.cluster.namespace else ""
    patch = json.dumps(group_bounds_patch(cfg))  # group names and numbers only: no quote to escape
    return [f"CLUSTER=$(kubectl get rayservice {cfg.name}{namespace} -o jsonpath='{ACTIVE_CLUSTER_JSONPATH}')",
            f"kubectl patch raycluster \"$CLUSTER\"{namespace} --type json -p '{patch}'"]
