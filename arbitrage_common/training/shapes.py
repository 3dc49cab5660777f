"""Model shapes of the bundled checkpoints (one place, so cards and code agree)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_positions: int = 512

    def llama_config(self, vocab_size: int, **extra):
        from transformers import LlamaConfig

        from ..tokenizer import BOS, EOS, PAD, SPECIALS

        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.ffn,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.heads, max_position_embeddings=self.max_positions,
            tie_word_embeddings=True, pad_token_id=SPECIALS.index(PAD),
            bos_token_id=SPECIALS.index(BOS), eos_token_id=SPECIALS.index(EOS), **extra,
        )

    def as_dict(self) -> dict:
        return asdict(self)


# Cost at batch 1 follows the layer count (MODELS_NOTES), so the draft is shallow (2 layers)
# and trained briefly, so it is cheap and often wrong. (1 layer measured 1.5% final accuracy.)
SHAPES = {
    "draft": Shape(hidden=96, layers=2, heads=4, ffn=256),
    "target": Shape(hidden=160, layers=6, heads=4, ffn=640),
    # The independent PRM's body: about 1/5 of the target's parameters, as Skywork-1.5B is
    # of an 8B target in the paper.
    "prm": Shape(hidden=112, layers=3, heads=4, ffn=320),
}
