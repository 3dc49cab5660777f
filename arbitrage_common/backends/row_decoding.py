"""Per-row bookkeeping of a batched decode: each row's tokens, text and stop, its own sampling
draws, and which of its proposed tokens it keeps. Torch only (no model), so a row's result
never depends on the other rows of its batch."""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from ..interfaces import GenerationOptions


class RowSampler:
    """Greedy or sampled picks for every row at once. A sampled row's uniforms come from its
    own generator, seeded from its own seed and drawn for its own budget up front, so a row
    samples the same tokens whatever else is in the batch; per token, one vectorised
    inverse-CDF pick for all of them."""

    def __init__(self, options: Sequence[GenerationOptions], budgets: Sequence[int]) -> None:
        self.sampled = [i for i, o in enumerate(options) if o.temperature > 0]
        self.temps = torch.tensor([options[i].temperature for i in self.sampled])
        self.uniforms = torch.zeros(len(self.sampled), max(budgets))
        for j, i in enumerate(self.sampled):
            seed = options[i].seed if options[i].seed is not None else 0
            self.uniforms[j, : budgets[i]] = torch.rand(budgets[i], generator=torch.Generator().manual_seed(seed))

    def pick(self, scores: torch.Tensor, draws: torch.Tensor | None) -> list:
        """Each row's token from ``scores`` ([rows, ..., vocab]); ``draws``: the sampled rows'
        uniforms, shaped as ``scores`` without its last dimension."""
        tokens = scores.argmax(-1)
        if self.sampled:
            temps = self.temps.view(-1, *[1] * (scores.dim() - 1))
            cdf = torch.softmax(scores[self.sampled] / temps, dim=-1).cumsum(-1)
            # the first token whose cumulative mass reaches u (scaled by the total, so float
            # rounding never picks past the last token with mass)
            tokens[self.sampled] = (cdf < draws[..., None] * cdf[..., -1:]).sum(-1)
        return tokens.tolist()

    def draws_at(self, index: Sequence[int]) -> torch.Tensor | None:
        """The sampled rows' uniforms at each row's generation ``index`` (one per row of the batch)."""
        if not self.sampled:
            return None
        at = torch.tensor([min(index[i], self.uniforms.shape[1] - 1) for i in self.sampled])
        return self.uniforms.gather(1, at[:, None])[:, 0]

    def draws_for_prefill(self, guessed: Sequence[int], columns: int) -> torch.Tensor | None:
        """Uniforms for the prefill's last ``columns`` positions: row r's generation index g
        sits at column ``columns - 1 - guessed[r] + g``."""
        if not self.sampled:
            return None
        draws = torch.zeros(len(self.sampled), columns)
        for j, i in enumerate(self.sampled):
            draws[j, columns - 1 - guessed[i]:] = self.uniforms[j, : guessed[i] + 1]
        return draws


class RowSteps:
    """Each row's generated tokens, text, count and finish reason; a row stops at an end-of-
    sequence id, at the step delimiter (not kept in its text) or at its own budget.

    ``texts``: per row, a function from its next token to the text that token completes (a
    ``detokenize.Detokenizer``'s rows), so a row's text is the decode of its tokens together.
    The delimiter is looked for in that decoded text, where each token's text joins what came
    before (it may arrive split over tokens, or with more text in the same token): the row
    ends at the token whose text completes it, and its text is what precedes it, as vLLM's
    stop strings do. An EOS token (any of ``eos_ids``) ends the row and adds no text."""

    def __init__(self, budgets: Sequence[int], texts: Sequence[Callable[[int], str | None]],
                 eos_ids: Collection[int], delimiter: str) -> None:
        n = len(budgets)
        if len(texts) != n:
            raise ValueError(f"texts: {len(texts)} for {n} rows")
        self.budgets, self.row_text, self.eos_ids, self.delimiter = budgets, texts, eos_ids, delimiter
        self._reach = max(len(delimiter) - 1, 0)
        self.texts, self.counts, self.reasons = [""] * n, [0] * n, ["length"] * n
        self.generated: list[list[int]] = [[] for _ in range(n)]

    def take(self, i: int, tok: int) -> bool:
        """Append row ``i``'s next token; True while the row goes on."""
        self.generated[i].append(tok)
        self.counts[i] += 1
        if tok in self.eos_ids:
            self.reasons[i] = "eos"
            return False
        if new := self.row_text[i](tok):
            text = self.texts[i] + new
            # only where the new text can complete it: the new text and len(delimiter) - 1 chars before
            if self.delimiter in text[-len(new) - self._reach:]:
                at = text.index(self.delimiter, max(0, len(text) - len(new) - self._reach))
                self.texts[i], self.reasons[i] = text[:at], "delimiter"
                return False
            self.texts[i] = text
        return self.counts[i] < self.budgets[i]

    def accept(self, picked: list[list[int]], proposals: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """Take each row's tokens from the prefill's picks (``picked[r]``: its last
        ``len(proposals[r]) + 1`` entries are its generation indices 0, 1, ...) while they equal
        its proposal: (guesses each row kept, rows still going, whose last token is not fed yet)."""
        accepted, active = [0] * len(picked), []
        for i, (row, guess) in enumerate(zip(picked, proposals)):
            for g, tok in enumerate(row[len(row) - 1 - len(guess):]):
                matches = g < len(guess) and tok == guess[g]
                going = self.take(i, tok)
                accepted[i] += matches
                if not going:
                    break
                if not matches:
                    active.append(i)
                    break
        return accepted, active

    def results(self) -> list[tuple[str, int, str]]:
        return [(t.strip(), c, r) for t, c, r in zip(self.texts, self.counts, self.reasons)]
