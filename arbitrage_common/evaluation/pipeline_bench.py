"""Step pipelining on vs off, in process, on the bundled models: latency per request and
saved per accepted step, with the outputs asserted identical. Prints figures; asserts
nothing about time.

    .venv/bin/python -m arbitrage_common.evaluation.pipeline_bench --n 20 --repeats 2

Each problem runs once pipelined and once not, in alternating order (on first for even
problems, off first for odd), so drift in machine load hits both alike. Models run through
``ThreadedGenerator`` / ``ThreadedScorer`` (one worker thread per call, ``threads`` torch
threads each): the draft's early call and the scorer's call overlap only as far as the cores
and the GIL let them (with the bundled tiny models, whose decode loop is mostly Python, the
GIL serializes them). ``--processes`` runs each model in its own worker process instead, as
the service's pools do (no shared GIL). Either way a cancelled call cannot be stopped: the
dropped early draft still runs to its end and the draft's next call queues behind it, unlike
a pool call, which is cancelled.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ..accounting import LoopResult
from ..loop import LoopRequest, Models, run_loop
from ..policies import make_policy
from ..synthetic import generate_problems


def _same(result: LoopResult) -> tuple:
    u = result.usage
    return ([(s.text, s.source, s.score, s.tokens, s.finish_reason, s.discarded_draft_text) for s in result.steps],
            result.finish_reason, u.draft_tokens_kept, u.draft_tokens_discarded, u.target_tokens)


_WORKER_MODEL: Any = None


def _worker_init(role: str, path: str, threads: int) -> None:
    global _WORKER_MODEL
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer

    _WORKER_MODEL = HFStepGenerator(path, threads=threads) if role in ("draft", "target") \
        else load_step_scorer(path, threads=threads)


def _worker_generate(prefixes: list[str], options: Any) -> Any:
    return _WORKER_MODEL.generate_batch(prefixes, options)


def _worker_score(items: list[Any]) -> Any:
    return _WORKER_MODEL.score_batch(items)


class _ProcessModel:
    """One model in its own process (one call at a time), as ``Generator`` and ``Scorer``."""

    def __init__(self, role: str, path: str, threads: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=_worker_init,
                                        initargs=(role, path, threads))
        self.pool.submit(_worker_score if role in ("router", "prm") else _worker_generate,
                         *([[]] if role in ("router", "prm") else [[], None])).result()  # loaded

    async def generate(self, prefixes, options):
        return await asyncio.get_running_loop().run_in_executor(self.pool, _worker_generate, list(prefixes), options)

    async def score(self, items):
        return await asyncio.get_running_loop().run_in_executor(self.pool, _worker_score, list(items))


def _process_models(models_dir: str | Path, threads: int) -> tuple[Models, list[Any]]:
    root = Path(models_dir)
    m = {role: _ProcessModel(role, str(root / role), threads) for role in ("draft", "target", "router", "prm")}
    return Models(draft=m["draft"], target=m["target"], router=m["router"], prm=m["prm"]), [x.pool for x in m.values()]


def run_pipeline_bench(n: int = 20, seed: int = 4000, policies: tuple[str, ...] = ("arbitrage", "rsd"),
                       models_dir: str | Path = "models", threads: int = 1, repeats: int = 1,
                       max_steps: int = 16, threshold: float | None = None,
                       processes: bool = False) -> dict[str, Any]:
    from ..backends.async_adapters import ThreadedGenerator, ThreadedScorer
    from .bench import load_backends

    pools: list[Any] = []
    if processes:
        models, pools = _process_models(models_dir, threads)
    else:
        backends = load_backends(models_dir, threads=threads)
        models = Models(draft=ThreadedGenerator(backends["draft"]), target=ThreadedGenerator(backends["target"]),
                        prm=ThreadedScorer(backends["prm"]), router=ThreadedScorer(backends["router"]))
    problems = generate_problems(n, seed)
    rows: dict[str, dict[bool, list[dict[str, float]]]] = {p: {True: [], False: []} for p in policies}

    async def one(prompt: str, policy: str, pipeline: bool) -> tuple[float, LoopResult]:
        request = LoopRequest(prompt, make_policy(policy, threshold), max_steps=max_steps, pipeline=pipeline)
        started = time.perf_counter()
        result = await run_loop(request, models)
        return time.perf_counter() - started, result

    async def all_() -> None:
        for policy in policies:  # warm-up, both ways
            for pipeline in (False, True):
                await one(problems[0].prompt, policy, pipeline)
        for rep in range(repeats):
            for i, problem in enumerate(problems):
                for policy in policies:
                    order = (True, False) if (i + rep) % 2 == 0 else (False, True)
                    got = {}
                    for pipeline in order:
                        seconds, result = await one(problem.prompt, policy, pipeline)
                        got[pipeline] = result
                        u = result.usage
                        rows[policy][pipeline].append({
                            "seconds": seconds, "steps": len(result.steps),
                            "draft_steps": u.steps_by_source["draft"], "target_steps": u.steps_by_source["target"],
                            "used": u.speculative_drafts_used, "discarded": u.speculative_drafts_discarded,
                            "spec_tokens": u.speculative_draft_tokens_discarded,
                            **{f"{k}_s": v for k, v in u.stage_seconds.items()}})
                    if _same(got[True]) != _same(got[False]):
                        raise AssertionError(f"problem {i} ({policy}): pipelined output differs from plain")

    load_before = os.getloadavg()
    try:
        asyncio.run(all_())
    finally:
        for pool in pools:
            pool.shutdown()
    out: dict[str, Any] = {"n": n, "repeats": repeats, "seed": seed, "threads": threads, "cores": os.cpu_count(),
                           "threshold": threshold, "models_in": "processes" if processes else "threads",
                           "loadavg_before": [round(x, 2) for x in load_before],
                           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "outputs_identical": True}
    for policy in policies:
        on, off = rows[policy][True], rows[policy][False]

        def total(rs: list[dict[str, float]], key: str) -> float:
            return sum(r[key] for r in rs)

        saved = total(off, "seconds") - total(on, "seconds")
        used = total(on, "used")
        paired = [b["seconds"] / a["seconds"] for a, b in zip(on, off)]
        out[policy] = {
            "requests": len(on),
            "latency_ms_mean_off": round(1000 * statistics.mean(r["seconds"] for r in off), 1),
            "latency_ms_mean_on": round(1000 * statistics.mean(r["seconds"] for r in on), 1),
            "latency_ms_median_off": round(1000 * statistics.median(r["seconds"] for r in off), 1),
            "latency_ms_median_on": round(1000 * statistics.median(r["seconds"] for r in on), 1),
            "speedup_mean": round(total(off, "seconds") / total(on, "seconds"), 3),
            "speedup_median_paired": round(statistics.median(paired), 3),
            "steps_per_request": round(total(on, "steps") / len(on), 2),
            "target_step_fraction": round(total(on, "target_steps") / max(total(on, "steps"), 1), 3),
            "early_drafts_used": int(used), "early_drafts_discarded": int(total(on, "discarded")),
            "early_draft_tokens_discarded": int(total(on, "spec_tokens")),
            "saved_ms_per_accepted_step": round(1000 * saved / used, 2) if used else None,
            "draft_ms_per_step_off": round(1000 * total(off, "draft_s") / total(off, "steps"), 2),
            "draft_ms_waited_per_step_on": round(1000 * total(on, "draft_s") / total(on, "steps"), 2),
            "scorer_ms_per_step_off": round(1000 * (total(off, "router_s") + total(off, "prm_s"))
                                            / total(off, "steps"), 2),
            "scorer_ms_per_step_on": round(1000 * (total(on, "router_s") + total(on, "prm_s")) / total(on, "steps"), 2),
            "target_ms_per_target_step_off": round(1000 * total(off, "target_s") / max(total(off, "target_steps"), 1), 2),
            "target_ms_per_target_step_on": round(1000 * total(on, "target_s") / max(total(on, "target_steps"), 1), 2),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model call")
    ap.add_argument("--policies", nargs="+", default=["arbitrage", "rsd"])
    ap.add_argument("--models", default="models")
    ap.add_argument("--threshold", type=float, default=None, help="every policy's threshold (default: its own); "
                    "arbitrage 1.0 / rsd 0.0 never route, which isolates the overlap from dropped drafts")
    ap.add_argument("--processes", action="store_true", help="each model in its own process (as the pools)")
    args = ap.parse_args(argv)
    print(json.dumps(run_pipeline_bench(args.n, args.seed, tuple(args.policies), args.models, args.threads,
                                        args.repeats, threshold=args.threshold, processes=args.processes),
                     indent=2))


if __name__ == "__main__":
    main()
