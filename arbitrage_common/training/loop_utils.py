"""Shared pieces of the training loops: seeding, LR schedule, resumable state, cards."""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int = 50, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class ResumableState:
    """Model + optimizer + step + elapsed time in ``<out>/ckpt/state.pt``, written atomically."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "ckpt" / "state.pt"
        self.log_path = out_dir / "ckpt" / "log.jsonl"

    def load(self, model, optimizer) -> tuple[int, float]:
        if not self.path.exists():
            return 0, 0.0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state["elapsed_s"]

    def save(self, model, optimizer, step: int, elapsed_s: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed_s": elapsed_s, "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, self.path)

    def log(self, **row) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def train_step(model, optimizer, loss, step: int, state: ResumableState, clock: Stopwatch,
               end: int, save_every: int) -> None:
    """Backward, clip, update; every ``save_every`` steps (and at ``end``) save state and log the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if (step + 1) % save_every == 0 or step + 1 == end:
        state.save(model, optimizer, step + 1, clock.elapsed)
        state.log(step=step + 1, loss=round(loss.item(), 4), elapsed_s=round(clock.elapsed, 1))


class Stopwatch:
    def __init__(self, already: float = 0.0):
        self.start, self.already = time.perf_counter(), already

    @property
    def elapsed(self) -> float:
        return self.already + time.perf_counter() - self.start


def write_model_card(out_dir: Path, title: str, meta: dict, remake: str) -> None:
    """README.md (human) and training_meta.json (machine) beside the weights."""
    (out_dir / "training_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    lines = [f"# {title}", "", "Made by this project on CPU; safetensors only.", "",
             "## Remake", "", "```", remake, "```", "", "## Facts", ""]
    lines += [f"- **{k}**: `{json.dumps(v) if isinstance(v, (dict, list)) else v}`" for k, v in meta.items()]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
