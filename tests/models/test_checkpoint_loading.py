"""Checkpoints load from safetensors only, and run the checkpoint's own code only when the
model spec says ``trust_remote_code``: real loads of the bundled models, with
``from_pretrained`` wrapped to record what every backend passes."""
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.backends.scorers import load_step_scorer

MODELS = Path(__file__).resolve().parents[2] / "models"


def _bin_only_copy(src: Path, dst: Path) -> Path:
    """``src`` with its weights as a (valid) pytorch_model.bin instead of safetensors."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


@pytest.mark.parametrize("role", ["draft", "prm", "router"])
def test_a_pickle_only_checkpoint_is_refused_naming_the_path(role, tmp_path):
    path = _bin_only_copy(MODELS / role, tmp_path / role)
    load = HFStepGenerator if role == "draft" else load_step_scorer
    with pytest.raises(CheckpointError, match=rf"{path}: no \*\.safetensors weights \(only safetensors are loaded\)"):
        load(path)


def test_a_pickle_beside_the_safetensors_is_never_read(tmp_path):
    path = _bin_only_copy(MODELS / "draft", tmp_path / "both")
    (path / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail")
    shutil.copy2(MODELS / "draft" / "model.safetensors", path)
    HFStepGenerator(path)


@pytest.fixture
def recorded(monkeypatch):
    """Every from_pretrained call's keyword arguments, by class name."""
    calls: dict[str, list[dict]] = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM,
                transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained

        def wrapper(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.setdefault(_name, []).append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", wrapper)
    return calls


def _classifier_checkpoint(path: Path) -> Path:
    from arbitrage_common.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64,
                                   pad_token_id=tok.pad_token_id, num_labels=1)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("trust", [None, False, True])
def test_every_backend_passes_safetensors_and_the_trust_setting(trust, recorded, tmp_path):
    kw = {} if trust is None else {"trust_remote_code": trust}
    HFStepGenerator(MODELS / "draft", lean_load=False, **kw)  # the transformers path (test_lean_loading: the other)
    load_step_scorer(MODELS / "prm", lean_load=False, **kw)
    load_step_scorer(MODELS / "router", lean_load=False, **kw)
    load_step_scorer(_classifier_checkpoint(tmp_path / "clf"), **kw)
    want = bool(trust)
    models = recorded["AutoModelForCausalLM"] + recorded["AutoModelForSequenceClassification"]
    assert len(models) == 4 and len(recorded["AutoTokenizer"]) == 4
    assert all(call["use_safetensors"] is True and call["trust_remote_code"] is want for call in models)
    assert all(call["trust_remote_code"] is want for call in recorded["AutoTokenizer"])
