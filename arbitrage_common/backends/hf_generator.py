"""Lean batched step generation on a transformers causal LM.

No ``generate()``: one prefill, then a greedy/sampled decode loop over the KV cache,
stopping each row at the step delimiter, EOS or its own token budget (its options, capped
by the context). Per-token Python work is a table lookup and a suffix check per active
row, plus one draw per sampled row.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..interfaces import Generation, GenerationOptions, row_options
from ..steps import STEP_DELIMITER
from .checkpoints import load_or_explain
from .steppers import FastLlamaStepper, HFStepper, fast_llama_supported


class HFStepGenerator:
    """Synchronous batched step generator; thread-safe (one forward at a time)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, delimiter: str = STEP_DELIMITER,
                 fast_path: bool = True, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)  # denormals make tiny CPU models several times slower
        path = Path(model_dir)
        self.tokenizer = load_or_explain(
            path, lambda p: AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code))
        self.model = load_or_explain(path, lambda p: AutoModelForCausalLM.from_pretrained(
            p, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code))
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

    def count_tokens(self, prefix: str) -> int:
        """The tokens this backend feeds the model for ``prefix`` (special tokens included)."""
        return len(self.tokenizer(prefix).input_ids)

    def _encode(self, rows: Sequence[list[int]]):
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last token is aligned
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask

    @torch.inference_mode()
    def generate_batch(self, prefixes: Sequence[str],
                       options: GenerationOptions | Sequence[GenerationOptions]) -> list[Generation]:
        """Continue each prefix; ``options`` is one for all rows or one per row (``row_options``).

        Every row has its own context check, token budget, temperature and sampling
        generator, so a row's result does not depend on the other rows of the batch. A row
        whose prefix fills the context returns ``("", 0, "context")`` and is not run."""
        if not prefixes:
            return []
        rows = row_options(options, len(prefixes))
        with self._lock:
            start = time.perf_counter()
            results = self._decode(prefixes, rows)
            seconds = time.perf_counter() - start
        return [Generation(t, n, r, seconds) for t, n, r in results]

    def _decode(self, prefixes: Sequence[str], rows: list[GenerationOptions]) -> list[tuple[str, int, str]]:
        results: list[tuple[str, int, str]] = [("", 0, "length")] * len(prefixes)
        run, run_ids, budgets = [], [], []
        for i, prefix in enumerate(prefixes):
            ids = self.tokenizer(prefix).input_ids
            if len(ids) >= self.context:
                results[i] = ("", 0, "context")
                continue
            budget = min(rows[i].max_new_tokens, self.context - len(ids))
            if budget < 1:
                continue  # nothing asked for: ("", 0, "length") without a forward pass
            run.append(i)
            run_ids.append(ids)
            budgets.append(budget)
        if run:
            decoded = self._decode_rows(run_ids, [rows[i] for i in run], budgets)
            for i, result in zip(run, decoded):
                results[i] = result
        return results

    def _decode_rows(self, rows: list[list[int]], options: list[GenerationOptions],
                     budgets: list[int]) -> list[tuple[str, int, str]]:
        n = len(rows)
        ids, mask = self._encode(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        longest = max(budgets)
        # Sampled rows: each row's uniforms come from its own generator, seeded from its own
        # seed and drawn for its own budget up front, so a row samples the same tokens whatever
        # else is in the batch; per token, one vectorised inverse-CDF pick for all of them.
        sampled = [i for i in range(n) if options[i].temperature > 0]
        if sampled:
            temps = torch.tensor([[options[i].temperature] for i in sampled])
            uniforms = torch.zeros(len(sampled), longest)
            for j, i in enumerate(sampled):
                seed = options[i].seed if options[i].seed is not None else 0
                uniforms[j, : budgets[i]] = torch.rand(budgets[i], generator=torch.Generator().manual_seed(seed))
        stepper = self.stepper
        logits = stepper.prefill(ids, mask, positions, longest)
        texts, counts, reasons = [""] * n, [0] * n, ["length"] * n
        active = list(range(n))
        # Rows that are done keep decoding (cheaper than re-packing the cache); their positions
        # stop at the last one the model has, so a long finished row never indexes past it.
        last_pos = self.context - 1
        next_pos = positions[:, -1] + 1
        for step in range(longest):
            tokens = logits.argmax(-1)
            if sampled:
                cdf = torch.softmax(logits[sampled] / temps, dim=-1).cumsum(-1)
                # the first token whose cumulative mass reaches u (scaled by the total, so float
                # rounding never picks past the last token with mass)
                tokens[sampled] = (cdf < uniforms[:, step: step + 1] * cdf[:, -1:]).sum(-1)
            token_list = tokens.tolist()
            still = []
            for i in active:
                tok = token_list[i]
                counts[i] += 1
                if tok == self.eos_id:
                    reasons[i] = "eos"
                elif (text := texts[i] + self.piece[tok]).endswith(self.delimiter):
                    texts[i], reasons[i] = text[: -len(self.delimiter)], "delimiter"
                else:
                    texts[i] = text
                    if counts[i] < budgets[i]:
                        still.append(i)
            active = still
            if not active:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
            logits = stepper.decode(tokens, mask, next_pos.clamp(max=last_pos))
            next_pos = next_pos + 1
        return [(t.strip(), c, r) for t, c, r in zip(texts, counts, reasons)]
