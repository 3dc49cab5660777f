"""Lean batched step generation on a transformers causal LM.

No ``generate()``: one prefill, then a greedy/sampled decode loop over the KV cache,
stopping each row at the step delimiter, EOS or its token limit. Per-token Python
work is a table lookup and a suffix check per active row.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..interfaces import Generation, GenerationOptions
from ..steps import STEP_DELIMITER
from .checkpoints import load_or_explain
from .steppers import FastLlamaStepper, HFStepper, fast_llama_supported


class HFStepGenerator:
    """Synchronous batched step generator; thread-safe (one forward at a time)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, delimiter: str = STEP_DELIMITER,
                 fast_path: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)  # denormals make tiny CPU models several times slower
        path = Path(model_dir)
        self.tokenizer = load_or_explain(path, AutoTokenizer.from_pretrained)
        self.model = load_or_explain(path, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
        self.model.eval()
        self.delimiter = delimiter
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        # id -> text table: the decode loop never calls the tokenizer.
        self.piece = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        self.params = sum(p.numel() for p in self.model.parameters())
        self.fast_path = fast_path and fast_llama_supported(self.model)
        self.stepper = FastLlamaStepper(self.model) if self.fast_path else HFStepper(self.model)
        self.context = self.model.config.max_position_embeddings
        self._lock = threading.Lock()

    def _encode(self, prefixes: Sequence[str]):
        rows = [self.tokenizer(p).input_ids for p in prefixes]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last token is aligned
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask

    @torch.inference_mode()
    def generate_batch(self, prefixes: Sequence[str], options: GenerationOptions) -> list[Generation]:
        if not prefixes:
            return []
        with self._lock:
            start = time.perf_counter()
            texts, counts, reasons = self._decode(prefixes, options)
            seconds = time.perf_counter() - start
        return [Generation(t, n, r, seconds) for t, n, r in zip(texts, counts, reasons)]

    def _decode(self, prefixes, options: GenerationOptions):
        n = len(prefixes)
        ids, mask = self._encode(prefixes)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        sampler = None
        if options.temperature > 0:
            sampler = torch.Generator().manual_seed(options.seed if options.seed is not None else 0)
        if ids.shape[1] >= self.context:
            raise ValueError(f"prompt: {ids.shape[1]} tokens leave no room in the model's context of {self.context}")
        max_new = min(options.max_new_tokens, self.context - ids.shape[1])
        stepper = self.stepper
        logits = stepper.prefill(ids, mask, positions, max_new)
        texts, counts, reasons = [""] * n, [0] * n, ["length"] * n
        active = list(range(n))
        next_pos = positions[:, -1] + 1
        for _ in range(max_new):
            if sampler is None:
                tokens = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / options.temperature, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=sampler).squeeze(-1)
            token_list = tokens.tolist()
            still = []
            for i in active:
                tok = token_list[i]
                counts[i] += 1
                if tok == self.eos_id:
                    reasons[i] = "eos"
                    continue
                texts[i] += self.piece[tok]
                if texts[i].endswith(self.delimiter):
                    texts[i] = texts[i][: -len(self.delimiter)]
                    reasons[i] = "delimiter"
                    continue
                still.append(i)
            active = still
            if not active:
                break
            # Finished rows keep decoding: cheaper than re-packing the cache.
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
            logits = stepper.decode(tokens, mask, next_pos)
            next_pos = next_pos + 1
        return [t.strip() for t in texts], counts, reasons
