"""Per-session KV prefix cache for the transformers step generators.

A request's step calls to one generator pool share a growing prefix: the problem, then the
steps kept so far. After a call the generator keeps, under the request's session key, the
token ids it ran (prefix + the generated step) with their keys/values. The next call of the
session tokenizes its whole prefix as always and reuses the keys/values of the longest
common run of leading ids; only the rest runs. Causal attention makes that exact: the
keys/values of a token depend only on the tokens before it, so the cached ones are those a
full prefill would compute (to float rounding). Whatever differs (a stripped space, a step the
target rewrote, a BPE merge across the boundary) simply runs again.

Bounded by an LRU over bytes (``prefix_cache.ByteLRU``); ``release`` drops a session when its
request ends, and a call still in flight for a released session does not bring it back.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, ByteLRU
from .steppers import KVPrefix


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class KVSequence:
    """Token ids and their keys/values (``KVPrefix``), as one call of a session left them."""

    ids: tuple[int, ...]
    kv: KVPrefix

    @property
    def nbytes(self) -> int:
        return self.kv.keys.nbytes + self.kv.values.nbytes + 8 * len(self.ids)


class GeneratorPrefixCache:
    """Sessions' ``KVSequence`` under a byte bound; thread-safe (the LRU has its own lock)."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        self.store = ByteLRU(max_bytes)
        # rows looked up, of which reused nothing; their prefix tokens, of which reused
        self.requests = self.misses = self.queries = self.hits = 0

    def epoch(self) -> int:
        return self.store.epoch()

    def lookup(self, session: Hashable | None, ids: Sequence[int]) -> KVPrefix | None:
        """The cached keys/values of ``ids``' longest cached leading run, leaving at least one
        token to run (its logits start the step); None on a miss."""
        held = self.store.get(session) if session is not None else None
        n = min(common_prefix(held.ids, ids), len(ids) - 1) if held is not None else 0
        if session is not None:
            self.requests += 1
            self.misses += n <= 0
            self.queries += len(ids)
            self.hits += max(n, 0)
        if n <= 0:
            return None
        return KVPrefix(held.kv.keys[:, :, :n], held.kv.values[:, :, :n])

    def keep(self, session: Hashable, sequence: KVSequence, epoch: int) -> bool:
        """Store the session's sequence after a call that began at ``epoch``."""
        return self.store.put(session, sequence, sequence.nbytes, epoch=epoch)

    def release(self, session: Hashable) -> bool:
        return self.store.release(session)

    def info(self) -> dict:
        """Counters as the vLLM engine's prefix cache reports them (``requests``: rows looked up;
        ``queries``: their prefix tokens; ``hits``: tokens reused; ``hit_rate``), plus ``misses``
        (rows that reused nothing) and the store's size."""
        return {"requests": self.requests, "queries": self.queries, "hits": self.hits,
                "hit_rate": self.hits / self.queries if self.queries else 0.0, "misses": self.misses,
                "sessions": len(self.store), "bytes": self.store.bytes, "max_bytes": self.store.max_bytes,
                "evictions": self.store.evictions}
