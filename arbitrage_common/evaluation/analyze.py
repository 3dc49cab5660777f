"""`arbitrage analyze`: will Arbitrage pay off for this model pair? From a router dataset
(`router data`, in-process or `--endpoint` against a served preset) it replays RSD at a
set of thresholds and reports how many of its target calls improve nothing, the bound on
the target calls a router could save at the same gains, what a given router realises, and
(with a planner profile) the target-pool GPUs that saves at a load.

A step "improves" when the target's step beats the draft's: by the exact step checker
where the rows have one (synthetic), else by the PRM (PRM(target) - PRM(draft) > 0).
"""
from __future__ import annotations

from collections.abc import Sequence

from . import payoff

RSD_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def improves(row: dict) -> bool:
    if row.get("draft_correct") is not None and row.get("target_correct") is not None:
        return not row["draft_correct"] and row["target_correct"]
    return row["advantage"] > 0


def check_rows(rows: Sequence[dict]) -> None:
    """Rows must say the PRM's score of each draft step: RSD is replayed on it."""
    if not rows:
        raise ValueError("--data: the router dataset is empty")
    missing = sum(r.get("prm_draft") is None for r in rows)
    if missing:
        raise ValueError(f"--data: {missing} of {len(rows)} rows have no prm_draft (the PRM's score of the draft "
                         f"step); collect them again with this version's `router data` (the service sends "
                         f"draft_score on oracle steps)")


def router_calls_for(gains: int, flags: Sequence[bool], scores: Sequence[float]) -> int | None:
    """The fewest steps a router must send to the target, highest scores first, to collect
    ``gains`` improving steps; None if all of them do not."""
    if gains == 0:
        return 0
    found = 0
    for calls, i in enumerate(sorted(range(len(scores)), key=lambda j: -scores[j]), start=1):
        found += flags[i]
        if found >= gains:
            return calls
    return None


def rsd_replay(rows: Sequence[dict], thresholds: Sequence[float] = RSD_THRESHOLDS,
               router_scores: Sequence[float] | None = None) -> list[dict]:
    """At each RSD threshold: its target calls, their waste, the bound on a router's saving
    at the same gains, and (with scores) what that router needs for the same gains."""
    flags = [improves(r) for r in rows]
    table = []
    for tau in thresholds:
        routed = [f for r, f in zip(rows, flags) if r["prm_draft"] < tau]
        gains = sum(routed)
        entry = {"rsd_threshold": tau, "rsd_target_fraction": round(len(routed) / len(rows), 4),
                 "improving_calls": gains, "rsd_waste": payoff.waste(routed),
                 "oracle_target_fraction": round(gains / len(rows), 4),
                 "savings_bound": payoff.savings_bound(payoff.waste(routed))}
        if router_scores is not None:
            calls = router_calls_for(gains, flags, router_scores)
            entry["router_target_fraction"] = None if calls is None else round(calls / len(rows), 4)
            entry["router_saving"] = round(len(routed) / calls, 3) if calls else None
            bound_gap = len(routed) - gains
            entry["realised_share"] = (round((len(routed) - calls) / bound_gap, 3)
                                       if calls is not None and bound_gap > 0 else None)
        table.append(entry)
    return table


def analyze(rows: Sequence[dict], rsd_threshold: float = 0.5, thresholds: Sequence[float] = RSD_THRESHOLDS,
            router_scores: Sequence[float] | None = None) -> dict:
    check_rows(rows)
    taus = sorted({*thresholds, rsd_threshold})
    table = rsd_replay(rows, taus, router_scores)
    headline = next(e for e in table if e["rsd_threshold"] == rsd_threshold)
    checked = sum(r.get("draft_correct") is not None and r.get("target_correct") is not None for r in rows)
    judge = {len(rows): "step checker", 0: "PRM (advantage > 0)"}.get(checked, f"step checker on {checked} rows, "
                                                                           f"PRM (advantage > 0) on the rest")
    out = {"steps": len(rows), "problems": len({r["problem_id"] for r in rows}), "improvement_judged_by": judge,
           "improvable_share": round(sum(map(improves, rows)) / len(rows), 4),
           "headline": headline, "by_rsd_threshold": table,
           "paper": {"rsd_waste": payoff.PAPER_RSD_WASTE, "router_spearman": "-".join(map(str, payoff.PAPER_SPEARMAN))},
           "reading": _reading(headline)}
    if router_scores is not None:
        from .metrics import spearman

        out["router"] = payoff.spearman_note(round(spearman(router_scores, [r["advantage"] for r in rows]), 4))
    return out


def _reading(entry: dict) -> str:
    bound = entry["savings_bound"]
    if bound is None or entry["rsd_waste"] is None:
        return "RSD sends no step to the target at this threshold: nothing to save"
    verdict = "Arbitrage can pay off" if bound >= 1.25 else "little to gain over RSD"
    return (f"{entry['rsd_waste']:.0%} of RSD's target calls improve nothing at threshold {entry['rsd_threshold']}; "
            f"a perfect router would need {bound:.2f}x fewer target calls for the same gains ({verdict})")


def plan_savings(profile, entry: dict, rate: float, slo_ms: float, cfg=None) -> dict:
    """Target-pool replicas (and GPUs, with a preset) that RSD and a router need at ``rate``
    under ``slo_ms``: RSD at its target fraction, the bound at the oracle's, the router at its.
    Each is planned on its own, with its predicted p95 and the planner's warnings
    (``headroom_warning``, ``sampling_warning``, ``stalled_pools``); one that cannot meet the SLO says so
    (``unreachable``) beside the others; ValueError only when none can be planned."""
    from ..planning.planner import Unreachable, gpus_and_pods, plan

    fractions = {"rsd": entry["rsd_target_fraction"], "bound": entry["oracle_target_fraction"]}
    if entry.get("router_target_fraction") is not None:
        fractions["router"] = entry["router_target_fraction"]
    out = {}
    for name, fraction in fractions.items():
        try:
            planned = plan(profile, "rsd" if name == "rsd" else "arbitrage", fraction, rate, slo_ms)
        except Unreachable as exc:
            out[name] = {"target_fraction": fraction, "unreachable": str(exc)}
            continue
        # The plan's own caveats go with it: one without headroom, or with pools more replicas did
        # not help, is no plain saving.
        row = {"target_fraction": fraction, "replicas": planned["replicas"],
               "target_replicas": planned["replicas"].get("target", 0),
               **{k: planned[k] for k in ("predicted_p95_ms", "headroom_warning", "sampling_warning",
                                          "stalled_pools")}}
        if cfg is not None:
            row["target_gpus"] = gpus_and_pods(planned["replicas"], cfg)["gpus_per_pool"].get("target")
        out[name] = row
    planned = [name for name, row in out.items() if "unreachable" not in row]
    if not planned:
        raise ValueError("--slo-ms: neither RSD nor a router can be planned: " + "; ".join(
            f"{name}: {row['unreachable']}" for name, row in out.items()))
    for name in ("bound", "router"):
        if name in planned and "rsd" in planned:  # a saving needs both plans
            out[name]["target_replicas_saved_vs_rsd"] = out["rsd"]["target_replicas"] - out[name]["target_replicas"]
            if cfg is not None and out[name].get("target_gpus") is not None:
                out[name]["target_gpus_saved_vs_rsd"] = round(out["rsd"]["target_gpus"] - out[name]["target_gpus"], 3)
    return {"rate": rate, "slo_p95_ms": slo_ms, **out}
