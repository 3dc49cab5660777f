"""A router fine-tuned from a classifier PRM starts as 1 - PRM (RSD's ranking)."""
import json

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from arbitrage_common.training.router import is_classifier_prm, start_from_rsd_ranking


def _tiny_classifier():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def test_a_classifier_prm_init_is_negated_so_the_router_starts_as_one_minus_prm(tmp_path):
    (tmp_path / "training_meta.json").write_text(json.dumps({"role": "prm", "kind": "classifier"}))
    model = _tiny_classifier()
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        before = torch.sigmoid(model(input_ids=ids).logits[0, 0]).item()
    assert is_classifier_prm(tmp_path) and start_from_rsd_ranking(model, str(tmp_path))
    with torch.no_grad():
        after = torch.sigmoid(model(input_ids=ids).logits[0, 0]).item()
    assert abs(after - (1 - before)) < 1e-6 and abs(before - 0.5) > 1e-4


def test_an_lm_or_router_init_keeps_its_head(tmp_path):
    model = _tiny_classifier()
    weight = model.score.weight.detach().clone()
    lm, router, verifier = tmp_path / "lm", tmp_path / "router", tmp_path / "verifier"
    for d in (lm, router, verifier):
        d.mkdir()
    (lm / "training_meta.json").write_text(json.dumps({"role": "target"}))
    (router / "training_meta.json").write_text(json.dumps({"role": "router"}))
    (verifier / "training_meta.json").write_text(json.dumps({"role": "prm"}))
    (verifier / "verifier.json").write_text("{}")  # an LM verifier: its LM has no score head to keep
    for d in (lm, router, verifier, tmp_path / "missing"):
        assert not start_from_rsd_ranking(model, str(d))
    assert torch.equal(model.score.weight, weight)
