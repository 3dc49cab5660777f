"""The fast Llama stepper computes what transformers computes, with left padding and a KV cache."""
import torch
from transformers import LlamaForCausalLM

from arbitrage_common.backends.steppers import FastLlamaStepper, HFStepper, fast_llama_supported
from arbitrage_common.tokenizer import build_char_tokenizer
from arbitrage_common.training.shapes import Shape


def _model():
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = LlamaForCausalLM(Shape(hidden=32, layers=2, heads=4, ffn=64).llama_config(len(tok))).eval()
    return tok, model


@torch.inference_mode()
def test_fast_stepper_matches_transformers_over_prefill_and_decode():
    tok, model = _model()
    assert fast_llama_supported(model)
    texts = ["Start with 12. Add 30.\n\n", "Start with 7.\n\n", "Start with 99. Subtract 45. Add 10.\n\n"]
    rows = [tok(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    fast, ref = FastLlamaStepper(model), HFStepper(model)
    a, b = fast.prefill(ids, mask, pos, 5), ref.prefill(ids, mask, pos, 5)
    assert torch.allclose(a, b, atol=1e-4)
    next_pos = pos[:, -1] + 1
    for _ in range(5):
        tokens = a.argmax(-1)
        mask = torch.cat([mask, torch.ones((3, 1), dtype=mask.dtype)], dim=1)
        a, b = fast.decode(tokens, mask, next_pos), ref.decode(tokens, mask, next_pos)
        assert torch.allclose(a, b, atol=1e-4)
        next_pos = next_pos + 1
