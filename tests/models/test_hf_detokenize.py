"""The transformers generator's text is the decode of its generated tokens together, as vLLM's
incremental detokenizer gives it, and it stops on every EOS id vLLM stops on.

A byte-level BPE tokenizer (Llama 3 / Qwen2 style: GPT-2's byte alphabet and decoder) is built
offline with ``tokenizers``; its extra tokens straddle UTF-8 characters and the step delimiter
as real merges do. A tiny random Llama goes with it into a checkpoint directory, so the
generator loads it as it loads any model. Scripted rows swap the model for a stepper that
makes each row generate given tokens; random rows run the real model and are checked against
a reference computed from full decodes (``reference``), never against the detokenizer itself.
"""
import json
import random
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from arbitrage_common.backends import hf_generator
from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.backends.row_decoding import RowSteps
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.steps import STEP_DELIMITER, as_written, build_prefix
from arbitrage_common.synthetic import generate_problems

MODELS = Path(__file__).resolve().parents[2] / "models"
SPECIALS = ["<pad>", "<eos>", "<eom>"]  # <eom>: an EOS in the generation config only (Llama 3.1's <|eom_id|>)
# Tokens as byte-level BPE merges make them: across characters' UTF-8 bytes and the delimiter.
EXTRA = [b"\n\n", b"2\n", b"\nThen", b"\n\nT", b"\n\xcf", b"\x80y", b" \xcf", b"\x80r\xc2", b"\xb2 \xe2\x89",
         b"\xa4 4\xe2", b"\x88\x9a2", b"Area", b" =", b"\xe2\x88", b"\xcf\x80", b"\xc2\xb2"]
EOS_IDS = {1, 2}  # <eos>, <eom>
STEP = "Area = \u03c0r\u00b2 \u2264 4\u221a2"  # "Area = πr² ≤ 4√2"


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ``ByteLevel`` writes tokens in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


BYTE = byte_chars()


def token(raw: bytes) -> str:
    return "".join(BYTE[b] for b in raw)


def bytelevel_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + [BYTE[b] for b in range(256)] + [token(e) for e in EXTRA])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(SPECIALS)
    return tok


def decode(ids: list[int]) -> str:
    """The reference: one decode of all the ids (special tokens as text, as the backends write them)."""
    return bytelevel_tokenizer().decode(ids, skip_special_tokens=False)


def test_the_byte_alphabet_is_the_one_bytelevel_uses():
    assert sorted(BYTE.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = bytelevel_tokenizer()
    assert tok.encode(STEP).ids == [tok.token_to_id(BYTE[b]) for b in STEP.encode()]
    assert tok.decode(tok.encode(STEP).ids) == STEP
    assert {tok.token_to_id("<eos>"), tok.token_to_id("<eom>")} == EOS_IDS
    assert [tok.decode(ids(tok, b" \xcf")), tok.decode(ids(tok, b"\x80r\xc2"))] == [" \ufffd", "\ufffdr\ufffd"]


def make_checkpoint(path: Path, favoured: list[bytes]) -> Path:
    """A tiny random Llama with the byte-level tokenizer; EOS <eos>, the generation config's
    [<eos>, <eom>]. Its head is sharper than a fresh init's for the ``favoured`` tokens and
    <eom>, so sampled rows pick them (and the newlines among them) often."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = bytelevel_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(path)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.token_to_id("<eos>"), pad_token_id=tok.token_to_id("<pad>"),
                         bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[[tok.token_to_id(token(t)) for t in favoured] + [tok.token_to_id("<eom>")]] *= 60
    model.save_pretrained(path)
    eos = [tok.token_to_id("<eos>"), tok.token_to_id("<eom>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Favouring the tokens that straddle characters and the delimiter."""
    return make_checkpoint(tmp_path_factory.mktemp("bytelevel"), EXTRA + [bytes([b]) for b in b"\n\xcf\x80\xe2 x2"])


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory) -> Path:
    """Favouring single bytes (as the tokenizer, without merges, encodes text), so that a
    step's text re-encodes to the tokens the model generates and a proposal can be kept."""
    return make_checkpoint(tmp_path_factory.mktemp("bytes"), [bytes([b]) for b in b"\n\xcf\x80\xe2\x89\xa4 x2=+"])


def ids(tok: Tokenizer, *parts) -> list[int]:
    """Token ids of ``parts``: a special's name, a vocabulary token's bytes, or text as one token per byte."""
    out = []
    for part in parts:
        if part in SPECIALS:
            out.append(tok.token_to_id(part))
        elif isinstance(part, bytes):
            assert tok.token_to_id(token(part)) is not None, part
            out.append(tok.token_to_id(token(part)))
        else:
            out += [tok.token_to_id(BYTE[b]) for b in part.encode()]
    return out


