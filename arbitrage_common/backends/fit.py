"""Scorer inputs cut to the model's context: ``steps.fit_scorer_input`` applied with a tokenizer.

Every scorer backend calls :func:`fit_item` before it encodes an item. An item that fits is
returned as it is (one exact token count); one that does not becomes a shorter ``ScoreItem``
(newest history steps kept, then the problem's middle cut, then the candidate's head), which
the scorer then scores as if it had been sent so.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..interfaces import ScoreItem
from ..steps import ScorerFit, cut_middle, fit_scorer_input, format_scorer_input, keep_tail, scorer_pieces

Costs = tuple[int, Sequence[int], int]  # problem, each history step, candidate (tokens)


def model_context(model) -> int | None:
    """Positions the model was trained for (``max_position_embeddings``); None: unknown, no cut."""
    return getattr(model.config, "max_position_embeddings", None)


def plain_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Each token's character span in ``text`` (a slow tokenizer has no offsets: one span per
    character, and ``fit_item``'s exact recount trims further if that was too generous)."""
    if getattr(tokenizer, "is_fast", False):
        return [tuple(s) for s in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ["offset_mapping"]]
    return [(i, i + 1) for i in range(len(text))]


def _apply(item: ScoreItem, plan: ScorerFit, costs: Costs, tokenizer) -> ScoreItem:
    problem, candidate = item.problem, item.candidate
    p_cost, _, c_cost = costs
    if plan.problem_tokens < p_cost:
        spans = token_spans(tokenizer, problem)
        # The piece's cost may include a separator the problem's own tokens do not: it stays.
        problem = cut_middle(problem, spans, plan.problem_tokens - (p_cost - len(spans)))
    if plan.candidate_tokens < c_cost:
        spans = token_spans(tokenizer, candidate)
        candidate = keep_tail(candidate, spans, plan.candidate_tokens - (c_cost - len(spans)))
    return ScoreItem(problem, item.history[plan.drop_history:], candidate)


def fit_item(item: ScoreItem, limit: int | None, count: Callable[[ScoreItem], int],
             costs: Callable[[ScoreItem], Costs], tokenizer) -> ScoreItem:
    """``item`` cut so that ``count(item) <= limit`` (``count``: the exact tokens the model would
    read; ``costs``: each piece's tokens). Piece costs need not add up exactly (subword merges
    across pieces, special tokens): the difference is carried as overhead, and the fitted item
    is recounted and cut further until it fits."""
    if limit is None:
        return item
    total = count(item)
    if total <= limit:
        return item
    piece_costs = costs(item)
    p, history, c = piece_costs
    budget = limit - (total - p - sum(history) - c)
    while True:
        plan = fit_scorer_input(p, history, c, budget)
        fitted = _apply(item, plan, piece_costs, tokenizer)
        total = count(fitted)
        if total <= limit:
            return fitted
        if plan == ScorerFit(len(history), 0, 0):
            raise ValueError(f"a context of {limit} tokens cannot hold even an empty scorer input ({total} tokens)")
        budget -= total - limit


class TextFit:
    """``fit_item`` for scorers that read ``format_scorer_input(item, annotate)`` as one text."""

    def __init__(self, tokenizer, limit: int | None, annotate: bool):
        self.tokenizer, self.limit, self.annotate = tokenizer, limit, annotate

    def count(self, item: ScoreItem) -> int:
        return len(self.tokenizer(format_scorer_input(item, self.annotate))["input_ids"])

    def costs(self, item: ScoreItem) -> Costs:
        problem, history, candidate = scorer_pieces(item, self.annotate)
        tok = self.tokenizer
        return plain_tokens(tok, problem), [plain_tokens(tok, h) for h in history], plain_tokens(tok, candidate)

    def __call__(self, item: ScoreItem) -> ScoreItem:
        return fit_item(item, self.limit, self.count, self.costs, self.tokenizer)
