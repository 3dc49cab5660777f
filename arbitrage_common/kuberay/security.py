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
