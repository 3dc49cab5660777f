"""Make the LM-verifier PRM: copy a causal LM and fit a logistic calibration of its
min-token-log-prob feature on checker labels (the same rows the classifier PRM trains on)."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..backends.lm_verifier import FEATURE, VERIFIER_FILE, LMVerifierScorer, load_causal_lm, min_logprob_features
from ..steps import STEP_DELIMITER
from .loop_utils import write_model_card
from .prm import TEMPERATURES, check_labeled_rows, load_or_collect_prm_data, split_for_training

FLOOR = -30.0  # log-probs below this carry no more information; keeps the fit well-conditioned


def candidate_start(text: str) -> int:
    """Where the candidate (the last step) starts in a stored scorer text."""
    cut = text.rfind(STEP_DELIMITER)
    return cut + len(STEP_DELIMITER) if cut >= 0 else 0


def fit_logistic(x: list[float], y: list[int], iters: int = 200) -> tuple[float, float]:
    """Maximum-likelihood (a, b) of P(y=1) = sigmoid(a*x + b)."""
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * xs + params[1], ys)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = params.detach().tolist()
    return a, b


def make_verifier(out_dir: str, lm: str, draft: str, target: str, n_problems: int, seed: int = 0,
                  fit_rows: int = 8000, eval_rows: int = 3000, threads: int = 1) -> Path:
    from ..evaluation.metrics import auroc

    out = Path(out_dir)
    rows = load_or_collect_prm_data(out, draft, target, n_problems, seed)
    train_rows, held_rows = split_for_training(rows, seed, n_problems)
    train_rows, held_rows = train_rows[:fit_rows], held_rows[:eval_rows]
    check_labeled_rows(train_rows, "--fit-rows", "calibration")
    check_labeled_rows(held_rows, "--eval-rows", "held-out")
    tokenizer, model = load_causal_lm(lm, threads, device="cpu")
    started = time.perf_counter()

    def feats(rows):
        texts = [r["text"] for r in rows]
        return [max(f, FLOOR) for f in min_logprob_features(model, tokenizer, texts, [candidate_start(t) for t in texts])]

    a, b = fit_logistic(feats(train_rows), [r["label"] for r in train_rows])
    held_x = feats(held_rows)
    seconds = time.perf_counter() - started
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / VERIFIER_FILE).write_text(json.dumps({"feature": FEATURE, "a": a, "b": b, "floor": FLOOR}, indent=2) + "\n")
    # The card's AUROC is the saved scorer's: its P(correct) from the calibration read back (a
    # negative slope, or the 0.0 it gives below logit -60, ranks differently from the raw feature).
    saved = LMVerifierScorer(out, threads=threads, device="cpu")
    held_p = [saved.probability(x) for x in held_x]
    by_subset = defaultdict(list)
    for r, p in zip(held_rows, held_p):
        by_subset[f"{r['writer']}@T{r['temperature']}"].append((p, r["label"]))
    subsets = {k: round(auroc([p for p, _ in v], [y for _, y in v]), 4) for k, v in sorted(by_subset.items())
               if 0 < sum(y for _, y in v) < len(v)}
    meta = {"role": "prm", "kind": "lm_verifier", "architecture": type(model).__name__, "init": lm,
            "score": f"sigmoid(a * max({FEATURE}, floor) + b) over the candidate step's tokens",
            "calibration": {"a": round(a, 4), "b": round(b, 4), "floor": FLOOR, "fit_rows": len(train_rows)},
            "params": sum(p.numel() for p in model.parameters()), "seed": seed,
            "data": {"problems": n_problems, "stream": f"random.Random('prm-data-{seed}')",
                     "writers": ["draft", "target"], "temperatures": list(TEMPERATURES)},
            "annotate_history": False, "threads": threads, "calibrate_time_s": round(seconds, 1),
            "held_out_rows": len(held_rows), "held_out_auroc": round(auroc(held_p, [r["label"] for r in held_rows]), 4),
            "held_out_auroc_of": "the saved scorer's P(step correct)",
            "held_out_auroc_by_writer": subsets}
    write_model_card(out, "Bundled PRM (an LM verifier)", meta,
                     f"arbitrage train verifier --lm {lm} --draft {draft} --target {target} "
                     f"--problems {n_problems} --seed {seed} --fit-rows {fit_rows} --eval-rows {eval_rows} "
                     f"--out {out_dir}")
    return out
