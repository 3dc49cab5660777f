"""Train and evaluate the Arbitrage router: P(target's step beats the draft's) from
(problem, annotated history, draft step)."""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from ..interfaces import ScoreItem
from ..steps import format_scorer_input
from .loop_utils import run_path, write_model_card
from .router_data import DEFAULT_LABEL_MARGIN, data_made_by, read_jsonl, relabel

HELD_OUT_FRACTION = 0.15


def router_item(row: dict) -> ScoreItem:
    """The router's input for a router-data row: problem, sourced history, draft step."""
    return ScoreItem(row["problem"], tuple((s, src) for s, src in row["history"]), row["draft_step"])


def score_rows(scorer, rows: Sequence[dict], batch: int = 64) -> list[float]:
    """A loaded router's score of each row's draft step (any router kind, its own annotations)."""
    return [s for lo in range(0, len(rows), batch) for s in scorer.score_batch([router_item(r) for r in rows[lo: lo + batch]])]


def rank_rows(scorer, rows: Sequence[dict], batch: int = 64) -> list[float]:
    """What a router's held-out Spearman ranks (`router eval` and every router card): each
    row's router *logit*. The probabilities tie where the sigmoid saturates (a verifier-head
    router gives exactly 1.0 to a third of the held-out steps), and ties change the Spearman."""
    import torch

    from ..backends.hf_scorer import HFStepScorer
    from ..backends.lm_verifier import LMVerifierScorer, split_candidate
    from ..backends.verifier_router import VerifierRouterScorer, router_logits, verifier_logit

    out: list[float] = []
    for lo in range(0, len(rows), batch):
        items = [router_item(r) for r in rows[lo: lo + batch]]
        if isinstance(scorer, VerifierRouterScorer):
            texts, starts = zip(*(split_candidate(scorer.fit(item)) for item in items))
            mins, hidden = scorer._features(texts, starts)  # what score_batch feeds its sigmoid
            out += router_logits(verifier_logit(mins, scorer.calibration), hidden, scorer.head).tolist()
        elif isinstance(scorer, LMVerifierScorer):
            texts, starts = zip(*(split_candidate(scorer.fit(item)) for item in items))
            out += verifier_logit(scorer.features(texts, starts), scorer.calibration).tolist()
        elif isinstance(scorer, HFStepScorer):
            batch_in = scorer.tokenizer(scorer.texts(items), return_tensors="pt", padding=True).to(scorer.device)
            with torch.inference_mode(), scorer._lock:
                out += scorer.model(**batch_in).logits[:, 0].float().tolist()
        else:  # another kind: its probabilities (the same order, ties included)
            out += [float(s) for s in scorer.score_batch(items)]
    return out


def held_out_spearman(scorer, held_rows: Sequence[dict]) -> float:
    """Spearman of ``rank_rows`` against the oracle's advantage: the card's and `router eval`'s figure."""
    from ..evaluation.metrics import spearman

    return spearman(rank_rows(scorer, held_rows), [r["advantage"] for r in held_rows])


def router_text(row: dict, annotate: bool) -> str:
    return format_scorer_input(router_item(row), annotate)


def split_by_problem(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The last HELD_OUT_FRACTION of problems are held out (whole trajectories, no leakage)."""
    n = 1 + max(r["problem_id"] for r in rows)
    cut = int(n * (1 - HELD_OUT_FRACTION))
    return [r for r in rows if r["problem_id"] < cut], [r for r in rows if r["problem_id"] >= cut]


def split_for_training(rows: Sequence[dict], data: str) -> tuple[list[dict], list[dict]]:
    """``split_by_problem``, refusing a dataset too small to train on and evaluate: ValueError naming --data."""
    if not rows:
        raise ValueError(f"--data {data}: no rows")
    train, held = split_by_problem(rows)
    if not train or not held:
        raise ValueError(f"--data {data}: too few problems to hold {HELD_OUT_FRACTION:.0%} of them out "
                         f"({1 + max(r['problem_id'] for r in rows)}); make it with a larger `router data --n`")
    return train, held


def balance_classes(rows: Sequence[dict], seed: int) -> list[dict]:
    """Downsample the majority class to the minority's size."""
    pos = [r for r in rows if r["label"]]
    neg = [r for r in rows if not r["label"]]
    small, big = sorted((pos, neg), key=len)
    rng = random.Random(f"balance-{seed}")
    return small + rng.sample(big, len(small))


def spearman_on(model, tokenizer, rows: Sequence[dict], annotate: bool) -> float:
    """Held-out Spearman of an in-memory classifier router, ranking logits (as ``rank_rows``)."""
    from ..evaluation.metrics import spearman
    from .classifier import predict_logits

    return spearman(predict_logits(model, tokenizer, [router_text(r, annotate) for r in rows]),
                    [r["advantage"] for r in rows])


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
               seed: int, lr: float, threads: int, device: str | None = None, run_args: dict | None = None,
               steps_flag: str = "--steps"):
    """``run_args``: the caller's flags that define the run (a resume must match them)."""
    from .classifier import load_scoring_model, train_scoring_model

    train = balance_classes(rows, seed) if balance else list(rows)
    if not train:
        raise ValueError("--balance: the training rows are all of one class, so balancing leaves none "
                         "(another --label-margin, or --no-balance)" if rows else "--data: no training rows")
    tokenizer, model = load_scoring_model(init, seed)
    start_from_rsd_ranking(model, init)
    seconds = train_scoring_model(model, tokenizer, [router_text(r, annotate) for r in train],
                                  [r["label"] for r in train], out, steps=steps, seed=seed, lr=lr, threads=threads,
                                  device=device, run_args={"--init": run_path(init), "--annotate": annotate,
                                                           "--balance": balance, **(run_args or {})},
                                  steps_flag=steps_flag)
    return tokenizer, model, seconds, len(train)


