"""Exact step checker and answer grader for the synthetic task."""
from __future__ import annotations

import re
from collections.abc import Sequence

from .problems import STEP_DELIMITER, Problem, answer_step, render_step

_RESULT = re.compile(r"= (-?\d+)$")
_ANSWER = re.compile(r"^Answer: (-?\d+)$")


def step_result(step: str) -> int | None:
    """The value a computation step ends with (``... = N``), else None."""
    m = _RESULT.search(step.strip())
    return int(m.group(1)) if m else None


def expected_step(problem: Problem, prior_steps: Sequence[str]) -> str | None:
    """The correct next step given the steps written so far (as written, not as
    they should have been), or None when no correct continuation exists."""
    k = len(prior_steps)
    if k == 0:
        value: int | None = problem.start
    else:
        prev = prior_steps[-1].strip()
        value = None if _ANSWER.match(prev) else step_result(prev)
    if value is None or k > len(problem.ops):
        return None
    if k == len(problem.ops):
        return answer_step(value)
    return render_step(value, problem.ops[k])


def check_step(problem: Problem, prior_steps: Sequence[str], step: str) -> bool:
    """Is ``step`` the correct step k, given the problem and steps 1..k-1?

    Correctness is local: a step that applies the right operation to a wrong
    previous result is still correct. Final correctness is ``grade_answer``.
    """
    want = expected_step(problem, prior_steps)
    return want is not None and step.strip() == want


def extract_answer(text: str) -> int | None:
    """The N of the final paragraph ``Answer: N``, else None."""
    paragraphs = [p.strip() for p in text.strip().split(STEP_DELIMITER) if p.strip()]
    if not paragraphs:
        return None
    m = _ANSWER.match(paragraphs[-1])
    if not m:
        return None
    try:
        return int(m.group(1))
    except ValueError:  # past Python's cap on digits (4300): no answer this checker could grade
        return None


def grade_answer(problem: Problem, text: str) -> bool:
    return extract_answer(text) == problem.answer


def is_wellformed(problem: Problem, steps: Sequence[str]) -> bool:
    """One computation step per operation (each ``a op b = ... = N``), then the answer."""
    if len(steps) != len(problem.ops) + 1:
        return False
    shapes = [re.fullmatch(r"-?\d+ [-+*] \d+ = -?\d+( [-+] \d+)+ = -?\d+", s.strip()) for s in steps[:-1]]
    return all(shapes) and bool(_ANSWER.match(steps[-1].strip()))
