"""`arbitrage models eval`: quality and cost of the bundled draft, target and PRM."""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ..interfaces import GenerationOptions, ScoreItem
from ..steps import build_prefix
from ..synthetic import STEP_DELIMITER, check_step, generate_mix, grade_answer, is_wellformed
from .metrics import auroc
from .solve import Trajectory, solve_batched, teacher_forced_steps


def measure_step_latency(backends: dict, prefixes: Sequence[str], batch: int, repeats: int) -> dict[str, float]:
    """Mean ms per step for each backend, calls interleaved so drift hits all alike."""
    options = GenerationOptions(max_new_tokens=64)
    for b in backends.values():  # warm-up
        b.generate_batch(list(prefixes[:batch]), options)
    total = defaultdict(float)
    steps = defaultdict(int)
    for r in range(repeats):
        chunk = [prefixes[(r * batch + i) % len(prefixes)] for i in range(batch)]
        for name, b in backends.items():
            t0 = time.perf_counter()
            b.generate_batch(chunk, options)
            total[name] += time.perf_counter() - t0
            steps[name] += batch
    return {name: 1000 * total[name] / steps[name] for name in backends}


def _model_quality(backend, problems) -> tuple[dict, list[Trajectory]]:
    trajs = solve_batched(backend, problems)
    by_tier = defaultdict(list)
    for p, k, text in teacher_forced_steps(backend, problems):
        by_tier[p.step_tiers()[k]].append(check_step(p, p.solution_steps()[:k], text))
    return {
        "final_accuracy": sum(grade_answer(t.problem, STEP_DELIMITER.join(t.steps)) for t in trajs) / len(trajs),
        "step_accuracy": {tier: sum(v) / len(v) for tier, v in sorted(by_tier.items())},
        "step_counts": {tier: len(v) for tier, v in sorted(by_tier.items())},
        "wellformed_rate": sum(is_wellformed(t.problem, t.steps) and t.finish_reason == "eos" for t in trajs) / len(trajs),
        "params": backend.params,
    }, trajs


def _prm_auroc(scorer, trajectories: Sequence[Trajectory]) -> tuple[float, int]:
    items, labels = [], []
    for t in trajectories:
        for k, step in enumerate(t.steps):
            items.append(ScoreItem(t.problem.prompt, tuple((s, "draft") for s in t.steps[:k]), step))
            labels.append(check_step(t.problem, t.steps[:k], step))
    scores = []
    for start in range(0, len(items), 64):
        scores += scorer.score_batch(items[start: start + 64])
    return auroc(scores, labels), len(items)


def evaluate_models(n: int, seed: int, models_dir: str | Path = "models", with_prm: bool = True,
                    latency_repeats: int = 20, threads: int = 1, mix: str = "math", prm: str | Path | None = None) -> dict:
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer

    root = Path(models_dir)
    # One intra-op thread: tiny models gain little from more, and spinning threads make
    # timings on a shared 2-core machine erratic.
    backends = {role: HFStepGenerator(root / role, threads=threads) for role in ("draft", "target")}
    scorer = load_step_scorer(prm or root / "prm", threads=threads) if with_prm else None  # load all first: fail before work
    problems = generate_mix(n, seed, mix)
    result: dict = {"n": n, "seed": seed, "mix": mix}
    trajectories = []
    for role, backend in backends.items():
        result[role], trajs = _model_quality(backend, problems)
        trajectories += trajs
    prefixes = [build_prefix(p.prompt, p.solution_steps()[:k]) for p in problems for k in range(len(p.ops))]
    b1 = measure_step_latency(backends, prefixes, batch=1, repeats=latency_repeats)
    b16 = measure_step_latency(backends, prefixes, batch=16, repeats=max(2, latency_repeats // 4))
    for role in backends:
        result[role]["ms_per_step_b1"] = round(b1[role], 2)
        result[role]["ms_per_step_b16"] = round(b16[role], 2)
    result["target_draft_latency_ratio"] = round(b1["target"] / b1["draft"], 2)
    result["target_draft_latency_ratio_b16"] = round(b16["target"] / b16["draft"], 2)
    result["hard_step_target_error_rate"] = round(1 - result["target"]["step_accuracy"].get("hard", 0.0), 4)
    if scorer is not None:
        value, count = _prm_auroc(scorer, trajectories)
        result["prm"] = {"auroc": round(value, 4), "steps_scored": count, "params": scorer.params}
    return result
