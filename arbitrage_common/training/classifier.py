"""Shared trainer for the one-logit scoring models (the PRM and the router)."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from .loop_utils import ResumableState, Stopwatch, lr_at, seed_everything, train_step


def load_scoring_model(init_dir: str | Path, seed: int):
    """A one-label sequence classifier whose body starts from ``init_dir`` (an LM or a scorer).
    A score head the checkpoint lacks (an LM's) is drawn from ``seed``: the same seed gives the
    same head, so a run's weights depend only on its arguments."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..backends.checkpoints import load_or_explain

    path = Path(init_dir)
    seed_everything(seed)  # before the model exists: transformers draws the new head from torch's RNG
    tokenizer = load_or_explain(path, AutoTokenizer.from_pretrained)
    model = load_or_explain(path, lambda p: AutoModelForSequenceClassification.from_pretrained(
        p, num_labels=1, dtype=torch.float32))
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def rows_digest(texts: Sequence[str], targets: Sequence[float], weights: Sequence[float] | None = None) -> str:
    """A short fingerprint of the training rows (a resume on other rows is refused)."""
    h = hashlib.sha256(json.dumps([list(texts), [float(t) for t in targets],
                                   None if weights is None else [float(w) for w in weights]]).encode())
    return h.hexdigest()[:16]


def train_scoring_model(model, tokenizer, texts: Sequence[str], targets: Sequence[float], out_dir: Path,
                        steps: int, seed: int, lr: float, batch_size: int = 32, threads: int = 1,
                        weights: Sequence[float] | None = None, save_every: int = 100, device: str | None = None,
                        run_args: dict | None = None, steps_flag: str = "--steps") -> float:
    """BCE on soft or hard targets in [0, 1]; resumable from ``out_dir/ckpt``. Returns train seconds.
    ``device``: 'auto' (None) trains on the GPU when one is visible (a 1.5B router on a GPU).
    ``run_args`` (keyed by CLI flag): the caller's arguments that define the run; with --seed,
    --lr, ``steps_flag`` (the LR schedule's length) and a digest of the rows, a resume must match them."""
    from ..backends.checkpoints import pick_device

    if not texts:
        raise ValueError("no training rows")

    torch.set_num_threads(threads)
    model.to(pick_device(device))
    torch.set_flush_denormal(True)
    seed_everything(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    state = ResumableState(out_dir, {**(run_args or {}), "--seed": seed, "--lr": lr, steps_flag: steps,
                                     "batch size": batch_size, "training rows (digest)": rows_digest(texts, targets, weights)})
    start, elapsed = state.load(model, optimizer)
    clock = Stopwatch(elapsed)
    weights = list(weights) if weights is not None else [1.0] * len(texts)
    model.train()
    for step in range(start, steps):
        rng = random.Random(f"scorer-batch-{seed}-{step}")  # a batch depends only on (seed, step)
        idx = [rng.randrange(len(texts)) for _ in range(batch_size)]
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        y = torch.tensor([float(targets[i]) for i in idx], device=model.device)
        w = torch.tensor([weights[i] for i in idx], device=model.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=30)
        logits = model(**batch).logits[:, 0].float()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()
        train_step(model, optimizer, loss, step, state, clock, steps, save_every)
    model.eval()
    return clock.elapsed


@torch.inference_mode()
def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> list[float]:
    """The model's logit of each text: what to rank by (a sigmoid ties where it saturates)."""
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start: start + batch_size]), return_tensors="pt", padding=True).to(model.device)
        out += model(**batch).logits[:, 0].float().tolist()
    return out


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> list[float]:
    """P = sigmoid(logit) of each text, as the serving scorer gives it."""
    return torch.sigmoid(torch.tensor(predict_logits(model, tokenizer, texts, batch_size))).tolist()
