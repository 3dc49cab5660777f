"""`arbitrage bench --dataset`: the threshold sweep of `arbitrage bench` on real math problems
(MATH500, OlympiadBench, GSM8K), every answer graded with math-verify.

The same stack as the synthetic bench (``stack.run_sweep`` on a ``tasks.DatasetTask``): the
grid, the matched rule, the speedup curve, RSD's waste (judged by the PRM: real steps have
no exact checker), the oracle bound and the router's Spearman. What differs is the grader,
longer requests (real steps are paragraphs), a per-problem token budget that keeps the
in-process models inside their context, and one more output: ``answers.jsonl``.

In-process it runs the checkpoints of ``--models-dir`` on the transformers backend (the
bundled tiny models score ~0 on real math: the run checks the plumbing). Real models are
benched through a service: ``--endpoint HOST:PORT`` sends every request over gRPC, where the
server's prompt template and limits apply.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..client import Client
from ..datasets import DATASETS, BenchProblem, DatasetUnavailable, load_benchmark
from ..datasets.loaders import DATA_DIR_ENV
from ..steps import render_prompt
from .runners import InProcessRunner
from .stack import run_sweep, write_outputs
from .tasks import DatasetTask

MAX_NEW_TOKENS = 2048     # kept tokens per request, before the context budget
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


def run_dataset_bench(problems: Sequence[BenchProblem], out_dir: str | Path, backends: dict, *, dataset: str,
                      source: str, grid: dict | None = None, confirm_n: int | None = None,
                      show_progress: bool = True) -> dict:
    """The in-process sweep over ``backends`` (sync ``generate_batch`` / ``score_batch``)."""
    budgets = [token_budget(backends, p.problem) for p in problems]
    skipped = [{"id": p.id, "reason": "prompt longer than the generators' context"}
               for p, b in zip(problems, budgets) if b is None]
    kept = [(p, b) for p, b in zip(problems, budgets) if b is not None]
    if not kept:
        raise ValueError(f"--dataset {dataset}: no problem fits the models' context")
    task = DatasetTask(dataset, [p for p, _ in kept], source, [b for _, b in kept])
    result, points, answers = run_sweep(task, InProcessRunner(backends), grid, confirm_n or min(len(kept), 20),
                                        show_progress)
    result["skipped"] = skipped
    write_outputs(points, Path(out_dir), result, answers)
    return result


def run_remote_dataset_bench(endpoint: str, problems: Sequence[BenchProblem], out_dir: str | Path, *, dataset: str,
                             source: str, app: str | None = None, grid: dict | None = None,
                             show_progress: bool = True) -> dict:
    from .remote import endpoint_runner

    task = DatasetTask(dataset, problems, source)
    with Client(endpoint, app) as client:
        result, points, answers = run_sweep(task, endpoint_runner(client, f"bench-{dataset}"), grid,
                                            show_progress=show_progress)
    result["endpoint"] = endpoint
    write_outputs(points, Path(out_dir), result, answers)
    return result
