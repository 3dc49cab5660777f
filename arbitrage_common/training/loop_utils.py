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


def run_path(path: str | Path) -> str:
    """A path argument as a run records it: absolute, so a resume from another directory that
    names the same file compares equal."""
    return str(Path(path).resolve())


def check_run_args(what: Path, saved: dict | None, current: dict, fresh: Path) -> None:
    """ValueError unless ``saved`` (the arguments ``what`` was made with, keyed by flag) equals
    ``current``: each differing flag named, and how to start fresh (remove ``fresh``)."""
    how = f"rerun with the flags it was made with, or remove {fresh} to start fresh"
    if saved is None:
        raise ValueError(f"{what}: made before runs recorded their arguments, so resuming it cannot be checked; "
                         f"remove {fresh} to start fresh")
    current = json.loads(json.dumps(current))  # tuples as lists, as the saved copy reads back
    diffs = [f"{flag} {json.dumps(current.get(flag))} (it was made with {json.dumps(saved.get(flag))})"
             for flag in sorted(set(saved) | set(current)) if saved.get(flag) != current.get(flag)]
    if any(d.startswith(("--steps ", "--ablation-steps ")) for d in diffs):  # the LR schedule's length
        how = "the step count sets the cosine LR schedule, so a resume cannot change it; " + how
    if diffs:
        raise ValueError(f"{what}: cannot resume with different arguments: {'; '.join(diffs)}; {how}")


class ResumableState:
    """Model + optimizer + step + elapsed time in ``<out>/ckpt/state.pt``, written atomically,
    with ``run_args``: the arguments that define the run (keyed by CLI flag). A resume with
    different ones is refused (``check_run_args``): the card would record arguments the weights
    were not trained with."""

    def __init__(self, out_dir: Path, run_args: dict | None = None):
        self.path = out_dir / "ckpt" / "state.pt"
        self.log_path = out_dir / "ckpt" / "log.jsonl"
        self.run_args = json.loads(json.dumps(run_args or {}))

    def load(self, model, optimizer) -> tuple[int, float]:
        if not self.path.exists():
            return 0, 0.0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        check_run_args(self.path, state.get("run_args"), self.run_args, self.path.parent)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state["elapsed_s"]

    def save(self, model, optimizer, step: int, elapsed_s: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed_s": elapsed_s, "torch_rng": torch.get_rng_state(),
                    "run_args": self.run_args}, tmp)
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


def write_model_card(out_dir: Path, title: str, meta: dict, remake: str, data_remake: str | None = None,
                     data: str | None = None) -> None:
    """README.md (human) and training_meta.json (machine) beside the weights. ``data_remake``:
    the command that made the training data ``data`` (a router dataset's sidecar), shown first."""
    (out_dir / "training_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    lines = [f"# {title}", "", "Made by this project on CPU; safetensors only.", "", "## Remake", ""]
    if data_remake:
        lines += [f"The training data (`{data}`) first:" if data else "The training data first:",
                  "", "```", data_remake, "```", "", "Then:", ""]
    elif data:
        from .router_data import data_meta_path

        side = data_meta_path(data).name
        lines += [f"The training data `{data}` has no record of how it was made (no `{side}` beside it).", ""]
    lines += ["```", remake, "```", "", "## Facts", ""]
    lines += [f"- **{k}**: `{json.dumps(v) if isinstance(v, (dict, list)) else v}`" for k, v in meta.items()]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
