"""The synthetic step-reasoning task: problems, scratchpad solutions, checker."""
from .checker import check_step, expected_step, extract_answer, grade_answer, is_wellformed, step_result
from .problems import (
    STEP_DELIMITER,
    Op,
    Problem,
    generate_problem,
    generate_problems,
    parse_prompt,
    solution_text,
)

__all__ = [
    "STEP_DELIMITER",
    "Op",
    "Problem",
    "check_step",
    "expected_step",
    "extract_answer",
    "generate_problem",
    "generate_problems",
    "grade_answer",
    "is_wellformed",
    "parse_prompt",
    "solution_text",
    "step_result",
]
