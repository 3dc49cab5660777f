"""Benchmark loaders, answer extraction and grading, on hand-written fixtures (no hub)."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from arbitrage_common.datasets import (
    DATASETS,
    DatasetUnavailable,
    GradingUnavailable,
    extract_answer,
    extract_boxed,
    extract_gsm8k_answer,
    grade_answer,
    load_benchmark,
    load_jsonl,
    normalize_row,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"


# ---- extraction ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{4}$.", "4"),
    ("\\boxed{\\frac{5}{6}}", "\\frac{5}{6}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} and more", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{ \\{1, 2\\} }", "\\{1, 2\\}"),  # escaped braces never close the group
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{ok} then \\boxed{unclosed", "ok"),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_gsm8k_answer_strips_thousands_separators():
    assert extract_gsm8k_answer("250 * 8 = 2000\n#### 2,000") == "2000"
    assert extract_gsm8k_answer("no marker") is None


@pytest.mark.parametrize("text, expected", [
    ("work\n\n\\boxed{3}", "3"),
    ("work\n#### 42", "42"),
    ("work\n\nAnswer: 611", "611"),
    ("Final answer: $x^2$", "x^2"),
    ("So the answer is 13.", "13"),
    ("nothing to see", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---- loaders ------------------------------------------------------------------------------

def test_fixtures_hold_five_rows_each():
    for name in DATASETS:
        assert len(load_benchmark(name, FIXTURES / f"{name}.jsonl")) == 5


def test_math500_maps_fields_and_falls_back_to_the_boxed_solution():
    rows = load_benchmark("math500", FIXTURES)  # a folder: <folder>/math500.jsonl
    assert rows[0].id == "fixture/prealgebra/1.json"
    assert rows[0].problem.startswith("What is $\\frac{1}{2}")
    assert rows[0].answer == "\\frac{5}{6}"
    assert rows[0].meta == {"subject": "Prealgebra", "level": 1}
    assert rows[4].answer == "9\\pi"  # no 'answer' field: taken from \boxed{} in the solution


def test_olympiadbench_joins_list_answers_strips_dollars_and_prepends_context():
    rows = {r.id: r for r in load_benchmark("OlympiadBench", FIXTURES)}
    assert rows["9001"].answer == "9"
    assert rows["9004"].answer == "0, 2"
    assert rows["9005"].problem.startswith("A right triangle has legs")
    assert rows["9005"].problem.endswith("What is the length of the hypotenuse?")
    assert rows["9005"].answer == "\\sqrt{5}"


def test_gsm8k_answer_after_hashes():
    rows = load_benchmark("gsm8k", FIXTURES)
    assert [r.answer for r in rows] == ["7", "60", "6", "2000", "13"]
    assert rows[0].problem.startswith("Ann has 3 apples")
    assert rows[2].solution.startswith("On Tuesday")


def test_limit_and_data_dir_env(monkeypatch):
    monkeypatch.setenv("ARBITRAGE_DATA_DIR", str(FIXTURES))
    assert len(load_benchmark("gsm8k", limit=2)) == 2
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("gsm8k", limit=0)


def test_alternative_field_names_load():
    row = normalize_row("gsm8k", {"problem": "1+1?", "final_answer": "2"}, 0)
    assert (row.problem, row.answer, row.id) == ("1+1?", "2", "gsm8k-0")
    row = normalize_row("math500", {"question": "q", "answer": "$3$", "id": 7}, 0)
    assert (row.problem, row.answer, row.id) == ("q", "3", "7")


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'aime'.*gsm8k"):
        load_benchmark("aime", FIXTURES)


def test_missing_explicit_path_is_an_error_not_a_hub_fallback(tmp_path):
    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "nope.jsonl")):
        load_benchmark("gsm8k", tmp_path / "nope.jsonl")


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"gsm8k.jsonl:3: not JSON"):
        load_jsonl("gsm8k", bad)
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k.jsonl:1: gsm8k row 0: no gold answer"):
        load_jsonl("gsm8k", bad)
    bad.write_text(json.dumps({"answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match=r"no problem text"):
        load_jsonl("gsm8k", bad)


def test_no_local_file_and_hub_off(tmp_path):
    with pytest.raises(DatasetUnavailable, match=f"no local file at {tmp_path / 'math500.jsonl'}.*hub is off"):
        load_benchmark("math500", data_dir=tmp_path, hub=False)


def test_no_local_file_without_datasets_package_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetUnavailable, match="needs the 'datasets' package"):
        load_benchmark("math500", data_dir=tmp_path)


def test_offline_hub_error_names_dataset_and_local_option(tmp_path, monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(DatasetUnavailable, match=r"openai/gsm8k \(main, test\).*ConnectionError.*local JSONL"):
        load_benchmark("gsm8k", data_dir=tmp_path)


def test_hub_rows_are_normalized(monkeypatch):
    class FakeDatasets:
        calls: ClassVar[list] = []

        @classmethod
        def load_dataset(cls, hub_id, config, split):
            cls.calls.append((hub_id, config, split))
            return [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.delenv("ARBITRAGE_DATA_DIR", raising=False)
    rows = load_benchmark("gsm8k", limit=3)
    assert [r.answer for r in rows] == ["0", "1", "2"]
    assert FakeDatasets.calls == [("openai/gsm8k", "main", "test")]


# ---- grading ------------------------------------------------------------------------------

def test_grading_without_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(GradingUnavailable, match=r"math-verify.*\[bench\]"):
        grade_answer("\\boxed{1}", "1")


@pytest.mark.parametrize("prediction, gold, ok", [
    ("so $\\boxed{\\frac{5}{6}}$", "\\frac{5}{6}", True),
    ("\\boxed{10/12}", "\\frac{5}{6}", True),
    ("\\boxed{\\sqrt{50}}", "5\\sqrt{2}", True),
    ("\\boxed{(-3,3)}", "(-3, 3)", True),
    ("\\boxed{[-3,3]}", "(-3, 3)", False),
    ("\\boxed{2, 0}", "0, 2", True),
    ("\\boxed{7}", "9", False),
    ("Answer: 2,000", "2000", True),
    ("no answer at all", "13", False),
])
def test_grade_answer(prediction, gold, ok):
    pytest.importorskip("math_verify", reason="grading needs the bench extra (math-verify)")
    assert grade_answer(prediction, gold) is ok


def test_every_fixture_gold_grades_against_itself():
    pytest.importorskip("math_verify", reason="grading needs the bench extra (math-verify)")
    for name in DATASETS:
        for p in load_benchmark(name, FIXTURES):
            assert grade_answer(f"... so the answer is $\\boxed{{{p.answer}}}$.", p.answer), (name, p.id)


def test_grade_answer_works_off_the_main_thread():
    pytest.importorskip("math_verify", reason="grading needs the bench extra (math-verify)")
    out = []
    t = threading.Thread(target=lambda: out.append(grade_answer("\\boxed{\\frac{10}{12}}", "\\frac{5}{6}")))
    t.start()
    t.join(30)
    assert out == [True]
