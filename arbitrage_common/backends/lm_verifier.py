"""A PRM made from a causal LM: how surprised the LM is by a candidate step.

A step's feature is the lowest log-probability the LM gives any of the step's tokens in
context (one slip -- a wrong digit -- is enough to make a step wrong, so the minimum, not
the mean). ``verifier.json`` in the checkpoint holds a logistic calibration fitted on
checker labels, so the score reads as P(step correct) like a classifier PRM's.
"""
from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..interfaces import ScoreItem
from ..steps import format_scorer_input
from .checkpoints import CheckpointError, load_or_explain, pick_device, set_cpu_threads
from .fit import TextFit, model_context
from .llama_checkpoint import LeanTokenizer, lean_llama_supported
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCachedLM
from .steppers import FastLlamaStepper, load_fast_llama

VERIFIER_FILE = "verifier.json"
FEATURE = "min_token_logprob"


def read_calibration(model_dir: str | Path) -> dict:
    path = Path(model_dir) / VERIFIER_FILE
    try:
        cal = json.loads(path.read_text())
        float(cal["a"]), float(cal["b"]), float(cal["floor"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable verifier calibration ({exc})") from exc
    if cal.get("feature") != FEATURE:
        raise CheckpointError(f"{path}: feature {cal.get('feature')!r} is not {FEATURE!r}")
    return cal


def split_candidate(item: ScoreItem) -> tuple[str, int]:
    """The scorer text (history unannotated: the LM never saw tags) and where the candidate starts."""
    text = format_scorer_input(item, annotate=False)
    return text, len(text) - len(item.candidate)


@torch.inference_mode()
def step_features(model, tokenizer, texts: Sequence[str], starts: Sequence[int], batch_size: int = 32,
                  lock: threading.Lock | None = None, with_hidden: bool = False):
    """Per text: the min log-prob over the tokens at or after its candidate start (a char
    offset), and with ``with_hidden`` the final hidden state at its last token ([n, hidden])."""
    mins: list[float] = []
    hidden: list[torch.Tensor] = []
    for lo in range(0, len(texts), batch_size):
        chunk, cut = list(texts[lo: lo + batch_size]), starts[lo: lo + batch_size]
        # Right padding keeps every real token at its true position (no position ids needed).
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        enc = enc.to(model.device)
        with lock if lock is not None else contextlib.nullcontext():
            out = model(**enc, output_hidden_states=with_hidden)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        logp, mask_all = logp.cpu(), enc["attention_mask"].cpu()
        begin, end = offsets[:, 1:, 0], offsets[:, 1:, 1]
        for row in range(len(chunk)):
            mask = (begin[row] >= cut[row]) & (end[row] > begin[row]) & mask_all[row, 1:].bool()
            mins.append(float(logp[row][mask].min()) if mask.any() else 0.0)
        if with_hidden:
            last = mask_all.sum(dim=1) - 1
            hidden.append(out.hidden_states[-1].float().cpu()[torch.arange(len(chunk)), last])
    return mins, (torch.cat(hidden) if with_hidden else None)


def min_logprob_features(model, tokenizer, texts: Sequence[str], starts: Sequence[int],
                         batch_size: int = 32, lock: threading.Lock | None = None) -> list[float]:
    """Min log-prob over the tokens at or after each text's candidate start (char offset)."""
    return step_features(model, tokenizer, texts, starts, batch_size, lock)[0]


def load_causal_lm(model_dir: str | Path, threads: int | None = None, device: str | None = None,
                   trust_remote_code: bool = False):
    """(tokenizer, float32 causal LM in eval mode on ``device``) of a checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_cpu_threads(threads)
    path = Path(model_dir)
    tokenizer = load_or_explain(path, lambda p: AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code))
    model = load_or_explain(path, lambda p: AutoModelForCausalLM.from_pretrained(
        p, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code))
    return tokenizer, model.to(pick_device(device)).eval()


@dataclass(frozen=True)
class ScoringLM:
    """A scorer's causal LM: the transformers ``model``, or None and ``stepper`` when the
    checkpoint loaded without transformers (``llama_checkpoint``: on CPU, plain Llama)."""

    tokenizer: Any
    model: Any
    stepper: FastLlamaStepper | None
    params: int
    context: int | None
    hidden_size: int


def load_scoring_lm(model_dir: str | Path, threads: int | None = None, device: str | None = None,
                    trust_remote_code: bool = False, lean_load: bool = True) -> ScoringLM:
    """The checkpoint's LM for scoring, without transformers where ``lean_llama_supported``
    (a replica starts about 2.5 s of CPU sooner); ``lean_load=False`` forces transformers."""
    path = Path(model_dir)
    if lean_load and not trust_remote_code and pick_device(device) == "cpu" and lean_llama_supported(path):
        set_cpu_threads(threads)
        tokenizer = load_or_explain(path, LeanTokenizer.from_dir)
        checkpoint, stepper = load_or_explain(path, load_fast_llama)
        config = checkpoint.config
        return ScoringLM(tokenizer, None, stepper, checkpoint.params, config.max_position_embeddings, config.hidden_size)
    tokenizer, model = load_causal_lm(path, threads, device, trust_remote_code)
    return ScoringLM(tokenizer, model, None, sum(p.numel() for p in model.parameters()), model_context(model),
                     model.config.hidden_size)


class LMVerifierScorer:
    """``sigmoid(a * max(min_logprob, floor) + b)`` under the checkpoint's causal LM (an item
    longer than its context is cut by ``self.fit``: ``steps.fit_scorer_input``).

    ``score_batch(items, sessions)`` keeps each session's prefix KV cache (``prefix_cache``,
    at most ``prefix_cache_bytes``; 0 turns it off) and runs only each step's new tokens;
    ``release(session)`` drops a session's cache at the end of its request."""

    annotate_history = False

    def __init__(self, model_dir: str | Path, threads: int | None = None, batch_size: int = 32,
                 device: str | None = None, trust_remote_code: bool = False,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, lean_load: bool = True):
        self.calibration = read_calibration(model_dir)  # before the weights: a bad file fails fast
        lm = load_scoring_lm(model_dir, threads, device, trust_remote_code, lean_load)
        self.tokenizer, self.model = lm.tokenizer, lm.model
        self.batch_size = batch_size
        self.params = lm.params
        self.context = lm.context
        self.fit = TextFit(self.tokenizer, self.context, annotate=False)
        self._lock = threading.Lock()
        self.prefix_cache = PrefixCachedLM(self.model, self.tokenizer, prefix_cache_bytes, batch_size, self._lock,
                                           stepper=lm.stepper)

    def features(self, texts: Sequence[str], starts: Sequence[int]) -> list[float]:
        if self.model is None:  # loaded without transformers: the stepper's forward, as a cache miss
            return self.prefix_cache.uncached(texts, starts)[0]
        return min_logprob_features(self.model, self.tokenizer, texts, starts, self.batch_size, self._lock)

    def probability(self, feature: float) -> float:
        c = self.calibration
        z = c["a"] * max(feature, c["floor"]) + c["b"]
        return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0

    def score_texts(self, texts: Sequence[str], starts: Sequence[int]) -> list[float]:
        return [self.probability(f) for f in self.features(texts, starts)]

    def score_batch(self, items: Sequence[ScoreItem], sessions: Sequence[Hashable | None] | None = None) -> list[float]:
        """One P(step correct) per item. ``sessions``: one key per item (None: not cached), e.g.
        the request id; items of a session reuse its cached prefix (same scores as uncached)."""
        if not items:
            return []
        if sessions is None:
            texts, starts = zip(*(split_candidate(self.fit(item)) for item in items))
            return self.score_texts(texts, starts)
        mins, _ = self.prefix_cache.features(items, sessions, self.fit, split_candidate,
                                             lambda texts, starts: (self.features(texts, starts), None))
        return [self.probability(f) for f in mins]

    def release(self, session: Hashable) -> bool:
        """Drop ``session``'s cached prefix (its request ended); True if it had one."""
        return self.prefix_cache.release(session)