def train_router(data: str, init: str, out_dir: str, annotate: bool = True, balance: bool = True,
                 steps: int = 400, seed: int = 0, lr: float = 3e-4, threads: int = 1,
                 ablation: list[dict] | None = None, device: str | None = None,
                 label_margin: float = DEFAULT_LABEL_MARGIN) -> Path:
    from ..backends.scorers import load_step_scorer

    rows = relabel(read_jsonl(data), label_margin)
    train_rows, held_rows = split_for_training(rows, data)
    out = Path(out_dir)
    tokenizer, model, seconds, n_train = fit_router(train_rows, init, out, annotate, balance, steps, seed, lr, threads,
                                                    device, {"--data": run_path(data), "--label-margin": label_margin})
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # The saved checkpoint as `router eval` loads it: the card's figure is the one that command prints.
    rho = held_out_spearman(load_step_scorer(out, threads=threads, annotate_history=annotate, device=device),
                            held_rows)
    made_by = data_made_by(data)
    meta = {"role": "router", "architecture": type(model).__name__, "init": init,
            "head": "1 logit, sigmoid = P(PRM(target) - PRM(draft) > label margin)", "label_margin": label_margin,
            "params": sum(p.numel() for p in model.parameters()), "seed": seed, "data": data,
            "data_made_by": made_by, "annotate_history": annotate, "balance_classes": balance, "train_rows": n_train,
            "held_out_rows": len(held_rows), "positive_rate_raw": round(sum(r["label"] for r in train_rows) / len(train_rows), 4),
            "steps": steps, "lr_peak": lr, "threads": threads, "train_time_s": round(seconds, 1),
            "head_init": "the PRM's score head negated (starts as RSD's ranking)" if is_classifier_prm(init)
            else "new",
            "held_out_spearman_vs_oracle_advantage": round(rho, 4),
            "held_out_spearman_ranks": "router logits (as arbitrage router eval ranks them)"}
    if ablation:
        meta["ablation"] = ablation
    flags = ("" if annotate else " --no-annotate") + ("" if balance else " --no-balance")
    write_model_card(out, "Bundled Arbitrage router", meta,
                     f"arbitrage router train --kind classifier --data {data} --init {init} --steps {steps} --seed {seed} "
                     f"--lr {lr} --label-margin {label_margin}{flags} --out {out_dir}", data_remake=made_by, data=data)
    return out


def run_ablation(data: str, init: str, work_dir: str, steps: int, seed: int = 0, lr: float = 3e-4,
                 threads: int = 1, device: str | None = None, label_margin: float = DEFAULT_LABEL_MARGIN) -> list[dict]:
    """Spearman on held-out steps for annotations on/off x downsampling on/off."""
    rows = relabel(read_jsonl(data), label_margin)
    train_rows, held_rows = split_for_training(rows, data)
    table = []
    for annotate in (True, False):
        for balance in (True, False):
            out = Path(work_dir) / f"annotate-{int(annotate)}-balance-{int(balance)}"
            tokenizer, model, _, n = fit_router(train_rows, init, out, annotate, balance, steps, seed, lr, threads,
                                                device, {"--data": run_path(data), "--label-margin": label_margin},
                                                steps_flag="--ablation-steps")
            table.append({"annotate_history": annotate, "balance_classes": balance, "train_rows": n,
                          "spearman": round(spearman_on(model, tokenizer, held_rows, annotate), 4)})
    return table
