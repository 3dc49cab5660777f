"""Problem mixes (math, olympiad), their parser and CLI type, the router-data problem stream
and relabelling at a margin."""
import argparse
import random

import pytest

from arbitrage_common.cli.argtypes import mix_list
from arbitrage_common.synthetic import (
    MIXES,
    Op,
    Problem,
    generate_mix,
    generate_mix_problem,
    generate_problems,
    has_hard_step,
    parse_mixes,
)
from arbitrage_common.training.router_data import relabel, router_problems


def _prompts(problems):
    return [p.prompt for p in problems]


def test_mixes_are_math_and_olympiad():
    assert set(MIXES) == {"math", "olympiad"}


def test_has_hard_step():
    assert has_hard_step(Problem(20, (Op("add", 11), Op("teen", 12)))) is True
    assert has_hard_step(Problem(20, (Op("add", 11), Op("sub", 10)))) is False


@pytest.mark.parametrize("seed", [0, 7])
def test_math_mix_equals_generate_problems(seed):
    assert _prompts(generate_mix(30, seed, "math")) == _prompts(generate_problems(30, seed))


def test_math_is_the_default_mix():
    assert _prompts(generate_mix(10, 3)) == _prompts(generate_problems(10, 3))


def test_every_olympiad_problem_has_a_hard_step():
    problems = generate_mix(60, 0, "olympiad")
    assert len(problems) == 60
    assert all("hard" in p.step_tiers() for p in problems)


def test_olympiad_hard_step_is_the_final_operation():
    for p in generate_mix(30, 1, "olympiad"):
        assert p.ops[-1].kind == "teen"


def test_olympiad_mix_is_seeded():
    assert _prompts(generate_mix(20, 5, "olympiad")) == _prompts(generate_mix(20, 5, "olympiad"))
    assert _prompts(generate_mix(20, 5, "olympiad")) != _prompts(generate_mix(20, 6, "olympiad"))


def test_math_mix_has_problems_without_a_hard_step():
    problems = generate_mix(60, 0, "math")
    assert any(not has_hard_step(p) for p in problems)
    assert any(has_hard_step(p) for p in problems)


def test_generate_mix_problem_rejects_an_unknown_mix():
    with pytest.raises(ValueError, match=r"^mix:"):
        generate_mix_problem(random.Random(0), "nope")


def test_parse_mixes_comma_list():
    assert parse_mixes("math,olympiad") == ("math", "olympiad")
    assert parse_mixes(" olympiad , math ") == ("olympiad", "math")
    assert parse_mixes("math") == ("math",)


@pytest.mark.parametrize("text", ["nope", "", "math,nope", ","])
def test_parse_mixes_rejects_bad_text(text):
    with pytest.raises(ValueError) as err:
        parse_mixes(text)
    assert str(err.value).startswith("mix:")


def test_parse_mixes_names_the_bad_mix():
    with pytest.raises(ValueError, match="nope"):
        parse_mixes("math,nope")


def test_mix_list_parses_a_comma_list():
    assert mix_list("math,olympiad") == ("math", "olympiad")


def test_mix_list_raises_argument_type_error_for_a_bad_mix():
    with pytest.raises(argparse.ArgumentTypeError) as err:
        mix_list("nope")
    assert not str(err.value).startswith("mix:")  # argparse adds the argument's name
    assert "nope" in str(err.value)


def test_mix_list_bad_mix_is_a_usage_error_in_argparse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mix", type=mix_list)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--mix", "nope"])
    assert exit_info.value.code == 2


def test_router_problems_alternate_between_mixes():
    problems = router_problems(40, 0, ("math", "olympiad"))
    assert len(problems) == 40
    assert all(has_hard_step(p) for p in problems[1::2])
    assert any(not has_hard_step(p) for p in problems[0::2])


def test_router_problems_are_seeded():
    assert _prompts(router_problems(10, 3)) == _prompts(router_problems(10, 3))
    assert _prompts(router_problems(10, 3)) != _prompts(router_problems(10, 4))


def test_router_problems_are_not_the_eval_stream():
    assert _prompts(router_problems(10, 0)) != _prompts(generate_problems(10, 0))


def test_relabel_sets_label_from_advantage_and_margin():
    rows = [{"advantage": 0.3, "label": 0, "step": "a"}, {"advantage": -0.2, "label": 1, "step": "b"},
            {"advantage": 0.05, "label": 1, "step": "c"}]
    assert [r["label"] for r in relabel(rows)] == [1, 0, 1]
    assert [r["label"] for r in relabel(rows, 0.1)] == [1, 0, 0]
    assert [r["step"] for r in relabel(rows, 0.1)] == ["a", "b", "c"]


def test_relabel_zero_advantage_at_the_margin():
    rows = [{"advantage": 0.0, "label": 1}]
    assert relabel(rows, 0.0)[0]["label"] == 0
    assert relabel(rows, -0.01)[0]["label"] == 1


def test_relabel_default_margin_is_zero():
    assert relabel([{"advantage": 0.0, "label": 1}])[0]["label"] == 0


def test_relabel_leaves_the_input_rows_alone():
    rows = [{"advantage": 0.5, "label": 0}]
    relabel(rows)
    assert rows == [{"advantage": 0.5, "label": 0}]


def test_load_test_mix_draws_from_a_named_mix():
    from arbitrage_common.synthetic import has_hard_step, parse_prompt
    from loadtests.settings import Mix

    prompts = Mix(problem_mix="olympiad", pool_size=40, seed=3).prompts()
    assert len(prompts) == 40 and all(has_hard_step(parse_prompt(p)) for p in prompts)
    with pytest.raises(ValueError, match="--mix: unknown mix 'nope'"):
        Mix(problem_mix="nope")
