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
    """'cuda' for None/'auto' when torch sees a GPU, else 'cpu'; an explicit device is kept.

    "Sees" is not "was given": Ray 2.60 no longer hides the GPUs from an actor that asked for
    none (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` defaults to off), so inside a replica 'auto'
    here would put a 0-GPU pool on GPU 0, unaccounted. Serve pools therefore decide from the
    GPUs Ray assigned the replica (``services.pools.replica_device``) and pass 'cuda' or 'cpu'
    down; 'auto' is for scripts and training, where torch's view is the whole story."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
