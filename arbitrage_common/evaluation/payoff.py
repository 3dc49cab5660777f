"""When Arbitrage pays off: the speedup curve over RSD, RSD's waste and the oracle's bound.

Pure arithmetic over sweep points (``SweepPoint``-like: policy, accuracy, latency_s_mean,
target_step_fraction) and over routed steps, so a synthetic run, a real dataset and a
served endpoint are judged by the same numbers.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

PAPER_SPEARMAN = (0.13, 0.17)  # the paper's router Spearman against the oracle advantage
PAPER_RSD_WASTE = 0.60         # about 60% of RSD's regenerations gain nothing (its Appendix A)
TARGET_SLACK = 0.01            # "target accuracy minus one point"


def _reaching(points: Sequence, policy: str, level: float) -> list:
    return [p for p in points if p.policy == policy and p.accuracy >= level - 1e-12]


def cheapest(points: Sequence, policy: str, level: float, cost: str = "latency_s_mean"):
    """The point of ``policy`` with the lowest ``cost`` among those reaching ``level``."""
    ok = _reaching(points, policy, level)
    return min(ok, key=lambda p: getattr(p, cost)) if ok else None


def frontier(points: Sequence, policy: str, cost: str) -> list:
    """``policy``'s points that no cheaper point matches in accuracy, cheapest first."""
    out, best = [], float("-inf")
    for p in sorted((p for p in points if p.policy == policy), key=lambda p: (getattr(p, cost), -p.accuracy)):
        if p.accuracy > best + 1e-12:
            out.append(p)
            best = p.accuracy
    return out


def cost_at(points: Sequence, policy: str, level: float, cost: str = "latency_s_mean") -> float | None:
    """The least ``cost`` at which ``policy`` reaches ``level``, interpolated on its frontier:
    between two thresholds, serving a share of requests at each is an operating point too, so a
    coarse grid does not make a policy pay for the next point up. None past its best point."""
    front = frontier(points, policy, cost)
    for j, p in enumerate(front):
        if p.accuracy >= level - 1e-12:
            if j == 0:
                return getattr(p, cost)
            q = front[j - 1]
            t = (level - q.accuracy) / (p.accuracy - q.accuracy)
            return getattr(q, cost) + t * (getattr(p, cost) - getattr(q, cost))
    return None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def ratio_at(points: Sequence, level: float, upper: str = "arbitrage", base: str = "rsd") -> dict | None:
    """``base`` ÷ ``upper`` at one accuracy level, in latency and in target-step fraction (each
    on its own interpolated frontier, ``cost_at``); the thresholds are each policy's cheapest
    point reaching the level (the ones a wall-clock run confirms). None when either policy
    does not reach the level."""
    lat_b, lat_u = cost_at(points, base, level), cost_at(points, upper, level)
    if lat_b is None or lat_u is None:
        return None
    ts_b = cost_at(points, base, level, "target_step_fraction")
    ts_u = cost_at(points, upper, level, "target_step_fraction")
    return {"accuracy_level": round(level, 4), "latency_ratio": _ratio(lat_b, lat_u),
            "target_steps_ratio": _ratio(ts_b, ts_u),
            f"{base}_threshold": cheapest(points, base, level).threshold,
            f"{upper}_threshold": cheapest(points, upper, level).threshold}


def speedup_curve(points: Sequence, upper: str = "arbitrage", base: str = "rsd") -> list[dict]:
    """The ratios at every accuracy level that both policies reach (the levels are the
    accuracies their points have), lowest level first. Levels within one point of the draft's
    own accuracy are left out: there hardly a target call is worth paying for, and the ratio
    would compare the grids' lowest thresholds or one lucky problem."""
    return [r for r in (ratio_at(points, level, upper, base) for level in curve_levels(points, upper, base))
            if r is not None]


def curve_levels(points: Sequence, upper: str = "arbitrage", base: str = "rsd") -> list[float]:
    """The (unrounded) accuracy levels of ``speedup_curve``."""
    tops = [max((p.accuracy for p in points if p.policy == name), default=None) for name in (base, upper)]
    if None in tops:
        return []
    top = min(tops)
    draft = _single(points, "draft")
    floor = draft.accuracy + TARGET_SLACK if draft is not None else float("-inf")
    return sorted({p.accuracy for p in points if p.policy in (base, upper) and floor + 1e-12 < p.accuracy <= top + 1e-12})


