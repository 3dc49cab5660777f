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

# Padded tokens (rows x the longest) of one forward. The classifier's activations grow with them
# (a 1.5B body in float32: ~0.1 MB a token in its MLP alone), and a replica packed on a shared GPU
# must not take its neighbours' memory for a batch of 32 long histories: ~2 GB at this budget.
MAX_TOKENS_PER_FORWARD = 16384


def token_budget_chunks(lengths: Sequence[int], budget: int = MAX_TOKENS_PER_FORWARD) -> list[list[int]]:
    """Row indices, shortest first, cut into forwards of at most ``budget`` padded tokens (rows
    times the longest); a row longer than the budget runs alone. Sorting by length also leaves
    less padding."""
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


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
    def score_texts(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS_PER_FORWARD) -> list[float]:
        """One score per text, in order; forwards of at most ``max_tokens`` padded tokens."""
        if not texts:
            return []
        encoded = self.tokenizer(list(texts))
        scores = [0.0] * len(texts)
        for rows in token_budget_chunks([len(ids) for ids in encoded["input_ids"]], max_tokens):
            batch = self.tokenizer.pad({key: [values[i] for i in rows] for key, values in encoded.items()},
                                       return_tensors="pt").to(self.device)
            with self._lock:
                logits = self.model(**batch).logits[:, 0]
            for i, score in zip(rows, torch.sigmoid(logits.float()).tolist()):
                scores[i] = score
        return scores

    def score_batch(self, items: Sequence[ScoreItem]) -> list[float]:
        return self.score_texts(self.texts(items))
