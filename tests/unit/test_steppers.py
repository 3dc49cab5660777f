"""The fast Llama stepper computes what transformers computes, with left padding and a KV cache."""
import pytest
import torch
from transformers import LlamaForCausalLM

from arbitrage_common.backends import steppers
from arbitrage_common.backends.steppers import FastLlamaStepper, HFStepper, _rotated_half, fast_llama_supported
from arbitrage_common.tokenizer import build_char_tokenizer
from arbitrage_common.training.shapes import Shape


def _model(kv_heads: int | None = None):
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    config = Shape(hidden=32, layers=2, heads=4, ffn=64).llama_config(len(tok))
    if kv_heads is not None:
        config.num_key_value_heads = kv_heads  # grouped-query attention
    model = LlamaForCausalLM(config).eval()
    return tok, model


def _left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _decode_alike(one, other, logits, mask, pos, steps: int, atol: float) -> None:
    """Feed both steppers the same greedy tokens; their logits must agree at every step."""
    next_pos = pos[:, -1] + 1
    for _ in range(steps):
        tokens = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        logits, theirs = one.decode(tokens, mask, next_pos), other.decode(tokens, mask, next_pos)
        assert torch.allclose(logits, theirs, atol=atol)
        next_pos = next_pos + 1


def test_the_folded_rope_columns_give_rotate_half_of_each_head():
    torch.manual_seed(0)
    heads, head_dim = 3, 8
    weight_t, x = torch.randn(16, heads * head_dim), torch.randn(5, 16)
    out = (x @ weight_t).view(5, heads, head_dim)
    expected = torch.cat([-out[..., head_dim // 2:], out[..., :head_dim // 2]], dim=-1).reshape(5, -1)
    assert torch.allclose(x @ _rotated_half(weight_t, heads, head_dim), expected, atol=1e-6)


@torch.inference_mode()
@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_a_prefill_rotating_its_product_equals_one_using_the_folded_columns(kv_heads, monkeypatch):
    # A prefill multiplies by the Q, K, V columns and rotates the product; a decode step uses the
    # folded rotated columns. Both must give the same logits and leave the same keys/values.
    tok, model = _model(kv_heads)
    ids, mask, pos = _left_padded([tok(t).input_ids for t in ["Start with 12. Add 30.\n\n", "Start with 7.\n\n"]])
    rotating, folded = FastLlamaStepper(model), FastLlamaStepper(model)
    a = rotating.prefill(ids, mask, pos, 3)
    monkeypatch.setattr(steppers, "FOLDED_ROPE_MAX_TOKENS", ids.shape[1])
    b = folded.prefill(ids, mask, pos, 3)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    width = ids.shape[1]
    for mine, theirs in zip(rotating.k_cache + rotating.v_cache, folded.k_cache + folded.v_cache):
        assert torch.allclose(mine[:, :, :width], theirs[:, :, :width], atol=1e-6, rtol=0)
    _decode_alike(rotating, folded, a, mask, pos, 3, atol=1e-6)


@torch.inference_mode()
@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_fast_stepper_matches_transformers_over_prefill_and_decode(kv_heads):
    tok, model = _model(kv_heads)
    assert fast_llama_supported(model)
    texts = ["Start with 12. Add 30.\n\n", "Start with 7.\n\n", "Start with 99. Subtract 45. Add 10.\n\n"]
    ids, mask, pos = _left_padded([tok(t).input_ids for t in texts])
    fast, ref = FastLlamaStepper(model), HFStepper(model)
    a, b = fast.prefill(ids, mask, pos, 5), ref.prefill(ids, mask, pos, 5)
    assert torch.allclose(a, b, atol=1e-4)
    _decode_alike(fast, ref, a, mask, pos, 5, atol=1e-4)


@torch.inference_mode()
def test_a_prefill_in_chunks_by_width_equals_the_padded_one():
    # A first step's whole prompt beside other rows' few new tokens: the chunked prefill runs
    # the short rows in their own narrow forward, and every row's logits stay what padding gives.
    _, model = _model()
    torch.manual_seed(1)
    lengths = [3, 5, 150]
    ids, mask, pos = _left_padded([torch.randint(3, 90, (n,)).tolist() for n in lengths])
    padded, chunked = FastLlamaStepper(model), FastLlamaStepper(model)
    forwards = []
    run = chunked._forward
    chunked._forward = lambda *a: forwards.append(a[0].shape) or run(*a)
    a = padded.prefill(ids, mask, pos, 4)
    b = chunked.prefill(ids, mask, pos, 4, new_tokens=lengths)
    assert forwards == [(2, 5), (1, 150)]  # the short rows ran 5 wide, not 150
    assert torch.allclose(a, b, atol=1e-5)
    _decode_alike(padded, chunked, a, mask, pos, 4, atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("chunked", [False, True], ids=["padded", "chunked"])
def test_a_prefill_keeps_the_last_positions_logits_as_transformers_computes_them(chunked):
    # A proposal's verification: the logits of each row's last 4 positions, over narrow and wide
    # rows alike (a chunk keeps 4 columns even when its rows are narrower).
    _, model = _model()
    torch.manual_seed(2)
    lengths = [2, 3, 40]
    ids, mask, pos = _left_padded([torch.randint(3, 90, (n,)).tolist() for n in lengths])
    fast = FastLlamaStepper(model)
    got = fast.prefill(ids, mask, pos, 3, new_tokens=lengths if chunked else None, last=4)
    slow = HFStepper(model).prefill(ids, mask, pos, 3, last=4)
    full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert got.shape == slow.shape == (3, 4, full.shape[-1])
    for row, n in enumerate(lengths):  # its real positions (a short row's first ones are padding)
        real = min(n, 4)
        assert torch.allclose(got[row, -real:], full[row, -real:], atol=1e-4)
        assert torch.allclose(slow[row, -real:], full[row, -real:], atol=1e-5)
