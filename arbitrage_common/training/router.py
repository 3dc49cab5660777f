"""Train and evaluate the Arbitrage router: P(target's step beats the draft's) from
(problem, annotated history, draft step)."""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from ..interfaces import ScoreItem
from ..steps import format_scorer_input
from .loop_utils import write_model_card
from .router_data import DEFAULT_LABEL_MARGIN, read_jsonl, relabel

HELD_OUT_FRACTION = 0.15


def router_item(row: dict) -> ScoreItem:
    """The router's input for a router-data row: problem, sourced history, draft step."""
    return ScoreItem(row["problem"], tuple((s, src) for s, src in row["history"]), row["draft_step"])


def score_rows(scorer, rows: Sequence[dict], batch: int = 64) -> list[float]:
    """A loaded router's score of each row's draft step (any router kind, its own annotations)."""
    return [s for lo in range(0, len(rows), batch) for s in scorer.score_batch([router_item(r) for r in rows[lo: lo + batch]])]


def router_text(row: dict, annotate: bool) -> str:
    return format_scorer_input(router_item(row), annotate)


def split_by_problem(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The last HELD_OUT_FRACTION of problems are held out (whole trajectories, no leakage)."""
    n = 1 + max(r["problem_id"] for r in rows)
    cut = int(n * (1 - HELD_OUT_FRACTION))
    return [r for r in rows if r["problem_id"] < cut], [r for r in rows if r["problem_id"] >= cut]


def balance_classes(rows: Sequence[dict], seed: int) -> list[dict]:
    """Downsample the majority class to the minority's size."""
    pos = [r for r in rows if r["label"]]
    neg = [r for r in rows if not r["label"]]
    small, big = sorted((pos, neg), key=len)
    rng = random.Random(f"balance-{seed}")
    return small + rng.sample(big, len(small))


def spearman_on(model, tokenizer, rows: Sequence[dict], annotate: bool) -> float:
    from ..evaluation.metrics import spearman
    from .classifier import predict

    return spearman(predict(model, tokenizer, [router_text(r, annotate) for r in rows]), [r["advantage"] for r in rows])


def is_classifier_prm(init: str | Path) -> bool:
    """A one-logit PRM (not an LM: an LM's score head is new, with no ranking to keep)."""
    from ..backends.scorers import is_lm_verifier

    meta = Path(init) / "training_meta.json"
    return not is_lm_verifier(init) and meta.is_file() and json.loads(meta.read_text()).get("role") == "prm"


def start_from_rsd_ranking(model, init: str) -> bool:
    """A router fine-tuned from a classifier PRM starts as 1 - PRM: its score head negated, so
    it first ranks draft steps exactly as RSD does (a low P(correct) is a likely gain) and
    training only has to learn where the target does no better. True if negated."""
    import torch

    if not is_classifier_prm(init):
        return False
    with torch.no_grad():
        model.score.weight.neg_()
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.neg_()
    return True


def fit_router(rows: Sequence[dict], init: str, out: Path, annotate: bool, balance: bool, steps: int,
               seed: int, lr: float, threads: int, device: str | None = None):
    from .classifier import load_scoring_model, train_scoring_model

    train = balance_classes(rows, seed) if balance else list(rows)
    tokenizer, model = load_scoring_model(init)
    start_from_rsd_ranking(model, init)
    seconds = train_scoring_model(model, tokenizer, [router_text(r, annotate) for r in train],
                                  [r["label"] for r in train], out, steps=steps, seed=seed, lr=lr, threads=threads,
                                  device=device)
    return tokenizer, model, seconds, len(train)


def train_router(data: str, init: str, out_dir: str, annotate: bool = True, balance: bool = True,
                 steps: int = 400, seed: int = 0, lr: float = 3e-4, threads: int = 1,
                 ablation: list[dict] | None = None, device: str | None = None,
                 label_margin: float = DEFAULT_LABEL_MARGIN) -> Path:
    rows = relabel(read_jsonl(data), label_margin)
    train_rows, held_rows = split_by_problem(rows)
    out = Path(out_dir)
    tokenizer, model, seconds, n_train = fit_router(train_rows, init, out, annotate, balance, steps, seed, lr, threads,
                                                device)
    rho = spearman_on(model, tokenizer, held_rows, annotate)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    meta = {"role": "router", "architecture": type(model).__name__, "init": init,
            "head": "1 logit, sigmoid = P(PRM(target) - PRM(draft) > label margin)", "label_margin": label_margin,
            "params": sum(p.numel() for p in model.parameters()), "seed": seed, "data": data,
            "annotate_history": annotate, "balance_classes": balance, "train_rows": n_train,
            "held_out_rows": len(held_rows), "positive_rate_raw": round(sum(r["label"] for r in train_rows) / len(train_rows), 4),
            "steps": steps, "lr_peak": lr, "threads": threads, "train_time_s": round(seconds, 1),
            "head_init": "the PRM's score head negated (starts as RSD's ranking)" if is_classifier_prm(init)
            else "new",
            "held_out_spearman_vs_oracle_advantage": round(rho, 4)}
    if ablation:
        meta["ablation"] = ablation
    flags = ("" if annotate else " --no-annotate") + ("" if balance else " --no-balance")
    write_model_card(out, "Bundled Arbitrage router", meta,
                     f"arbitrage router train --data {data} --init {init} --steps {steps} --seed {seed} "
                     f"--lr {lr} --label-margin {label_margin}{flags} --out {out_dir}")
    return out


def run_ablation(data: str, init: str, work_dir: str, steps: int, seed: int = 0, lr: float = 3e-4,
                 threads: int = 1, device: str | None = None, label_margin: float = DEFAULT_LABEL_MARGIN) -> list[dict]:
    """Spearman on held-out steps for annotations on/off x downsampling on/off."""
    rows = relabel(read_jsonl(data), label_margin)
    train_rows, held_rows = split_by_problem(rows)
    table = []
    for annotate in (True, False):
        for balance in (True, False):
            out = Path(work_dir) / f"annotate-{int(annotate)}-balance-{int(balance)}"
            tokenizer, model, _, n = fit_router(train_rows, init, out, annotate, balance, steps, seed, lr, threads,
                                             device)
            table.append({"annotate_history": annotate, "balance_classes": balance, "train_rows": n,
                          "spearman": round(spearman_on(model, tokenizer, held_rows, annotate), 4)})
    return table