def reference(decode, script: list[int], eos_ids, budget: int, delimiter: str = STEP_DELIMITER):
    """(text, tokens, finish reason) of a row generating ``script``, from full decodes only: the
    text out after k tokens is the decode of its first j tokens, for the largest j <= k whose
    decode does not end inside a character (U+FFFD); the row ends at the first EOS, at the first
    k whose text holds the delimiter (with the text before it), or at its budget."""
    out = ""
    for k, tok in enumerate(script[:budget], start=1):
        if tok in eos_ids:
            return out.strip(), k, "eos"
        if not (text := decode(script[:k])).endswith("\ufffd"):
            out = text
        if delimiter in out:
            return out[: out.index(delimiter)].strip(), k, "delimiter"
    assert len(script) >= budget, "script too short for its budget"
    return out.strip(), budget, "length"


class Scripted:
    """Stands in for the model: the row whose prompt ends with token ``t`` generates
    ``scripts[t]`` (greedy picks), then ``<pad>``; rows may come in any order."""

    supports_past = False

    def __init__(self, scripts: dict[int, list[int]], vocab: int):
        self.scripts, self.vocab = scripts, vocab

    def _logits(self):
        out = torch.zeros(len(self.rows), self.vocab)
        for r, (script, k) in enumerate(zip(self.rows, self.at)):
            out[r, script[k] if k < len(script) else 0] = 1.0
        return out

    def prefill(self, ids, mask, positions, max_new_tokens, past=None, new_tokens=None, last=1):
        assert past is None and last == 1
        self.rows, self.at = [self.scripts[int(t)] for t in ids[:, -1]], [0] * ids.shape[0]
        return self._logits()

    def decode(self, tokens, mask, positions):
        self.at = [k + 1 for k in self.at]
        return self._logits()


def run_scripts(checkpoint, scripts: list[list[int]], budget: int, **load):
    """Each script as one row of one greedy call (prompts "Q: a", "Q: b", ...): (the rows'
    (text, tokens, finish reason), the generator)."""
    gen = HFStepGenerator(checkpoint, threads=1, prefix_cache_bytes=0, verify_proposals=False, **load)
    prompts = [f"Q: {chr(ord('a') + i)}" for i in range(len(scripts))]
    ends = [gen.tokenizer(p).input_ids[-1] for p in prompts]
    assert len(set(ends)) == len(ends)
    gen.stepper = Scripted(dict(zip(ends, scripts)), len(gen.tokenizer))
    got = gen.generate_batch(prompts, GenerationOptions(max_new_tokens=budget))
    return [(g.text, g.tokens, g.finish_reason) for g in got], gen


@pytest.mark.parametrize("lean_load", [True, False], ids=["lean", "transformers"])
def test_multibyte_characters_come_out_as_the_full_decode(checkpoint, lean_load):
    tok = bytelevel_tokenizer()
    scripts = [
        ids(tok, STEP, "\n\n", "Then"),  # every byte its own token: each character split
        ids(tok, b"Area", b" =", b" \xcf", b"\x80r\xc2", b"\xb2 \xe2\x89", b"\xa4 4\xe2", b"\x88\x9a2", b"\n\n", "x"),
        ids(tok, b"Area", b" =", " ", b"\xcf\x80", "r", b"\xc2\xb2", " ", b"\xe2\x88", b"\x9a", "2", "<eos>"),
        ids(tok, STEP, "  more"),  # cut by the budget on a character boundary
    ]
    got, gen = run_scripts(checkpoint, scripts, budget=len(STEP.encode()) + 2, lean_load=lean_load)
    assert got[0] == (STEP, len(STEP.encode()) + 2, "delimiter")
    assert got[1] == (STEP, 8, "delimiter")
    assert got[2] == ("Area = \u03c0r\u00b2 \u221a2", 11, "eos")
    assert got[3] == (STEP, len(STEP.encode()) + 2, "length")
    assert gen.detokenizer.mode == "stream"
    for script, result in zip(scripts, got):
        assert result == reference(decode, script, EOS_IDS, len(STEP.encode()) + 2)
        assert result[0] == gen.tokenizer.decode(script[: result[1]]).split("\n\n")[0].replace("<eos>", "").strip()


