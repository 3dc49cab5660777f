"""`arbitrage bench --dataset`: the threshold sweep of `arbitrage bench` on real math problems
(MATH500, OlympiadBench, GSM8K), every answer graded with math-verify.

Composes the synthetic bench's parts: the same grid, memoized models and matched-accuracy rule
(``sweep``), the router Spearman (``bench``), the CSV and plots (``plots``). What differs is
the problem set, the grader (``datasets.grade_answer`` on the gold answer), longer requests
(real steps are paragraphs), a per-problem token budget that keeps the in-process models
inside their context, and one more output: ``answers.jsonl``, one graded answer per line.

In-process it runs the checkpoints of ``--models-dir`` on the transformers backend (the
bundled tiny models score ~0 on real math: the run checks the plumbing). Real models are
benched through a service: ``--endpoint HOST:PORT`` sends every request over gRPC, where the
server's prompt template and limits apply.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from ..accounting import LoopResult
from ..client import Client, ServiceError, build_request
from ..datasets import DATASETS, BenchProblem, DatasetUnavailable, extract_answer, grade_answer, load_benchmark
from ..datasets.loaders import DATA_DIR_ENV
from ..interfaces import GenerationOptions
from ..loop import LoopRequest, Models, run_loop
from ..policies import make_policy
from ..steps import render_prompt
from .memo import Charge, GenerationCache, ScoreCache
from .plots import write_csv, write_plots
from .sweep import DEFAULT_GRID, SweepPoint, curve_dominance, matched_comparison

MAX_STEPS = 40            # real solutions run to tens of paragraphs
MAX_NEW_TOKENS = 2048     # kept tokens per request, before the context budget
STEP_MAX_TOKENS = 512     # one paragraph; a step cut here ends the request
CONTEXT_SLACK = 16        # delimiters and tokenizer merges around the kept steps


def load_problems(dataset: str, data_file: str | None, limit: int | None) -> list[BenchProblem]:
    """The problems; a missing explicit file names ``--data-file``."""
    try:
        problems = load_benchmark(dataset, data_file, limit=limit)
    except DatasetUnavailable as exc:
        raise DatasetUnavailable(f"--data-file: {exc}" if data_file else f"--dataset: {exc}") from exc
    if not problems:
        raise ValueError(f"--dataset {dataset}: no problems loaded from {data_file or 'the hub'}")
    return problems


def describe_source(dataset: str, data_file: str | None) -> str:
    """Where ``load_benchmark`` reads ``dataset`` from (same order: file, $ARBITRAGE_DATA_DIR, hub)."""
    if data_file:
        return data_file
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and (Path(data_dir) / f"{dataset}.jsonl").is_file():
        return str(Path(data_dir) / f"{dataset}.jsonl")
    spec = DATASETS[dataset]
    return f"hub:{spec.hub_id}" + (f" ({spec.hub_config})" if spec.hub_config else "") + f" {spec.hub_split}"


def token_budget(backends: dict, problem: str, max_new_tokens: int = MAX_NEW_TOKENS) -> int | None:
    """Kept-token budget that keeps every generator prefix inside the generators' context
    (the transformers generator refuses a prefix that fills it). None: the prompt alone does
    not fit. Backends that do not say their context and tokenizer impose no limit."""
    budget = max_new_tokens
    for role in ("draft", "target"):
        context, tokenizer = getattr(backends[role], "context", None), getattr(backends[role], "tokenizer", None)
        if context is None or tokenizer is None:
            continue
        budget = min(budget, context - len(tokenizer(render_prompt(problem)).input_ids) - CONTEXT_SLACK)
    return budget if budget >= 1 else None


def _point(policy: str, threshold: float | None, results: Sequence[LoopResult], correct: Sequence[bool],
           latencies: Sequence[float]) -> SweepPoint:
    kept = sum(r.usage.draft_tokens_kept for r in results)
    drafted = kept + sum(r.usage.draft_tokens_discarded for r in results)
    target_steps = sum(r.usage.steps_by_source.get("target", 0) for r in results)
    steps = sum(len(r.steps) for r in results)
    return SweepPoint(policy, threshold, sum(correct) / len(results), kept / drafted if drafted else 0.0,
                      target_steps / steps if steps else 0.0, sum(latencies) / len(latencies), len(results))


def _records(policy: str, threshold: float | None, problems: Sequence[BenchProblem], texts: Sequence[str],
             correct: Sequence[bool]) -> list[dict]:
    return [{"policy": policy, "threshold": threshold, "id": p.id, "gold": p.answer,
             "extracted": extract_answer(t), "correct": c} for p, t, c in zip(problems, texts, correct)]


def _request(problem: BenchProblem, policy: str, threshold: float | None, seed: int, budget: int) -> LoopRequest:
    return LoopRequest(problem.problem, make_policy(policy, threshold, seed=seed), max_steps=MAX_STEPS,
                       max_new_tokens=budget, step_max_tokens=STEP_MAX_TOKENS)


def run_memo_point(policy: str, threshold: float | None, problems: Sequence[BenchProblem], budgets: Sequence[int],
                   caches: dict) -> tuple[SweepPoint, list[LoopResult], list[dict]]:
    """One sweep point on memoized models (latency: measured seconds of the calls made), graded."""
    async def all_() -> list[tuple[LoopResult, float]]:
        out = []
        for i, p in enumerate(problems):  # sequential: the caches are not shared-safe
            charge = Charge()
            models = Models(**{role: cache.view(charge) for role, cache in caches.items()})
            out.append((await run_loop(_request(p, policy, threshold, i, budgets[i]), models), charge.seconds))
        return out

    pairs = asyncio.run(all_())
    results = [r for r, _ in pairs]
    correct = [grade_answer(r.text, p.answer) for p, r in zip(problems, results)]  # main thread: timeouts work
    point = _point(policy, threshold, results, correct, [s for _, s in pairs])
    return point, results, _records(policy, threshold, problems, [r.text for r in results], correct)


def confirm_wallclock(problems: Sequence[BenchProblem], budgets: Sequence[int], backends: dict,
                      picks: dict[str, float | None]) -> dict:
    """The matched thresholds run again for real, no memoization, interleaved problem by problem."""
    from ..backends.async_adapters import ThreadedGenerator, ThreadedScorer

    models = Models(draft=ThreadedGenerator(backends["draft"]), target=ThreadedGenerator(backends["target"]),
                    prm=ThreadedScorer(backends["prm"]), router=ThreadedScorer(backends["router"]))
    seconds = {name: 0.0 for name in picks}
    texts: dict[str, list[str]] = {name: [] for name in picks}

    async def run_all() -> None:
        for i, p in enumerate(problems):
            for name, threshold in picks.items():
                t0 = time.perf_counter()
                result = await run_loop(_request(p, name, threshold, i, budgets[i]), models)
                seconds[name] += time.perf_counter() - t0
                texts[name].append(result.text)

    asyncio.run(run_all())
    out: dict = {name: {"threshold": picks[name], "latency_s_mean": round(seconds[name] / len(problems), 5),
                        "accuracy": round(sum(grade_answer(t, p.answer) for t, p in zip(texts[name], problems))
                                          / len(problems), 4)} for name in picks}
    out["n"] = len(problems)
    if "rsd" in out and "arbitrage" in out and seconds["arbitrage"] > 0:
        out["latency_ratio_rsd_over_arbitrage"] = round(seconds["rsd"] / seconds["arbitrage"], 3)
    return out


def run_dataset_bench(problems: Sequence[BenchProblem], out_dir: str | Path, backends: dict, *, dataset: str,
                      source: str, grid: dict | None = None, confirm_n: int | None = None,
                      show_progress: bool = True) -> dict:
    """The in-process sweep over ``backends`` (sync ``generate_batch`` / ``score_batch``)."""
    from .bench import router_spearman

    grade_answer("\\boxed{1}", "1")  # fail now, not after the sweep, when math-verify is missing
    grid = grid or DEFAULT_GRID
    budgets = [token_budget(backends, p.problem) for p in problems]
    skipped = [{"id": p.id, "reason": "prompt longer than the generators' context"}
               for p, b in zip(problems, budgets) if b is None]
    kept = [(p, b) for p, b in zip(problems, budgets) if b is not None]
    if not kept:
        raise ValueError(f"--dataset {dataset}: no problem fits the models' context")
    problems, budgets = [p for p, _ in kept], [b for _, b in kept]
    caches = {"draft": GenerationCache(backends["draft"], "draft"), "target": GenerationCache(backends["target"], "target"),
              "prm": ScoreCache(backends["prm"], "prm"), "router": ScoreCache(backends["router"], "router")}
    for role in ("draft", "target"):  # warm-up so the first timed call is not an outlier
        backends[role].generate_batch([render_prompt(problems[0].problem)], GenerationOptions(max_new_tokens=8))
    points, answers, oracle_zero = [], [], []
    jobs = [(policy, t) for policy, ts in grid.items() for t in ts]
    for policy, threshold in tqdm(jobs, desc=f"sweep {dataset}", unit="point", disable=not show_progress):
        point, results, records = run_memo_point(policy, threshold, problems, budgets, caches)
        points.append(point)
        answers += records
        if policy == "oracle" and threshold == 0.0:
            oracle_zero = results
    matched = matched_comparison(points) if any(p.policy == "rsd" for p in points) else None
    picks = {name: matched[name]["threshold"] for name in ("rsd", "arbitrage") if matched and matched[name]}
    confirm = confirm_wallclock(problems[: confirm_n or min(len(problems), 20)], budgets, backends, picks) \
        if picks else {}
    result = {
        "dataset": dataset, "source": source, "n": len(problems), "skipped": skipped, "graded": len(answers),
        "points": [p.as_dict() for p in points], "matched": matched,
        "curves": _curves(points),
        "router": router_spearman(oracle_zero, caches["router"]) if oracle_zero else None,
        "wallclock": confirm,
        "latency_note": "sweep latency = sum of batch-1 call times measured once per distinct call; "
                        "wallclock = real end-to-end runs at the matched thresholds",
    }
    write_outputs(points, answers, Path(out_dir), result)
    return result


def _curves(points: Sequence[SweepPoint]) -> list[dict]:
    have = {p.policy for p in points}
    pairs = [("oracle", "arbitrage"), ("oracle", "rsd"), ("arbitrage", "rsd")]
    return [curve_dominance(points, upper, lower) for upper, lower in pairs if {upper, lower} <= have]


# -- against a running service ---------------------------------------------------------------
def remote_point(call: Callable, policy: str, threshold: float | None, problems: Sequence[BenchProblem],
                 tag: str) -> tuple[SweepPoint, list[dict]]:
    """One point over ``call(GenerateRequest) -> GenerateResponse``; server limits and template apply."""
    correct, texts, seconds = [], [], 0.0
    kept = drafted = target_steps = steps = 0
    for i, p in enumerate(problems):
        request = build_request(p.problem, policy, request_id=f"{tag}-{policy}-{threshold}-{i}", threshold=threshold)
        t0 = time.perf_counter()
        try:
            reply = call(request)
        except RuntimeError as exc:
            raise RuntimeError(f"{p.dataset} problem {p.id}: {exc}") from exc
        seconds += time.perf_counter() - t0
        texts.append(reply.text)
        correct.append(grade_answer(reply.text, p.answer))
        kept += reply.usage.draft_tokens_kept
        drafted += reply.usage.draft_tokens_kept + reply.usage.draft_tokens_discarded
        target_steps += reply.usage.target_steps
        steps += len(reply.steps)
    point = SweepPoint(policy, threshold, sum(correct) / len(problems), kept / drafted if drafted else 0.0,
                       target_steps / steps if steps else 0.0, seconds / len(problems), len(problems))
    return point, _records(policy, threshold, problems, texts, correct)


def run_remote_dataset_bench(endpoint: str, problems: Sequence[BenchProblem], out_dir: str | Path, *, dataset: str,
                             source: str, app: str | None = None, grid: dict | None = None,
                             show_progress: bool = True) -> dict:
    grade_answer("\\boxed{1}", "1")
    grid = grid or DEFAULT_GRID
    points, answers = [], []
    with Client(endpoint, app) as client:

        def call(request):
            try:
                return client.generate(request)
            except ServiceError as exc:  # name the problem: one bad request stops the sweep
                raise RuntimeError(f"request {request.request_id}: {exc}") from exc

        jobs = [(policy, t) for policy, ts in grid.items() for t in ts]
        for policy, t in tqdm(jobs, desc=f"sweep {dataset}", unit="point", disable=not show_progress):
            point, records = remote_point(call, policy, t, problems, f"bench-{dataset}")
            points.append(point)
            answers += records
    result = {"dataset": dataset, "source": source, "endpoint": endpoint, "n": len(problems), "graded": len(answers),
              "points": [p.as_dict() for p in points],
              "matched": matched_comparison(points) if any(p.policy == "rsd" for p in points) else None,
              "curves": _curves(points),
              "latency_note": "every point is real gRPC requests, one at a time: end-to-end wall time"}
    write_outputs(points, answers, Path(out_dir), result)
    return result


def write_outputs(points: Sequence[SweepPoint], answers: Sequence[dict], out: Path, result: dict) -> None:
    """points.csv, the plots, answers.jsonl and bench.json, moved into place together: a failed
    run leaves no partial outputs."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_csv(points, tmp / "points.csv")
    (tmp / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    result["files"] = ["points.csv", *write_plots(points, tmp), "answers.jsonl", "bench.json"]
    (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
