"""Forward-pass steppers for the lean decode loop: prefill once, then one token per call.

``FastLlamaStepper`` runs a Llama-architecture model straight from its weights with a
preallocated KV cache and no module hooks. Tiny models spend their CPU time on per-op
overhead (about 2 us an op) and on streaming weights, so a layer is as few ops as it can be:
- weights are kept transposed (``[in, out]``, contiguous) and multiplied with ``matmul``: at
  a decode's few rows, ``F.linear`` over ``[out, in]`` costs 1.2-2x as much on CPU (MKL);
- RoPE's rotate-half is folded into the QKV weight (a sign-flipped, half-swapped copy of the
  Q and K columns after V: columns are only copied and negated), so at a decode step the one
  matmul also gives rotate_half(q) and rotate_half(k), and RoPE is a multiply and an
  ``addcmul`` instead of about a dozen ops per tensor. A forward of several tokens per row (a
  prefill) is compute-bound instead: it multiplies by the Q, K, V columns only (a view, 40 %
  fewer QKV FLOPs) and rotates with one ``cat``: 6-12 % less time for a batched prefill, and
  the same values (to the bit on this machine's CPU).
Its prefill can start each row over a cached past (``KVPrefix``: a request's earlier
tokens, from ``backends.generator_cache``), so only the new tokens run.
``HFStepper`` is the general fallback over any transformers causal LM (no cached past).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .llama_checkpoint import LlamaCheckpoint, llama_config_supported


@dataclass(frozen=True)
class KVPrefix:
    """Keys and values of a row's first tokens: ``[layers, kv heads, tokens, head dim]`` each."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class HFStepper:
    supports_past = False

    def __init__(self, model):
        self.model = model
        self.cache = None

    def prefill(self, ids, mask, positions, max_new_tokens: int, past: Sequence[KVPrefix | None] | None = None,
                new_tokens: Sequence[int] | None = None, last: int = 1):
        if past is not None:
            raise ValueError("HFStepper cannot start from a cached past")
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=last)
        self.cache = out.past_key_values
        return out.logits[:, -1, :] if last == 1 else out.logits[:, -last:, :]

    def decode(self, tokens, mask, positions):
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]


FOLDED_ROPE_MAX_TOKENS = 1  # tokens per row up to which a forward multiplies by the rotated columns too
FORWARD_OVERHEAD_TOKENS = 48  # one more forward costs about this many padded tokens (measured on CPU)


def plan_chunks(widths: Sequence[int], max_batch: int, overhead: float = FORWARD_OVERHEAD_TOKENS) -> list[int]:
    """Where to cut rows of ascending ``widths`` into forwards of at most ``max_batch`` rows so
    that the padded tokens (rows x widest row, per forward) plus ``overhead`` per forward are
    fewest: the end index of each chunk."""
    if any(a > b for a, b in itertools.pairwise(widths)):
        raise ValueError("widths must be ascending")
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(max(0, end - max_batch), end):
            cost = best[begin] + overhead + (end - begin) * widths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    ends, end = [], n
    while end > 0:
        ends.append(end)
        end = cut[end]
    return ends[::-1]


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's ``[out, in]`` weight as a contiguous ``[in, out]`` matrix."""
    return weight.detach().t().contiguous()


