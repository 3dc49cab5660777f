"""The one evaluation stack: a task's threshold sweep on a runner, then the matched comparison,
the speedup curve, RSD's waste, the oracle bound and the router's Spearman, the same way for
the synthetic mixes and the real datasets, in-process or against an endpoint."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from . import payoff
from .plots import write_csv, write_plots, write_speedup_plot
from .sweep import DEFAULT_GRID, SweepPoint, curve_dominance, matched_comparison, summarize
from .tasks import Task

ROUTING = ("rsd", "arbitrage", "oracle")  # the policies whose target calls can be wasted


def step_outcomes(task: Task, runner, traces: Sequence) -> list[bool]:
    """For each step a policy sent to the target: did the target's step improve on the draft's?
    The task's step checker decides where it has one, else the runner's PRM; steps neither can
    judge are left out."""
    improved = []
    for problem, trace in zip(task.problems, traces):
        history: list[tuple[str, str]] = []
        for step in trace.steps:
            if step.source == "target" and step.discarded_draft_text is not None:
                texts = [text for text, _ in history]
                verdict = task.step_improved(problem, texts, step.discarded_draft_text, step.text)
                if verdict is None:
                    verdict = runner.prm_improved(problem, history, step.discarded_draft_text, step.text)
                if verdict is not None:
                    improved.append(verdict)
            history.append((step.text, step.source))
    return improved


def _waste_at(points: Sequence[SweepPoint], wastes: dict, entry: dict | None) -> dict | None:
    """RSD's waste at the RSD point a speedup entry picked."""
    if entry is None:
        return None
    key = ("rsd", entry["rsd_threshold"])
    return {"accuracy_level": entry["accuracy_level"], "rsd_threshold": entry["rsd_threshold"],
            "waste": wastes.get(key, {}).get("waste")}


def payoff_report(points: Sequence[SweepPoint], wastes: dict) -> dict:
    """Speedup curve, RSD waste at its headline levels, oracle bound (see ``payoff``)."""
    speedup = payoff.speedup_summary(points)
    return {
        "speedup": speedup,
        "rsd_waste": {name: _waste_at(points, wastes, speedup[name])
                      for name in ("max_latency_ratio", "at_target_minus_1pt", "at_midpoint")},
        "oracle_bound": payoff.bound_summary(points),
    }


def run_sweep(task: Task, runner, grid: dict | None = None, confirm_n: int | None = None,
              show_progress: bool = True) -> tuple[dict, list[SweepPoint], list[dict]]:
    """(result, points, answers) for ``task`` on ``runner`` (``runners.InProcessRunner`` or
    ``runners.EndpointRunner``)."""
    grid = grid or DEFAULT_GRID
    runner.warm_up(task)
    points, answers, wastes, oracle_zero = [], [], {}, None
    jobs = [(policy, t) for policy, ts in grid.items() for t in ts]
    for policy, threshold in tqdm(jobs, desc=f"sweep {task.name}", unit="point", disable=not show_progress):
        traces = runner.run(task, policy, threshold)
        correct = [task.grade(p, t.text) for p, t in zip(task.problems, traces)]
        points.append(summarize(policy, threshold, traces, correct))
        answers += [dict(policy=policy, threshold=threshold, **rec) for p, t, c in zip(task.problems, traces, correct)
                    if (rec := task.record(p, t.text, c)) is not None]
        if policy in ROUTING:
            outcomes = step_outcomes(task, runner, traces)
            wastes[(policy, threshold)] = {"policy": policy, "threshold": threshold, "target_calls_judged": len(outcomes),
                                           "waste": payoff.waste(outcomes)}
        if policy == "oracle" and threshold == 0.0:
            oracle_zero = traces
    has_rsd = any(p.policy == "rsd" for p in points)
    matched = matched_comparison(points) if has_rsd else None
    picks = {name: matched[name]["threshold"] for name in ("rsd", "arbitrage") if matched and matched[name]}
    confirm_n = min(len(task.problems), 40) if confirm_n is None else confirm_n  # 0: no wall-clock runs
    confirm = runner.confirm(task, picks, confirm_n) if picks and confirm_n else {}
    router = runner.router_spearman(task, oracle_zero) if oracle_zero else None
    report = payoff_report(points, wastes)
    best = report["speedup"]["max_latency_ratio"]
    if best is not None and confirm_n:  # the "up to" point, confirmed end to end as well
        report["speedup"]["max_latency_ratio_wallclock"] = runner.confirm(
            task, {"rsd": best["rsd_threshold"], "arbitrage": best["arbitrage_threshold"]}, confirm_n)
    result = {
        **task.describe(),
        "points": [p.as_dict() for p in points],
        "matched": matched,
        **report,
        "waste_by_point": list(wastes.values()),
        "curves": _curves(points),
        "router": {**router, **payoff.spearman_note(router["spearman"])} if router else None,
        "wallclock": confirm,
        "latency_note": runner.latency_note,
    }
    if answers:
        result["graded"] = len(answers)
    return result, points, answers


