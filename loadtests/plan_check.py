"""``arbitrage plan check``: the planner against this machine. Start the service, profile it,
measure its capacity (closed loop, many users), then at shares of that capacity predict p95
(the planner's simulation) and measure it (locust, open loop, Poisson arrivals), side by side."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .runner import LocalService, run_locust
from .settings import LoadSettings, Mix

CAPACITY_USERS = 16
# |predicted / measured p95 - 1| a row may be off by and still count as agreeing. The measured
# p95 is one run's percentile of a few hundred requests on a shared machine (its sampling error
# alone is about 10 %), and a plan is a replica count, not a latency: within half either way it
# still sizes pools; beyond that it does not (docs/LOADTEST.md, "Checked against this machine").
P95_ERROR_TOLERANCE = 0.5
# The most of a row's requests that may fail (time out, be refused, be dropped) for the row to
# count as agreeing: its measured p95 is of the successes only, so with more failing it reads low
# (the slowest requests are the ones that hit the deadline), whatever its p95 error.
MAX_FAILED_SHARE = 0.01


def initial_replicas(cfg) -> dict[str, int]:
    """The replicas each configured pool starts with (what the service started here runs): the
    planner's predictions are for that deployment, not one replica a pool."""
    from arbitrage_common.kuberay.sizing import replica_bounds

    return {role: replica_bounds(spec).initial for role, spec in cfg.pools.configured()}


