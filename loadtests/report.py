"""summary.json and report.html of a load run, from the per-request records and the pool
timeline: what GuideLLM and ``vllm bench serve`` report, in steps (TTFS for TTFT, time per step
for ITL), plus goodput under an SLO and the pools' replicas, queues and batch sizes over time."""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path

from .records import Record

PERCENTILES = (50, 95, 99)
# What each end-to-end distribution counts, in the summary beside its figures: ``e2e_ms`` leaves
# failures out, which a deadline-bound run's p95 hides behind; ``e2e_ms_all`` keeps them.
E2E_OF = "succeeded requests only (failures left out: see e2e_ms_all)"
E2E_ALL_OF = ("every request sent, a failed one at the time it took (DROPPED, never sent, left out; a fast refusal "
              "counts low)")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    out = {f"p{q}": (round(v, 2) if (v := percentile(values, q)) is not None else None) for q in PERCENTILES}
    out["mean"] = round(sum(values) / len(values), 2) if values else None
    out["n"] = len(values)
    return out


def records_window_s(recs: list[Record]) -> float:
    """Seconds from the first request's start to the last one's end (0 for no records)."""
    if not recs:
        return 0.0
    return max(r.start_s + r.e2e_ms / 1000.0 for r in recs) - min(r.start_s for r in recs)


def summarize(recs: list[Record], duration_s: float, slo_ms: float | None, timeline: list[dict] | None,
              settings: dict) -> dict:
    """The run's figures; ``timeline`` None when no pool metrics were sampled (no ``--metrics``):
    ``pools_over_time`` and ``proposal_tokens_kept`` are then null, not empty (none ran)."""
    ok = [r for r in recs if r.ok]
    statuses = Counter(r.status for r in recs)
    steps = sum(r.steps for r in ok)
    per_step = [g for r in ok for g in r.step_ms] or [r.e2e_ms / r.steps for r in ok if r.steps]
    within = [r for r in ok if slo_ms is None or r.e2e_ms <= slo_ms]
    graded = [r for r in ok if r.correct is not None]
    return {
        "settings": settings,
        "duration_s": round(duration_s, 2),
        "requests": len(recs),
        "succeeded": len(ok),
        "failures_by_status": {k: v for k, v in sorted(statuses.items()) if k != "OK"},
        "requests_per_s": round(len(ok) / duration_s, 3) if duration_s > 0 else None,
        "e2e_ms": {**_dist([r.e2e_ms for r in ok]), "of": E2E_OF},
        "e2e_ms_all": {**_dist([r.e2e_ms for r in recs if r.status != "DROPPED"]), "of": E2E_ALL_OF},
        "ttfs_ms": _dist([r.ttfs_ms for r in ok if r.ttfs_ms is not None]),
        "time_per_step_ms": _dist(per_step),
        "time_per_step_source": "gaps between streamed steps" if any(r.step_ms for r in ok)
                                else "end-to-end / steps (unary calls)",
        "steps_per_request": round(steps / len(ok), 2) if ok else None,
        "target_step_fraction": round(sum(r.target_steps for r in ok) / steps, 4) if steps else None,
        # Of the answered requests whose reply carried the problem's answer (or none: wrong);
        # failures are counted above, apart.
        "accuracy": round(sum(bool(r.correct) for r in graded) / len(graded), 4) if graded else None,
        "threshold_used": _dist([r.threshold for r in ok if r.threshold is not None]),
        "slo_ms": slo_ms,
        "goodput": round(len(within) / len(recs), 4) if recs else None,
        "goodput_requests_per_s": round(len(within) / duration_s, 3) if duration_s > 0 else None,
        "proposal_tokens_kept": None if timeline is None else proposal_tokens_kept(timeline),
        "pools_over_time": timeline,
    }


def proposal_tokens_kept(timeline: list[dict]) -> dict[str, float]:
    """Per pool that verified proposals during the run: the fraction of proposal tokens kept."""
    totals: dict[str, list[float]] = {}
    for row in timeline:
        for pool, figures in row["pools"].items():
            if figures.get("proposal_tokens"):
                t = totals.setdefault(pool, [0.0, 0.0])
                t[0] += figures["proposal_tokens"]["proposed"]
                t[1] += figures["proposal_tokens"]["accepted"]
    return {pool: round(accepted / proposed, 4) for pool, (proposed, accepted) in sorted(totals.items())}


