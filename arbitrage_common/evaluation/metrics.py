"""Small statistics used by the evaluations (no sklearn needed)."""
from __future__ import annotations

from collections.abc import Sequence

from scipy.stats import rankdata, spearmanr


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError("auroc: needs both positive and negative labels")
    ranks = rankdata(scores)
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return float(spearmanr(a, b).statistic)