def run_plan_check(config: str | None, policy: str, fractions: list[float], duration_s: float, seed: int,
                   out: Path) -> dict:
    from arbitrage_common.config import default_config, load_config
    from arbitrage_common.planning.planner import calibrate, check_policy, predict
    from arbitrage_common.planning.profile import build_profile, local_cores

    check_policy(policy)  # before the service starts and the models load
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"--fractions: shares of capacity in (0, 1), got {fractions}")
    cfg = load_config(config) if config else default_config()
    replicas = initial_replicas(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # Ray's default metrics export: a 2 s export and a scraper cost this 2-core machine ~2x p95.
    with LocalService(config, out / "service.log", fast_metrics=False) as svc:
        base = LoadSettings(**svc.endpoints, transport="grpc", mix=Mix(policy=policy, seed=seed), timeout_s=120)
        profile = build_profile(cfg, svc.endpoints["host_grpc"], svc.name, policy, 20, seed,
                                cores=local_cores())
        (out / "profile.json").write_text(json.dumps(profile.as_dict(), indent=2))
        sat = run_locust(replace(base, users=CAPACITY_USERS, spawn_rate=CAPACITY_USERS, duration_s=duration_s / 2),
                         out / "capacity", [], False)
        capacity = sat["requests_per_s"]
        fraction_target = sat["target_step_fraction"] or 0.0
        # Calibration: at capacity the cores are saturated, so the profile's (in-process) times are
        # scaled until the model's core load (full-batch cost per request) is 1 at that rate.
        calibrated = with_fraction(calibrate(profile, policy, fraction_target, capacity), fraction_target)
        k = calibrated.measured["scaled_by"]
        rows = []
        for i, share in enumerate(fractions):
            rate = round(share * capacity, 3)
            sim = predict(calibrated, policy, fraction_target, rate, replicas, seed=seed + i)
            raw = predict(profile, policy, fraction_target, rate, replicas, seed=seed + i)
            run = run_locust(replace(base, rate=rate, duration_s=duration_s, mix=Mix(policy=policy, seed=seed + i)),
                             out / f"rate-{share:g}", [], False)
            measured = run["e2e_ms"]["p95"]  # of the requests that succeeded
            error = round(sim.p(95) / measured - 1, 3) if measured else None
            failed = sum(run["failures_by_status"].values())
            # the measured p95 leaves these out: above MAX_FAILED_SHARE the row does not agree
            failed_share = round(failed / run["requests"], 4) if run["requests"] else 0.0
            rows.append({"share_of_capacity": share, "rate_per_s": rate, "requests": run["requests"],
                         "failures": run["failures_by_status"], "failed_share": failed_share,
                         "predicted_p50_ms": round(sim.p(50), 1), "measured_p50_ms": run["e2e_ms"]["p50"],
                         "predicted_p95_ms": round(sim.p(95), 1), "measured_p95_ms": measured,
                         "measured_p95_all_ms": (run.get("e2e_ms_all") or {}).get("p95"),
                         "uncalibrated_predicted_p95_ms": round(raw.p(95), 1),
                         "p95_error": error, "within_tolerance": within_tolerance(error, failed_share)})
    (out / "profile-calibrated.json").write_text(json.dumps(calibrated.as_dict(), indent=2))
    table = {"policy": policy, "capacity_rps": capacity, "capacity_users": CAPACITY_USERS, "calibration_k": round(k, 3),
             "target_step_fraction": fraction_target, "replicas": replicas, "profile": str(out / "profile.json"),
             "p95_error_tolerance": P95_ERROR_TOLERANCE, "max_failed_share": MAX_FAILED_SHARE, "rows": rows}
    (out / "plan_check.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def with_fraction(calibrated, fraction: float):
    """The calibrated profile with the target fraction it was calibrated at (the capacity run's),
    the one-at-a-time measurement kept beside it: planning from it at the measured capacity must
    see a core load of 1, which the profiling's few requests (another fraction) would not give."""
    measured = {**calibrated.measured, "target_fraction": round(fraction, 4),
                "target_fraction_source": f"the capacity run ({CAPACITY_USERS} users)",
                "target_fraction_one_at_a_time": calibrated.measured.get("target_fraction")}
    return replace(calibrated, measured=measured)


def within_tolerance(p95_error: float | None, failed_share: float = 0.0) -> bool | None:
    """Whether a row agrees: its p95 error within ``P95_ERROR_TOLERANCE`` and at most
    ``MAX_FAILED_SHARE`` of its requests failed (False above it, whatever the error); None
    without a measured p95."""
    if failed_share > MAX_FAILED_SHARE:
        return False
    return None if p95_error is None else abs(p95_error) <= P95_ERROR_TOLERANCE


def _failed_share(row: dict) -> float:
    return row.get("failed_share") or 0.0


def verdict(table: dict) -> str:
    """One line on the rows: all within the tolerance, or a warning naming those that are not
    (failed requests or p95 error, and what either means for plans at those loads)."""
    tol = table.get("p95_error_tolerance", P95_ERROR_TOLERANCE)
    most_failed = table.get("max_failed_share", MAX_FAILED_SHARE)
    failing = [r for r in table["rows"] if _failed_share(r) > most_failed]
    off = [r for r in table["rows"] if r not in failing and within_tolerance(r["p95_error"]) is not True]
    if not off and not failing:
        return (f"every row's predicted p95 is within {tol:g} of the measured (|p95_error| <= {tol:g}), with at most "
                f"{most_failed:.0%} of its requests failed")
    parts = []
    if failing:
        named = "; ".join(f"{_where(r)}: {_failed_share(r):.1%} failed ({_counts(r.get('failures'))})"
                          for r in failing)
        parts.append(f"more than {most_failed:.0%} of the requests failed at {named}; the measured p95 leaves them "
                     f"out and reads low, so these rows do not check the prediction (the service could not carry "
                     f"that load within its deadline)")
    if off:
        named = "; ".join(_row_note(r) for r in off)
        parts.append(f"p95_error outside +-{tol:g} at {named}; plans near these loads on this machine are rough "
                     f"(a positive error: the planner buys more than needed; negative: its plan can miss the SLO)")
    return "warning: " + "; and ".join(parts)


def _where(row: dict) -> str:
    return f"{row['share_of_capacity']:g} of capacity ({row['rate_per_s']:g} req/s)"


def _counts(failures: dict | None) -> str:
    return ", ".join(f"{status} {n}" for status, n in (failures or {}).items()) or "by status not recorded"


def _row_note(row: dict) -> str:
    where = _where(row)
    if row["p95_error"] is None:
        return f"{where}: no measured p95 (no request succeeded)"
    return f"{where}: {row['p95_error']:+.2f} (predicted {row['predicted_p95_ms']:g} ms, measured {row['measured_p95_ms']:g} ms)"
