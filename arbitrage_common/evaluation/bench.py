"""`arbitrage bench`: threshold sweeps, the matched-accuracy comparison, and wall-clock confirmation."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..accounting import LoopResult
from ..interfaces import GenerationOptions, ScoreItem
from ..loop import LoopRequest, Models, run_loop
from ..policies import make_policy
from ..synthetic import Problem, generate_problems, grade_answer
from .memo import GenerationCache, ScoreCache
from .metrics import spearman
from .plots import write_csv, write_plots
from .sweep import DEFAULT_GRID, MAX_STEPS, SweepPoint, curve_dominance, matched_comparison, run_memo_point


def load_backends(models_dir: str | Path, threads: int = 1) -> dict:
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer

    root = Path(models_dir)
    return {"draft": HFStepGenerator(root / "draft", threads=threads),
            "target": HFStepGenerator(root / "target", threads=threads),
            "prm": load_step_scorer(root / "prm", threads=threads),
            "router": load_step_scorer(root / "router", threads=threads)}


def router_spearman(results: Sequence[LoopResult], router_cache: ScoreCache) -> dict:
    """Router score of each draft step vs its oracle advantage, on the oracle(0) trajectories."""
    scores, advantages = [], []
    for r in results:
        history: list[tuple[str, str]] = []
        for step in r.steps:
            draft_text = step.discarded_draft_text if step.draft_discarded else step.text
            if step.score is not None and draft_text is not None:
                scores.append(router_cache.lookup(ScoreItem(r.prompt, tuple(history), draft_text))[0])
                advantages.append(step.score)
            history.append((step.text, step.source))
    return {"spearman": round(spearman(scores, advantages), 4), "steps": len(scores),
            "on": "held-out bench problems, oracle(tau=0) trajectories"}


def confirm_wallclock(problems: Sequence[Problem], backends: dict, picks: dict[str, float | None]) -> dict:
    """Real end-to-end runs, no memoization, policies interleaved problem by problem."""
    from ..backends.async_adapters import ThreadedGenerator, ThreadedScorer

    models = Models(draft=ThreadedGenerator(backends["draft"]), target=ThreadedGenerator(backends["target"]),
                    prm=ThreadedScorer(backends["prm"]), router=ThreadedScorer(backends["router"]))
    seconds = {name: 0.0 for name in picks}
    correct = {name: 0 for name in picks}

    async def run_all() -> None:
        for i, p in enumerate(problems):
            for name, threshold in picks.items():
                t0 = time.perf_counter()
                result = await run_loop(LoopRequest(p.prompt, make_policy(name, threshold, seed=i), max_steps=MAX_STEPS), models)
                seconds[name] += time.perf_counter() - t0
                correct[name] += grade_answer(p, result.text)

    asyncio.run(run_all())
    out = {name: {"threshold": picks[name], "latency_s_mean": round(seconds[name] / len(problems), 5),
                  "accuracy": round(correct[name] / len(problems), 4)} for name in picks}
    out["n"] = len(problems)
    if "rsd" in out and "arbitrage" in out:
        out["latency_ratio_rsd_over_arbitrage"] = round(seconds["rsd"] / seconds["arbitrage"], 3)
    return out


def run_bench(n: int, seed: int, out_dir: str | Path, models_dir: str | Path = "models",
              grid: dict | None = None, confirm_n: int | None = None, show_progress: bool = True) -> dict:
    grid = grid or DEFAULT_GRID
    backends = load_backends(models_dir)
    problems = generate_problems(n, seed)
    caches = {"draft": GenerationCache(backends["draft"], "draft"), "target": GenerationCache(backends["target"], "target"),
              "prm": ScoreCache(backends["prm"], "prm"), "router": ScoreCache(backends["router"], "router")}
    for role in ("draft", "target"):  # warm-up so the first timed call is not an outlier
        backends[role].generate_batch([problems[0].prompt + "\n\n"], GenerationOptions(max_new_tokens=64))
    jobs = [(policy, t) for policy, ts in grid.items() for t in ts]
    points: list[SweepPoint] = []
    oracle_zero: list[LoopResult] = []
    for policy, threshold in tqdm(jobs, desc="sweep", unit="point", disable=not show_progress):
        point, results = run_memo_point(policy, threshold, problems, caches)
        points.append(point)
        if policy == "oracle" and threshold == 0.0:
            oracle_zero = results
    matched = matched_comparison(points)
    picks = {name: matched[name]["threshold"] for name in ("rsd", "arbitrage") if matched[name]}
    confirm = confirm_wallclock(problems[: confirm_n or min(n, 40)], backends, picks) if picks else {}
    result = {
        "n": n, "seed": seed,
        "points": [p.as_dict() for p in points],
        "matched": matched,
        "curves": [curve_dominance(points, "oracle", "arbitrage"), curve_dominance(points, "oracle", "rsd"),
                   curve_dominance(points, "arbitrage", "rsd")],
        "router": router_spearman(oracle_zero, caches["router"]) if oracle_zero else None,
        "wallclock": confirm,
        "latency_note": "sweep latency = sum of batch-1 call times measured once per distinct call; "
                        "wallclock = real end-to-end runs at the matched thresholds",
    }
    _write_outputs(points, Path(out_dir), result)
    return result


def _write_outputs(points: Sequence[SweepPoint], out: Path, result: dict) -> None:
    """Everything is written to a temp dir and moved into place last: no partial outputs."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_csv(points, tmp / "points.csv")
    result["files"] = ["points.csv", *write_plots(points, tmp), "bench.json"]
    (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
