"""Properties of the synthetic task: generator, checker, grader, prompt parser."""
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arbitrage_common.synthetic import (
    STEP_DELIMITER,
    check_step,
    expected_step,
    extract_answer,
    generate_problem,
    generate_problems,
    grade_answer,
    is_wellformed,
    parse_prompt,
    solution_text,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def _problem(seed):
    return generate_problem(random.Random(seed))


@given(seeds)
def test_gold_solution_checks_correct_at_every_step(seed):
    p = _problem(seed)
    steps = p.solution_steps()
    assert all(check_step(p, steps[:k], steps[k]) for k in range(len(steps)))
    assert is_wellformed(p, steps)
    assert grade_answer(p, solution_text(p))


@given(seeds, st.data())
def test_a_corrupted_digit_makes_the_step_wrong(seed, data):
    p = _problem(seed)
    steps = p.solution_steps()
    k = data.draw(st.integers(0, len(steps) - 1))
    digits = [i for i, c in enumerate(steps[k]) if c.isdigit()]
    i = data.draw(st.sampled_from(digits))
    new_digit = data.draw(st.sampled_from([d for d in "0123456789" if d != steps[k][i]]))
    corrupted = steps[k][:i] + new_digit + steps[k][i + 1:]
    assert not check_step(p, steps[:k], corrupted)


@given(seeds)
def test_wrong_final_answer_fails_grading(seed):
    p = _problem(seed)
    steps = p.solution_steps()
    steps[-1] = f"Answer: {p.answer + 1}"
    assert not grade_answer(p, STEP_DELIMITER.join(steps))


@given(seeds)
def test_prompt_round_trips(seed):
    p = _problem(seed)
    assert parse_prompt(p.prompt) == p


def test_step_correctness_is_local_to_the_written_previous_result():
    p = generate_problems(50, 3)[0]
    steps = p.solution_steps()
    # Rewrite step 0 with a wrong result; step 1 is judged from that wrong value.
    wrong0 = steps[0].rsplit("=", 1)[0] + "= 50"
    assert not check_step(p, [], wrong0)
    want = expected_step(p, [wrong0])
    assert want is not None and want.startswith("50 ")
    assert check_step(p, [wrong0], want)


def test_no_step_after_the_answer_is_correct():
    p = generate_problems(1, 4)[0]
    steps = p.solution_steps()
    assert not check_step(p, steps, "Answer: 1")


def test_generator_is_seeded_and_has_three_plus_steps_and_all_tiers():
    a, b = generate_problems(500, 11), generate_problems(500, 11)
    assert a == b
    assert a != generate_problems(500, 12)
    assert sum(len(p.solution_steps()) for p in a) / len(a) >= 3
    tiers = {t for p in a for t in p.step_tiers()}
    assert tiers == {"easy", "medium", "hard"}
    assert all(0 <= v <= 99 for p in a for v in p.values()[:-1] if p.ops[-1].kind == "teen")


@pytest.mark.parametrize("text,expected", [
    ("1 + 10 = 11 + 0 = 11\n\nAnswer: 11", 11),
    ("Answer: -3", -3),
    ("no answer here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_prompt_names_the_problem():
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt("Begin with 3.")
    with pytest.raises(ValueError, match="unknown operation"):
        parse_prompt("Start with 3. Divide by 2.")