def test_a_delimiter_split_across_tokens_ends_the_step_as_one_in_a_token(checkpoint):
    tok = bytelevel_tokenizer()
    scripts = [
        ids(tok, "x = 2", b"\n\n", "Then"),  # the delimiter as one token: the reference case
        ids(tok, "x = 2", "\n", "\n", "Then"),  # split over two tokens
        ids(tok, "x = ", b"2\n", b"\nThen", "!"),  # split, each half inside a token with other text
        ids(tok, "x = ", b"2\n", b"\n\nT", "!"),  # the delimiter inside a token, text after it
        ids(tok, "x = 2", "\n", b"\n\xcf", b"\x80y", "!"),  # completed in a token ending inside a character
    ]
    got, _ = run_scripts(checkpoint, scripts, budget=12)
    assert got == [("x = 2", 6, "delimiter"), ("x = 2", 7, "delimiter"), ("x = 2", 6, "delimiter"),
                   ("x = 2", 6, "delimiter"), ("x = 2", 8, "delimiter")]
    # the token count is the generated tokens through the one whose text completes the delimiter
    # (the last row's delimiter is text once the character after it is whole, as in vLLM)
    for script, result in zip(scripts, got):
        assert result == reference(decode, script, EOS_IDS, 12)


def test_an_eos_id_only_in_the_generation_config_stops_the_row(checkpoint, tmp_path):
    tok = bytelevel_tokenizer()
    eos, eom = tok.token_to_id("<eos>"), tok.token_to_id("<eom>")
    scripts = [ids(tok, "x = 2", "<eom>", "more text"), ids(tok, "x = 2", "<eos>", "more text"),
               ids(tok, "x = 2 and more")]
    got, gen = run_scripts(checkpoint, scripts, budget=10)
    assert got == [("x = 2", 6, "eos"), ("x = 2", 6, "eos"), ("x = 2 and", 10, "length")]
    assert gen.tokenizer.eos_token_id == eos and gen.eos_ids == {eos, eom}
    # an int in the generation config counts too, and config.json's when there is none
    for name, content in (("generation_config.json", {"eos_token_id": eom}), ("config.json", None)):
        other = tmp_path / name.split(".")[0]
        other.mkdir()
        for f in checkpoint.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        if content is None:
            (other / "generation_config.json").unlink()
            config = json.loads((other / "config.json").read_text())
            (other / "config.json").write_text(json.dumps({**config, "eos_token_id": [eom, 7]}))
        else:
            (other / name).write_text(json.dumps(content))
        got, gen = run_scripts(other, scripts, budget=10)
        assert got[0] == ("x = 2", 6, "eos")
        assert gen.eos_ids == ({eos, eom} if content else {eos, eom, 7})


class Recording(RowSteps):
    made: ClassVar[list[RowSteps]] = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        Recording.made.append(self)


def test_random_rows_of_the_real_model_give_the_reference_text(checkpoint, monkeypatch):
    """Sampled rows over many seeds: each row's result is the reference computed from full
    decodes of the tokens it generated (split characters, delimiters, both EOS ids)."""
    monkeypatch.setattr(hf_generator, "RowSteps", Recording)
    gen = HFStepGenerator(checkpoint, threads=1)
    prompts = [f"P{i}: " for i in range(10, 26)]  # one length: rows keep their order in the decode loop
    reasons, split = set(), 0
    for seed in range(8):
        Recording.made.clear()
        options = [GenerationOptions(max_new_tokens=24, temperature=1.0, seed=seed * 100 + i) for i in range(16)]
        got = gen.generate_batch(prompts, options)
        (steps,) = Recording.made
        for g, row in zip(got, steps.generated):
            assert (g.text, g.tokens, g.finish_reason) == reference(decode, row, EOS_IDS, 24)
            reasons.add(g.finish_reason)
            split += any("\ufffd" in gen.tokenizer.decode([t]) for t in row)
    assert reasons == {"eos", "delimiter", "length"} and split > 20  # the cases above were all hit


@pytest.mark.parametrize("favouring", ["bytes", "straddling tokens"])
def test_proposals_verify_to_the_plain_output_with_a_bytelevel_tokenizer(byte_checkpoint, checkpoint, favouring):
    """The target verifying a proposal (its own step, or another row's) gives its plain output."""
    path = byte_checkpoint if favouring == "bytes" else checkpoint
    target = HFStepGenerator(path, threads=1)
    plain = HFStepGenerator(path, threads=1, verify_proposals=False)
    prompts = [f"P{i}: " for i in range(10, 18)]
    options = [GenerationOptions(max_new_tokens=24, temperature=1.0, seed=i) for i in range(8)]
    want = plain.generate_batch(prompts, options)
    for guesses in (want, want[1:] + want[:1]):
        proposed = [GenerationOptions(o.max_new_tokens, o.temperature, o.seed, as_written(g.text, g.finish_reason))
                    for o, g in zip(options, guesses)]
        got = target.generate_batch(prompts, proposed, [f"s{i}" for i in range(8)])
        assert [(g.text, g.tokens, g.finish_reason) for g in got] == [(g.text, g.tokens, g.finish_reason)
                                                                       for g in want]
    if favouring == "bytes":  # else the generated tokens are rarely the ones the text re-encodes to
        assert 0 < target.speculation["accepted"] < target.speculation["proposed"]


