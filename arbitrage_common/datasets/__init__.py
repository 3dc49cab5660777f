"""Real math benchmarks: MATH500, OlympiadBench and GSM8K loaders, ``\\boxed{}`` answer
extraction, and grading with ``math-verify``.

Loaders read local JSONL first (an explicit path, or ``<data_dir>/<name>.jsonl``) and fall
back to the Hugging Face hub through ``datasets`` (imported lazily) only when no local file
exists; offline with no local file is a clear ``DatasetUnavailable`` naming both.
``math-verify`` is imported lazily too: grading without it raises ``GradingUnavailable``
(install the ``bench`` extra); there is no home-made fallback grader.
"""
from .answers import (
    GradingUnavailable,
    extract_answer,
    extract_boxed,
    extract_gsm8k_answer,
    grade_answer,
)
from .loaders import (
    DATASETS,
    BenchProblem,
    DatasetSpec,
    DatasetUnavailable,
    load_benchmark,
    load_jsonl,
    normalize_row,
)

__all__ = [
    "DATASETS", "BenchProblem", "DatasetSpec", "DatasetUnavailable", "GradingUnavailable",
    "extract_answer", "extract_boxed", "extract_gsm8k_answer", "grade_answer", "load_benchmark",
    "load_jsonl", "normalize_row",
]