def _single(points: Sequence, policy: str):
    return next((p for p in points if p.policy == policy), None)


def speedup_summary(points: Sequence, upper: str = "arbitrage", base: str = "rsd") -> dict:
    """The paper's "up to" (the maximum over the curve), the ratio at target accuracy minus
    one point, and at the midpoint between the draft's and the target's accuracy."""
    curve = speedup_curve(points, upper, base)
    best = max((r for r in curve if r["latency_ratio"] is not None), key=lambda r: r["latency_ratio"], default=None)
    best_steps = max((r for r in curve if r["target_steps_ratio"] is not None),
                     key=lambda r: r["target_steps_ratio"], default=None)
    draft, target = _single(points, "draft"), _single(points, "target")
    out = {"curve": curve, "max_latency_ratio": best, "max_target_steps_ratio": best_steps,
           "at_target_minus_1pt": None, "at_midpoint": None}
    if target is not None:
        out["at_target_minus_1pt"] = ratio_at(points, target.accuracy - TARGET_SLACK, upper, base)
    if target is not None and draft is not None:
        out["at_midpoint"] = ratio_at(points, (draft.accuracy + target.accuracy) / 2, upper, base)
    return out


def oracle_bound(points: Sequence, levels: Iterable[float]) -> list[dict]:
    """At each level that RSD, the oracle and Arbitrage all reach (fewest target steps each,
    interpolated on each frontier):
    the oracle's target-step saving over RSD and the share of it Arbitrage realises,
    (RSD - Arbitrage) / (RSD - oracle)."""
    out = []
    for level in levels:
        rsd, ora, arb = (cost_at(points, name, level, "target_step_fraction") for name in ("rsd", "oracle", "arbitrage"))
        if rsd is None or ora is None or arb is None:
            continue
        gap = rsd - ora
        out.append({"accuracy_level": round(level, 4), "rsd_target_fraction": round(rsd, 4),
                    "oracle_target_fraction": round(ora, 4), "arbitrage_target_fraction": round(arb, 4),
                    "oracle_target_steps_ratio": _ratio(rsd, ora),
                    "realised_share": round((rsd - arb) / gap, 3) if gap > 1e-9 else None})
    return out


def bound_summary(points: Sequence) -> dict:
    """The oracle bound over the levels of the speedup curve, and at its headline levels."""
    summary = speedup_summary(points)
    levels = curve_levels(points)  # unrounded: a rounded-up level is one its own point misses
    table = oracle_bound(points, levels)
    best = max((r for r in table if r["oracle_target_steps_ratio"] is not None),
               key=lambda r: r["oracle_target_steps_ratio"], default=None)
    at_max = None
    if summary["max_latency_ratio"] is not None:
        shown = summary["max_latency_ratio"]["accuracy_level"]
        level = min(levels, key=lambda x: abs(x - shown))
        at_max = next(iter(oracle_bound(points, [level])), None)
    # Pooled over the levels, weighted by the oracle's saving there: a level where the oracle
    # saves almost nothing would otherwise swing a plain mean of shares by any amount.
    gaps = [(r["rsd_target_fraction"] - r["arbitrage_target_fraction"],
             r["rsd_target_fraction"] - r["oracle_target_fraction"]) for r in table if r["realised_share"] is not None]
    pooled = sum(g for g, _ in gaps) / sum(b for _, b in gaps) if gaps else None
    return {"table": table, "max_oracle_saving": best, "at_max_latency_ratio": at_max,
            "realised_share_pooled": None if pooled is None else round(pooled, 3)}


def waste(improved: Sequence[bool]) -> float | None:
    """The share of target calls that did not improve the step."""
    return round(1 - sum(improved) / len(improved), 4) if improved else None


def savings_bound(waste_share: float | None) -> float | None:
    """A router that calls the target only where it improves the step keeps RSD's gains with
    (1 - waste) of its target calls: the bound on its target-call saving over RSD."""
    if waste_share is None or waste_share >= 1:
        return None
    return round(1 / (1 - waste_share), 3)


def spearman_note(rho: float | None) -> dict:
    lo, hi = PAPER_SPEARMAN
    return {"spearman": rho, "paper": f"{lo}-{hi}", "beats_paper": None if rho is None else rho > hi}
