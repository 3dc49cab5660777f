"""Scorers past their model's context (512 positions for the bundled models): the oldest
history steps are dropped, then the problem's middle is cut, and the score is the score of
that explicitly truncated item. Expected items are built here from the character tokenizer
(BOS + one token per character), not by the code under test."""
from pathlib import Path

import pytest
import torch

from arbitrage_common.backends.scorers import load_step_scorer
from arbitrage_common.interfaces import ScoreItem
from arbitrage_common.steps import format_scorer_input
from arbitrage_common.synthetic import generate_problems

MODELS = Path(__file__).resolve().parents[2] / "models"
CONTEXT = 512
PROBLEM = generate_problems(1, 31337)[0]
GOLD = PROBLEM.solution_steps()


def tokens(item: ScoreItem, annotate: bool = False) -> int:
    text = format_scorer_input(item, annotate)
    assert text.isascii()
    return 1 + len(text)


def newest_that_fit(item: ScoreItem, annotate: bool = False, context: int = CONTEXT) -> ScoreItem:
    """The item with the most newest history steps whose input fits ``context``."""
    for k in range(len(item.history), -1, -1):
        cut = ScoreItem(item.problem, item.history[len(item.history) - k:], item.candidate)
        if tokens(cut, annotate) <= context:
            return cut
    raise AssertionError("problem and candidate alone do not fit")


def long_item() -> ScoreItem:
    history = tuple((GOLD[i % len(GOLD)], "draft" if i % 3 else "target") for i in range(80))
    item = ScoreItem(PROBLEM.prompt, history, GOLD[0])
    assert tokens(item) > 2 * CONTEXT
    return item


@pytest.fixture(scope="module", params=["prm", "router"])
def scorer(request):
    s = load_step_scorer(MODELS / request.param)
    assert s.context == CONTEXT
    return s


def test_long_history_keeps_problem_candidate_and_newest_steps(scorer):
    item = long_item()
    expected = newest_that_fit(item)
    assert 0 < len(expected.history) < len(item.history)
    assert tokens(ScoreItem(item.problem, item.history[-len(expected.history) - 1:], item.candidate)) > CONTEXT
    assert scorer.fit(item) == expected
    assert scorer.score_batch([item]) == scorer.score_batch([expected])
    short = ScoreItem(PROBLEM.prompt, (), GOLD[0])
    assert scorer.fit(short) is short  # fits: untouched
    together = scorer.score_batch([item, short])
    assert together == pytest.approx(scorer.score_batch([expected]) + scorer.score_batch([short]), abs=1e-6)


def test_problem_longer_than_the_context_loses_its_middle(scorer):
    head, tail = "Start with 7. " + "Add 0. " * 60, "Then double it. What is the result?"
    item = ScoreItem(head + "Add 1. " * 40 + tail, ((GOLD[0], "draft"),), GOLD[1])
    keep = CONTEXT - 1 - len("\n\n" + item.candidate)  # all positions but BOS and the candidate
    expected = ScoreItem(item.problem[: (keep + 1) // 2] + item.problem[-(keep // 2):], (), item.candidate)
    assert tokens(expected) == CONTEXT
    fitted = scorer.fit(item)
    assert fitted == expected
    assert fitted.problem.startswith("Start with 7.") and fitted.problem.endswith(tail)
    assert scorer.score_batch([item]) == scorer.score_batch([expected])


def tiny_classifier(path: Path) -> Path:
    """A random one-layer Llama sequence classifier (96 positions) with the character tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from arbitrage_common.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
                      pad_token_id=tok.pad_token_id, num_labels=1)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_classifier_scorer_truncates_annotated_history(tmp_path):
    """HFStepScorer (a sequence-classification head) on a tiny random Llama with 96 positions,
    annotating history: the tags count against the context."""
    scorer = load_step_scorer(tiny_classifier(tmp_path), annotate_history=True)
    assert type(scorer).__name__ == "HFStepScorer" and scorer.context == 96
    item = ScoreItem("Start with 2. Add 2.", tuple((f"{i} + 2 = {i + 2}", "draft") for i in range(12)), "Answer: 4")
    expected = newest_that_fit(item, annotate=True, context=96)
    assert 0 < len(expected.history) < len(item.history)
    assert scorer.fit(item) == expected
    assert scorer.score_batch([item]) == scorer.score_batch([expected])


def test_classifier_scorer_cuts_a_batch_by_its_token_budget_and_keeps_each_score(tmp_path):
    """Forwards of at most ``max_tokens`` padded tokens (rows x the longest) give each row the
    score it gets alone, in the caller's order."""
    from arbitrage_common.backends.hf_scorer import token_budget_chunks

    scorer = load_step_scorer(tiny_classifier(tmp_path))
    texts = ["Start with 2. Add 2." * k + "\n\nAnswer: 4" for k in (3, 1, 2, 1, 3)]
    lengths = [1 + len(t) for t in texts]  # BOS + one token per character
    alone = [scorer.score_texts([t])[0] for t in texts]
    assert scorer.score_texts(texts) == pytest.approx(alone, abs=1e-5)  # one forward: under the default budget
    budget = 2 * max(lengths)
    assert len(token_budget_chunks(lengths, budget)) == 3  # the two 1s, the 2 and a 3, the other 3
    assert scorer.score_texts(texts, max_tokens=budget) == pytest.approx(alone, abs=1e-5)
    assert scorer.score_texts(texts, max_tokens=1) == pytest.approx(alone, abs=1e-5)  # each row alone


def test_token_budget_chunks_bound_rows_times_the_longest():
    from arbitrage_common.backends.hf_scorer import token_budget_chunks

    assert token_budget_chunks([50, 10, 30, 10, 200], 100) == [[1, 3, 2], [0], [4]]
    assert token_budget_chunks([], 100) == []
    assert token_budget_chunks([5, 5, 5], 15) == [[0, 1, 2]]
