"""Lean batched step generation on a transformers causal LM.

No ``generate()``: one prefill, then a greedy/sampled decode loop over the KV cache,
stopping each row at the step delimiter, EOS or its own token budget (its options, capped
by the context). A row's text is the decode of its generated tokens together, as vLLM's
incremental detokenizer gives it (``detokenize``: byte-level BPE splits characters over
tokens), and the delimiter is looked for in that text. EOS is any id vLLM stops on: the
tokenizer's and the generation config's ``eos_token_id`` (``stop_token_ids``). Per-token
Python work per active row is one detokenizer step (a table lookup for tokenizers whose
tokens decode on their own, as the bundled models') and a delimiter search, plus one draw
per sampled row.

Rows with a session key (a request id) start over the keys/values that session's last call
left (``generator_cache``; the fast Llama path only), so a step prefills only what is new
since the session's last step instead of the whole problem and history.

A row's ``GenerationOptions.proposal`` (the draft's step, when the target rewrites it) runs
in the prefill too: the row keeps the run of it that it would generate itself and decodes
only the rest, so its output is the same in fewer decode steps.

A plain Llama checkpoint loads without transformers (``llama_checkpoint``): its weights go
straight into the fast stepper, which is all the decode loop runs.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..interfaces import Generation, GenerationOptions, row_options
from ..steps import STEP_DELIMITER
from .checkpoints import load_or_explain, set_cpu_threads
from .detokenize import Detokenizer
from .generator_cache import GeneratorPrefixCache, KVSequence
from .llama_checkpoint import LeanTokenizer, lean_llama_supported
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from .row_decoding import RowSampler, RowSteps
from .steppers import FastLlamaStepper, HFStepper, KVPrefix, fast_llama_supported, load_fast_llama


def stop_token_ids(path: str | Path, tokenizer) -> frozenset[int]:
    """The ids that end a row (finish ``"eos"``), as vLLM stops on them: the tokenizer's
    ``eos_token_id`` and every id of the generation config's ``eos_token_id`` (an int or a
    list, e.g. Llama 3.1's ``<|eot_id|>`` and ``<|eom_id|>``). Without a
    ``generation_config.json``, config.json's ``eos_token_id``, as transformers and vLLM fall
    back to it."""
    ids = {tokenizer.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value])
            break
    return frozenset(i for i in ids if i is not None)


class HFStepGenerator:
    """Synchronous batched step generator; thread-safe (one forward at a time).
    ``prefix_cache_bytes`` bounds the per-session prefix cache (0: off); ``verify_proposals``:
    run a row's ``GenerationOptions.proposal`` as token-level speculation (off: ignore it)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, delimiter: str = STEP_DELIMITER,
                 fast_path: bool = True, trust_remote_code: bool = False,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, verify_proposals: bool = True,
                 lean_load: bool = True):
        set_cpu_threads(threads)
        path = Path(model_dir)
        self.delimiter = delimiter
        # A plain Llama on the fast path loads without transformers (``llama_checkpoint``: a
        # replica starts about 2.5 s of CPU sooner); ``lean_load=False`` forces transformers.
        if fast_path and lean_load and not trust_remote_code and lean_llama_supported(path):
            self.tokenizer = load_or_explain(path, LeanTokenizer.from_dir)
            checkpoint, self.stepper = load_or_explain(path, load_fast_llama)
            self.model, self.fast_path, self.params = None, True, checkpoint.params
            self.context = checkpoint.config.max_position_embeddings
        else:
            self._load_transformers(path, fast_path, trust_remote_code)
        self.eos_id = self.tokenizer.eos_token_id
        self.eos_ids = load_or_explain(path, lambda p: stop_token_ids(p, self.tokenizer))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.detokenizer = Detokenizer(self.tokenizer)  # how a row's tokens become text, decided once
        self.prefix_cache = (GeneratorPrefixCache(prefix_cache_bytes)
                             if self.stepper.supports_past and prefix_cache_bytes > 0 else None)
        self.verify_proposals = verify_proposals
        self.speculation = {"proposed": 0, "accepted": 0}  # proposal tokens run in prefills, and kept
        self._lock = threading.Lock()

    def _load_transformers(self, path: Path, fast_path: bool, trust_remote_code: bool) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = load_or_explain(
            path, lambda p: AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code))
        self.model = load_or_explain(path, lambda p: AutoModelForCausalLM.from_pretrained(
            p, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code))
        self.model.eval()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.fast_path = fast_path and fast_llama_supported(self.model)
        self.stepper = FastLlamaStepper(self.model) if self.fast_path else HFStepper(self.model)
        self.context = self.model.config.max_position_embeddings

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
        # Before the lock: a call waiting for it must not bring back a session released meanwhile.
        epoch = self.prefix_cache.epoch() if self.prefix_cache is not None else 0
        with self._lock:
            start = time.perf_counter()
            results = self._decode(prefixes, rows, sessions if self.prefix_cache is not None else None, epoch)
            seconds = time.perf_counter() - start
        return [Generation(t, n, r, seconds) for t, n, r in results]

    def _decode(self, prefixes: Sequence[str], rows: list[GenerationOptions],
                sessions: Sequence[str | None] | None, epoch: int = 0) -> list[tuple[str, int, str]]:
        results: list[tuple[str, int, str]] = [("", 0, "length")] * len(prefixes)
        run, run_ids, budgets, proposals = [], [], [], []
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
            proposals.append(self._proposal_ids(prefix, ids, rows[i].proposal, budget))
        if not run:
            return results
        keys = [sessions[i] for i in run] if sessions is not None else [None] * len(run)
        cache = self.prefix_cache if sessions is not None else None
        pasts = [cache.lookup(key, ids) for key, ids in zip(keys, run_ids)] if cache is not None else None
        decoded, kept = self._decode_rows(run_ids, [rows[i] for i in run], budgets, pasts,
                                          keep=[key is not None and key not in keys[:j] for j, key in enumerate(keys)],
                                          proposals=proposals)
        for i, result in zip(run, decoded):
            results[i] = result
        for key, sequence in zip(keys, kept):
            if sequence is not None:
                cache.keep(key, sequence, epoch)
        return results

    def _proposal_ids(self, prefix: str, ids: list[int], proposal: str, budget: int) -> list[int]:
        """The tokens of ``proposal`` after ``prefix``, as many as can be checked (one fewer than
        the budget: the token after the last accepted one is the model's own); none if the
        tokenizer splits the joint text differently at the seam."""
        if not proposal or not self.verify_proposals or budget < 2:
            return []
        joint = self.tokenizer(prefix + proposal).input_ids
        if joint[:len(ids)] != ids:
            return []
        return joint[len(ids):][:budget - 1]

    def _decode_rows(self, rows: list[list[int]], options: list[GenerationOptions], budgets: list[int],
                     pasts: list[KVPrefix | None] | None = None, keep: list[bool] | None = None,
                     proposals: list[list[int]] | None = None,
                     ) -> tuple[list[tuple[str, int, str]], list[KVSequence | None]]:
        """Decode each row over its cached past (``pasts``: one ``KVPrefix`` of its leading ids
        or None); for each row in ``keep``, return the ``KVSequence`` it leaves (else None).

        ``proposals``: per row, tokens guessed to follow it. They run in the prefill; the row
        keeps the longest run of them that equals what it generates (greedy or sampled, with
        its own draws), then decodes on from its own next token: the same tokens as without
        them. The rejected ones' slots are masked from then on."""
        n = len(rows)
        proposals = proposals if proposals is not None else [[] for _ in range(n)]
        lengths = [p.length if p is not None else 0 for p in pasts] if pasts else [0] * n
        new_tokens = [len(row) - start + len(guess) for row, start, guess in zip(rows, lengths, proposals)]
        order = sorted(range(n), key=new_tokens.__getitem__)
        if order != list(range(n)):  # fewest new tokens first: the prefill runs rows in chunks by width
            def pick(values):
                return [values[r] for r in order] if values is not None else None

            decoded, kept = self._decode_rows(pick(rows), pick(options), pick(budgets), pick(pasts), pick(keep),
                                              pick(proposals))
            at = {r: i for i, r in enumerate(order)}
            return [decoded[at[r]] for r in range(n)], [kept[at[r]] for r in range(n)]
        ids, mask = self._encode([row[start:] + guess for row, start, guess in zip(rows, lengths, proposals)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(lengths)[:, None] * mask
        width = max(lengths)
        if width:  # the past region: row r's first lengths[r] slots are its past, the rest a masked gap
            mask = torch.cat([torch.arange(width)[None, :] < torch.tensor(lengths)[:, None], mask.bool()], dim=1).long()
        longest = max(budgets)
        guessed = [len(guess) for guess in proposals]
        last = max(guessed) + 1  # logits kept per row: its last prefix token's and each guess's
        sampler = RowSampler(options, budgets)
        logits = self.stepper.prefill(ids, mask, positions, longest, past=pasts if width else None,
                                      new_tokens=new_tokens, last=last)
        steps = RowSteps(budgets, self.detokenizer.rows(rows), self.eos_ids, self.delimiter)
        picked = sampler.pick(logits if last > 1 else logits[:, None], sampler.draws_for_prefill(guessed, last))
        accepted, active = steps.accept(picked, proposals)  # accepted guesses: keys/values from the prefill
        self.speculation["proposed"] += sum(guessed)
        self.speculation["accepted"] += sum(accepted)
        start = width + ids.shape[1]
        for i in range(n):  # the rejected guesses' slots: never attended to again
            mask[i, start - guessed[i] + accepted[i]: start] = 0
        # Rows that are done keep decoding (cheaper than re-packing the cache); their positions
        # stop at the last one the model has, so a long finished row never indexes past it.
        last_pos = self.context - 1
        next_pos = positions[:, -1] + 1 - torch.tensor(guessed) + torch.tensor(accepted)
        fed = 0  # decode steps run: each fed every row its latest token
        while active:
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
            latest = torch.tensor([row[-1] for row in steps.generated])
            logits = self.stepper.decode(latest, mask, next_pos.clamp(max=last_pos))
            next_pos = next_pos + 1
            fed += 1
            picked = sampler.pick(logits, sampler.draws_at(steps.counts))  # each row at its own index
            active = [i for i in active if steps.take(i, picked[i])]
        generated = steps.generated
        kept = [self._kept(r, rows[r], lengths[r], start - guessed[r], generated[r][: accepted[r]], start,
                           generated[r][accepted[r]: accepted[r] + fed]) if keep and keep[r] else None
                for r in range(n)]
        return steps.results(), kept

    def _kept(self, row: int, prefix: list[int], past: int, end: int, accepted: list[int], start: int,
              fed: list[int]) -> KVSequence:
        """Row ``row``'s real tokens and their keys/values: its past (slots ``[0, past)``), its
        new prefix tokens (left-padded to end at ``end``), the guesses it accepted (right after
        them) and the generated tokens fed back (from the first decode slot, ``start``, on)."""
        slots = torch.cat([torch.arange(past), torch.arange(end - len(prefix) + past, end + len(accepted)),
                           torch.arange(start, start + len(fed))])
        return KVSequence(tuple(prefix) + tuple(accepted) + tuple(fed), self.stepper.export(row, slots))
