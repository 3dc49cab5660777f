"""Session affinity for pool deployments: every step of one request goes to one replica.

A step's prefix is the previous step's prefix plus one step, so a replica that served the
last step already holds most of the next one in its engine's prefix cache (vLLM). Ray
Serve's default router (power of two choices) picks the shorter of two random queues and
scatters the steps of a request over all replicas.

``preferred_replicas`` is the choice itself, pure and Ray-free: rendezvous (highest random
weight) hashing of (session id, replica id). The same session maps to the same replica
while it is alive; when a replica goes, only its sessions move (each to its next-ranked
replica); when one comes, it takes about 1/n of the sessions from the others. The hash is
blake2b, never Python's salted ``hash()``, so every coordinator replica (each its own
process with its own router) picks the same replica for a session.

``SessionAffinityRouter`` is the thin Ray Serve ``RequestRouter`` over it. A call made with
``handle.options(session_id=...)`` goes to its session's replica, or, when that replica's
queue is full, to the next in rank; a call without a session id gets Serve's default choice.
``services.app`` installs it from ``PoolSpec.session_affinity``.
"""
from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "services.affinity.SessionAffinityRouter"  # the import path Serve loads in each caller
DEFAULT_FALLBACKS = 1


def _weight(session_id: str, replica_key: str) -> int:
    # Length-prefixed, so no (session, replica) pair reads as another.
    data = f"{len(session_id)}:{session_id}{replica_key}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def preferred_replicas(session_id: str, replica_keys: Iterable[str], fallbacks: int = DEFAULT_FALLBACKS) -> list[str]:
    """The session's replica first, then up to ``fallbacks`` others in rank order.

    Empty when there is no session id (the caller uses its default choice) or no replica.
    """
    if not session_id:
        return []
    keys = set(replica_keys)
    # Ties (a 64-bit collision) break on the key, so the order never depends on input order.
    return heapq.nlargest(1 + max(fallbacks, 0), keys, key=lambda k: (_weight(session_id, k), k))


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Session id -> the same replica (rendezvous hashing); no session id -> power of two.

    ``request_router_kwargs``: ``num_fallback_replicas`` (default 1), how many next-ranked
    replicas a call may go to when its replica's queue is full; 0 waits for that replica.
    """

    num_fallback_replicas = DEFAULT_FALLBACKS

    # Hand each chosen replica to the request it was chosen for. The default's FIFO hand-off
    # gives it to the longest-waiting request instead, which would break affinity under load.
    _fulfill_next_pending_request = RequestRouter._fulfill_next_pending_request

    def initialize_state(self, num_fallback_replicas: int = DEFAULT_FALLBACKS, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        if isinstance(num_fallback_replicas, bool) or not isinstance(num_fallback_replicas, int) \
                or num_fallback_replicas < 0:
            raise ValueError(f"num_fallback_replicas must be an int >= 0, got {num_fallback_replicas!r}")
        self.num_fallback_replicas = num_fallback_replicas

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session:
            return await super().choose_replicas(candidate_replicas, pending_request)
        by_key = {r.replica_id.unique_id: r for r in candidate_replicas}
        # All ranks full: back off before asking again instead of spinning on queue probes.
        pending_request.routing_context.should_backoff = True
        return [[by_key[k]] for k in preferred_replicas(session, by_key, self.num_fallback_replicas)]


def router_config(enabled: bool) -> dict[str, Any] | None:
    """``serve.deployment(request_router_config=...)`` for a pool; None keeps Serve's default."""
    if not enabled:
        return None
    return {"request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"num_fallback_replicas": DEFAULT_FALLBACKS}}
