"""Training runs are functions of their arguments: seeded score heads, resumes that refuse other
arguments, no fit on an empty split, the card's AUROC of the saved scorer. Tiny models, 1-3 steps."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from arbitrage_common.synthetic import generate_problems
from arbitrage_common.training import prm as prm_mod
from arbitrage_common.training import verifier as verifier_mod
from arbitrage_common.training.lm import train_lm
from arbitrage_common.training.prm import train_prm
from arbitrage_common.training.router import train_router
from arbitrage_common.training.router_data import write_jsonl
from arbitrage_common.training.shapes import Shape
from arbitrage_common.training.verifier import make_verifier

TINY = Shape(hidden=16, layers=1, heads=2, ffn=32)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny causal LM with the bundled character tokenizer (the init of a PRM or a router)."""
    from transformers import LlamaForCausalLM

    from arbitrage_common.tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(123)
    LlamaForCausalLM(TINY.llama_config(len(tokenizer))).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    (path / "training_meta.json").write_text(json.dumps({"role": "prm-lm"}))
    return str(path)


def router_rows(n_problems: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, p in enumerate(generate_problems(n_problems, 4000 + seed)):
        for k, step in enumerate(p.solution_steps()[:3]):
            advantage = rng.uniform(-1, 1)
            rows.append({"problem_id": i, "problem": p.prompt, "history": [[s, "draft"] for s in p.solution_steps()[:k]],
                         "draft_step": step if rng.random() < 0.5 else step[:-1] + "7", "advantage": advantage,
                         "label": int(advantage > 0)})
    return rows


def prm_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": f"Start with {i}.\n\n{rng.randrange(99)} + 1 = {rng.randrange(99)}",
             "writer": ("draft", "target")[i % 2], "temperature": 0.0, "label": int(i % 3 != 0)} for i in range(n)]


@pytest.fixture
def fake_prm_data(monkeypatch):
    """``collect_prm_data`` without models: ``n_problems * 10`` labeled rows (seeded)."""
    calls = []

    def collect(draft, target, n_problems, seed, mixes=("math",)):
        calls.append(n_problems)
        return prm_rows(10 * n_problems, seed)

    monkeypatch.setattr(prm_mod, "collect_prm_data", collect)
    return calls


def tensors(path):
    return load_file(str(path / "model.safetensors"))


