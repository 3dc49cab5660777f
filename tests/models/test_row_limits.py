"""Per-row limits of the transformers generator on the bundled models: in one batch every row
gets its own context check, token budget, temperature and seed, so each row's result is the
one it gets alone, and a prefix that fills the context is answered "context", not an error."""
from pathlib import Path

import pytest

from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.steps import build_prefix
from arbitrage_common.synthetic import generate_problems

MODELS = Path(__file__).resolve().parents[2] / "models"
CONTEXT = 512  # max_position_embeddings of the bundled generators (config.json)
PREFIXES = [build_prefix(p.prompt, []) for p in generate_problems(4, 4242)]


def chars_to_tokens(text: str) -> int:
    """The bundled character tokenizer: BOS plus one token per (ASCII) character."""
    assert text.isascii()
    return 1 + len(text)


def near_context(room: int) -> str:
    """A prefix (opening a fresh step) that leaves ``room`` tokens of the context."""
    body = (PREFIXES[0] + "1 + 1 = 2\n" * 60)[: CONTEXT - room - chars_to_tokens("\n\n")]
    text = body + "\n\n"
    assert chars_to_tokens(text) == CONTEXT - room
    return text


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "hf-stepper"])
def gen(request):
    g = HFStepGenerator(MODELS / "draft", fast_path=request.param)
    assert g.fast_path is request.param and g.context == CONTEXT
    return g


def triple(g):
    return g.text, g.tokens, g.finish_reason


def test_every_row_of_a_mixed_batch_is_what_it_is_alone(gen):
    overlong = "Start with 1. " * 50  # 701 tokens: more than the whole context
    near = near_context(room=3)
    rows = [
        (overlong, GenerationOptions(max_new_tokens=64)),
        (PREFIXES[1], GenerationOptions(max_new_tokens=64)),  # short, greedy
        (PREFIXES[2], GenerationOptions(max_new_tokens=4)),  # its own small budget
        (PREFIXES[3], GenerationOptions(max_new_tokens=48, temperature=1.2, seed=7)),  # sampled
        (near, GenerationOptions(max_new_tokens=64)),  # budget capped to the 3 tokens left
        (PREFIXES[1], GenerationOptions(max_new_tokens=64, temperature=0.8)),  # sampled, seed None
    ]
    batch = gen.generate_batch([p for p, _ in rows], [o for _, o in rows])
    alone = [gen.generate_batch([p], o)[0] for p, o in rows]
    assert [triple(g) for g in batch] == [triple(g) for g in alone]
    assert triple(batch[0]) == ("", 0, "context")
    assert batch[1].finish_reason == "delimiter" and batch[1].tokens > 4  # not cut by row 2's budget
    assert (batch[2].tokens, batch[2].finish_reason) == (4, "length")
    assert batch[4].tokens <= 3 and batch[4].finish_reason in ("length", "eos")
    assert batch[4].finish_reason == "length"  # the bundled draft writes on at this prefix
    assert len({g.seconds for g in batch}) == 1  # one forward pass


def test_batch_of_one_seed_per_call_gives_row_i_seed_plus_i(gen):
    opts = GenerationOptions(max_new_tokens=32, temperature=1.5, seed=11)
    batch = gen.generate_batch(PREFIXES[:3], opts)
    alone = [gen.generate_batch([p], GenerationOptions(32, 1.5, 11 + i))[0] for i, p in enumerate(PREFIXES[:3])]
    assert [triple(g) for g in batch] == [triple(g) for g in alone]
    same = gen.generate_batch([PREFIXES[0]] * 3, opts)
    assert len({g.text for g in same}) > 1  # equal prefixes of one call draw different samples


def test_the_context_boundary():
    gen = HFStepGenerator(MODELS / "draft")
    full, one_left = near_context(room=0), near_context(room=1)
    got = gen.generate_batch([full, one_left, PREFIXES[0]], GenerationOptions(max_new_tokens=64))
    assert triple(got[0]) == ("", 0, "context")
    assert got[1].tokens == 1 and got[1].finish_reason in ("length", "eos")
    assert got[2].finish_reason == "delimiter"
    assert [triple(g) for g in gen.generate_batch([full, full], GenerationOptions())] == [("", 0, "context")] * 2
    zero = gen.generate_batch([PREFIXES[0]], GenerationOptions(max_new_tokens=0))
    assert triple(zero[0]) == ("", 0, "length")


def test_count_tokens_is_what_the_tokenizer_gives():
    from transformers import AutoTokenizer

    gen = HFStepGenerator(MODELS / "target")
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "target")
    for text in ["", "x", PREFIXES[0], near_context(room=5), "a</s>b<s>"]:
        assert gen.count_tokens(text) == len(tokenizer(text).input_ids)
    assert gen.count_tokens(PREFIXES[0]) == chars_to_tokens(PREFIXES[0])
    assert gen.count_tokens("a</s>b") == 7  # special-token text is data: split into characters


def test_options_must_be_one_or_one_per_prefix(gen):
    with pytest.raises(ValueError, match="options: 1 for 2 prefixes"):
        gen.generate_batch(PREFIXES[:2], [GenerationOptions()])