def test_the_detokenizer_paths_agree_with_a_full_decode():
    """Random ids through each path (piece table, DecodeStream, prefix/read offsets) give the
    reference text; a SentencePiece-style tokenizer keeps the spaces its pieces lose alone."""
    from arbitrage_common.backends.detokenize import Detokenizer

    class NoBackend:  # a tokenizer without a Rust backend (a slow one): decode only
        def __init__(self, tok):
            self.tok = tok

        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    class Wrapped:
        def __init__(self, tok):
            self.backend_tokenizer = tok

    sp = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(["<unk>", "\u2581Hello", "\u2581world", "\u2581x",
                                                                  "=", "\u2581", "<0x0A>"])}, merges=[]))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    assert sp.decode([1]) + sp.decode([2]) == "Helloworld" != sp.decode([1, 2])
    rng = random.Random(5)
    texts = ["", "x", "Hello world", "x = \u03c0", STEP]
    for tok in (bytelevel_tokenizer(), sp):
        size = tok.get_vocab_size()
        for wrapper, mode in ((Wrapped(tok), "stream"), (NoBackend(tok), "offsets")):
            detok = Detokenizer(wrapper)
            assert detok.mode == mode
            for _ in range(40):
                prompt = tok.encode(rng.choice(texts)).ids  # a prompt is text: whole characters
                row = [rng.randrange(size) for _ in range(rng.randrange(1, 12))]
                step = detok.rows([prompt])[0]
                text = "".join(step(t) or "" for t in row)
                # the decode of the longest start of the row that ends on a whole character
                whole = max((tok.decode(row[:k], skip_special_tokens=False) for k in range(len(row) + 1)
                             if not tok.decode(row[:k], skip_special_tokens=False).endswith("\ufffd")), key=len)
                # (the prompt gives the first token context: a leading space kept, then stripped as a step)
                assert text.strip() == whole.strip()
    bundled = Tokenizer.from_file(str(MODELS / "draft" / "tokenizer.json"))
    fast, general = Detokenizer(Wrapped(bundled)), Detokenizer(Wrapped(bundled), exact_pieces=False)
    assert (fast.mode, general.mode) == ("pieces", "stream")
    row = [rng.randrange(bundled.get_vocab_size()) for _ in range(400)]
    fast_step, general_step = fast.rows([[1]])[0], general.rows([[1]])[0]
    assert "".join(fast_step(t) for t in row) == "".join(general_step(t) or "" for t in row) == bundled.decode(
        row, skip_special_tokens=False)


@pytest.mark.parametrize("role", ["draft", "target"])
def test_the_bundled_models_take_the_piece_table_and_generate_what_the_general_path_does(role):
    from arbitrage_common.backends.detokenize import Detokenizer

    fast, general = HFStepGenerator(MODELS / role, threads=1), HFStepGenerator(MODELS / role, threads=1)
    general.detokenizer = Detokenizer(general.tokenizer, exact_pieces=False)
    assert fast.detokenizer.mode == "pieces" and general.detokenizer.mode == "stream"
    assert fast.eos_ids == {fast.tokenizer.eos_token_id}
    problems = generate_problems(6, 515)
    steps = {"fast": [[] for _ in problems], "general": [[] for _ in problems]}
    results = {"fast": [], "general": []}
    for k in range(3):
        options = [GenerationOptions(max_new_tokens=48, temperature=0.9 * (i % 2), seed=k * 10 + i)
                   for i in range(len(problems))]
        for name, gen in (("fast", fast), ("general", general)):
            got = gen.generate_batch([build_prefix(p.prompt, s) for p, s in zip(problems, steps[name])], options,
                                     [f"{name}{i}" for i in range(len(problems))])
            results[name] += [(g.text, g.tokens, g.finish_reason) for g in got]
            for s, g in zip(steps[name], got):
                s.append(g.text)
        assert results["fast"] == results["general"]
