"""Checks a local checkpoint directory before any weights are loaded."""
from __future__ import annotations

import json
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint is missing or corrupt; the message names the path and the problem."""


def check_checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint directory does not exist")
    config = p / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: missing (not a Hugging Face checkpoint)")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config}: corrupt JSON ({exc})") from exc
    if not list(p.glob("*.safetensors")):
        raise CheckpointError(f"{p}: no *.safetensors weights (only safetensors are loaded)")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{p}: no tokenizer files")
    return p


def load_or_explain(path: Path, loader):
    """Run ``loader(path)``; turn any load failure into a CheckpointError naming the path."""
    check_checkpoint_dir(path)
    try:
        return loader(str(path))
    except Exception as exc:  # safetensors/transformers raise many types for a corrupt file
        raise CheckpointError(f"{path}: failed to load ({type(exc).__name__}: {exc})") from exc


def trained_with_annotations(path: str | Path) -> bool:
    """Whether a scorer checkpoint was trained on "Model 0:/1:" history tags (its training_meta.json)."""
    meta = Path(path) / "training_meta.json"
    return bool(json.loads(meta.read_text()).get("annotate_history", False)) if meta.is_file() else False


def set_cpu_threads(threads: int | None) -> None:
    """torch's intra-op threads (None: torch's default), and denormals flushed: they make tiny
    CPU models several times slower."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def pick_device(device: str | None) -> str:
    """'cuda' for 'auto' when a GPU is visible to this process (Ray sets CUDA_VISIBLE_DEVICES
    from the replica's num_gpus), else 'cpu'; an explicit device is kept."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
