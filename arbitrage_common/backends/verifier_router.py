"""An Arbitrage router built on the LM-verifier PRM ("fine-tuned from the PRM").

The PRM's own signal says whether the draft step is wrong; a small trained head on the
LM's final hidden state says whether the target is likely to do better there. Score:
``sigmoid(alpha * -z + w . standardize(h) + c)``, where ``z`` is the PRM's logit of the draft
step (``verifier.json``) and ``h`` the hidden state at the step's last token. With
``w = 0`` it ranks steps exactly as RSD does; training moves it toward the oracle's labels.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch

from ..interfaces import ScoreItem
from .checkpoints import CheckpointError
from .fit import TextFit
from .lm_verifier import load_scoring_lm, read_calibration, split_candidate, step_features
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCachedLM

ROUTER_HEAD_FILE = "router_head.json"


def read_router_head(model_dir: str | Path) -> dict:
    path = Path(model_dir) / ROUTER_HEAD_FILE
    try:
        head = json.loads(path.read_text())
        float(head["alpha"]), float(head["c"])
        if not len(head["w"]) == len(head["mean"]) == len(head["std"]):
            raise ValueError("w, mean and std must have one entry per hidden unit")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable router head ({exc})") from exc
    return head


def verifier_logit(features: Sequence[float], calibration: dict) -> torch.Tensor:
    """The PRM's logit ``a * max(f, floor) + b`` of each step."""
    f = torch.tensor(features, dtype=torch.float64).clamp(min=calibration["floor"])
    return calibration["a"] * f + calibration["b"]


def router_logits(z: torch.Tensor, hidden: torch.Tensor, head: dict) -> torch.Tensor:
    h = (hidden.double() - torch.tensor(head["mean"], dtype=torch.float64)) / torch.tensor(head["std"], dtype=torch.float64)
    return head["alpha"] * -z + h @ torch.tensor(head["w"], dtype=torch.float64) + head["c"]


class VerifierRouterScorer:
    """The router pool's scorer for a ``router_head.json`` checkpoint (history never annotated:
    the LM never saw tags; an item longer than the context is cut by ``self.fit``).

    ``score_batch(items, sessions)`` keeps each session's prefix KV cache (``prefix_cache``,
    at most ``prefix_cache_bytes``; 0 turns it off) and runs only each step's new tokens;
    ``release(session)`` drops a session's cache at the end of its request."""

    annotate_history = False

    def __init__(self, model_dir: str | Path, threads: int | None = None, batch_size: int = 32,
                 device: str | None = None, trust_remote_code: bool = False,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, lean_load: bool = True):
        path = Path(model_dir)
        self.calibration = read_calibration(path)
        self.head = read_router_head(path)
        lm = load_scoring_lm(path, threads, device, trust_remote_code, lean_load)
        self.tokenizer, self.model = lm.tokenizer, lm.model
        if lm.hidden_size != len(self.head["w"]):
            raise CheckpointError(f"{path / ROUTER_HEAD_FILE}: head has {len(self.head['w'])} weights, the model "
                                  f"{lm.hidden_size} hidden units")
        self.batch_size = batch_size
        self.params = lm.params + len(self.head["w"]) + 2
        self.context = lm.context
        self.fit = TextFit(self.tokenizer, self.context, annotate=False)
        self._lock = threading.Lock()
        self.prefix_cache = PrefixCachedLM(self.model, self.tokenizer, prefix_cache_bytes, batch_size, self._lock,
                                           stepper=lm.stepper)

    def _features(self, texts: Sequence[str], starts: Sequence[int]):
        if self.model is None:  # loaded without transformers: the stepper's forward, as a cache miss
            return self.prefix_cache.uncached(texts, starts, with_hidden=True)
        return step_features(self.model, self.tokenizer, texts, starts, self.batch_size, self._lock, with_hidden=True)

    def score_batch(self, items: Sequence[ScoreItem], sessions: Sequence[Hashable | None] | None = None) -> list[float]:
        """One router score per item. ``sessions``: one key per item (None: not cached), e.g.
        the request id; items of a session reuse its cached prefix (same scores as uncached)."""
        if not items:
            return []
        if sessions is None:
            texts, starts = zip(*(split_candidate(self.fit(item)) for item in items))
            mins, hidden = self._features(texts, starts)
        else:
            mins, hidden = self.prefix_cache.features(items, sessions, self.fit, split_candidate, self._features,
                                                      with_hidden=True)
        return torch.sigmoid(router_logits(verifier_logit(mins, self.calibration), hidden, self.head)).tolist()

    def release(self, session: Hashable) -> bool:
        """Drop ``session``'s cached prefix (its request ended); True if it had one."""
        return self.prefix_cache.release(session)
