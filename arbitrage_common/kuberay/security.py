"""The securityContexts of every rendered Pod: the Kubernetes Pod Security Standards'
``restricted`` profile (docs/KUBERAY.md §5, "Pod security").

Pod level: who the processes run as and their seccomp profile, so they cover every container of
the Pod, KubeRay's own included. Container level: the two fields the standard wants on each
container (``allowPrivilegeEscalation``, ``capabilities``). No Ray imports.
"""
from __future__ import annotations

from typing import Any

# The user of the rayproject/ray images (docker/base-deps/Dockerfile in ray-project/ray: `ray`,
# uid 1000, primary group `users`, gid 100), which k8s/Dockerfile keeps (no USER of its own; its
# files are COPY --chown=ray:users). Numeric on purpose: kubelet refuses runAsNonRoot for an
# image whose USER is a name it cannot check, unless runAsUser gives the uid.
RAY_UID = 1000
RAY_GID = 100


def pod_security_context() -> dict[str, Any]:
    """A Ray Pod's ``securityContext``: non-root as the image's ``ray`` user, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        # A writable volume of the config's own (a cache, say) becomes group `users`-writable.
        # OnRootMismatch: kubelet walks a volume's files only when its root is not yet the group's,
        # not on every Pod start (a volume of model weights is large). Read-only volumes are left
        # as they are, so weights must be readable by uid 1000 or gid 100, as before.
        "fsGroup": RAY_GID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """A container's ``securityContext``: no privilege escalation (no setuid, no sudo), no
    capabilities. KubeRay copies the Ray container's onto the workers' ``wait-gcs-ready`` init
    container; the autoscaler sidecar gets it from ``autoscalerOptions.securityContext``."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
