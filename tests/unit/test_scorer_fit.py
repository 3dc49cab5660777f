"""The scorer truncation rule (steps.fit_scorer_input) and its application (backends.fit)."""
import pytest

from arbitrage_common.backends.fit import TextFit, fit_item
from arbitrage_common.interfaces import ScoreItem
from arbitrage_common.steps import ScorerFit, cut_middle, fit_scorer_input, format_scorer_input, keep_tail
from arbitrage_common.tokenizer import build_char_tokenizer


def test_everything_kept_when_it_fits():
    assert fit_scorer_input(10, [5, 5, 5], 10, 35) == ScorerFit(0, 10, 10)
    assert fit_scorer_input(10, [], 10, 20) == ScorerFit(0, 10, 10)


def test_oldest_history_dropped_first():
    assert fit_scorer_input(10, [5, 6, 7], 10, 34) == ScorerFit(1, 10, 10)  # 6 + 7 kept
    assert fit_scorer_input(10, [5, 6, 7], 10, 32) == ScorerFit(2, 10, 10)  # 7 kept, 6 no longer fits
    assert fit_scorer_input(10, [5, 6, 7], 10, 26) == ScorerFit(3, 10, 10)


def test_kept_history_is_the_newest_without_a_gap():
    # the oldest step (1 token) would fit after the 100-token one is dropped: it is dropped too
    assert fit_scorer_input(10, [1, 100, 1], 10, 25) == ScorerFit(3 - 1, 10, 10)


def test_problem_middle_cut_only_when_problem_and_candidate_do_not_fit():
    assert fit_scorer_input(100, [3, 3], 10, 50) == ScorerFit(2, 40, 10)
    assert fit_scorer_input(100, [3], 10, 110) == ScorerFit(1, 100, 10)


def test_candidate_cut_only_when_it_alone_does_not_fit():
    assert fit_scorer_input(100, [3], 60, 50) == ScorerFit(1, 0, 50)
    assert fit_scorer_input(5, [3], 10, 0) == ScorerFit(1, 0, 0)
    assert fit_scorer_input(5, [3], 10, -4) == ScorerFit(1, 0, 0)


def test_cut_middle_and_keep_tail_cut_at_token_spans():
    text = "abcdefghij"
    chars = [(i, i + 1) for i in range(len(text))]
    assert cut_middle(text, chars, 5) == "abc" + "ij"
    assert cut_middle(text, chars, 1) == "a"
    assert cut_middle(text, chars, 0) == ""
    assert cut_middle(text, chars, 10) == cut_middle(text, chars, 99) == text
    assert keep_tail(text, chars, 3) == "hij" and keep_tail(text, chars, 0) == "" and keep_tail(text, chars, 10) == text
    pairs = [(0, 2), (2, 4), (4, 7), (7, 10)]  # multi-character tokens
    assert cut_middle(text, pairs, 3) == "abcd" + "hij"
    assert keep_tail(text, pairs, 2) == "efghij"


ITEM = ScoreItem("Start with 5. Add 2. Double it.", (("5 + 2 = 7", "draft"), ("7 * 2 = 14", "target"),
                                                    ("so 14", "draft")), "Answer: 14")


def test_text_fit_with_the_character_tokenizer():
    tok = build_char_tokenizer()
    plain = 1 + len(format_scorer_input(ITEM, annotate=False))
    assert TextFit(tok, plain, annotate=False)(ITEM) is ITEM
    one_less = TextFit(tok, plain - 1, annotate=False)(ITEM)
    assert one_less == ScoreItem(ITEM.problem, ITEM.history[1:], ITEM.candidate)
    # annotated tags ("Model 0: ") cost tokens too
    annotated = TextFit(tok, plain, annotate=True)(ITEM)
    assert annotated == ScoreItem(ITEM.problem, ITEM.history[-1:], ITEM.candidate)
    assert 1 + len(format_scorer_input(ScoreItem(ITEM.problem, ITEM.history[-2:], ITEM.candidate), True)) > plain
    tiny = TextFit(tok, 1 + len("\n\n") + len(ITEM.candidate) + 6, annotate=False)(ITEM)
    assert tiny == ScoreItem("Sta" + "it.", (), ITEM.candidate)  # the problem's middle is cut
    tail = TextFit(tok, 1 + len("\n\n") + 4, annotate=False)(ITEM)
    assert tail == ScoreItem("", (), ": 14")  # the candidate alone is too long: its head is cut


def test_fit_item_recounts_until_it_fits():
    """Piece costs that undercount (as subword merges across a cut can): the exact count
    decides, and the item is cut further."""
    def count(item):  # a cut problem costs 2 more tokens than its pieces say
        return len(item.problem) + sum(len(t) for t, _ in item.history) + len(item.candidate) + \
            (2 if item.problem != ITEM.problem else 0)

    def costs(item):
        return len(item.problem), [len(t) for t, _ in item.history], len(item.candidate)

    class Chars:  # no offsets: one span per character
        is_fast = False

    limit = len(ITEM.candidate) + 10
    fitted = fit_item(ITEM, limit, count, costs, Chars())
    assert fitted == ScoreItem(ITEM.problem[:4] + ITEM.problem[-4:], (), ITEM.candidate)
    assert count(fitted) == limit
    whole = count(ITEM)
    assert fit_item(ITEM, whole, count, costs, Chars()) is ITEM
    assert fit_item(ITEM, whole - 1, count, costs, Chars()) == ScoreItem(ITEM.problem, ITEM.history[1:], ITEM.candidate)
    assert fit_item(ITEM, None, count, costs, Chars()) is ITEM
    with pytest.raises(ValueError, match="cannot hold even an empty"):
        fit_item(ITEM, 0, lambda item: count(item) + 1, costs, Chars())
