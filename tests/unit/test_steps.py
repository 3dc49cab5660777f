from arbitrage_common.interfaces import ScoreItem
from arbitrage_common.steps import build_prefix, format_scorer_input, join_steps, split_steps


def test_build_prefix_without_steps_strips_prompt_and_opens_a_step():
    assert build_prefix("  Start with 3. Add 4.\n", []) == "Start with 3. Add 4.\n\n"


def test_build_prefix_with_steps():
    assert build_prefix("P", ["a", "b c"]) == "P\n\na\n\nb c\n\n"


def test_split_steps_drops_blank_paragraphs_and_inverts_join():
    assert split_steps("a\n\n b \n\n\n\nc\n\n") == ["a", "b", "c"]
    steps = ["3 + 4 = 7", "7 * 2 = 14", "Answer: 14"]
    assert split_steps(join_steps(steps)) == steps
    assert split_steps("") == []


def test_format_scorer_input_plain():
    item = ScoreItem("P", (("s1", "draft"), ("s2", "target")), "cand")
    assert format_scorer_input(item, annotate=False) == "P\n\ns1\n\ns2\n\ncand"


def test_format_scorer_input_annotates_history_only():
    item = ScoreItem("P", (("s1", "draft"), ("s2", "target")), "cand")
    assert format_scorer_input(item, annotate=True) == "P\n\nModel 0: s1\n\nModel 1: s2\n\ncand"


def test_format_scorer_input_empty_history():
    assert format_scorer_input(ScoreItem("P", (), "cand"), annotate=True) == "P\n\ncand"


def test_build_prefix_renders_a_prompt_template_without_format_braces():
    template = "<|user|>\n{problem} Put the answer in \\boxed{}.<|assistant|>\n"
    assert build_prefix(" 2+2? ", ["s1"], template) == \
        "<|user|>\n2+2? Put the answer in \\boxed{}.<|assistant|>\ns1\n\n"
