"""Lean batched step generation on a transformers causal LM.

No ``generate()``: one prefill, then a greedy/sampled decode loop over the KV cache,
stopping each row at the step delimiter, EOS or its own token budget (its options, capped
by the context). Per-token Python work is a table lookup and a suffix check per active
row, plus one draw per sampled row.

Rows with a session key (a request id) start over the keys/values that session's last call
left (``generator_cache``; the fast Llama path only), so a step prefills only what is new
since the session's last step instead of the whole problem and history.
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
from .generator_cache import GeneratorPrefixCache, KVSequence
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from .steppers import FastLlamaStepper, HFStepper, KVPrefix, fast_llama_supported


class HFStepGenerator:
    """Synchronous batched step generator; thread-safe (one forward at a time).
    ``prefix_cache_bytes`` bounds the per-session prefix cache (0: off)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, delimiter: str = STEP_DELIMITER,
                 fast_path: bool = True, trust_remote_code: bool = False,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
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
        self.prefix_cache = (GeneratorPrefixCache(prefix_cache_bytes)
                             if self.stepper.supports_past and prefix_cache_bytes > 0 else None)
        self._lock = threading.Lock()

    def release(self, session: str) -> bool:
        """Drop a finished request's cached prefix; True if there was one."""
        return self.prefix_cache is not None and self.prefix_cache.release(session)

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
    def generate_batch(self, prefixes: Sequence[str], options: GenerationOptions | Sequence[GenerationOptions],
                       sessions: Sequence[str | None] | None = None) -> list[Generation]:
        """Continue each prefix; ``options`` is one for all rows or one per row (``row_options``);
        ``sessions``: each row's session key, or None (uncached).

        Every row has its own context check, token budget, temperature and sampling
        generator, so a row's result does not depend on the other rows of the batch. A row
        whose prefix fills the context returns ``("", 0, "context")`` and is not run."""
        if not prefixes:
            return []
        rows = row_options(options, len(prefixes))
        if sessions is not None and len(sessions) != len(prefixes):
            raise ValueError(f"sessions: {len(sessions)} for {len(prefixes)} prefixes")
        with self._lock:
            start = time.perf_counter()
            results = self._decode(prefixes, rows, sessions if self.prefix_cache is not None else None)
            seconds = time.perf_counter() - start
        return [Generation(t, n, r, seconds) for t, n, r in results]

    def _decode(self, prefixes: Sequence[str], rows: list[GenerationOptions],
                sessions: Sequence[str | None] | None) -> list[tuple[str, int, str]]:
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
        if not run:
            return results
        keys = [sessions[i] for i in run] if sessions is not None else [None] * len(run)
        cache = self.prefix_cache if sessions is not None else None
        epoch = cache.epoch() if cache is not None else 0
        pasts = [cache.lookup(key, ids) for key, ids in zip(keys, run_ids)] if cache is not None else None
        decoded, kept = self._decode_rows(run_ids, [rows[i] for i in run], budgets, pasts,
                                          keep=[key is not None and key not in keys[:j] for j, key in enumerate(keys)])
        for i, result in zip(run, decoded):
            results[i] = result
        for key, sequence in zip(keys, kept):
            if sequence is not None:
                cache.keep(key, sequence, epoch)
        return results

    def _decode_rows(self, rows: list[list[int]], options: list[GenerationOptions], budgets: list[int],
                     pasts: list[KVPrefix | None] | None = None, keep: list[bool] | None = None,
                     ) -> tuple[list[tuple[str, int, str]], list[KVSequence | None]]:
        """Decode each row over its cached past (``pasts``: one ``KVPrefix`` of its leading ids
        or None); for each row in ``keep``, return the ``KVSequence`` it leaves (else None)."""
        n = len(rows)
        lengths = [p.length if p is not None else 0 for p in pasts] if pasts else [0] * n
        new_tokens = [len(row) - start for row, start in zip(rows, lengths)]
        order = sorted(range(n), key=new_tokens.__getitem__)
        if order != list(range(n)):  # fewest new tokens first: the prefill runs rows in chunks by width
            def pick(values):
                return [values[r] for r in order] if values is not None else None

            decoded, kept = self._decode_rows(pick(rows), pick(options), pick(budgets), pick(pasts), pick(keep))
            at = {r: i for i, r in enumerate(order)}
            return [decoded[at[r]] for r in range(n)], [kept[at[r]] for r in range(n)]
        ids, mask = self._encode([row[start:] for row, start in zip(rows, lengths)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(lengths)[:, None] * mask
        width = max(lengths)
        if width:  # the past region: row r's first lengths[r] slots are its past, the rest a masked gap
            mask = torch.cat([torch.arange(width)[None, :] < torch.tensor(lengths)[:, None], mask.bool()], dim=1).long()
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
        logits = stepper.prefill(ids, mask, positions, longest, past=pasts if width else None, new_tokens=new_tokens)
        texts, counts, reasons = [""] * n, [0] * n, ["length"] * n
        generated: list[list[int]] = [[] for _ in range(n)]
        fed = 0  # generated tokens fed back (their keys/values exist) in every row
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
                generated[i].append(tok)
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
            fed += 1
        kept = [self._kept(r, rows[r], lengths[r], width + ids.shape[1], generated[r][:fed])
                if keep and keep[r] else None for r in range(n)]
        return [(t.strip(), c, r) for t, c, r in zip(texts, counts, reasons)], kept

    def _kept(self, row: int, prefix: list[int], past: int, start: int, fed: list[int]) -> KVSequence:
        """Row ``row``'s real tokens and their keys/values: its past (slots ``[0, past)``), its
        new prefix tokens (left-padded to end at ``start``) and the generated tokens fed back."""
        slots = torch.cat([torch.arange(past), torch.arange(start - len(prefix) + past, start + len(fed))])
        return KVSequence(tuple(prefix) + tuple(fed), self.stepper.export(row, slots))
