"""Batched scoring with a transformers sequence-classification head (PRM and router)."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from ..interfaces import ScoreItem
from ..steps import format_scorer_input
from .checkpoints import load_or_explain, pick_device, trained_with_annotations
from .fit import TextFit, model_context


class HFStepScorer:
    """sigmoid(logit) of a one-label classifier over ``format_scorer_input(item)``.

    ``annotate_history`` defaults to what the checkpoint was trained with
    (``training_meta.json``), so a router trained with "Model 0:/1:" tags sees them. An item
    longer than the model's context is cut by ``self.fit`` (``steps.fit_scorer_input``).
    """

    def __init__(self, model_dir: str | Path, threads: int | None = None, annotate_history: bool | None = None,
                 device: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        path = Path(model_dir)
        self.tokenizer = load_or_explain(
            path, lambda p: AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code))
        self.model = load_or_explain(path, lambda p: AutoModelForSequenceClassification.from_pretrained(
            p, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code))
        self.device = pick_device(device)
        self.model.to(self.device).eval()
        self.annotate_history = trained_with_annotations(path) if annotate_history is None else annotate_history
        self.params = sum(p.numel() for p in self.model.parameters())
        self.context = model_context(self.model)
        self.fit = TextFit(self.tokenizer, self.context, self.annotate_history)
        self._lock = threading.Lock()

    def texts(self, items: Sequence[ScoreItem]) -> list[str]:
        return [format_scorer_input(self.fit(item), self.annotate_history) for item in items]

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True).to(self.device)
        with self._lock:
            logits = self.model(**batch).logits[:, 0]
        return torch.sigmoid(logits.float()).tolist()

    def score_batch(self, items: Sequence[ScoreItem]) -> list[float]:
        return self.score_texts(self.texts(items))
