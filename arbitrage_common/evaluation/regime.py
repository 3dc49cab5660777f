"""`arbitrage regime-map`: where does Arbitrage pay off? One sweep per cell of problem mixes x
PRM kinds x router kinds, on the one evaluation stack, then a table and a PNG of the maximum
latency ratio over RSD and the ratio at target accuracy minus one point, with RSD's waste.

A cell's RSD waste is the waste of the RSD point that reaches the midpoint between the
draft's and the target's accuracy (where the paper finds the gains), else the waste pooled
over every RSD point.
"""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .payoff import PAPER_RSD_WASTE


@dataclass(frozen=True)
class Cell:
    prm_kind: str
    router_kind: str
    prm: str      # checkpoint dirs, relative to the models dir
    router: str


# The bundled checkpoints (models/README.md). RSD's PRM and the router start from the same
# model in every cell, as in the paper.
CELLS = (
    Cell("independent", "classifier", "prm-independent", "router-independent"),
    Cell("self-verifier", "verifier-head", "prm", "router"),
    Cell("self-verifier", "classifier", "prm", "router-classifier"),
)
TINY_GRID = {"draft": [None], "target": [None], "rsd": [0.5, 0.9], "arbitrage": [0.5, 0.2], "oracle": [0.0]}
REGIME_MARKER = "regime.json"  # in every directory `regime-map` writes
COLUMNS = ["mix", "prm", "router", "draft_accuracy", "target_accuracy", "rsd_waste", "max_latency_ratio",
           "max_ratio_accuracy", "ratio_at_target_minus_1pt", "ratio_at_midpoint", "max_target_steps_ratio",
           "oracle_max_saving", "realised_share_at_max", "realised_share_pooled", "router_spearman"]


def cell_waste(result: dict) -> float | None:
    mid = (result.get("rsd_waste") or {}).get("at_midpoint")
    if mid and mid.get("waste") is not None:
        return mid["waste"]
    rsd = [w for w in result["waste_by_point"] if w["policy"] == "rsd" and w["waste"] is not None]
    calls = sum(w["target_calls_judged"] for w in rsd)
    return round(sum(w["waste"] * w["target_calls_judged"] for w in rsd) / calls, 4) if calls else None


def _get(d: dict | None, *keys):
    for key in keys:
        if d is None:
            return None
        d = d.get(key)
    return d


def cell_row(mix: str, cell: Cell, result: dict) -> dict:
    acc = {p["policy"]: p["accuracy"] for p in result["points"] if p["policy"] in ("draft", "target")}
    s = result["speedup"]
    return {"mix": mix, "prm": cell.prm_kind, "router": cell.router_kind,
            "draft_accuracy": acc.get("draft"), "target_accuracy": acc.get("target"),
            "rsd_waste": cell_waste(result),
            "max_latency_ratio": _get(s, "max_latency_ratio", "latency_ratio"),
            "max_ratio_accuracy": _get(s, "max_latency_ratio", "accuracy_level"),
            "ratio_at_target_minus_1pt": _get(s, "at_target_minus_1pt", "latency_ratio"),
            "ratio_at_midpoint": _get(s, "at_midpoint", "latency_ratio"),
            "max_target_steps_ratio": _get(s, "max_target_steps_ratio", "target_steps_ratio"),
            "oracle_max_saving": _get(result, "oracle_bound", "max_oracle_saving", "oracle_target_steps_ratio"),
            "realised_share_at_max": _get(result, "oracle_bound", "at_max_latency_ratio", "realised_share"),
            "realised_share_pooled": _get(result, "oracle_bound", "realised_share_pooled"),
            "router_spearman": _get(result, "router", "spearman")}


def closest_to_paper(rows: list[dict]) -> dict | None:
    """The cell whose RSD waste is closest to the paper's 60%."""
    judged = [r for r in rows if r["rsd_waste"] is not None]
    return min(judged, key=lambda r: abs(r["rsd_waste"] - PAPER_RSD_WASTE)) if judged else None


