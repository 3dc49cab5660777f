"""Per-session prefix KV cache for the causal-LM scorers (LM-verifier PRM, verifier-head router).

A scorer input is a prefix (problem + kept steps + the delimiter) followed by the candidate
step; from one step of a request to the next the prefix only grows. For an item with a session
key the scorer keeps that session's state and runs only the new tokens (newly kept history +
the candidate) over it. The state after a call (:class:`SessionState`) holds cached token
sequences (:class:`PrefixState`: ids, keys/values, the logits at the last token, which give the
log-prob of the next token):

- the prefix of the call's last item, cropped before its candidate;
- each scored item's whole text (a *branch*): the step a request keeps is usually one it just
  had scored (the router's draft step when accepted, the oracle's target step), and then only
  the delimiter and the next candidate run.

Two candidates with the same history (an oracle or RSD call) both reuse it; on a fresh session
the first one runs alone and the second runs over its prefix (``_run``'s waves).

Exactness: the item's whole text is tokenized every time and a cached sequence is used only if
its ids are a prefix of those ids ending at or before the candidate's first token (a BPE merge
across the boundary, another history or a failover is a miss); an item that ``fit`` had to cut
is not cached at all. A miss is scored from scratch (the same forward, with no past) and
rebuilds the session's state, so hits and misses give the uncached path's scores (to float
rounding: 1e-5 in the scorer tests' shapes, up to about 3e-5 on the router's scores with 32
sessions near 265 tokens, where a big padded batch's rounding in the cached keys/values is
amplified by the router head).

Batching: rows of one call have different past lengths; they run in padded forwards: row
``i``'s past fills slots ``[0, P_i)`` of a zeroed buffer, its new tokens slots ``[Pmax, Pmax +
N_i)`` at positions ``P_i + j``, and the attention mask hides the gap, so every real token sees
exactly its own past (a masked slot's weight is exactly 0). The buffer is preallocated and
written in place by ``_BufferLayer`` (a ``DynamicLayer`` whose ``update`` does not
concatenate), so a step copies each past once. Misses and hits run apart, sorted by new tokens
and cut where padding would cost more than another forward (:func:`plan_chunks`). Keys/values
are stored as segments (one per call's new tokens, stacked over layers: ``[layers, 2, heads,
T, head_dim]``; a prefix shares its branch's segment), concatenated past ``MAX_SEGMENTS``.

Bounded: an LRU over sessions by bytes of tensor storage (:class:`ByteLRU`); ``release`` evicts
a session at the end of its request (a call in flight for a released session does not put it
back). Thread-safe: the store has its own lock; the model forward runs under the scorer's lock;
stored states are never mutated.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .steppers import FORWARD_OVERHEAD_TOKENS, FastLlamaStepper, fast_llama_supported, plan_chunks

DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
MAX_SEGMENTS = 8  # a session's KV segments are concatenated into one past this many
MAX_BRANCHES = 4  # whole texts (scored candidates) kept per session from its last call
_TOMBSTONES = 4096  # released keys remembered (to refuse a put from a batch that began before)


class ByteLRU:
    """A thread-safe LRU of values with a byte size each, bounded by their total.

    ``put`` evicts the least recently used entries until the total fits ``max_bytes``; a value
    larger than the whole bound is not stored (and drops the key's old value). ``release``
    removes a key and records it, so that a ``put`` with an ``epoch`` taken (``epoch()``) before
    the release is refused: a batch still in flight for a finished request does not bring its
    session back."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._released: OrderedDict[Hashable, int] = OrderedDict()
        self._bytes = 0
        self._epoch = 0
        self._forgotten = 0  # the newest epoch whose tombstone was dropped (see ``put``)
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int, epoch: int | None = None) -> bool:
        """Store ``value`` (``nbytes``) as the newest entry; False if it was not stored (too
        large, or ``key`` released after ``epoch``)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        with self._lock:
            # A forgotten tombstone may have been this key's: a batch older than the oldest one
            # kept is refused (a later miss costs a forward, never a wrong answer).
            if epoch is not None and (self._released.get(key, -1) > epoch or epoch < self._forgotten):
                return False
            self._drop(key)
            if nbytes > self.max_bytes:
                return False
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
                self.evictions += 1
            return True

    def discard(self, key: Hashable) -> bool:
        """Remove ``key`` (no record kept); True if it was there."""
        with self._lock:
            return self._drop(key)

    def release(self, key: Hashable) -> bool:
        """Remove ``key`` and refuse puts from batches that began before now; True if it was there."""
        with self._lock:
            self._epoch += 1
            self._released[key] = self._epoch
            self._released.move_to_end(key)
            while len(self._released) > _TOMBSTONES:
                _, dropped = self._released.popitem(last=False)
                self._forgotten = max(self._forgotten, dropped)
            return self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: Hashable) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry[1]
        return True


@dataclass(frozen=True)
class PrefixState:
    """A cached token sequence: its ids, its keys/values (segments of ``[layers, 2, heads, T,
    head_dim]``, in order) and the logits at its last token (they predict the next token)."""

    ids: tuple[int, ...]
    segments: tuple[torch.Tensor, ...]
    logits: torch.Tensor

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SessionState:
    """A session's cached sequences after its last call: the prefix of its last item (cropped
    before the candidate), then each scored item's whole text (a branch: the step a request
    keeps is usually one it had scored, whose tokens then need not run again)."""

    states: tuple[PrefixState, ...]

    def lookup(self, ids: Sequence[int], limit: int) -> PrefixState | None:
        """The longest cached sequence that is a prefix of ``ids``, at most ``limit`` long and
        shorter than ``ids`` (at least one token must run)."""
        best = None
        for state in self.states:
            n = state.length
            if (n <= limit and n < len(ids) and (best is None or n > best.length)
                    and tuple(ids[:n]) == state.ids):
                best = state
        return best

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor storage it holds (shared segments counted once) and its ids."""
        seen: dict[int, int] = {}
        for state in self.states:
            for t in (*state.segments, state.logits):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values()) + sum(8 * s.length for s in self.states)