def pool_metrics_note(timeline: list[dict] | None, urls: list[str], repeats: int = 0,
                      unreachable: dict[str, str] | None = None) -> str | None:
    """What a reader of ``pools_over_time`` must know, or None: that no metrics were sampled
    (and how to sample them), that a URL was never reached (``unreachable``: URL -> why), that
    no sample held a pool, or that samples repeating the previous export were left out (Ray
    exports every 10 s unless told otherwise)."""
    if timeline is None:
        return ("pool metrics (pools_over_time, proposal_tokens_kept) were not sampled: pass --metrics URL, the "
                "Prometheus endpoint `arbitrage serve` prints")
    if unreachable:
        named = "; ".join(f"{url} ({why})" for url, why in unreachable.items())
        what = ("no pool metrics were sampled" if set(unreachable) >= set(urls)
                else "the pools it exports are missing from pools_over_time")
        return (f"--metrics: never answered with metrics during the run: {named}; {what} (is it the Prometheus "
                f"endpoint `arbitrage serve` prints?)")
    if not any(row["pools"] for row in timeline):
        return (f"--metrics {' '.join(urls)}: no sample held a pool's metrics (is it the service's Ray metrics "
                f"export, and --app its application?)")
    if repeats:
        return (f"{repeats} sample(s) repeated the service's previous metrics export and were left out: its Ray "
                f"exports every 10 s by default; start it with `arbitrage serve --metrics-interval-s 2` for 2 s")
    return None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _charts(recs: list[Record], timeline: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    ok = [r for r in recs if r.ok]
    if ok:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.scatter([r.start_s for r in ok], [r.e2e_ms for r in ok], s=6, label="end-to-end")
        ttfs = [r for r in ok if r.ttfs_ms is not None]
        if ttfs:
            ax.scatter([r.start_s for r in ttfs], [r.ttfs_ms for r in ttfs], s=6, label="TTFS")
        ax.set_xlabel("request start (s)")
        ax.set_ylabel("ms")
        ax.legend()
        charts.append(("Latency of each request", _png(fig)))
        plt.close(fig)
    if timeline:
        for key, title in (("replicas", "Healthy replicas per pool"), ("queued", "Queued calls per pool"),
                           ("batch_size", "Mean batch size per pool")):
            fig, ax = plt.subplots(figsize=(7, 2.6))
            pools = sorted({p for row in timeline for p in row["pools"]})
            for pool in pools:
                pts = [(row["t"], row["pools"][pool][key]) for row in timeline
                       if pool in row["pools"] and row["pools"][pool][key] is not None]
                if pts:
                    ax.step([t for t, _ in pts], [v for _, v in pts], where="post", label=pool)
            ax.set_xlabel("s since the run started")
            ax.legend(fontsize=7, ncol=5)
            charts.append((title, _png(fig)))
            plt.close(fig)
    return charts


def _table(summary: dict) -> str:
    rows = []
    for key in ("requests", "succeeded", "requests_per_s", "steps_per_request", "target_step_fraction", "accuracy",
                "proposal_tokens_kept", "slo_ms", "goodput", "goodput_requests_per_s", "pool_metrics_note"):
        rows.append(f"<tr><th>{key}</th><td>{html.escape(str(summary.get(key)))}</td></tr>")
    for key in ("e2e_ms", "e2e_ms_all", "ttfs_ms", "time_per_step_ms"):
        d = summary.get(key)
        if d is None:
            continue
        of = f" · {html.escape(d['of'])}" if d.get("of") else ""
        rows.append(f"<tr><th>{key}</th><td>p50 {d['p50']} · p95 {d['p95']} · p99 {d['p99']} · mean {d['mean']} "
                    f"(n={d['n']}){of}</td></tr>")
    rows.append(f"<tr><th>failures by status</th><td>{html.escape(json.dumps(summary['failures_by_status']))}"
                f"</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def write_report(out: Path, recs: list[Record], summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    charts = _charts(recs, summary["pools_over_time"])
    imgs = "".join(f"<h3>{html.escape(t)}</h3><img src='data:image/png;base64,{b}'>" for t, b in charts)
    settings = html.escape(json.dumps(summary["settings"], indent=1))
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Arbitrage Serve load test</title>"
        "<style>body{font-family:sans-serif;max-width:60em}th{text-align:left;padding-right:1em}</style>"
        f"<h1>Arbitrage Serve load test</h1><pre>{settings}</pre>{_table(summary)}{imgs}")
