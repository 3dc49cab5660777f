"""The vLLM backend's padded-head copy of a checkpoint (no vllm needed to build it)."""
from __future__ import annotations

import json

from arbitrage_common.backends.vllm_generator import pad_head_dim
from arbitrage_common.paths import models_dir


def test_a_second_replica_padding_the_same_checkpoint_keeps_the_copy_already_in_place(tmp_path):
    """Two replicas on one host both miss the copy and both pad: the one that finishes second
    must not delete the directory the first may already be loading."""
    src, dst = models_dir() / "draft", tmp_path / "draft-hd32"
    pad_head_dim(src, dst, 32)
    first = (dst / "model.safetensors").stat().st_ino
    pad_head_dim(src, dst, 32)
    assert (dst / "model.safetensors").stat().st_ino == first
    assert json.loads((dst / "config.json").read_text())["head_dim"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft-hd32"]  # no temporary copy left
