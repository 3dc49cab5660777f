"""The bundled router: the PRM's frozen LM plus a logistic head fitted to oracle labels."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.scorers import load_step_scorer
from arbitrage_common.backends.verifier_router import VerifierRouterScorer, router_logits
from arbitrage_common.interfaces import ScoreItem
from arbitrage_common.synthetic import generate_problems
from arbitrage_common.training.verifier_router import fit_head

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def router():
    return load_step_scorer(MODELS / "router", threads=1)


def test_bundled_router_is_a_verifier_head_router(router):
    assert isinstance(router, VerifierRouterScorer) and router.annotate_history is False
    meta = json.loads((MODELS / "router" / "training_meta.json").read_text())
    assert meta["kind"] == "verifier_head" and meta["held_out_spearman_vs_oracle_advantage"] > 0.5


def test_router_scores_a_wrong_fixable_draft_step_above_its_correct_version(router):
    rng = random.Random(3)
    higher = 0
    problems = [p for p in generate_problems(40, 31337) if p.step_tiers()[0] != "hard"][:10]
    for p in problems:
        gold = p.solution_steps()[0]
        i = len(gold) - 1  # the last digit of the first step's result
        wrong = gold[:i] + str((int(gold[i]) + rng.randrange(1, 10)) % 10)
        good, bad = router.score_batch([ScoreItem(p.prompt, (), gold), ScoreItem(p.prompt, (), wrong)])
        assert 0.0 <= good <= 1.0 and 0.0 <= bad <= 1.0
        higher += bad > good
    assert len(problems) == 10 and higher >= 9


def test_head_with_no_hidden_weights_ranks_like_the_prm():
    z = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)
    head = {"alpha": 1.0, "c": 0.0, "w": [0.0, 0.0], "mean": [0.0, 0.0], "std": [1.0, 1.0]}
    logits = router_logits(z, torch.randn(3, 2), head)
    assert torch.equal(torch.argsort(logits), torch.argsort(-z))


def test_fit_head_learns_a_signal_in_the_hidden_state():
    gen = torch.Generator().manual_seed(0)
    n = 2000
    hidden = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    logit = -1.0 * z + 2.0 * hidden[:, 2]  # hidden unit 2 carries "the target can fix this"
    labels = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(logit)).int().tolist()
    head = fit_head(z, hidden, labels, l2=1e-4)
    assert head["alpha"] == pytest.approx(1.0, rel=0.3)
    assert abs(head["w"][2]) > 3 * max(abs(head["w"][i]) for i in (0, 1, 3))


def test_bad_router_head_names_the_file(tmp_path):
    bad = tmp_path / "router"
    shutil.copytree(MODELS / "router", bad, ignore=shutil.ignore_patterns("ckpt"))
    head = json.loads((bad / "router_head.json").read_text())
    head["w"] = head["w"][:-1]
    (bad / "router_head.json").write_text(json.dumps(head))
    with pytest.raises(CheckpointError, match=r"router_head.json: unreadable router head"):
        load_step_scorer(bad)
    with pytest.raises(ValueError, match="annotate_history"):
        load_step_scorer(MODELS / "router", annotate_history=True)
