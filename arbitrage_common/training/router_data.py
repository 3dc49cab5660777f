"""Oracle labels for the router: both models write every step, the PRM scores both.

Each row is one step position of one trajectory: the kept history (with sources), the
draft's and the target's candidate steps, their PRM scores, the advantage
PRM(target) - PRM(draft) and its class. Each trajectory continues with the better
step, so histories mix draft- and target-written steps as they do at serving time.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..interfaces import GenerationOptions, ScoreItem
from ..steps import build_prefix
from ..synthetic import check_step, generate_mix_problem

# The paper's label, 1[PRM(target) - PRM(draft) > 0]: a step where the target writes the
# draft's text has an advantage of exactly 0, whatever the PRM's noise, so it is never positive.
DEFAULT_LABEL_MARGIN = 0.0


def router_problems(n_problems: int, seed: int, mixes: tuple[str, ...] = ("math",)) -> list:
    """The synthetic training problems of ``router data`` (a string-keyed stream: never eval
    seeds); with several mixes, problem i is of ``mixes[i % len(mixes)]``."""
    rng = random.Random(f"router-data-{seed}")
    return [generate_mix_problem(rng, mixes[i % len(mixes)]) for i in range(n_problems)]


def collect_router_rows(draft, target, prm, n_problems: int, seed: int, batch_size: int = 64,
                        label_margin: float = DEFAULT_LABEL_MARGIN, progress=None,
                        mixes: tuple[str, ...] = ("math",)) -> list[dict]:
    """``draft``/``target`` expose ``generate_batch``; ``prm`` exposes ``score_batch``."""
    problems = router_problems(n_problems, seed, mixes)
    histories: list[list[tuple[str, str]]] = [[] for _ in problems]
    open_ids = list(range(n_problems))
    options = GenerationOptions(max_new_tokens=64)
    rows = []
    while open_ids:
        still = []
        for start in range(0, len(open_ids), batch_size):
            ids = open_ids[start: start + batch_size]
            prefixes = [build_prefix(problems[i].prompt, [s for s, _ in histories[i]]) for i in ids]
            d_gens = draft.generate_batch(prefixes, options)
            t_gens = target.generate_batch(prefixes, options)
            items = []
            for i, d, t in zip(ids, d_gens, t_gens):
                hist = tuple(histories[i])
                items += [ScoreItem(problems[i].prompt, hist, d.text), ScoreItem(problems[i].prompt, hist, t.text)]
            scores = prm.score_batch(items)
            for j, (i, d, t) in enumerate(zip(ids, d_gens, t_gens)):
                p, prior = problems[i], [s for s, _ in histories[i]]
                s_d, s_t = scores[2 * j], scores[2 * j + 1]
                advantage = s_t - s_d
                rows.append({
                    "problem_id": i, "problem": p.prompt, "history": histories[i].copy(), "step_index": len(prior),
                    "tier": p.step_tiers()[len(prior)] if len(prior) < len(p.step_tiers()) else "extra",
                    "draft_step": d.text, "target_step": t.text, "prm_draft": s_d, "prm_target": s_t,
                    "advantage": advantage, "label": int(advantage > label_margin),
                    "draft_correct": check_step(p, prior, d.text), "target_correct": check_step(p, prior, t.text),
                    "draft_tokens": d.tokens, "target_tokens": t.tokens,
                })
                kept, src = (t, "target") if advantage > 0 else (d, "draft")
                if kept.text:
                    histories[i].append((kept.text, src))
                if kept.finish_reason == "delimiter" and len(histories[i]) < len(p.ops) + 3:
                    still.append(i)
            if progress is not None:
                progress(len(rows))
        open_ids = still
    return rows


def relabel(rows: list[dict], label_margin: float = DEFAULT_LABEL_MARGIN) -> list[dict]:
    """The rows with ``label = 1[advantage > label_margin]`` (the knob of `router train`)."""
    return [{**r, "label": int(r["advantage"] > label_margin)} for r in rows]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def data_meta_path(path: str | Path) -> Path:
    """The sidecar that says how a router dataset was made: ``rows.jsonl`` -> ``rows.meta.json``."""
    path = Path(path)
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(stem + ".meta.json")


def write_data_meta(path: str | Path, meta: dict) -> Path:
    """Write ``meta`` (``command`` first: the one line that remakes the data) beside the dataset."""
    side = data_meta_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, side)
    return side


def read_data_meta(path: str | Path) -> dict | None:
    """The sidecar of a router dataset, or None (none, or not a JSON object)."""
    side = data_meta_path(path)
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def data_made_by(path: str | Path) -> str | None:
    """The command that made a router dataset, from its sidecar (None: not recorded)."""
    meta = read_data_meta(path)
    return meta.get("command") if meta else None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a router dataset; ValueError naming the file and the first line that is not a
    JSON object."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: router dataset not found (make it with `arbitrage router data`)")
    try:
        lines = p.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not JSON Lines (not UTF-8 text)") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not JSON Lines (line {number}, column {exc.colno}: {exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}: line {number} is not a JSON object")  # noqa: TRY004 (user input)
        rows.append(row)
    return rows


def error_structure(rows: list[dict]) -> dict | None:
    """How the draft's wrong steps split, by the exact step checker: ones the target fixes,
    and ones it gets wrong too. At full accuracy a perfect-PRM RSD routes every wrong draft
    step and a perfect router only the fixable ones, so ``draft_wrong / target_fixes`` bounds
    the target-step saving any router can show over RSD on this data."""
    if any(r.get("draft_correct") is None for r in rows):  # rows from a service: no step checker
        return None
    draft_wrong = sum(not r["draft_correct"] for r in rows)
    fixes = sum(not r["draft_correct"] and r["target_correct"] for r in rows)
    return {"steps": len(rows), "draft_wrong": draft_wrong, "target_fixes": fixes, "both_wrong": draft_wrong - fixes,
            "target_steps_ratio_ceiling": round(draft_wrong / fixes, 3) if fixes else None}
