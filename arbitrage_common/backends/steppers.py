"""Forward-pass steppers for the lean decode loop: prefill once, then one token per call.

``FastLlamaStepper`` runs a Llama-architecture model straight from its weights with a
preallocated KV cache and fused QKV / gate-up matmuls: a handful of torch ops per layer
and no module hooks, which is where tiny models spend their time on CPU.
``HFStepper`` is the general fallback over any transformers causal LM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class HFStepper:
    def __init__(self, model):
        self.model = model
        self.cache = None

    def prefill(self, ids, mask, positions, max_new_tokens: int):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def decode(self, tokens, mask, positions):
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]


def fast_llama_supported(model) -> bool:
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (type(model).__name__ == "LlamaForCausalLM" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and cfg.hidden_act == "silu"
            and rope.get("rope_type", "default") == "default")


class FastLlamaStepper:
    def __init__(self, model):
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        m = model.model
        self.embed = m.embed_tokens.weight.detach()
        self.final_norm = m.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                a.o_proj.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                mlp.down_proj.weight.detach(),
            ))
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.length = 0

    def _norm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def _rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _forward(self, ids, positions, attn_mask):
        """ids/positions [B, T]; attn_mask bool [B, 1, T, length+T]. Returns last-position logits."""
        b, t = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, T, D]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        start, end = self.length, self.length + t
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.layers):
            h = self._norm(x, w_in)
            q, k, v = F.linear(h, w_qkv).split([q_dim, kv_dim, kv_dim], dim=-1)
            q = self._rope(q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rope(k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
            self.k_cache[i][:, :, start:end] = k
            self.v_cache[i][:, :, start:end] = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end],
                                               attn_mask=attn_mask, enable_gqa=self.n_kv != self.n_heads)
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, q_dim), w_o)
            gate, up = F.linear(self._norm(x, w_post), w_gu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        self.length = end
        return F.linear(self._norm(x[:, -1], self.final_norm), self.lm_head)

    def prefill(self, ids, mask, positions, max_new_tokens: int):
        b, t = ids.shape
        total = t + max_new_tokens
        self.k_cache = [torch.empty(b, self.n_kv, total, self.head_dim) for _ in self.layers]
        self.v_cache = [torch.empty(b, self.n_kv, total, self.head_dim) for _ in self.layers]
        self.length = 0
        keys = mask.bool()[:, None, None, :]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        # Each position also sees itself, so left-pad rows stay finite (no all-masked softmax).
        allowed = (causal & keys) | torch.eye(t, dtype=torch.bool)
        return self._forward(ids, positions, allowed)

    def decode(self, tokens, mask, positions):
        return self._forward(tokens[:, None], positions[:, None], mask.bool()[:, None, None, :])
