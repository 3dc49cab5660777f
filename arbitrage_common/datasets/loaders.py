"""Loaders for MATH500, OlympiadBench and GSM8K: local JSONL first, the hub second.

Each dataset maps its own fields onto one ``BenchProblem``:

| dataset | problem field | gold answer | hub (only when no local file) |
| --- | --- | --- | --- |
| math500 | ``problem`` | ``answer``, else ``\\boxed{}`` of ``solution`` | HuggingFaceH4/MATH-500, test |
| olympiadbench | ``question`` (or ``problem``) | ``final_answer`` (a list: joined with ", "), else ``answer`` | Hothan/OlympiadBench, OE_TO_maths_en_COMP, train |
| gsm8k | ``question`` (or ``problem``) | after ``####`` in ``answer``, else ``final_answer`` | openai/gsm8k, main, test |

Local rows may use any of the listed field names, so a file exported from the hub and a
hand-written one both load.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .answers import extract_boxed, extract_gsm8k_answer

DATA_DIR_ENV = "ARBITRAGE_DATA_DIR"


class DatasetUnavailable(RuntimeError):
    """No local file and the hub could not be used; the message says where it looked."""


@dataclass(frozen=True)
class BenchProblem:
    """One benchmark problem: a stable id, the problem text, the gold final answer (bare LaTeX)."""

    id: str
    dataset: str
    problem: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    problem_fields: tuple[str, ...]
    answer: Callable[[dict[str, Any]], str | None]
    solution_field: str | None
    id_fields: tuple[str, ...] = ("unique_id", "id", "idx")


def _first(row: dict[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        value = row.get(name)
        if value not in (None, "", []):
            return value
    return None


def _strip_math(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):  # OlympiadBench: final_answer / solution are lists
        parts = [_strip_math(str(v)) for v in value if str(v).strip()]
        return ", ".join(parts) if parts else None
    return _strip_math(str(value)) or None


def _math500_answer(row: dict[str, Any]) -> str | None:
    answer = _text(row.get("answer"))
    if answer is None and row.get("solution"):
        answer = extract_boxed(str(row["solution"]))
    return answer


def _olympiad_answer(row: dict[str, Any]) -> str | None:
    return _text(_first(row, ("final_answer", "answer")))


def _gsm8k_answer(row: dict[str, Any]) -> str | None:
    raw = row.get("answer")
    if isinstance(raw, str) and "####" in raw:
        return extract_gsm8k_answer(raw)
    value = _text(_first(row, ("final_answer", "answer")))
    return value.replace(",", "") if value else None


DATASETS: dict[str, DatasetSpec] = {
    "math500": DatasetSpec("math500", "HuggingFaceH4/MATH-500", None, "test",
                           ("problem", "question"), _math500_answer, "solution"),
    "olympiadbench": DatasetSpec("olympiadbench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train",
                                 ("question", "problem"), _olympiad_answer, "solution"),
    "gsm8k": DatasetSpec("gsm8k", "openai/gsm8k", "main", "test",
                         ("question", "problem"), _gsm8k_answer, "answer"),
}


def _spec(name: str) -> DatasetSpec:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def normalize_row(name: str, row: dict[str, Any], index: int) -> BenchProblem:
    """Map one raw row of dataset ``name`` onto a BenchProblem; ValueError names the missing field."""
    spec = _spec(name)
    problem = _first(row, spec.problem_fields)
    if problem is None:
        raise ValueError(f"{spec.name} row {index}: no problem text (fields {', '.join(spec.problem_fields)})")
    context = row.get("context")  # OlympiadBench: some problems share a preamble
    text = f"{str(context).strip()}\n\n{str(problem).strip()}" if context else str(problem).strip()
    answer = spec.answer(row)
    if not answer:
        raise ValueError(f"{spec.name} row {index}: no gold answer")
    rid = _first(row, spec.id_fields)
    solution = _text(row.get(spec.solution_field)) if spec.solution_field else None
    used = set(spec.problem_fields) | set(spec.id_fields) | {"answer", "final_answer", "solution", "context"}
    meta = {k: v for k, v in row.items() if k not in used}
    return BenchProblem(str(rid) if rid is not None else f"{spec.name}-{index}", spec.name, text, answer,
                        solution, meta)


def load_jsonl(name: str, path: str | Path, limit: int | None = None) -> list[BenchProblem]:
    """Read ``path`` (one JSON object a line; blank lines skipped) as dataset ``name``."""
    p = Path(path)
    out: list[BenchProblem] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: not JSON ({exc.msg})") from exc
            try:
                out.append(normalize_row(name, row, len(out)))
            except ValueError as exc:
                raise ValueError(f"{p}:{lineno}: {exc}") from exc
            if limit is not None and len(out) >= limit:
                break
    return out


def _load_hub(spec: DatasetSpec, split: str | None, limit: int | None, looked: str) -> list[BenchProblem]:
    try:
        import datasets  # lazily: heavy, and only needed without a local file
    except ImportError as exc:
        raise DatasetUnavailable(f"{spec.name}: {looked}, and the hub fallback needs the 'datasets' package "
                                 f"(pip install datasets), or give a local JSONL with --data-file") from exc
    split = split or spec.hub_split
    try:
        rows = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    except Exception as exc:  # offline: ConnectionError, OfflineModeIsEnabled, FileNotFoundError, ...
        raise DatasetUnavailable(f"{spec.name}: {looked}, and {spec.hub_id} ({spec.hub_config or 'default'}, "
                                 f"{split}) could not be loaded from the hub ({type(exc).__name__}: {exc}). "
                                 f"Give a local JSONL file.") from exc
    out = []
    for i, row in enumerate(rows):
        out.append(normalize_row(spec.name, dict(row), i))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_benchmark(name: str, path: str | Path | None = None, *, data_dir: str | Path | None = None,
                   limit: int | None = None, split: str | None = None, hub: bool = True) -> list[BenchProblem]:
    """Problems of ``name`` (math500, olympiadbench, gsm8k).

    Looks at ``path`` (a JSONL file, or a folder holding ``<name>.jsonl``); else at
    ``<data_dir>/<name>.jsonl`` (``data_dir`` defaults to $ARBITRAGE_DATA_DIR); else, when
    ``hub`` is true, the hub through ``datasets``. An explicit ``path`` that does not exist is an
    error (never silently replaced by the hub).
    """
    spec = _spec(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / f"{spec.name}.jsonl"
        if not p.is_file():
            raise DatasetUnavailable(f"{spec.name}: {p}: no such file")
        return load_jsonl(spec.name, p, limit)
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    looked = "no local file given"
    if data_dir:
        p = Path(data_dir) / f"{spec.name}.jsonl"
        if p.is_file():
            return load_jsonl(spec.name, p, limit)
        looked = f"no local file at {p}"
    if not hub:
        raise DatasetUnavailable(f"{spec.name}: {looked} and the hub is off")
    return _load_hub(spec, split, limit, looked)
