"""A plain Llama generator or LM scorer loads without transformers (``backends.llama_checkpoint``)
and generates or scores what the transformers load does: real loads of the bundled models."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.backends.llama_checkpoint import LeanTokenizer, LlamaCheckpoint, lean_llama_supported
from arbitrage_common.backends.lm_verifier import split_candidate
from arbitrage_common.backends.scorers import load_step_scorer
from arbitrage_common.backends.steppers import FastLlamaStepper
from arbitrage_common.interfaces import GenerationOptions, ScoreItem
from arbitrage_common.steps import build_prefix
from arbitrage_common.synthetic import generate_problems

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PROBLEMS = generate_problems(6, 4040)


@pytest.mark.parametrize("lean", [True, False])
def test_the_pools_backends_start_without_importing_transformers(lean):
    code = ("import sys; from arbitrage_common.backends.hf_generator import HFStepGenerator; "
            "from arbitrage_common.backends.scorers import load_step_scorer; "
            f"g = HFStepGenerator('models/draft', lean_load={lean}); "
            f"s = [load_step_scorer(f'models/{{m}}', lean_load={lean}) for m in ('prm', 'router')]; "
            "print(g.model is None, all(x.model is None for x in s), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == (["True", "True", "False"] if lean else ["False", "False", "True"])


@pytest.mark.parametrize("role", ["draft", "router"])  # the router's tokenizer.json carries a padding setting
def test_the_lean_tokenizer_encodes_and_decodes_as_transformers_does(role):
    lean, ref = LeanTokenizer.from_dir(MODELS / role), AutoTokenizer.from_pretrained(MODELS / role)
    texts = [build_prefix(p.prompt, p.solution_steps()[:2]) for p in PROBLEMS]
    texts += ["", "<s>x</s><pad>", "  two  spaces\tand a tab", "é ü ß"]  # special-token text is split as text
    for text in texts:
        assert lean(text).input_ids == ref(text).input_ids
        mine, theirs = (t(text, add_special_tokens=False, return_offsets_mapping=True) for t in (lean, ref))
        assert mine["input_ids"] == theirs["input_ids"]
        assert mine["offset_mapping"] == [tuple(o) for o in theirs["offset_mapping"]]
    mine, theirs = lean(texts, return_offsets_mapping=True), ref(texts, return_offsets_mapping=True)
    assert mine.input_ids == theirs["input_ids"]  # unpadded, as transformers gives them
    assert mine.offset_mapping == [[tuple(o) for o in row] for row in theirs["offset_mapping"]]
    assert len(lean) == len(ref)
    assert [lean.decode([i]) for i in range(len(ref))] == [ref.decode([i]) for i in range(len(ref))]
    assert (lean.bos_token_id, lean.eos_token_id, lean.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                          ref.pad_token_id)


def test_the_stepper_over_the_checkpoint_holds_the_transformers_models_weights():
    model = AutoModelForCausalLM.from_pretrained(MODELS / "target", dtype=torch.float32)
    ref, lean = FastLlamaStepper(model), FastLlamaStepper.from_checkpoint(LlamaCheckpoint.load(MODELS / "target"))
    assert torch.equal(ref.embed, lean.embed) and torch.equal(ref.lm_head_t, lean.lm_head_t)
    assert torch.equal(ref.final_norm, lean.final_norm) and torch.equal(ref.cos, lean.cos)
    assert len(ref.layers) == len(lean.layers) == model.config.num_hidden_layers
    for mine, theirs in zip(lean.layers, ref.layers):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert LlamaCheckpoint.load(MODELS / "target").params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("role", ["draft", "target"])
def test_lean_and_transformers_loads_generate_the_same_steps(role):
    lean, ref = HFStepGenerator(MODELS / role, threads=1), HFStepGenerator(MODELS / role, threads=1, lean_load=False)
    assert lean.model is None and ref.model is not None
    assert (lean.params, lean.context, lean.eos_ids) == (ref.params, ref.context, ref.eos_ids)
    assert (lean.detokenizer.mode, lean.detokenizer.pieces) == (ref.detokenizer.mode, ref.detokenizer.pieces)
    prompts = [p.prompt for p in PROBLEMS]
    sessions = [f"s{i}" for i in range(len(prompts))]
    steps: dict[str, list[list[str]]] = {"lean": [[] for _ in prompts], "ref": [[] for _ in prompts]}
    for k in range(3):  # over each session's cached prefix from the second step on
        sampled = GenerationOptions(max_new_tokens=40, temperature=0.8, seed=k)
        for name, gen in (("lean", lean), ("ref", ref)):
            got = gen.generate_batch([build_prefix(p, s) for p, s in zip(prompts, steps[name])],
                                     [sampled if i % 2 else GenerationOptions(max_new_tokens=40)
                                      for i in range(len(prompts))], sessions)
            for s, g in zip(steps[name], got):
                s.append(g.text)
        assert steps["lean"] == steps["ref"]
    assert lean.prefix_cache.info()["hits"] == ref.prefix_cache.info()["hits"] > 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_only_plain_llama_checkpoints_load_lean(tmp_path):
    assert lean_llama_supported(MODELS / "draft") and lean_llama_supported(MODELS / "target")
    changes = {
        "config.json": [{"architectures": ["MistralForCausalLM"]}, {"auto_map": {"AutoModelForCausalLM": "x.Y"}},
                        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, {"attention_bias": True},
                        {"quantization_config": {"quant_method": "bitsandbytes"}}],
        "tokenizer_config.json": [{"tokenizer_class": "LlamaTokenizerFast"}, {"clean_up_tokenization_spaces": True},
                                  {"add_bos_token": False}, {"additional_special_tokens": ["<x>"]},
                                  {"eos_token": "<|end|>"}],  # transformers would add a token the vocab lacks
    }
    for name, edits in changes.items():
        for i, edit in enumerate(edits):
            path = _copy(MODELS / "draft", tmp_path / f"{Path(name).stem}{i}")
            (path / name).write_text(json.dumps({**json.loads((path / name).read_text()), **edit}))
            assert not lean_llama_supported(path), (name, edit)
    no_post = _copy(MODELS / "draft", tmp_path / "no_post_processor")
    raw = json.loads((no_post / "tokenizer.json").read_text())
    (no_post / "tokenizer.json").write_text(json.dumps({**raw, "post_processor": None}))
    assert not lean_llama_supported(no_post)  # transformers would write one from the config
    bad_tokenizer = _copy(MODELS / "draft", tmp_path / "bad_tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text("{broken")
    assert not lean_llama_supported(bad_tokenizer)
    with pytest.raises(CheckpointError, match=rf"{bad_tokenizer}: failed to load"):
        HFStepGenerator(bad_tokenizer)
    broken = _copy(MODELS / "draft", tmp_path / "broken")
    (broken / "config.json").write_text("{broken")
    assert not lean_llama_supported(broken)  # the transformers path then names the problem
    with pytest.raises(CheckpointError, match=r"config.json: corrupt JSON"):
        HFStepGenerator(broken)


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_fails_at_load_naming_the_path(damage, tmp_path):
    path = _copy(MODELS / "draft", tmp_path / damage)
    weights = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    if damage == "missing":
        del weights[name]
    else:
        weights[name] = weights[name][:, :-8].contiguous()
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{path}: failed to load"):
        HFStepGenerator(path)


@pytest.mark.parametrize("role", ["prm", "router"])
def test_lean_and_transformers_loads_score_alike_cached_and_not(role):
    lean = load_step_scorer(MODELS / role, threads=1)
    ref = load_step_scorer(MODELS / role, threads=1, lean_load=False)
    assert lean.model is None and ref.model is not None and lean.prefix_cache.enabled
    assert (lean.params, lean.context) == (ref.params, ref.context)
    for k in range(3):  # the second and third steps over each session's cache
        items = [ScoreItem(p.prompt, tuple((s, "draft") for s in p.solution_steps()[:k]), p.solution_steps()[k])
                 for p in PROBLEMS]
        expected = ref.score_batch(items)  # transformers' forward, no cache
        assert lean.score_batch(items) == pytest.approx(expected, abs=1e-5)
        assert lean.score_batch(items, [f"s{i}" for i in range(len(items))]) == pytest.approx(expected, abs=1e-5)
    assert lean.prefix_cache.info()["hits"] > 0
    texts, starts = zip(*(split_candidate(item) for item in items))
    if role == "prm":  # the raw feature too: a calibrated score can saturate and hide a difference
        assert lean.features(texts, starts) == pytest.approx(ref.features(texts, starts), abs=1e-4)


def test_a_lean_scorer_with_its_cache_off_scores_uncached():
    off = load_step_scorer(MODELS / "prm", threads=1, prefix_cache_mb=0)
    ref = load_step_scorer(MODELS / "prm", threads=1, lean_load=False)
    p = PROBLEMS[0]
    item = ScoreItem(p.prompt, ((p.solution_steps()[0], "draft"),), p.solution_steps()[1])
    assert not off.prefix_cache.enabled
    assert off.score_batch([item], ["s"]) == pytest.approx(ref.score_batch([item]), abs=1e-5)
    assert off.prefix_cache.info()["uncached"] == 1 and off.prefix_cache.info()["sessions"] == 0


def test_a_sharded_checkpoint_loads_the_shards_its_index_lists_and_nothing_beside_them(tmp_path):
    path = _copy(MODELS / "draft", tmp_path / "sharded")
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(path / shard))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    save_file({"stray": torch.zeros(1)}, str(path / "adapter_model.safetensors"))  # not the model's: never read
    assert lean_llama_supported(path)
    assert sorted(LlamaCheckpoint.load(path).weights) == names
    prefixes = [build_prefix(p.prompt, []) for p in PROBLEMS]
    options = GenerationOptions(max_new_tokens=40)
    got = HFStepGenerator(path, threads=1).generate_batch(prefixes, options)
    assert [g.text for g in got] == [g.text for g in HFStepGenerator(MODELS / "draft", threads=1,
                                                                     lean_load=False).generate_batch(prefixes, options)]
