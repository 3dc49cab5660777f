"""Every bundled checkpoint loads from models/ and does its job on the synthetic task."""
from pathlib import Path

import pytest

from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.backends.scorers import load_step_scorer
from arbitrage_common.interfaces import GenerationOptions, ScoreItem
from arbitrage_common.steps import build_prefix
from arbitrage_common.synthetic import check_step, generate_problems, is_wellformed

MODELS = Path(__file__).resolve().parents[2] / "models"
PROBLEMS = generate_problems(8, 777)


@pytest.mark.parametrize("role", ["draft", "target"])
def test_lm_checkpoint_writes_wellformed_first_steps(role):
    gen = HFStepGenerator(MODELS / role)
    prefixes = [build_prefix(p.prompt, []) for p in PROBLEMS]
    out = gen.generate_batch(prefixes, GenerationOptions(max_new_tokens=64))
    assert len(out) == len(PROBLEMS)
    assert all(g.finish_reason == "delimiter" for g in out)
    # A well-formed first step: shape of a computation line (the value may be wrong).
    assert sum(is_wellformed(p, [g.text] + p.solution_steps()[1:]) for p, g in zip(PROBLEMS, out)) >= 7
    # Batched and single-row decoding agree (left padding does not change greedy results).
    single = gen.generate_batch(prefixes[:1], GenerationOptions(max_new_tokens=64))[0]
    assert single.text == out[0].text


@pytest.mark.parametrize("role", ["prm", "router"])
def test_scorer_checkpoint_returns_probabilities(role):
    scorer = load_step_scorer(MODELS / role)
    p = PROBLEMS[0]
    gold = p.solution_steps()[0]
    wrong = gold[:-1] + str((int(gold[-1]) + 1) % 10)
    assert check_step(p, [], gold) and not check_step(p, [], wrong)
    scores = scorer.score_batch([ScoreItem(p.prompt, (), gold), ScoreItem(p.prompt, (), wrong)])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    if role == "prm":
        assert scores[0] > scores[1]


def test_every_checkpoint_has_a_model_card_and_only_safetensors():
    for role in ("draft", "target", "prm", "router"):
        d = MODELS / role
        assert (d / "README.md").is_file() and (d / "training_meta.json").is_file()
        assert list(d.glob("*.safetensors")) and not list(d.glob("*.bin"))


def test_models_stay_within_the_size_budget():
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file() and "ckpt" not in f.parts)
    assert total <= 60 * 1024 * 1024


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        HFStepGenerator(tmp_path / "nope")


def test_corrupt_checkpoint_names_the_path_and_problem(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (MODELS / "draft").iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"bad.*failed to load"):
        HFStepGenerator(bad)
    (bad / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config.json: corrupt JSON"):
        HFStepGenerator(bad)
