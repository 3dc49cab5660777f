"""Every bundled checkpoint loads from models/ and does its job on the synthetic task."""
import json
import re
import shlex
import tomllib
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


CHECKPOINTS = ("draft", "target", "prm", "router", "prm-independent", "router-independent", "router-classifier")


def test_every_checkpoint_has_a_model_card_and_only_safetensors():
    assert {d.name for d in MODELS.iterdir() if d.is_dir()} == set(CHECKPOINTS)
    for role in CHECKPOINTS:
        d = MODELS / role
        assert (d / "README.md").is_file() and (d / "training_meta.json").is_file()
        json.loads((d / "training_meta.json").read_text())
        assert list(d.glob("*.safetensors")) and not list(d.glob("*.bin"))


def _card_commands(role: str) -> list[str]:
    """The `arbitrage ...` lines of a card's code blocks."""
    blocks = re.findall(r"```\n(.*?)```", (MODELS / role / "README.md").read_text(), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("arbitrage ")]


@pytest.mark.parametrize("role", CHECKPOINTS)
def test_every_card_gives_commands_that_parse(role, monkeypatch):
    """Each card's remake command (and a router's data command: runs/ is not in git) is one the
    CLI accepts, ending in this checkpoint's directory."""
    from arbitrage_common.cli.main import build_parser

    monkeypatch.chdir(MODELS.parent)  # the cards' paths are relative to the checkout
    commands = _card_commands(role)
    assert commands, f"{role}: no remake command"
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])
    assert commands[-1].endswith(f"--out models/{role}")
    if role.startswith("router"):
        data = json.loads((MODELS / role / "training_meta.json").read_text())["data"]
        made = [c for c in commands if c.startswith("arbitrage router data ")]
        assert len(made) == 1 and made[0].endswith(f"--out {data}"), made


def test_the_installed_bundle_carries_every_checkpoint():
    """pyproject's data-files: a non-editable install (the image) has every bundled model."""
    files = tomllib.loads((MODELS.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for role in CHECKPOINTS:
        assert files.get(f"share/arbitrage-serve/models/{role}") == [f"models/{role}/*"], role


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