def _curves(points: Sequence[SweepPoint]) -> list[dict]:
    have = {p.policy for p in points}
    pairs = [("oracle", "arbitrage"), ("oracle", "rsd"), ("arbitrage", "rsd")]
    return [curve_dominance(points, upper, lower) for upper, lower in pairs if {upper, lower} <= have]


def write_outputs(points: Sequence[SweepPoint], out: Path, result: dict, answers: Sequence[dict] = ()) -> None:
    """points.csv, the plots, answers.jsonl (datasets) and bench.json, written into a temporary
    directory and moved into ``out`` once complete (``publish``): a failed run leaves no partial
    outputs, and only this command's own files in ``out`` are replaced."""
    out = Path(out)
    check_out_dir(out, BENCH_MARKER)
    tmp = temp_dir_for(out)
    try:
        write_csv(points, tmp / "points.csv")
        files = ["points.csv", *write_plots(points, tmp)]
        if result.get("speedup", {}).get("curve"):
            files.append(write_speedup_plot(result["speedup"], tmp))
        if answers:
            (tmp / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
            files.append("answers.jsonl")
        result["files"] = [*files, BENCH_MARKER]
        (tmp / BENCH_MARKER).write_text(json.dumps(result, indent=2) + "\n")
        publish(tmp, out, BENCH_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when publish moved it whole


# -- output directories: never delete what this tool did not write ------------------------
BENCH_MARKER = "bench.json"  # in every directory `bench` writes (and every cell of `regime-map`)


def check_out_dir(out: str | Path, marker: str = BENCH_MARKER, flag: str = "--out") -> Path:
    """Refuse, before any work, an output directory this command cannot write or must not touch:
    a file, a path under a file or in a directory it may not write, or a non-empty directory
    without ``marker`` (so not one an earlier run of this command wrote: ``--out runs`` must
    not replace runs/). ValueError names ``flag``."""
    out = Path(out)
    if out.is_symlink() or out.exists():
        if not out.is_dir():
            raise ValueError(f"{flag}: {out} exists and is not a directory")
        if not (out / marker).is_file() and any(out.iterdir()):
            raise ValueError(f"{flag}: {out} is a non-empty directory without {marker}, so not an output of "
                             f"this command: its files are left alone; name a new or empty directory, or the "
                             f"directory of an earlier run")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"{flag}: {out}: permission denied")
    for parent in out.absolute().parents:  # the nearest existing folder above it: where it is made
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag}: {out}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag}: {out}: cannot write in {parent} (permission denied)")
            break
    return out


def temp_dir_for(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` (same file system: it moves into place by renames);
    never a fixed name, so nothing of the user's is cleared to make it."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))


def own_files(directory: Path, marker: str) -> set[str]:
    """What an earlier run wrote into ``directory``: the plain names its ``marker`` lists in
    "files", and the marker itself."""
    try:
        listed = json.loads((directory / marker).read_text()).get("files") or []
    except (OSError, ValueError, AttributeError):
        listed = []
    names = {n for n in listed if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n}
    return names | {marker}


def publish(tmp: Path, out: Path, marker: str, flag: str = "--out") -> None:
    """Move the finished outputs in ``tmp`` into ``out``: a new directory is renamed into place
    whole; into an existing one (empty, or an earlier run's) each file moves in, the marker last,
    and what the earlier run wrote that this one does not goes. Any other file stays. A
    subdirectory (a `regime-map` cell) is a bench output directory and is merged the same way."""
    tmp, out = Path(tmp), Path(out)
    check_out_dir(out, marker, flag)  # again: it may have changed while the run was working
    if not out.exists():
        os.replace(tmp, out)
        return
    old = own_files(out, marker)
    new = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == marker)
    for name in new:
        src, dst = tmp / name, out / name
        if src.is_dir():
            publish(src, dst, BENCH_MARKER, flag)
        else:
            os.replace(src, dst)
    for name in sorted(old - set(new)):
        _remove_own(out / name)


def _remove_own(path: Path) -> None:
    """Remove an output of an earlier run: a file, or of a directory (a cell) the files its
    bench.json lists, then the directory if nothing else is in it."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir() and (path / BENCH_MARKER).is_file():
        for name in own_files(path, BENCH_MARKER):
            _remove_own(path / name)
        with contextlib.suppress(OSError):
            path.rmdir()
