"""Sweep points of the routing policies, the matched-accuracy rule and curve dominance."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .payoff import cheapest

DEFAULT_GRID = {
    "draft": [None],
    "target": [None],
    # Dense where scores crowd (an independent PRM's sit near 1; routers' near 0), so a level
    # is not reached by one policy only because its grid jumps past it.
    "rsd": [0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9,
            0.925, 0.95, 0.965, 0.98, 0.99, 0.995],
    "arbitrage": [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8,
                  0.9, 0.95, 0.98, 0.99],
    # tau = 0 is the paper's oracle (keep the target's step when it scores higher); just below
    # 0 it also routes the ties, where the target wrote the draft's text.
    "oracle": [-0.5, -0.2, -0.01, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98, 0.99],
}
MATCH_SLACK = 0.01  # matched level = the target's accuracy minus one point


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


def summarize(policy: str, threshold: float | None, traces: Sequence, correct: Sequence[bool]) -> SweepPoint:
    """One point from a run's traces (``runners.Trace``) and their grades."""
    kept = sum(t.draft_tokens_kept for t in traces)
    drafted = kept + sum(t.draft_tokens_discarded for t in traces)
    target_steps = sum(t.target_steps for t in traces)
    steps = sum(len(t.steps) for t in traces)
    return SweepPoint(
        policy=policy, threshold=threshold, accuracy=sum(correct) / len(traces),
        acceptance_rate=kept / drafted if drafted else 0.0,
        target_step_fraction=target_steps / steps if steps else 0.0,
        latency_s_mean=sum(t.seconds for t in traces) / len(traces), n=len(traces))


def cheapest_reaching(points: Sequence[SweepPoint], policy: str, level: float) -> SweepPoint | None:
    return cheapest(points, policy, level)


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
