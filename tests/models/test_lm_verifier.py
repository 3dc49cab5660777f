"""The bundled PRM is an LM verifier: a causal LM's min token log-prob, calibrated."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.lm_verifier import LMVerifierScorer, split_candidate
from arbitrage_common.backends.scorers import is_lm_verifier, load_step_scorer
from arbitrage_common.interfaces import ScoreItem
from arbitrage_common.synthetic import check_step, generate_problems
from arbitrage_common.training.verifier import candidate_start, fit_logistic

MODELS = Path(__file__).resolve().parents[2] / "models"


def _corrupt(step: str, rng: random.Random) -> str:
    digits = [i for i, c in enumerate(step) if c.isdigit()]
    i = rng.choice(digits[len(digits) // 2:])  # a digit of the result side
    return step[:i] + str((int(step[i]) + rng.randrange(1, 10)) % 10) + step[i + 1:]


@pytest.fixture(scope="module")
def verifier():
    return load_step_scorer(MODELS / "prm", threads=1)


def test_bundled_prm_is_a_calibrated_verifier(verifier):
    assert is_lm_verifier(MODELS / "prm") and isinstance(verifier, LMVerifierScorer)
    meta = json.loads((MODELS / "prm" / "training_meta.json").read_text())
    assert meta["kind"] == "lm_verifier" and meta["held_out_auroc"] >= 0.9


def test_verifier_ranks_correct_steps_above_corrupted_ones(verifier):
    rng = random.Random(5)
    items, labels = [], []
    for p in generate_problems(12, 4242):
        gold = p.solution_steps()
        k = rng.randrange(len(gold))
        history = tuple((s, "draft") for s in gold[:k])
        wrong = _corrupt(gold[k], rng)
        if check_step(p, gold[:k], wrong):
            continue
        items += [ScoreItem(p.prompt, history, gold[k]), ScoreItem(p.prompt, history, wrong)]
        labels += [1, 0]
    scores = verifier.score_batch(items)
    pairs = list(zip(scores[0::2], scores[1::2]))
    assert len(pairs) >= 10 and all(0.0 <= s <= 1.0 for s in scores)
    assert sum(good > bad for good, bad in pairs) >= len(pairs) - 1


def test_batched_features_equal_one_at_a_time(verifier):
    problems = generate_problems(3, 99)
    items = [ScoreItem(p.prompt, tuple((s, "target") for s in p.solution_steps()[:i]), p.solution_steps()[i])
             for p, i in zip(problems, (0, 1, 2))]
    batched = verifier.score_batch(items)
    single = [verifier.score_batch([it])[0] for it in items]
    assert batched == pytest.approx(single, abs=1e-5)
    # The feature is the min log-prob of the candidate's own tokens (computed here directly,
    # with transformers' model: the scorer loads without it, backends.llama_checkpoint).
    text, start = split_candidate(items[2])
    ids = AutoTokenizer.from_pretrained(MODELS / "prm")(text, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(MODELS / "prm", dtype=torch.float32)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    n = len(items[2].candidate)  # char tokenizer: one token per character
    direct = logp[-n:].gather(-1, ids[0, -n:, None]).min().item()
    assert verifier.features([text], [start])[0] == pytest.approx(direct, abs=1e-4)


def test_verifier_refuses_annotations_and_bad_calibration(tmp_path):
    with pytest.raises(ValueError, match="annotate_history"):
        load_step_scorer(MODELS / "prm", annotate_history=True)
    bad = tmp_path / "prm"
    shutil.copytree(MODELS / "prm", bad, ignore=shutil.ignore_patterns("ckpt"))
    (bad / "verifier.json").write_text('{"feature": "min_token_logprob", "a": 1.0}')
    with pytest.raises(CheckpointError, match=r"verifier.json: unreadable"):
        load_step_scorer(bad)


def test_fit_logistic_recovers_known_parameters():
    rng = random.Random(0)
    xs = [rng.uniform(-8, 2) for _ in range(4000)]
    ys = [int(rng.random() < 1 / (1 + 2.718281828 ** -(1.5 * x + 3.0))) for x in xs]
    a, b = fit_logistic(xs, ys)
    assert a == pytest.approx(1.5, rel=0.15) and b == pytest.approx(3.0, rel=0.15)


def test_candidate_start_is_the_last_paragraph():
    text = "problem\n\nstep one\n\nstep two"
    assert text[candidate_start(text):] == "step two"
    assert candidate_start("only") == 0
