"""`arbitrage bench --endpoint`: the same sweep against a running service over gRPC.

No memoization here: every point is real requests, so latency is end-to-end wall time
as clients see it. Keep ``n`` small; the matched rule is the in-process bench's.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from ..client import Client, build_request
from ..synthetic import Problem, generate_problems, grade_answer
from .sweep import DEFAULT_GRID, MAX_STEPS, SweepPoint, curve_dominance, matched_comparison


def _point(client: Client, policy: str, threshold: float | None, problems: Sequence[Problem]) -> SweepPoint:
    correct = kept = drafted = target_steps = steps = 0
    seconds = 0.0
    for i, p in enumerate(problems):
        request = build_request(p.prompt, policy, max_steps=MAX_STEPS, request_id=f"bench-{policy}-{i}",
                                threshold=threshold)
        t0 = time.perf_counter()
        reply = client.generate(request)
        seconds += time.perf_counter() - t0
        correct += grade_answer(p, reply.text)
        kept += reply.usage.draft_tokens_kept
        drafted += reply.usage.draft_tokens_kept + reply.usage.draft_tokens_discarded
        target_steps += reply.usage.target_steps
        steps += len(reply.steps)
    return SweepPoint(policy, threshold, correct / len(problems), kept / drafted if drafted else 0.0,
                      target_steps / steps if steps else 0.0, seconds / len(problems), len(problems))


def run_remote_bench(endpoint: str, n: int, seed: int, app: str | None = None, grid: dict | None = None,
                     show_progress: bool = True) -> dict:
    from tqdm import tqdm

    grid = grid or DEFAULT_GRID
    problems = generate_problems(n, seed)
    jobs = [(policy, t) for policy, ts in grid.items() for t in ts]
    with Client(endpoint, app) as client:
        points = [_point(client, policy, t, problems)
                  for policy, t in tqdm(jobs, desc="sweep", unit="point", disable=not show_progress)]
    return {"n": n, "seed": seed, "endpoint": endpoint, "points": [p.as_dict() for p in points],
            "matched": matched_comparison(points),
            "curves": [curve_dominance(points, "arbitrage", "rsd"), curve_dominance(points, "oracle", "arbitrage")],
            "latency_note": "every point is real gRPC requests, one at a time: end-to-end wall time"}