@dataclass
class _Row:
    index: int  # in the batch
    session: Hashable
    ids: list[int]
    scored: list[int]  # token positions of the candidate (the min log-prob is over them)
    prefix: int  # tokens before the candidate: the state kept for the next step
    past: PrefixState | None  # a hit: the cached sequence the new tokens run over


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class _BufferLayer(DynamicLayer):
        """A DynamicLayer over preallocated ``[B, H, S, D]`` buffers whose first ``length``
        slots already hold the past: ``update`` writes the new keys/values in place."""

        def __init__(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int):
            super().__init__()
            self.k_buf, self.v_buf, self.length = k_buf, v_buf, length
            self.dtype, self.device = k_buf.dtype, k_buf.device
            self.keys, self.values = k_buf[:, :, :length], v_buf[:, :, :length]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            self.k_buf[:, :, self.length:end] = key_states
            self.v_buf[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
            return self.keys, self.values

    return _BufferLayer


def _kv_layout(model) -> tuple[int, int, int, torch.dtype] | None:
    """(layers, kv heads, head dim, dtype) of the model's cache, probed with one token; None
    when a layer is not a plain ``DynamicLayer`` (sliding window, linear attention) or the
    model does not take the probe: such a model is scored uncached."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        probe = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        with torch.inference_mode():
            cache = model(input_ids=probe, use_cache=True).past_key_values
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError, NotImplementedError):
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers:
        return None
    shapes = set()
    for layer in layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4:
            return None
        shapes.add((tuple(layer.keys.shape), tuple(layer.values.shape), layer.keys.dtype))
    if len(shapes) != 1:
        return None
    (k_shape, v_shape, dtype), = shapes
    if k_shape != v_shape:
        return None
    return len(layers), k_shape[1], k_shape[3], dtype


Fallback = Callable[[Sequence[str], Sequence[int]], tuple[list[float], torch.Tensor | None]]


class PrefixCachedLM:
    """Step features (min log-prob over the candidate's tokens, optionally the final hidden
    state at its last token) of session items over cached prefixes; see the module docstring."""

    def __init__(self, model, tokenizer, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, batch_size: int = 32,
                 lock: threading.Lock | None = None, forward_overhead_tokens: float = FORWARD_OVERHEAD_TOKENS,
                 stepper: FastLlamaStepper | None = None):
        """``model``: the transformers model; or None with ``stepper``, a checkpoint loaded
        without transformers (``steppers.load_fast_llama``), whose uncached path is
        ``uncached``."""
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = max(1, int(batch_size))
        self.forward_overhead_tokens = forward_overhead_tokens
        self.lock = lock
        self.store = ByteLRU(max_bytes)
        self.caching = max_bytes > 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._layout: tuple | None = None
        self._probed = not self.caching  # probed on the first call with sessions (0 bytes: off, never)
        self._probe_lock = threading.Lock()
        self._layer = None
        self._fast: FastLlamaStepper | None = None  # the fused Llama forward, where the model allows it (CPU)
        if stepper is not None:
            self._fast, self._probed = stepper, True
            self._layout = (len(stepper.layers), stepper.n_kv, stepper.head_dim, stepper.embed.dtype)
        self.device = model.device if model is not None else torch.device("cpu")
        self._stats_lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "truncated": 0, "uncached": 0, "new_tokens": 0, "cached_tokens": 0}

    @property
    def layout(self) -> tuple[int, int, int, torch.dtype] | None:
        """The model's KV layout (probed once, under the scorer's lock); None: caching is off."""
        if not self._probed:
            with self._probe_lock:
                if not self._probed:
                    with self.lock if self.lock is not None else contextlib.nullcontext():
                        self._layout = _kv_layout(self.model)
                    self._layer = _layer_class() if self._layout is not None else None
                    if self._layout is not None and self.model.device.type == "cpu" and fast_llama_supported(self.model):
                        self._fast = FastLlamaStepper(self.model)
                    self._probed = True
        return self._layout

    @property
    def enabled(self) -> bool:
        return self.caching and self.layout is not None

    def release(self, session: Hashable) -> bool:
        return self.store.release(session)

    def info(self) -> dict:
        with self._stats_lock:
            stats = dict(self.stats)
        return {**stats, "sessions": len(self.store), "bytes": self.store.bytes, "max_bytes": self.store.max_bytes,
                "evictions": self.store.evictions, "enabled": self.enabled}

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                self.stats[k] += v

    @torch.inference_mode()
    def features(self, items: Sequence, sessions: Sequence[Hashable | None], fit: Callable, split: Callable,
                 fallback: Fallback, with_hidden: bool = False) -> tuple[list[float], torch.Tensor | None]:
        """Per item: its min log-prob (and hidden state). ``fit(item)`` is the scorer's
        truncation, ``split(item) -> (text, candidate start)`` its text, ``fallback(texts,
        starts)`` its uncached features (items without a session, cut items, a disabled cache)."""
        if len(sessions) != len(items):
            raise ValueError(f"{len(sessions)} sessions for {len(items)} items")
        epoch = self.store.epoch()
        n = len(items)
        mins: list[float | None] = [None] * n
        hidden: list[torch.Tensor | None] = [None] * n
        plain: list[tuple[int, str, int]] = []
        keyed: list[tuple[int, Hashable, str, int]] = []
        for i, (item, session) in enumerate(zip(items, sessions)):
            fitted = fit(item)
            text, start = split(fitted)
            if session is None or not self.enabled:
                plain.append((i, text, start))
            elif fitted != item:  # cut to the context: its prefix changes every step
                self.store.discard(session)
                plain.append((i, text, start))
                self._count(truncated=1)
            else:
                keyed.append((i, session, text, start))
        if plain:
            got, h = fallback([t for _, t, _ in plain], [s for _, _, s in plain])
            for k, (i, _, _) in enumerate(plain):
                mins[i] = got[k]
                if with_hidden:
                    hidden[i] = h[k]
            self._count(uncached=len(plain))
        if keyed:
            for session, state in self._run(self._rows(keyed), with_hidden, mins, hidden).items():
                self.store.put(session, state, state.nbytes, epoch)
        return mins, (torch.stack(hidden) if with_hidden else None)

    def _rows(self, keyed: list[tuple[int, Hashable, str, int]]) -> list[_Row]:
        enc = self.tokenizer([t for _, _, t, _ in keyed], return_offsets_mapping=True)
        rows = []
        for k, (i, session, text, start) in enumerate(keyed):
            ids, offsets = list(enc["input_ids"][k]), enc["offset_mapping"][k]
            # As step_features: tokens after the first that begin at or after the candidate.
            scored = [j for j in range(1, len(ids)) if offsets[j][0] >= start and offsets[j][1] > offsets[j][0]]
            prefix = next((j for j, (_, end) in enumerate(offsets) if end > start), len(ids))
            rows.append(_Row(i, session, ids, scored, prefix, None))
        return rows

    @torch.inference_mode()
    def uncached(self, texts: Sequence[str], starts: Sequence[int],
                 with_hidden: bool = False) -> tuple[list[float], torch.Tensor | None]:
        """The features of texts scored from scratch, nothing kept: the uncached path of a
        checkpoint loaded without transformers (the same forward as a miss)."""
        n = len(texts)
        mins: list[float | None] = [None] * n
        hidden: list[torch.Tensor | None] = [None] * n
        rows = sorted(self._rows([(i, None, t, s) for i, (t, s) in enumerate(zip(texts, starts))]),
                      key=lambda r: len(r.ids))
        lo = 0
        for hi in plan_chunks([len(r.ids) for r in rows], self.batch_size, self.forward_overhead_tokens):
            self._forward(rows[lo:hi], with_hidden, mins, hidden)
            lo = hi
        return mins, (torch.stack(hidden) if with_hidden and n else None)

    def _run(self, rows: list[_Row], with_hidden: bool, mins: list, hidden: list) -> dict[Hashable, SessionState]:
        """Features of every row; the sessions' new states. Rows run in waves: a session's
        first miss runs before its other rows, which then look up again (the two candidates of
        an oracle call on a fresh session share one prefix forward)."""
        cached = {r.session: self.store.get(r.session) for r in rows}
        done: dict[Hashable, list[tuple[int, PrefixState | None, PrefixState]]] = {}
        pending = rows
        while pending:
            wave, later, missing = [], [], set()
            for r in pending:
                state = cached.get(r.session)
                r.past = state.lookup(r.ids, r.prefix) if state is not None else None
                if r.past is None and r.session in missing:
                    later.append(r)
                    continue
                if r.past is None:
                    missing.add(r.session)
                wave.append(r)
            self._count(hits=sum(r.past is not None for r in wave), misses=sum(r.past is None for r in wave),
                        cached_tokens=sum(r.past.length for r in wave if r.past is not None),
                        new_tokens=sum(len(r.ids) - (r.past.length if r.past else 0) for r in wave))
            # Misses (long, no past) and hits (short, over a past) apart, each sorted by its new
            # tokens and cut into forwards that waste the least on padding (``plan_chunks``).
            new = lambda r: len(r.ids) - (r.past.length if r.past is not None else 0)
            for group in ([r for r in wave if r.past is None], [r for r in wave if r.past is not None]):
                group.sort(key=new)
                lo = 0
                for hi in plan_chunks([new(r) for r in group], self.batch_size, self.forward_overhead_tokens):
                    chunk = group[lo:hi]
                    lo = hi
                    for r, (prefix, whole) in zip(chunk, self._forward(chunk, with_hidden, mins, hidden)):
                        done.setdefault(r.session, []).append((r.index, prefix, whole))
            for session in missing:  # what the waiting rows look up
                cached[session] = self._session_state(done[session])
            pending = later
        return {session: self._session_state(got) for session, got in done.items()}

    @staticmethod
    def _session_state(got: list[tuple[int, PrefixState | None, PrefixState]]) -> SessionState:
        """The last item's prefix, then every item's whole text (newest last, ids deduplicated)."""
        got = sorted(got, key=lambda g: g[0])
        states: dict[tuple[int, ...], PrefixState] = {}
        last_prefix = got[-1][1]
        if last_prefix is not None:
            states[last_prefix.ids] = last_prefix
        for _, _, whole in got[-MAX_BRANCHES:]:
            states.setdefault(whole.ids, whole)
        return SessionState(tuple(states.values()))

    def _hf_forward(self, input_ids, mask, positions, buf, p_max: int, with_hidden: bool):
        from transformers import DynamicCache

        device = self.device
        cache = DynamicCache()
        cache.layers = [self._layer(buf[layer, 0], buf[layer, 1], p_max) for layer in range(buf.shape[0])]
        out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                         output_hidden_states=with_hidden)
        return out.logits, (out.hidden_states[-1] if with_hidden else None)

    def _fast_forward(self, input_ids, mask, positions, buf, p_max: int):
        """The same forward on the fused Llama path (``FastLlamaStepper``: no module hooks):
        new tokens are right-padded after the past region, so row i's token j sees its past and
        its new tokens up to j."""
        n = input_ids.shape[1]
        allowed = torch.ones(n, p_max + n, dtype=torch.bool).tril(diagonal=p_max) & mask.bool()[:, None, None, :]
        # Padding positions may run past the rotary table; their outputs are never read.
        hidden = self._fast.forward_over(input_ids, positions.clamp(max=len(self._fast.cos) - 1), allowed,
                                         list(buf[:, 0]), list(buf[:, 1]), p_max)
        return self._fast.logits(hidden), hidden

    def _forward(self, chunk: list[_Row], with_hidden: bool, mins: list,
                 hidden: list) -> list[tuple[PrefixState | None, PrefixState]]:
        """One padded forward of the chunk's new tokens over their pasts; per row its features
        into ``mins``/``hidden`` and (its prefix, its whole text) as cached sequences."""
        n_layers, heads, head_dim, dtype = self.layout
        device = self.device
        pasts = [r.past.length if r.past is not None else 0 for r in chunk]
        news = [len(r.ids) - p for r, p in zip(chunk, pasts)]
        b, p_max, n_max = len(chunk), max(pasts), max(news)
        width = p_max + n_max
        input_ids = torch.full((b, n_max), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, (r, p, m) in enumerate(zip(chunk, pasts, news)):
            input_ids[i, :m] = torch.tensor(r.ids[p:], dtype=torch.long)
            mask[i, :p] = 1
            mask[i, p_max:p_max + m] = 1
        positions = torch.arange(n_max)[None, :] + torch.tensor(pasts)[:, None]
        buf = torch.empty((n_layers, 2, b, heads, width, head_dim), dtype=dtype, device=device)
        if p_max:
            for i, r in enumerate(chunk):
                # a masked slot (the gap after a shorter past) must hold a finite value (0 * NaN is NaN)
                buf[:, :, i, :, pasts[i]:p_max].zero_()
                at = 0
                for seg in r.past.segments if r.past is not None else ():
                    t = seg.shape[3]
                    buf[:, :, i, :, at:at + t] = seg
                    at += t
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if self._fast is not None:
                logits, last_hidden = self._fast_forward(input_ids, mask, positions, buf, p_max)
            else:
                logits, last_hidden = self._hf_forward(input_ids, mask, positions, buf, p_max, with_hidden)
        results = []
        for i, (r, p, m) in enumerate(zip(chunk, pasts, news)):
            # Logits for positions ``first`` .. p + m - 1 (a past's stored logits stand for p - 1).
            rows, first = logits[i, :m], p
            if r.past is not None:
                rows, first = torch.cat([r.past.logits[None].to(rows.dtype), rows]), p - 1
            if r.scored:
                at = torch.tensor([j - 1 - first for j in r.scored], device=rows.device)
                tok = torch.tensor([r.ids[j] for j in r.scored], device=rows.device)
                logp = torch.log_softmax(rows[at].float(), dim=-1).gather(-1, tok[:, None])[:, 0]
                mins[r.index] = float(logp.min())
            else:
                mins[r.index] = 0.0
            if with_hidden:
                hidden[r.index] = last_hidden[i, m - 1].float().cpu()
            base = r.past.segments if r.past is not None else ()
            if len(base) >= MAX_SEGMENTS:
                base = (torch.cat(base, dim=3),)
            new = buf[:, :, i, :, p_max:p_max + m].clone()
            whole = PrefixState(tuple(r.ids), (*base, new), logits[i, m - 1].clone())
            keep = r.prefix - p  # the new tokens before the candidate
            if keep > 0:
                prefix = PrefixState(tuple(r.ids[:r.prefix]), (*base, new[:, :, :, :keep]), logits[i, keep - 1].clone())
            else:
                prefix = r.past
            results.append((prefix, whole))
        return results