def _rotated_half(weight_t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Columns of a transposed ``[in, heads * head_dim]`` weight such that ``x @ result`` is
    RoPE's ``rotate_half(x @ weight_t)`` per head: ``cat(-second half, first half)``."""
    w = weight_t.reshape(weight_t.shape[0], heads, head_dim)
    half = head_dim // 2
    return torch.cat([-w[..., half:], w[..., :half]], dim=-1).reshape(weight_t.shape)


def fast_llama_supported(model) -> bool:
    return type(model).__name__ == "LlamaForCausalLM" and llama_config_supported(model.config)


def load_fast_llama(path) -> tuple[LlamaCheckpoint, FastLlamaStepper]:
    """A checkpoint directory's weights (``LlamaCheckpoint``) and a stepper over them, checked
    with one token through every layer, so a tensor of the wrong shape fails at load."""
    checkpoint = LlamaCheckpoint.load(path)
    stepper = FastLlamaStepper.from_checkpoint(checkpoint)
    one = torch.ones((1, 1), dtype=torch.long)
    with torch.inference_mode():
        logits = stepper.prefill(one, one, torch.zeros_like(one), 1)
    if logits.shape[-1] != checkpoint.config.vocab_size:
        raise ValueError(f"lm_head gives {logits.shape[-1]} logits for a vocab_size of {checkpoint.config.vocab_size}")
    return checkpoint, stepper


class FastLlamaStepper:
    supports_past = True

    def __init__(self, model):
        """Over a transformers ``LlamaForCausalLM`` (``fast_llama_supported``)."""
        self._load(model.config, model.get_parameter)

    @classmethod
    def from_checkpoint(cls, checkpoint) -> FastLlamaStepper:
        """Over a ``llama_checkpoint.LlamaCheckpoint``'s weights: no transformers model."""
        stepper = cls.__new__(cls)
        stepper._load(checkpoint.config, checkpoint.weight)
        return stepper

    def _load(self, cfg, weight) -> None:
        """``weight(name)``: a parameter by its transformers name, e.g. ``model.norm.weight``."""
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.embed = weight("model.embed_tokens.weight").detach()
        self.final_norm = weight("model.norm.weight").detach()
        self.lm_head_t = _transposed(weight("lm_head.weight"))
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            w = lambda name, i=i: weight(f"model.layers.{i}.{name}.weight")
            self.layers.append((
                w("input_layernorm").detach(),
                self._qkv_weight(w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")),
                _transposed(w("self_attn.o_proj")),
                w("post_attention_layernorm").detach(),
                _transposed(torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")])),
                _transposed(w("mlp.down_proj")),
            ))
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.length = 0

    def _qkv_weight(self, q, k, v) -> torch.Tensor:
        """Columns ``[q, k, v | rotate_half(q, k)]``: one matmul gives all five; the first three
        alone are a view (``_hidden``'s prefill)."""
        qk = _transposed(torch.cat([q, k]))
        rotated = _rotated_half(qk, self.n_heads + self.n_kv, self.head_dim)
        return torch.cat([qk, _transposed(v), rotated], dim=1).contiguous()

    def _norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of final (normed) hidden states."""
        return torch.matmul(hidden, self.lm_head_t)

    def _forward(self, ids, positions, attn_mask, last: int = 1):
        """ids/positions [B, T]; attn_mask bool [B, 1, T, length+T]. Returns the last position's
        logits [B, V], or the last ``last`` positions' [B, last, V]."""
        return self.logits(self._hidden(ids, positions, attn_mask, last=last))

    def forward_over(self, ids, positions, attn_mask, k_cache: list, v_cache: list, start: int) -> torch.Tensor:
        """The final (normed) hidden states [B, T, H] of every new position, over per-layer
        key/value buffers ``[B, KV, S, D]`` whose slots before ``start`` hold the past; the new
        keys/values are written from ``start`` on. For the prefix-cached scorers."""
        self.k_cache, self.v_cache, self.length = k_cache, v_cache, start
        return self._hidden(ids, positions, attn_mask, last=None)

    def _hidden(self, ids, positions, attn_mask, last: int | None):
        """Final (normed) hidden states: of the last position ([B, H]) if ``last`` is 1, of the
        last ``last`` positions ([B, last, H]), or of every position (None)."""
        b, t = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [B, T, 1, D]
        heads, d = self.n_heads + self.n_kv, self.head_dim
        qk_dim, q_dim, v_dim = heads * d, self.n_heads * d, self.n_kv * d
        start, end = self.length, self.length + t
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.layers):
            h = self._norm(x, w_in)
            if t > FOLDED_ROPE_MAX_TOKENS:  # compute-bound: skip the rotated columns, rotate the product
                qk, v = torch.matmul(h, w_qkv[:, :qk_dim + v_dim]).split([qk_dim, v_dim], dim=-1)
                qk = qk.view(b, t, heads, d)
                qk_rot = torch.cat([-qk[..., d // 2:], qk[..., :d // 2]], dim=-1)
            else:  # bound by per-op overhead: one matmul gives the rotation too
                qk, v, qk_rot = torch.matmul(h, w_qkv).split([qk_dim, v_dim, qk_dim], dim=-1)
                qk, qk_rot = qk.view(b, t, heads, d), qk_rot.view(b, t, heads, d)
            qk = torch.addcmul(qk * cos, qk_rot, sin).transpose(1, 2)
            self.k_cache[i][:, :, start:end] = qk[:, self.n_heads:]
            self.v_cache[i][:, :, start:end] = v.view(b, t, self.n_kv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qk[:, :self.n_heads], self.k_cache[i][:, :, :end],
                                               self.v_cache[i][:, :, :end], attn_mask=attn_mask,
                                               enable_gqa=self.n_kv != self.n_heads)
            x = x + torch.matmul(o.transpose(1, 2).reshape(b, t, q_dim), w_o)
            gate, up = torch.matmul(self._norm(x, w_post), w_gu).chunk(2, dim=-1)
            x = x + torch.matmul(F.silu(gate) * up, w_down)
        self.length = end
        if last is not None:
            x = x[:, -1] if last == 1 else x[:, -last:]
        return self._norm(x, self.final_norm)

    def prefill(self, ids, mask, positions, max_new_tokens: int, past: Sequence[KVPrefix | None] | None = None,
                new_tokens: Sequence[int] | None = None, last: int = 1):
        """Run the new tokens ``ids`` [B, T] (left-padded); the logits of the last position
        ([B, V]), or of the last ``last`` positions ([B, last, V]: a proposal's verification). Without ``past``, ``mask`` is [B, T].
        With it, row ``r``'s past fills slots ``[0, P_r)`` of a zeroed region ``P = max P_r``
        wide and ``mask`` is [B, P + T] (slots ``>= P_r`` of the region are False): the
        gap is masked, so every real token sees exactly its own past.

        ``new_tokens``: each row's count of real new tokens, ascending. The rows then run in
        chunks (``plan_chunks``), each only as wide as its widest row, instead of all padded to
        the widest: a batch that mixes a request's first step (its whole prompt) with other
        requests' next steps (a few tokens each) would spend most of its prefill on padding.
        The slots a chunk skips are left-padding: zeroed, and masked as before."""
        b, t = ids.shape
        width = mask.shape[1] - t
        total = width + t + max_new_tokens
        self.k_cache = [torch.empty(b, self.n_kv, total, self.head_dim) for _ in self.layers]
        self.v_cache = [torch.empty(b, self.n_kv, total, self.head_dim) for _ in self.layers]
        if width:
            for i in range(len(self.layers)):  # zeros, not garbage: a masked slot's weight is 0, never NaN
                self.k_cache[i][:, :, :width] = 0
                self.v_cache[i][:, :, :width] = 0
            for row, prefix in enumerate(past or ()):
                if prefix is not None:
                    for i in range(len(self.layers)):
                        self.k_cache[i][row, :, :prefix.length] = prefix.keys[i]
                        self.v_cache[i][row, :, :prefix.length] = prefix.values[i]
        keys = mask.bool()[:, None, None, :]
        causal = torch.ones(t, width + t, dtype=torch.bool).tril(diagonal=width)
        # Each position also sees itself, so left-pad rows stay finite (no all-masked softmax).
        itself = torch.zeros(t, width + t, dtype=torch.bool)
        itself[:, width:] = torch.eye(t, dtype=torch.bool)
        allowed = (causal & keys) | itself
        ends = plan_chunks([max(n, 1) for n in new_tokens], b) if new_tokens is not None else [b]
        if len(ends) == 1:
            self.length = width
            return self._forward(ids, positions, allowed, last)
        k_all, v_all, logits, lo = self.k_cache, self.v_cache, [], 0
        for hi in ends:
            skip = t - max(new_tokens[hi - 1], last)  # leading columns that are padding in every row here
            for k, v in zip(k_all, v_all):
                k[lo:hi, :, width:width + skip] = 0
                v[lo:hi, :, width:width + skip] = 0
            self.k_cache, self.v_cache = [k[lo:hi] for k in k_all], [v[lo:hi] for v in v_all]
            self.length = width + skip
            logits.append(self._forward(ids[lo:hi, skip:], positions[lo:hi, skip:], allowed[lo:hi, :, skip:], last))
            lo = hi
        self.k_cache, self.v_cache = k_all, v_all
        return torch.cat(logits)

    def decode(self, tokens, mask, positions):
        return self._forward(tokens[:, None], positions[:, None], mask.bool()[:, None, None, :])

    def export(self, row: int, slots: torch.Tensor) -> KVPrefix:
        """A copy of row ``row``'s keys/values at ``slots`` (its real tokens, in order)."""
        return KVPrefix(torch.stack([k[row].index_select(1, slots) for k in self.k_cache]),
                        torch.stack([v[row].index_select(1, slots) for v in self.v_cache]))
