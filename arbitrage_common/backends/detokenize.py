"""Generated tokens to text for the transformers generator's decode loop, as vLLM's incremental
detokenizer gives it: a row's text is the decode of all its generated tokens together, not
the concatenation of each token decoded on its own.

Decoding each token alone is wrong for byte-level BPE tokenizers (Llama 3, Qwen2, GPT-2): a
character of several UTF-8 bytes split over tokens decodes as U+FFFD per piece
("πr²" -> "��r��"); and for tokenizers whose decoder depends on the neighbours (SentencePiece's
leading-space rule, WordPiece's "##").

``Detokenizer(tokenizer)`` decides once per tokenizer how (``mode``):

- ``"pieces"``: the tokenizer's decode of any ids is exactly the concatenation of each id's
  own decode (its decoder only fuses tokens, optionally after per-token replacements, as the
  bundled character-level models'), so a row's next text is a lookup in an id -> text table;
- ``"stream"``: a ``tokenizers.decoders.DecodeStream`` per row over the tokenizer's Rust
  backend (what vLLM's ``FastIncrementalDetokenizer`` runs), primed with the end of the row's
  prompt as vLLM primes it;
- ``"offsets"``: a tokenizer without a Rust backend decodes a window of ids with prefix/read
  offsets (vLLM's slow detokenizer, HF TGI).

In the last two a token that ends inside a character yields nothing until a later token
completes it (a row cut there by its budget ends without the incomplete character, as in
vLLM). Special tokens decode as text and nothing is cleaned up, as the vLLM backend asks
(``skip_special_tokens=False``; vLLM never applies ``clean_up_tokenization_spaces``).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a decode gives for bytes that are not (yet) a whole character
# vLLM (FastIncrementalDetokenizer) primes a row's stream with the shortest suffix of its
# prompt of at least 4 tokens (up to 23) that decodes without U+FFFD.
PRIME_MIN, PRIME_MAX = 4, 24
OFFSETS_PRIME = 5  # the prompt tokens the offsets path starts from (vLLM's slow path)
INVALID_PREFIX = "Invalid prefix encountered"  # DecodeStream's error when a decode is not monotonic

# Decoders that map each token to text on its own: a decode is then the concatenation of
# single-token decodes (Replace applies per token only before a Fuse joins them).
_PER_TOKEN_DECODERS = ("Replace", "Fuse")

RowText = Callable[[int], "str | None"]  # a row's next token -> the text it completes (None/"": none yet)


def backend_tokenizer(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (a transformers fast tokenizer's or a
    ``LeanTokenizer``'s), or None for a tokenizer without one."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def decodes_per_token(backend) -> bool:
    """Whether ``backend``'s decoder turns each token into text on its own and joins them: Fuse,
    or Replace steps before any Fuse. No decoder is not (tokenizers then joins with spaces)."""
    if backend is None or backend.decoder is None:
        return False
    try:
        spec = json.loads(backend.decoder.__getstate__())
    except Exception:  # noqa: BLE001 - a custom (Python) decoder has no JSON: not known to be per token
        return False
    kinds = [d.get("type") for d in spec["decoders"]] if spec.get("type") == "Sequence" else [spec.get("type")]
    if not all(kind in _PER_TOKEN_DECODERS for kind in kinds):
        return False
    return "Fuse" not in kinds or all(kind == "Fuse" for kind in kinds[kinds.index("Fuse"):])


class Detokenizer:
    """Per-row incremental detokenization for one tokenizer (see the module docstring);
    ``exact_pieces=False`` never uses the piece table (the general path, for checks)."""

    def __init__(self, tokenizer: Any, exact_pieces: bool = True) -> None:
        self.tokenizer = tokenizer
        self.backend = backend_tokenizer(tokenizer)
        self.pieces: list[str] | None = None
        if self.backend is not None:
            self.mode = "stream"
            if exact_pieces and decodes_per_token(self.backend):
                size = self.backend.get_vocab_size(with_added_tokens=True)
                pieces = [self.backend.decode([i], skip_special_tokens=False) for i in range(size)]
                # A cheap guard on the decoder reading: one decode of the whole vocabulary.
                if self.backend.decode(list(range(size)), skip_special_tokens=False) == "".join(pieces):
                    self.mode, self.pieces = "pieces", pieces
        else:
            self.mode = "offsets"

    def decode(self, ids: Sequence[int]) -> str:
        """A full decode of ``ids``, as the rows' texts follow it."""
        if self.backend is not None:
            return self.backend.decode(list(ids), skip_special_tokens=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def rows(self, prompts: Sequence[Sequence[int]]) -> list[RowText]:
        """For each row (its prompt's ids), a function from its next generated token to the
        text that token completes."""
        if self.pieces is not None:
            return [self.pieces.__getitem__] * len(prompts)
        if self.mode == "stream":
            return [_StreamRow(self.backend, self._primer(prompt)) for prompt in prompts]
        return [_OffsetsRow(self.decode, prompt[-OFFSETS_PRIME:]) for prompt in prompts]

    def _primer(self, prompt: Sequence[int]) -> Sequence[int]:
        if len(prompt) > PRIME_MIN:
            for i in range(PRIME_MIN, min(len(prompt) + 1, PRIME_MAX)):
                if REPLACEMENT not in self.decode(prompt[-i:]):
                    return prompt[-i:]
        return prompt


class _StreamRow:
    """One row's ``DecodeStream``, primed with the end of its prompt (whose text is dropped)."""

    __slots__ = ("backend", "stream")

    def __init__(self, backend, primer: Sequence[int]) -> None:
        from tokenizers.decoders import DecodeStream

        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=False)
        for tok in primer:
            self(tok)

    def __call__(self, tok: int) -> str | None:
        try:
            return self.stream.step(self.backend, tok)
        except Exception as exc:  # tokenizers raises a plain Exception
            if not str(exc).startswith(INVALID_PREFIX):
                raise
            # A decode that does not extend the previous one (rare, invalid UTF-8 runs) breaks
            # the stream's state: start a fresh one at this token, as vLLM recovers.
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=False)
            return self.stream.step(self.backend, tok)


class _OffsetsRow:
    """One row's window of ids: ``[prefix, read)`` is text already given out, kept as context
    for the next token's decode; text comes out once it no longer ends in U+FFFD."""

    __slots__ = ("decode", "ids", "prefix", "read")

    def __init__(self, decode: Callable[[Sequence[int]], str], primer: Sequence[int]) -> None:
        self.decode, self.ids = decode, list(primer)
        self.prefix, self.read = 0, len(self.ids)

    def __call__(self, tok: int) -> str | None:
        self.ids.append(tok)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return None
