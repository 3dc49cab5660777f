"""CSV and PNG outputs of a sweep."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .sweep import SweepPoint

FIELDS = ["policy", "threshold", "accuracy", "acceptance_rate", "target_step_fraction", "latency_s_mean", "n"]
PLOTS = {
    "accuracy_vs_acceptance.png": ("acceptance_rate", "acceptance rate (kept draft tokens / draft tokens)"),
    "accuracy_vs_target_fraction.png": ("target_step_fraction", "fraction of steps written by the target"),
    "accuracy_vs_latency.png": ("latency_s_mean", "mean latency per problem (s)"),
}
STYLE = {"rsd": "o-", "arbitrage": "s-", "oracle": "^--", "random": "x:", "draft": "k*", "target": "r*"}


def write_csv(points: Sequence[SweepPoint], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for p in points:
            writer.writerow(p.as_dict())


def write_plots(points: Sequence[SweepPoint], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (field, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for policy in dict.fromkeys(p.policy for p in points):
            pts = sorted((p for p in points if p.policy == policy), key=lambda p: getattr(p, field))
            ax.plot([getattr(p, field) for p in pts], [p.accuracy for p in pts], STYLE.get(policy, ".-"), label=policy)
        ax.set_xlabel(label)
        ax.set_ylabel("final accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_speedup_plot(speedup: dict, out_dir: Path, name: str = "speedup_vs_accuracy.png") -> str:
    """RSD ÷ Arbitrage (latency and target steps) against the accuracy level both reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = speedup["curve"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, style, label in (("latency_ratio", "o-", "latency"), ("target_steps_ratio", "s--", "target steps")):
        pts = [(r["accuracy_level"], r[key]) for r in curve if r[key] is not None]
        ax.plot([a for a, _ in pts], [v for _, v in pts], style, label=f"{label}: RSD / Arbitrage")
    ax.axhline(1.0, color="grey", lw=0.8)
    for key, color in (("at_target_minus_1pt", "red"), ("at_midpoint", "green")):
        if speedup.get(key):
            ax.axvline(speedup[key]["accuracy_level"], color=color, lw=0.8, ls=":", label=key.replace("_", " "))
    ax.set_xlabel("accuracy level reached by both")
    ax.set_ylabel("ratio (higher: Arbitrage cheaper)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name
