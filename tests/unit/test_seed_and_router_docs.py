"""docs/VLLM.md says what the code does: the transformers backend's sampler keeps a seed's low
32 bits (torch.Generator.manual_seed), and the bundled router is a causal LM with a verifier
head, not a sequence classifier."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from arbitrage_common.backends.row_decoding import RowSampler
from arbitrage_common.interfaces import GenerationOptions

ROOT = Path(__file__).resolve().parents[2]
VLLM_DOC = " ".join((ROOT / "docs" / "VLLM.md").read_text().split())


def _draws(seed: int) -> torch.Tensor:
    return RowSampler([GenerationOptions(temperature=0.7, seed=seed)], [16]).uniforms[0]


def test_the_transformers_sampler_keeps_the_low_32_bits_of_a_seed():
    assert torch.equal(_draws(5), _draws(5 + 2**32))
    assert torch.equal(_draws(-5), _draws(2**64 - 5))  # a negative seed: its two's complement
    assert not torch.equal(_draws(5), _draws(6))


def test_vllm_md_says_so():
    assert "tells every int64 seed apart" not in VLLM_DOC
    assert "keeps only the seed's low 32 bits" in VLLM_DOC


def test_vllm_md_describes_the_bundled_router_as_it_is():
    router = ROOT / "models" / "router"
    assert json.loads((router / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (router / "router_head.json").is_file()
    assert "bundled `LlamaForSequenceClassification`" not in VLLM_DOC
    assert "6-layer classifier" not in VLLM_DOC
    assert "`router_head.json`" in VLLM_DOC and "6-layer `LlamaForCausalLM`" in VLLM_DOC