def same_weights(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --- 1. a new score head is drawn from the seed ---

def test_router_classifier_runs_with_one_seed_give_identical_weights(tmp_path, tiny_lm):
    data = tmp_path / "rows.jsonl"
    write_jsonl(router_rows(), data)
    outs = {name: tmp_path / name for name in ("a", "b", "other-seed")}
    for i, (name, out) in enumerate(outs.items()):
        torch.manual_seed(i)  # whatever the process did before, the run is the same
        train_router(str(data), tiny_lm, str(out), steps=2, seed=1 if name == "other-seed" else 0, device="cpu")
    assert same_weights(outs["a"], outs["b"])
    assert not torch.equal(tensors(outs["a"])["score.weight"], tensors(outs["other-seed"])["score.weight"])


def test_train_prm_runs_with_one_seed_give_identical_weights(tmp_path, tiny_lm, fake_prm_data):
    outs = [tmp_path / "a", tmp_path / "b"]
    for i, out in enumerate(outs):
        torch.manual_seed(i)
        train_prm(str(out), init=tiny_lm, draft="d", target="t", n_problems=30, steps=2, seed=0)
    assert same_weights(*outs)


# --- 2. a resume with other arguments is refused, naming them ---

def test_lm_resume_refuses_changed_arguments_but_may_move_the_stop(tmp_path):
    out = tmp_path / "lm"
    train_lm("draft", str(out), steps=3, seed=0, batch_size=2, shape=TINY, stop_after=1)
    for kwargs, flag in (({"lr": 1e-3}, "--lr"), ({"seed": 1}, "--seed"), ({"steps": 4}, "--steps"),
                         ({"batch_size": 3}, "--batch-size"), ({"role": "target"}, "--role")):
        args = {"role": "draft", "steps": 3, "seed": 0, "batch_size": 2, "shape": TINY, "stop_after": 2, **kwargs}
        with pytest.raises(ValueError, match=flag) as err:
            train_lm(out_dir=str(out), **args)
        assert f"remove {out / 'ckpt'}" in str(err.value)
    # The same run, stopped later on the same schedule: allowed (what --stop-after is for).
    train_lm("draft", str(out), steps=3, seed=0, batch_size=2, shape=TINY, stop_after=2, threads=2)
    assert json.loads((out / "training_meta.json").read_text())["trained_steps"] == 2


def test_router_classifier_resume_refuses_changed_arguments_or_rows(tmp_path, tiny_lm):
    data, out = tmp_path / "rows.jsonl", tmp_path / "router"
    write_jsonl(router_rows(), data)
    base = {"steps": 2, "seed": 0, "device": "cpu"}
    train_router(str(data), tiny_lm, str(out), **base)
    for kwargs, flag in (({"lr": 1e-3}, "--lr"), ({"steps": 3}, "--steps"), ({"label_margin": 0.3}, "--label-margin"),
                         ({"balance": False}, "--balance"), ({"annotate": False}, "--annotate"), ({"seed": 2}, "--seed")):
        with pytest.raises(ValueError, match=flag):
            train_router(str(data), tiny_lm, str(out), **{**base, **kwargs})
    train_router(str(data), tiny_lm, str(out), **base)  # the same arguments resume (here: nothing left to train)
    write_jsonl(router_rows(seed=1), data)  # same flags, other rows
    with pytest.raises(ValueError, match="training rows"):
        train_router(str(data), tiny_lm, str(out), **base)


def test_cached_prm_data_is_not_reused_for_other_arguments(tmp_path, tiny_lm, fake_prm_data):
    out = tmp_path / "prm"
    train_prm(str(out), init=tiny_lm, draft="d", target="t", n_problems=30, steps=1, seed=0)
    meta = json.loads((out / "ckpt" / "prm_data.meta.json").read_text())
    assert meta["--problems"] == 30 and meta["--mix"] == ["math"]
    for kwargs, flag in (({"n_problems": 40}, "--problems"), ({"mixes": ("olympiad",)}, "--mix"),
                         ({"draft": "other"}, "--draft")):
        args = {"init": tiny_lm, "draft": "d", "target": "t", "n_problems": 30, "steps": 1, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=flag) as err:
            train_prm(str(out), **args)
        assert "prm_data.jsonl" in str(err.value) and f"remove {out / 'ckpt'}" in str(err.value)
    with pytest.raises(ValueError, match="--lr"):  # the data match; the training state does not
        train_prm(str(out), init=tiny_lm, draft="d", target="t", n_problems=30, steps=1, seed=0, lr=1e-3)
    assert fake_prm_data == [30]  # collected once; never again for other arguments
    (out / "ckpt" / "prm_data.meta.json").unlink()  # rows of unknown making are not trusted either
    with pytest.raises(ValueError, match="cannot be checked"):
        train_prm(str(out), init=tiny_lm, draft="d", target="t", n_problems=30, steps=1, seed=0)


# --- 3. no fit on an empty split; the card's AUROC is the saved scorer's ---

@pytest.mark.parametrize("command", ["prm", "verifier"])
def test_too_few_problems_is_an_error_naming_problems(tmp_path, fake_prm_data, command):
    out = tmp_path / command
    with pytest.raises(ValueError, match=r"--problems 4: .*none to train on"):
        if command == "prm":
            train_prm(str(out), init="unused", draft="d", target="t", n_problems=4, steps=1)
        else:
            make_verifier(str(out), lm="unused", draft="d", target="t", n_problems=4)
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


def test_verifier_refuses_one_class_calibration_rows_naming_fit_rows(tmp_path, fake_prm_data):
    with pytest.raises(ValueError, match="--fit-rows"):
        make_verifier(str(tmp_path / "v"), lm="unused", draft="d", target="t", n_problems=40, fit_rows=1)


def test_verifier_card_auroc_is_that_of_the_saved_scorer(tmp_path, tiny_lm, fake_prm_data, monkeypatch):
    """Features that fall as a step gets more likely right: the fitted slope is negative, so the
    saved scorer ranks the held-out steps the other way round from the raw feature."""
    from arbitrage_common.backends.lm_verifier import LMVerifierScorer
    from arbitrage_common.evaluation.metrics import auroc

    labels = {r["text"]: r["label"] for r in prm_rows(400)}
    rng = random.Random(5)
    feature = {t: (-4.0 if y else -2.0) + rng.uniform(-2.0, 2.0) for t, y in labels.items()}
    monkeypatch.setattr(verifier_mod, "min_logprob_features", lambda model, tok, texts, starts: [feature[t] for t in texts])
    out = tmp_path / "v"
    make_verifier(str(out), lm=tiny_lm, draft="d", target="t", n_problems=40, eval_rows=200)
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["calibration"]["a"] < 0
    held = prm_rows(400)
    random.Random(0).shuffle(held)  # split_prm_rows: this shuffle, the first 200 held out
    held = held[:200]
    saved = LMVerifierScorer(out, device="cpu")
    expected = auroc([saved.probability(feature[r["text"]]) for r in held], [r["label"] for r in held])
    raw = auroc([feature[r["text"]] for r in held], [r["label"] for r in held])
    assert meta["held_out_auroc"] == round(expected, 4) > 0.5 > raw


# --- 4. `router eval` and the cards rank logits ---

def test_router_ranking_uses_logits_where_the_probabilities_tie():
    """The bundled verifier-head router gives wrong draft steps exactly 1.0: ranked by
    probability they tie; `router eval` and the card rank its logits, which do not."""
    from pathlib import Path

    from arbitrage_common.backends.scorers import load_step_scorer
    from arbitrage_common.evaluation.metrics import spearman
    from arbitrage_common.training.router import held_out_spearman, rank_rows, score_rows

    scorer = load_step_scorer(Path(__file__).resolve().parents[2] / "models" / "router")
    rows = []
    for i, p in enumerate(generate_problems(3, 777)):
        gold = p.solution_steps()[0]
        for bad in (gold[:-1] + str((int(gold[-1]) + 1) % 10), "99 * 99 = 12", "Answer: 5", "x"):
            rows.append({"problem_id": i, "problem": p.prompt, "history": [], "draft_step": bad})
    probabilities, logits = score_rows(scorer, rows), rank_rows(scorer, rows)
    assert set(probabilities) == {1.0} and len(set(logits)) == len(rows)
    for r, logit in zip(rows, logits):
        r["advantage"] = logit / 1000  # an oracle that agrees with the router's ranking
    assert held_out_spearman(scorer, rows) == pytest.approx(1.0)
    assert spearman(logits, [r["advantage"] for r in rows]) == pytest.approx(1.0)
