"""Train the PRM on checker labels of steps written by the draft and the target."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..interfaces import GenerationOptions, ScoreItem
from ..steps import format_scorer_input
from ..synthetic import check_step, generate_mix_problem
from .loop_utils import check_run_args, run_path, write_model_card

# Greedy runs give the models' typical mistakes; sampled runs add rarer ones.
TEMPERATURES = (0.0, 0.8)


def collect_prm_data(draft_dir: str, target_dir: str, n_problems: int, seed: int,
                     mixes: tuple[str, ...] = ("math",)) -> list[dict]:
    """Label every step of draft and target trajectories with the exact checker; problem i is
    of ``mixes[i % len(mixes)]``."""
    from ..backends.hf_generator import HFStepGenerator
    from ..evaluation.solve import solve_batched

    rng = random.Random(f"prm-data-{seed}")
    problems = [generate_mix_problem(rng, mixes[i % len(mixes)]) for i in range(n_problems)]
    rows = []
    for role, path in (("draft", draft_dir), ("target", target_dir)):
        backend = HFStepGenerator(path)
        for temperature in TEMPERATURES:
            options = GenerationOptions(max_new_tokens=64, temperature=temperature, seed=seed)
            for t in solve_batched(backend, problems, batch_size=64, options=options):
                for k, step in enumerate(t.steps):
                    item = ScoreItem(t.problem.prompt, tuple((s, role) for s in t.steps[:k]), step)
                    rows.append({"text": format_scorer_input(item, annotate=False), "writer": role,
                                 "temperature": temperature,
                                 "label": int(check_step(t.problem, t.steps[:k], step))})
    return rows


def prm_data_args(draft: str, target: str, n_problems: int, seed: int, mixes: tuple[str, ...]) -> dict:
    """The arguments that make the labeled rows, keyed by flag (``prm_data.meta.json``)."""
    return {"--draft": run_path(draft), "--target": run_path(target), "--problems": n_problems, "--seed": seed,
            "--mix": list(mixes)}


def load_or_collect_prm_data(out: Path, draft: str, target: str, n_problems: int, seed: int,
                             mixes: tuple[str, ...] = ("math",)) -> list[dict]:
    """The labeled rows, generated once per output directory (``ckpt/prm_data.jsonl``) so a
    resumed or re-calibrated run reads the same data. The arguments that made them are kept
    beside them (``ckpt/prm_data.meta.json``): cached rows made with others are refused
    (ValueError naming the differing flags), never silently reused."""
    data_path = out / "ckpt" / "prm_data.jsonl"
    meta_path = data_path.with_name("prm_data.meta.json")
    args = prm_data_args(draft, target, n_problems, seed, mixes)
    if data_path.exists():
        saved = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        check_run_args(data_path, saved, args, out / "ckpt")
        return [json.loads(line) for line in data_path.read_text().splitlines()]
    rows = collect_prm_data(draft, target, n_problems, seed, mixes)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(args, indent=2) + "\n")  # first: rows never lie there without it
    tmp = data_path.with_name(data_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, data_path)
    return rows


MIN_HELD_OUT = 200


def split_prm_rows(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded shuffle, 10% (at least MIN_HELD_OUT rows) held out."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    held = max(MIN_HELD_OUT, len(rows) // 10)
    return rows[held:], rows[:held]


def check_labeled_rows(rows: list[dict], flag: str, what: str) -> None:
    """ValueError naming ``flag`` unless ``rows`` hold both a correct and a wrong step."""
    labels = {r["label"] for r in rows}
    if not rows:
        raise ValueError(f"{flag}: no {what} steps")
    if len(labels) < 2:
        raise ValueError(f"{flag}: the {len(rows)} {what} steps are all {'correct' if 1 in labels else 'wrong'}; "
                         f"a score needs both kinds (use a larger {flag})")


def split_for_training(rows: list[dict], seed: int, n_problems: int) -> tuple[list[dict], list[dict]]:
    """``split_prm_rows``, refusing a split with nothing (or one class only) to train or
    evaluate on: ValueError naming --problems."""
    train, held = split_prm_rows(rows, seed)
    if not train:
        raise ValueError(f"--problems {n_problems}: gave {len(rows)} labeled steps, and at least {MIN_HELD_OUT} are "
                         f"held out for the AUROC, which leaves none to train on; use more problems")
    check_labeled_rows(train, "--problems", "training")
    check_labeled_rows(held, "--problems", "held-out")
    return train, held


def train_prm(out_dir: str, init: str, draft: str, target: str, n_problems: int, steps: int,
              seed: int = 0, lr: float = 5e-4, threads: int = 1, mixes: tuple[str, ...] = ("math",)) -> Path:
    from ..evaluation.metrics import auroc
    from .classifier import load_scoring_model, predict, train_scoring_model

    out = Path(out_dir)
    rows = load_or_collect_prm_data(out, draft, target, n_problems, seed, mixes)
    train_rows, held_rows = split_for_training(rows, seed, n_problems)
    tokenizer, model = load_scoring_model(init, seed)
    seconds = train_scoring_model(model, tokenizer, [r["text"] for r in train_rows],
                                  [r["label"] for r in train_rows], out, steps=steps, seed=seed, lr=lr,
                                  threads=threads, run_args={"--init": run_path(init),
                                                             **prm_data_args(draft, target, n_problems, seed, mixes)})
    held_scores = predict(model, tokenizer, [r["text"] for r in held_rows])
    held_auroc = auroc(held_scores, [r["label"] for r in held_rows])
    by_writer = {}
    for writer in ("draft", "target"):
        pairs = [(s, r["label"]) for s, r in zip(held_scores, held_rows) if r["writer"] == writer]
        if len({y for _, y in pairs}) == 2:
            by_writer[writer] = round(auroc([s for s, _ in pairs], [y for _, y in pairs]), 4)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    meta = {"role": "prm", "kind": "classifier", "architecture": type(model).__name__, "init": init,
            "head": "1 logit, sigmoid = P(step correct)",
            "params": sum(p.numel() for p in model.parameters()), "seed": seed,
            "data": {"problems": n_problems, "mixes": list(mixes), "stream": f"random.Random('prm-data-{seed}')",
                     "writers": ["draft", "target"], "temperatures": list(TEMPERATURES), "rows": len(rows),
                     "positive_rate": round(sum(r["label"] for r in rows) / len(rows), 4)},
            "annotate_history": False, "steps": steps, "lr_peak": lr, "threads": threads,
            "train_time_s": round(seconds, 1), "held_out_auroc": round(held_auroc, 4),
            "held_out_auroc_by_writer": by_writer}
    write_model_card(out, "Bundled PRM (process reward model)", meta,
                     f"arbitrage train prm --init {init} --draft {draft} --target {target} "
                     f"--problems {n_problems} --steps {steps} --seed {seed} --lr {lr} --mix {','.join(mixes)} "
                     f"--out {out_dir}")
    return out
