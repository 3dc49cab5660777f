"""Train the verifier-head router: the PRM's LM stays frozen; a logistic head over
(-PRM logit of the draft step, final hidden state) is fitted to the oracle's labels."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..backends.lm_verifier import VERIFIER_FILE, load_causal_lm, read_calibration, step_features
from ..backends.verifier_router import ROUTER_HEAD_FILE, router_logits, verifier_logit
from .loop_utils import write_model_card
from .router import balance_classes, held_out_spearman, router_text, split_for_training
from .router_data import DEFAULT_LABEL_MARGIN, data_made_by, error_structure, read_jsonl, relabel


def _features(model, tokenizer, rows: list[dict], calibration: dict) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [router_text(r, annotate=False) for r in rows]
    starts = [len(t) - len(r["draft_step"]) for t, r in zip(texts, rows)]
    mins, hidden = step_features(model, tokenizer, texts, starts, with_hidden=True)
    return verifier_logit(mins, calibration), hidden.double()


def fit_head(z: torch.Tensor, hidden: torch.Tensor, labels: list[int], l2: float, iters: int = 300) -> dict:
    """Maximum-likelihood logistic head with an L2 penalty on the hidden-state weights."""
    mean, std = hidden.mean(0), hidden.std(0).clamp(min=1e-6)
    h = (hidden - mean) / std
    y = torch.tensor(labels, dtype=torch.float64)
    alpha, c = torch.ones(1, dtype=torch.float64, requires_grad=True), torch.zeros(1, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(h.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([alpha, w, c], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = alpha * -z + h @ w + c
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"alpha": alpha.item(), "c": c.item(), "w": w.detach().tolist(), "mean": mean.tolist(), "std": std.tolist()}


def train_verifier_router(data: str, prm: str, out_dir: str, seed: int = 0, balance: bool = True,
                          l2: float = 1e-3, threads: int = 1, label_margin: float = DEFAULT_LABEL_MARGIN) -> Path:
    from ..backends.scorers import load_step_scorer
    from ..evaluation.metrics import spearman

    started = time.perf_counter()
    rows = relabel(read_jsonl(data), label_margin)
    train_rows, held_rows = split_for_training(rows, data)
    calibration = read_calibration(prm)
    tokenizer, model = load_causal_lm(prm, threads, device="cpu")
    z_all, h_all = _features(model, tokenizer, train_rows, calibration)
    z_held, h_held = _features(model, tokenizer, held_rows, calibration)
    advantages = [r["advantage"] for r in held_rows]
    ablation, heads = [], {}
    for bal in (True, False):
        picked = _balanced_indices(train_rows, seed) if bal else list(range(len(train_rows)))
        head = fit_head(z_all[picked], h_all[picked], [train_rows[i]["label"] for i in picked], l2)
        rho = spearman(router_logits(z_held, h_held, head).tolist(), advantages)
        ablation.append({"balance_classes": bal, "train_rows": len(picked), "spearman": round(rho, 4)})
        heads[bal] = (head, rho, len(picked))
    head, _, n_train = heads[balance]
    prm_only = spearman((-z_held).tolist(), advantages)  # the head's starting point: RSD's ranking
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    shutil.copyfile(Path(prm) / VERIFIER_FILE, out / VERIFIER_FILE)
    (out / ROUTER_HEAD_FILE).write_text(json.dumps(head) + "\n")
    # The card's figure is the saved router's, ranked as `router eval` ranks it (logits): that
    # command on the same data prints it. (The ablation's come from the in-memory features.)
    rho = held_out_spearman(load_step_scorer(out, threads=threads), held_rows)
    made_by = data_made_by(data)
    meta = {"role": "router", "kind": "verifier_head", "architecture": f"{type(model).__name__} (frozen, = {prm}) "
            f"+ logistic head", "init": prm,
            "head": "sigmoid(alpha * -PRM_logit(draft step) + w . standardized final hidden state + c) = "
                    "P(PRM(target) - PRM(draft) > label margin)",
            "trained_params": len(head["w"]) + 2, "seed": seed, "data": data, "data_made_by": made_by,
            "annotate_history": False,
            "balance_classes": balance, "l2": l2, "label_margin": label_margin, "train_rows": n_train, "held_out_rows": len(held_rows),
            "positive_rate_raw": round(sum(r["label"] for r in train_rows) / len(train_rows), 4),
            "threads": threads, "train_time_s": round(time.perf_counter() - started, 1),
            "held_out_spearman_vs_oracle_advantage": round(rho, 4),
            "held_out_spearman_ranks": "router logits (as arbitrage router eval ranks them)",
            "held_out_spearman_prm_only": round(prm_only, 4), "ablation": ablation,
            "held_out_error_structure": error_structure(held_rows)}
    write_model_card(out, "Bundled Arbitrage router (verifier head)", meta,
                     f"arbitrage router train --kind verifier-head --data {data} --init {prm} --seed {seed} "
                     f"--l2 {l2} --label-margin {label_margin}{'' if balance else ' --no-balance'} --out {out_dir}",
                     data_remake=made_by, data=data)
    return out


def _balanced_indices(rows: list[dict], seed: int) -> list[int]:
    """Indices of ``balance_classes(rows, seed)`` (rows are dicts: match by identity)."""
    kept = {id(r) for r in balance_classes(rows, seed)}
    return [i for i, r in enumerate(rows) if id(r) in kept]
