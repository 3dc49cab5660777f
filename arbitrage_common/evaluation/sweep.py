"""Threshold sweeps of the routing policies over the step loop, and the matched-accuracy rule."""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..accounting import LoopResult
from ..loop import LoopRequest, Models, run_loop
from ..policies import make_policy
from ..synthetic import Problem, grade_answer
from .memo import Charge

DEFAULT_GRID = {
    "draft": [None],
    "target": [None],
    "rsd": [0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995],
    "arbitrage": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98],
    "oracle": [-0.5, -0.2, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98, 0.99],
}
MATCH_SLACK = 0.01  # matched level = the target's accuracy minus one point
MAX_STEPS = 12


@dataclass
class SweepPoint:
    policy: str
    threshold: float | None
    accuracy: float
    acceptance_rate: float
    target_step_fraction: float
    latency_s_mean: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(policy: str, threshold: float | None, problems: Sequence[Problem],
              results: Sequence[LoopResult], latencies: Sequence[float]) -> SweepPoint:
    kept = sum(r.usage.draft_tokens_kept for r in results)
    drafted = kept + sum(r.usage.draft_tokens_discarded for r in results)
    target_steps = sum(r.usage.steps_by_source.get("target", 0) for r in results)
    steps = sum(len(r.steps) for r in results)
    return SweepPoint(
        policy=policy, threshold=threshold,
        accuracy=sum(grade_answer(p, r.text) for p, r in zip(problems, results)) / len(results),
        acceptance_rate=kept / drafted if drafted else 0.0,
        target_step_fraction=target_steps / steps if steps else 0.0,
        latency_s_mean=sum(latencies) / len(latencies), n=len(results))


def run_memo_point(policy: str, threshold: float | None, problems: Sequence[Problem], caches: dict) -> tuple[SweepPoint, list[LoopResult]]:
    """One sweep point on memoized models; latency = measured seconds of the calls made."""
    async def one(i: int, p: Problem) -> tuple[LoopResult, float]:
        charge = Charge()
        models = Models(**{role: cache.view(charge) for role, cache in caches.items()})
        req = LoopRequest(p.prompt, make_policy(policy, threshold, seed=i), max_steps=MAX_STEPS)
        return await run_loop(req, models), charge.seconds

    async def all_() -> list[tuple[LoopResult, float]]:
        return [await one(i, p) for i, p in enumerate(problems)]  # sequential: caches are not shared-safe

    pairs = asyncio.run(all_())
    results = [r for r, _ in pairs]
    return summarize(policy, threshold, problems, results, [s for _, s in pairs]), results


def cheapest_reaching(points: Sequence[SweepPoint], policy: str, level: float) -> SweepPoint | None:
    ok = [p for p in points if p.policy == policy and p.accuracy >= level - 1e-12]
    return min(ok, key=lambda p: p.latency_s_mean) if ok else None


def _matched_at(points: Sequence[SweepPoint], level: float, rule: str) -> dict:
    rsd, arb = cheapest_reaching(points, "rsd", level), cheapest_reaching(points, "arbitrage", level)
    out = {"rule": rule, "accuracy_level": round(level, 4), "rsd": rsd.as_dict() if rsd else None,
           "arbitrage": arb.as_dict() if arb else None,
           "latency_ratio_rsd_over_arbitrage": None, "target_steps_ratio_rsd_over_arbitrage": None}
    if rsd and arb:
        out["latency_ratio_rsd_over_arbitrage"] = round(rsd.latency_s_mean / arb.latency_s_mean, 3)
        if arb.target_step_fraction > 0:
            out["target_steps_ratio_rsd_over_arbitrage"] = round(rsd.target_step_fraction / arb.target_step_fraction, 3)
    return out


def matched_comparison(points: Sequence[SweepPoint]) -> dict:
    """Matched accuracy = the target alone minus MATCH_SLACK (the promise of speculative
    reasoning: the target's quality for less); for each policy the cheapest (lowest mean
    latency) threshold reaching it. The best-RSD rule (best RSD accuracy minus MATCH_SLACK) is
    reported beside it as ``best_rsd_rule``: a maximum over many noisy points, it moves with
    every lucky RSD point. Without a target point, the best-RSD rule is the rule."""
    rsd_best = max(p.accuracy for p in points if p.policy == "rsd")
    best_rsd = _matched_at(points, rsd_best - MATCH_SLACK, f"best RSD accuracy ({rsd_best:.3f}) minus {MATCH_SLACK}; "
                                                           f"cheapest point per policy reaching it")
    target = next((p for p in points if p.policy == "target"), None)
    if target is None:
        return best_rsd
    out = _matched_at(points, target.accuracy - MATCH_SLACK, f"target-only accuracy ({target.accuracy:.3f}) minus "
                                                             f"{MATCH_SLACK}; cheapest point per policy reaching it")
    out["best_rsd_rule"] = best_rsd
    return out


def curve_dominance(points: Sequence[SweepPoint], upper: str, lower: str, slack: float = 0.005) -> dict:
    """Is ``upper``'s accuracy-vs-target-fraction curve at or above ``lower``'s?

    For every point of ``lower``, the best accuracy ``upper`` reaches with no larger target
    step fraction must be at least as high (within ``slack``)."""
    ups = [p for p in points if p.policy == upper]
    checks = []
    for q in (p for p in points if p.policy == lower):
        best = max((p.accuracy for p in ups if p.target_step_fraction <= q.target_step_fraction + 1e-9), default=None)
        checks.append(best is not None and best >= q.accuracy - slack)
    return {"upper": upper, "lower": lower, "points_checked": len(checks), "points_at_or_above": sum(checks),
            "at_or_above": all(checks)}
