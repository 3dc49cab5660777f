"""Scorer cost per step, uncached vs the per-session prefix KV cache (``backends.prefix_cache``).

``python -m arbitrage_common.evaluation.scorer_bench`` prints, for the bundled PRM (LM verifier,
two candidates per step as in an oracle/RSD call) and router (verifier head, one candidate):

- ``trajectory``: sessions advancing step by step through synthetic problems (the bundled draft
  model's step as the candidate; the PRM's second candidate is the gold step), B sessions per
  scorer call (B = 1 and 16): ms per call and per item, uncached vs cached, first steps
  (misses) included. Two histories bracket what a served request does: ``kept gold`` (each
  kept step is the gold one, never the step just scored, as when the target rewrites every
  step) and ``kept draft`` (each kept step is the draft step just scored, as when the router
  accepts it);
- ``context``: one step at a history of h steps (long synthetic problems), the cache warmed
  with the h-1 step prefix: ms per item uncached, cached (rows of a batch in one padded
  forward, the default) and cached with one forward per row, and the tokens each item reads.

Cached and uncached calls alternate step by step so that load drift hits both alike; the
largest |cached - uncached| score difference is printed too. Figures only, no asserts.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

from ..interfaces import GenerationOptions, ScoreItem
from ..steps import build_prefix, format_scorer_input
from ..synthetic import Op, Problem, generate_problems

HISTORIES = (1, 4, 8, 12, 16)
BATCHES = (1, 16)


def long_problem(rng: random.Random, n_ops: int) -> Problem:
    """A synthetic problem of ``n_ops`` add/sub/mul ops on a value kept in 0..99."""
    value = rng.randint(10, 99)
    start, ops = value, []
    while len(ops) < n_ops:
        kind = rng.choice(["add", "sub", "mul"])
        if kind == "add" and value <= 89:
            op = Op("add", rng.randint(10, 99 - value))
        elif kind == "sub" and value >= 10:
            op = Op("sub", rng.randint(10, value))
        elif kind == "mul" and 1 <= value <= 49:
            op = Op("mul", rng.randint(2, min(9, 99 // value)))
        else:
            continue
        ops.append(op)
        value = value + op.operand if kind == "add" else value - op.operand if kind == "sub" else value * op.operand
    return Problem(start, tuple(ops))


def draft_steps(draft, problems: Sequence[Problem], batch: int = 32) -> dict[tuple[int, int], str]:
    """The draft model's step k given the gold steps 1..k-1, for every (problem, k); the gold
    step where the draft wrote nothing (a prefix at the draft's context)."""
    jobs = [(i, k) for i, p in enumerate(problems) for k in range(len(p.solution_steps()))]
    out = {}
    options = GenerationOptions(max_new_tokens=48)
    for lo in range(0, len(jobs), batch):
        chunk = jobs[lo: lo + batch]
        prefixes = [build_prefix(problems[i].prompt, problems[i].solution_steps()[:k]) for i, k in chunk]
        for (i, k), g in zip(chunk, draft.generate_batch(prefixes, options)):
            out[i, k] = g.text or problems[i].solution_steps()[k]
    return out


def step_items(problem: Problem, draft: str, k: int, pair: bool, kept: Sequence[str] | None = None) -> list[ScoreItem]:
    """Step ``k``'s items: the draft candidate (and the gold one for a pair) after the ``kept``
    steps (default: the gold steps before k)."""
    gold = problem.solution_steps()
    history = tuple((s, "draft") for s in (gold[:k] if kept is None else kept))
    items = [ScoreItem(problem.prompt, history, draft)]
    return items + [ScoreItem(problem.prompt, history, gold[k])] if pair else items


class Clock:
    """Wall and CPU seconds per named variant (CPU: this process, all threads; on a loaded
    machine it is the steadier of the two)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def time(self, name: str, fn, *args):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return out

    def per(self, n: int) -> dict[str, dict[str, float]]:
        return {"wall": {k: 1000 * v / n for k, v in self.wall.items()},
                "cpu": {k: 1000 * v / n for k, v in self.cpu.items()}}


def _diff(a: Sequence[float], b: Sequence[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def bench_trajectories(scorer, problems: Sequence[Problem], drafts: dict, batch: int, pair: bool,
                       repeats: int, tag: str, kept: str = "gold") -> dict:
    """B = ``batch`` sessions per call advancing through their problems together (candidate:
    the draft's step, plus the gold step for the PRM; history: the gold steps, or with
    ``kept="draft"`` the draft steps scored before)."""
    first, later = Clock(), Clock()  # each session's first step (a miss), the steps after it
    calls = items_n = later_items = 0
    worst = 0.0
    for rep in range(repeats):
        for lo in range(0, len(problems) - batch + 1, batch):
            group = range(lo, lo + batch)
            keys = {i: f"{tag}-{rep}-{i}" for i in group}
            for k in range(max(len(problems[i].solution_steps()) for i in group)):
                items, sessions = [], []
                for i in group:
                    if k < len(problems[i].solution_steps()):
                        history = [drafts[i, j] for j in range(k)] if kept == "draft" else None
                        row = step_items(problems[i], drafts[i, k], k, pair, history)
                        items += row
                        sessions += [keys[i]] * len(row)
                order = ["uncached", "cached"] if calls % 2 else ["cached", "uncached"]
                c = later if k else first
                got = {name: c.time(name, scorer.score_batch, items, sessions if name == "cached" else None)
                       for name in order}
                worst = max(worst, _diff(got["cached"], got["uncached"]))
                calls += 1
                items_n += len(items)
                later_items += len(items) if k else 0
            for key in keys.values():
                scorer.release(key)
    every = Clock()
    for c in (first, later):
        for name in c.wall:
            every.wall[name] = every.wall.get(name, 0.0) + c.wall[name]
            every.cpu[name] = every.cpu.get(name, 0.0) + c.cpu[name]
    return {"batch_sessions": batch, "kept": kept, "calls": calls, "items": items_n, "ms_per_call": every.per(calls),
            "ms_per_item": every.per(items_n), "items_after_first_step": later_items,
            "ms_per_item_after_first_step": later.per(later_items), "max_abs_diff": worst}


def bench_context(scorer, problems: Sequence[Problem], drafts: dict, history: int, batch: int, pair: bool,
                  repeats: int, tag: str) -> dict:
    """One step at ``history`` kept steps for ``batch`` sessions whose cache holds the call of
    the step before (``cached``: the rows of the call in one padded forward, the default;
    ``cached_1_per_forward``: one forward per row)."""
    group = problems[:batch]
    cache = scorer.prefix_cache
    clock = Clock()
    worst = 0.0
    items: list[ScoreItem] = []
    for rep in range(repeats):
        for variant in ("cached", "cached_1_per_forward"):
            warm, warm_sessions, items, sessions = [], [], [], []
            for i, p in enumerate(group):
                key = f"{tag}-{rep}-{variant}-{i}"
                w = step_items(p, drafts[i, history - 1], history - 1, pair)
                warm += w
                warm_sessions += [key] * len(w)
                row = step_items(p, drafts[i, history], history, pair)
                items += row
                sessions += [key] * len(row)
            scorer.score_batch(warm, warm_sessions)  # the cache now holds the previous call
            saved = cache.batch_size
            try:
                cache.batch_size = 1 if variant == "cached_1_per_forward" else saved
                order = ["uncached", variant] if rep % 2 else [variant, "uncached"]
                got = {name: clock.time(name, scorer.score_batch, items, sessions if name != "uncached" else None)
                       for name in order}
            finally:
                cache.batch_size = saved
            worst = max(worst, _diff(got[variant], got["uncached"]))
            for key in set(sessions):
                scorer.release(key)
    per = clock.per(repeats * len(items))
    for kind in per.values():
        kind["uncached"] /= 2  # it ran once per variant
    tokens = [1 + len(format_scorer_input(scorer.fit(it), False)) for it in items]
    return {"history": history, "batch_sessions": batch, "items": len(items), "tokens_mean": sum(tokens) / len(tokens),
            "truncated_items": sum(scorer.fit(it) != it for it in items), "ms_per_item": per, "max_abs_diff": worst}


def run(models_dir: str | Path = "models", threads: int = 1, n_problems: int = 32, repeats: int = 2,
        batches: Sequence[int] = BATCHES, histories: Sequence[int] = HISTORIES, seed: int = 0,
        which: Sequence[str] = ("prm", "router")) -> dict:
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer

    root = Path(models_dir)
    draft = HFStepGenerator(root / "draft", threads=threads)
    problems = generate_problems(max(n_problems, max(batches)), seed)
    rng = random.Random(seed + 1)
    long = [long_problem(rng, max(histories)) for _ in range(max(batches))]
    drafts, long_drafts = draft_steps(draft, problems), draft_steps(draft, long)
    out = {"threads": threads, "problems": len(problems), "repeats": repeats, "scorers": {}}
    for name in which:
        scorer = load_step_scorer(root / name, threads=threads)
        pair = name == "prm"  # the PRM scores a draft and a target candidate per step
        scorer.score_batch(step_items(problems[0], drafts[0, 0], 0, pair))  # warm-up
        res = {"items_per_session_step": 2 if pair else 1, "trajectory": [], "context": []}
        for kept in ("gold", "draft"):
            for b in batches:
                res["trajectory"].append(bench_trajectories(scorer, problems, drafts, b, pair, repeats,
                                                            f"{name}-t{b}-{kept}", kept))
        for b in batches:
            for h in histories:
                res["context"].append(bench_context(scorer, long, long_drafts, h, b, pair, repeats, f"{name}-c{b}-{h}"))
        res["cache"] = scorer.prefix_cache.info()
        out["scorers"][name] = res
    return out


def print_report(res: dict) -> None:
    print(f"scorer bench: {res['threads']} thread(s), {res['problems']} problems, {res['repeats']} repeats; "
          f"ms = CPU ms of this process (wall ms in brackets)")
    for name, r in res["scorers"].items():
        print(f"\n== {name}: {r['items_per_session_step']} item(s) per session step ==")
        print("trajectory kept   B  calls items |  ms/call uncached        cached |  ms/item uncached        cached "
              "| speedup | after 1st step: ms/item uncached   cached | speedup  max|diff|")
        for t in r["trajectory"]:
            c, i, a = t["ms_per_call"], t["ms_per_item"], t["ms_per_item_after_first_step"]
            print(f"           {t['kept']:>5} {t['batch_sessions']:>3} {t['calls']:>6} {t['items']:>5} | "
                  f"{_ms(c, 'uncached'):>22} {_ms(c, 'cached'):>13} | {_ms(i, 'uncached'):>22} {_ms(i, 'cached'):>13} | "
                  f"{i['cpu']['uncached'] / i['cpu']['cached']:>6.2f}x | {_ms(a, 'uncached'):>31} {_ms(a, 'cached'):>13} | "
                  f"{a['cpu']['uncached'] / a['cpu']['cached']:>6.2f}x  {t['max_abs_diff']:.1e}")
        print("context       B  hist tokens cut |  ms/item uncached        cached  cached, 1 row/fwd "
              "| speedup  max|diff|")
        for t in r["context"]:
            m = t["ms_per_item"]
            print(f"            {t['batch_sessions']:>3} {t['history']:>5} {t['tokens_mean']:>6.0f} {t['truncated_items']:>3} | "
                  f"{_ms(m, 'uncached'):>22} {_ms(m, 'cached'):>13} {_ms(m, 'cached_1_per_forward'):>18} | "
                  f"{m['cpu']['uncached'] / m['cpu']['cached']:>6.2f}x  {t['max_abs_diff']:.1e}")
        print("cache:", json.dumps(r["cache"]))


def _ms(per: dict, name: str) -> str:
    return f"{per['cpu'][name]:.2f} ({per['wall'][name]:.2f})"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", type=int, default=32, help="synthetic problems for the trajectory runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--histories", default=",".join(map(str, HISTORIES)))
    ap.add_argument("--scorers", default="prm,router")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    res = run(args.models, args.threads, args.problems, args.repeats,
              [int(x) for x in args.batches.split(",")], [int(x) for x in args.histories.split(",")],
              args.seed, args.scorers.split(","))
    print(json.dumps(res, indent=2) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_report(res)


if __name__ == "__main__":
    main()