def run_regime_map(out_dir: str | Path, n: int, seed: int, mixes: tuple[str, ...], models_dir: str | Path = "models",
                   grid: dict | None = None, confirm_n: int = 0, show_progress: bool = True) -> dict:
    """Every cell whose checkpoints exist; the draft and target calls of a mix are computed once
    and shared by its cells (memoized, greedy). ``out_dir`` is checked before any work and only
    this command's files in it are replaced (``stack.publish``)."""
    from .stack import BENCH_MARKER, check_out_dir, publish, temp_dir_for

    root, out = Path(models_dir), Path(out_dir)
    check_out_dir(out, REGIME_MARKER)  # before any work: a file, or a directory of the user's, is refused
    present = [c for c in CELLS if (root / c.prm).is_dir() and (root / c.router).is_dir()]
    skipped = [{"prm": c.prm_kind, "router": c.router_kind, "reason": f"{root / c.router} or {root / c.prm} missing"}
               for c in CELLS if c not in present]
    if not present:
        raise ValueError(f"--models-dir: {root} holds no PRM/router pair of the map ({', '.join(c.router for c in CELLS)})")
    for mix in mixes:  # an earlier run's cell directories are replaced the same way: only bench's files
        for cell in present:
            check_out_dir(out / cell_dir(mix, cell), BENCH_MARKER)
    tmp = temp_dir_for(out)
    try:
        summary = _run_cells(tmp, root, present, skipped, n, seed, mixes, grid, confirm_n, show_progress)
        publish(tmp, out, REGIME_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted run leaves nothing behind
    return summary


def cell_dir(mix: str, cell: Cell) -> str:
    return f"{mix}-{cell.prm_kind}-{cell.router_kind}"


def _run_cells(tmp: Path, root: Path, present: list[Cell], skipped: list[dict], n: int, seed: int,
               mixes: tuple[str, ...], grid: dict | None, confirm_n: int, show_progress: bool) -> dict:
    """Every cell's sweep, written under ``tmp`` with the table, the plot and regime.json."""
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer
    from .runners import InProcessRunner, generation_caches
    from .stack import run_sweep, write_outputs
    from .tasks import SyntheticTask

    rows = []
    generators = {role: HFStepGenerator(root / role, threads=1) for role in ("draft", "target")}
    loaded: dict[str, object] = {}  # a checkpoint two cells share (the self-verifier PRM) loads once

    def scorer(name: str):
        if name not in loaded:
            loaded[name] = load_step_scorer(root / name, threads=1)
        return loaded[name]

    scorers = {c: {"prm": scorer(c.prm), "router": scorer(c.router)} for c in present}
    for mix in mixes:
        task, shared = SyntheticTask(n, seed, mix), generation_caches(generators)
        for cell in present:
            backends = {**generators, **scorers[cell]}
            result, points, _ = run_sweep(task, InProcessRunner(backends, shared), grid, confirm_n, show_progress)
            name = cell_dir(mix, cell)
            write_outputs(points, tmp / name, result)
            rows.append({**cell_row(mix, cell, result), "dir": name})
    summary = {"n": n, "seed": seed, "mixes": list(mixes), "cells": rows, "skipped": skipped,
               "closest_to_paper_waste": closest_to_paper(rows), "paper_rsd_waste": PAPER_RSD_WASTE,
               "waste_rule": "RSD waste at the RSD point reaching the draft/target accuracy midpoint "
                             "(else pooled over RSD points); a step improves when the target's step is "
                             "right where the draft's is wrong (the exact step checker)"}
    _write_table(rows, tmp / "regime.csv")
    _write_plot(rows, tmp / "regime_map.png")
    summary["files"] = ["regime.csv", "regime_map.png", REGIME_MARKER, *[r["dir"] for r in rows]]
    (tmp / REGIME_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_table(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['mix']}\n{r['prm']}\n{r['router']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.8))
    width = 0.38
    for offset, key, label in ((-width / 2, "max_latency_ratio", "max ratio (up to)"),
                               (width / 2, "ratio_at_target_minus_1pt", "at target - 1pt")):
        ax.bar([x + offset for x in xs], [r[key] or 0 for r in rows], width, label=label)
    for x, r in zip(xs, rows):
        waste = "n/a" if r["rsd_waste"] is None else f"{r['rsd_waste']:.0%}"
        ax.annotate(f"waste {waste}", (x, max(r["max_latency_ratio"] or 0, r["ratio_at_target_minus_1pt"] or 0)),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("latency ratio RSD / Arbitrage")
    ax.set_title("When does Arbitrage pay off (RSD waste annotated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
