"""The synthetic step-reasoning task: problems, scratchpad solutions, checker."""
from .checker import check_step, expected_step, extract_answer, grade_answer, is_wellformed, step_result
from .problems import (
    MIXES,
    STEP_DELIMITER,
    Op,
    Problem,
    generate_mix,
    generate_mix_problem,
    generate_problem,
    generate_problems,
    has_hard_step,
    parse_mixes,
    parse_prompt,
    solution_text,
)

__all__ = [
    "MIXES",
    "STEP_DELIMITER",
    "Op",
    "Problem",
    "check_step",
    "expected_step",
    "extract_answer",
    "generate_mix",
    "generate_mix_problem",
    "generate_problem",
    "generate_problems",
    "grade_answer",
    "has_hard_step",
    "is_wellformed",
    "parse_mixes",
    "parse_prompt",
    "solution_text",
    "step_result",
]
