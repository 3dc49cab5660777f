"""The securityContexts of every rendered Pod: the Kubernetes Pod Security Standards'
``restricted`` profile (docs/KUBERAY.md §5, "Pod security").

Pod level: non-root and the seccomp profile, so they cover every container of the Pod, KubeRay's
own included. Container level: the two fields the standard wants on each
container (``allowPrivilegeEscalation``, ``capabilities``). No Ray imports.
"""
from __future__ import annotations

from typing import Any


def pod_security_context() -> dict[str, Any]:
    """A Ray Pod's ``securityContext``: non-root, RuntimeDefault seccomp. No uid of its own: the
    image's numeric USER runs (the rayproject/ray images' ``USER $RAY_UID``, 1000, which
    k8s/Dockerfile keeps), kubelet refuses an image that would run as root, and clusters that
    assign uids and fsGroups per namespace (OpenShift's restricted-v2) can still assign them."""
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    """A container's ``securityContext``: no privilege escalation (no setuid, no sudo), no
    capabilities. KubeRay copies the Ray container's onto the workers' ``wait-gcs-ready`` init
    container; the autoscaler sidecar gets it from ``autoscalerOptions.securityContext``."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


# The volume sources the ``restricted`` profile admits; ``baseline`` refuses only hostPath.
RESTRICTED_VOLUME_SOURCES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                       "persistentVolumeClaim", "projected", "secret"})


def volume_profile_problems(cluster: Any) -> list[tuple[str, str]]:
    """(field, message) per config volume (``cluster``: a ``ClusterSpec``) whose source takes its
    Pods out of the ``restricted`` profile: a namespace that enforces it refuses them. A warning,
    not an error: a node-local model cache (hostPath) is a fair choice where nothing enforces it."""
    problems = []
    for shape in ("head", "draft", "target", "scorers", "coordinator"):
        for i, volume in enumerate(getattr(cluster, shape).volumes):
            source = next((key for key in volume if key != "name"), "?")
            if source in RESTRICTED_VOLUME_SOURCES:
                continue
            profiles = "profiles 'baseline' and 'restricted'" if source == "hostPath" else "profile 'restricted'"
            message = (f"volume {volume.get('name')!r} takes these Pods out of the Pod Security Standards' "
                       f"{profiles}: a namespace that enforces it refuses them ('restricted' admits "
                       f"{', '.join(sorted(RESTRICTED_VOLUME_SOURCES))})")
            problems.append((f"cluster.{shape}.volumes[{i}].{source}", message))
    return problems
