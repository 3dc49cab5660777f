"""A Llama checkpoint's weights and tokenizer read straight from its files, for the fast Llama
path (``FastLlamaStepper`` reads weights, not modules) of the step generators and the LM
scorers (the LM-verifier PRM and the verifier-head router).

Why: transformers' model and tokenizer classes cost a replica about 2.5 s of CPU to import
(torch's compiler and distributed modules come with them), several times what the bundled
models take to load, and every pool replica pays it at start and at each scale-up. Without
them such a replica needs torch, safetensors and tokenizers only.

Only what this path can reproduce exactly is read this way (``lean_llama_supported``): a plain
``LlamaForCausalLM`` and a plain fast tokenizer (its ``tokenizer.json`` is the whole
tokenizer). Anything else loads through transformers as before.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Tokenizer classes whose behaviour is all in tokenizer.json: subclasses (LlamaTokenizerFast,
# Qwen2TokenizerFast, ...) may rewrite the post-processor or the text in Python.
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def llama_config_supported(config: Any) -> bool:
    """Whether ``FastLlamaStepper`` computes this Llama config exactly (an object with the
    config's fields as attributes: a transformers config or ``checkpoint_config``)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", "silu") == "silu"
            and rope.get("rope_type", rope.get("type", "default")) == "default")


def checkpoint_config(path: str | Path) -> SimpleNamespace:
    """config.json as attributes, with LlamaConfig's defaults for the fields the stepper reads."""
    raw = _read_json(Path(path) / "config.json")
    heads = raw.get("num_attention_heads", 32)
    defaults = {"num_key_value_heads": heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 32000,
                "max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu"}
    return SimpleNamespace(**{**defaults, **raw})


def lean_llama_supported(path: str | Path) -> bool:
    """A plain Llama causal LM (no remote code, no quantization) with a plain fast tokenizer and
    safetensors."""
    p = Path(path)
    try:
        config = _read_json(p / "config.json")
        return (config.get("architectures") == ["LlamaForCausalLM"]
                and not any(key in config for key in ("auto_map", "quantization_config"))
                and llama_config_supported(checkpoint_config(p)) and bool(weight_files(p)) and _plain_tokenizer(p))
    except Exception:  # noqa: BLE001 - unreadable (tokenizers raises plain Exception): transformers names it
        return False


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files transformers would load: ``model.safetensors``, or the shards its
    index lists (none: not a layout this path reads)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    index = _read_json(p / "model.safetensors.index.json")
    return [p / name for name in sorted(set(index.get("weight_map", {}).values()))]


# tokenizer_config.json keys with which transformers rewrites what tokenizer.json says (the
# post-processor, the pre-tokenizer, the special tokens), or runs the checkpoint's code.
_TOKENIZER_REWRITES = ("add_bos_token", "add_eos_token", "add_prefix_space", "post_processor", "auto_map",
                       "extra_special_tokens", "additional_special_tokens")


def _plain_tokenizer(p: Path) -> bool:
    """tokenizer.json is the whole tokenizer: a plain class, no key that rewrites it, and every
    special token the config names already in the vocabulary (transformers would add it)."""
    config = _read_json(p / "tokenizer_config.json")
    if (config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES or config.get("clean_up_tokenization_spaces")
            or any(key in config for key in _TOKENIZER_REWRITES) or not (p / "tokenizer.json").is_file()):
        return False
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
    named = [config.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")]
    named += list((config.get("added_tokens_decoder") or {}).values())
    return tokenizer.post_processor is not None and all(_token_id(tokenizer, t) is not None for t in named if t)


class LlamaCheckpoint:
    """config.json and the float32 weights of its safetensors (``weight_files``), by parameter name.
    ``weight(name)``: a tied ``lm_head.weight`` is the embedding, as transformers ties it."""

    def __init__(self, config: SimpleNamespace, weights: Mapping[str, Any]):
        self.config, self.weights = config, weights

    @classmethod
    def load(cls, path: str | Path) -> LlamaCheckpoint:
        import torch
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for shard in weight_files(path):
            weights.update({k: v.to(torch.float32) for k, v in load_file(str(shard)).items()})
        return cls(checkpoint_config(path), weights)

    def weight(self, name: str):
        if name == "lm_head.weight" and name not in self.weights and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        if name not in self.weights:
            raise KeyError(f"{name}: not in the checkpoint's safetensors")
        return self.weights[name]

    @property
    def params(self) -> int:
        """Parameters as transformers counts them (a tied head once)."""
        return sum(w.numel() for w in self.weights.values())


def _token_id(tokenizer, token: Any) -> int | None:
    """The id of a special token as tokenizer_config.json writes it (a string or an AddedToken dict)."""
    content = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(content) if content else None


class Encoded(dict):
    """An encoding by key or attribute (``enc["input_ids"]``, ``enc.input_ids``), as
    transformers' ``BatchEncoding``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LeanTokenizer:
    """The part of a transformers fast tokenizer the generators and LM scorers use, on
    ``tokenizers``: ``tok(text or texts, add_special_tokens=, return_offsets_mapping=)``
    (lists, no padding or tensors), ``decode(ids)``, ``len(tok)``, the special ids and
    ``backend_tokenizer``.
    Special-token text in the input is split like any text when the config says
    ``split_special_tokens``."""

    is_fast = True  # it has offsets (``fit.token_spans``)

    def __init__(self, tokenizer, config: Mapping[str, Any]):
        self._tok = tokenizer
        # As transformers calls it: no padding or truncation unless asked (a saved tokenizer.json
        # may carry the padding its trainer set, and would pad every batch to its longest text).
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = (
            _token_id(tokenizer, config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token"))

    @classmethod
    def from_dir(cls, path: str | Path) -> LeanTokenizer:
        from tokenizers import Tokenizer

        p = Path(path)
        return cls(Tokenizer.from_file(str(p / "tokenizer.json")), _read_json(p / "tokenizer_config.json"))

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> Encoded:
        if isinstance(text, str):
            encodings = [self._tok.encode(text, add_special_tokens=add_special_tokens)]
        else:
            encodings = self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens)
        out = Encoded(input_ids=[e.ids for e in encodings])
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        return Encoded({k: v[0] for k, v in out.items()}) if isinstance(text, str) else out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` (as transformers' fast tokenizers name it): the decode
        loop's incremental detokenizer (``backends.detokenize``) runs on it."""
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
