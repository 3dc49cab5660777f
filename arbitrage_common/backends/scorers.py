"""One entry point for scorer checkpoints (PRM and router), whatever their kind."""
from __future__ import annotations

from pathlib import Path


def load_step_scorer(model_dir: str | Path, threads: int | None = None, annotate_history: bool | None = None):
    """The blocking scorer a checkpoint directory describes (``score_batch(items) -> floats``)."""
    from .hf_scorer import HFStepScorer

    return HFStepScorer(model_dir, threads=threads, annotate_history=annotate_history)
