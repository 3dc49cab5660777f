"""Draft lookahead: one draft call writes step k and, as if each step were kept, the steps after it.

A served step costs a pool call per model it runs (a Serve hop each way), and most steps of
an ``arbitrage`` request are the draft's. With lookahead the draft pool writes step k, then
step k+1 from the prefix with step k kept, and so on, within one call; the scorer then reads
all of them in one call. While the scorer keeps accepting, the next steps need no call at
all. A step that goes to the target drops the drafts and scores after it.

``DraftAhead`` is the plan a call carries: how many steps ahead, and what the loop would ask
of each next call (the prefix with the step kept, the token budget left). It continues only
where the plain loop would: a step that ended at the delimiter, with budget and steps left.
Pure Python: no Ray, no torch.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .errors import ScorerError
from .interfaces import Generation, GenerationOptions
from .steps import STEP_DELIMITER

log = logging.getLogger(__name__)

Generate = Callable[[Sequence[str], GenerationOptions], Awaitable[list[Generation]]]


@dataclass(frozen=True)
class DraftAhead:
    """Steps to write after the first (``extra_steps``), and the request's state before the
    first: tokens of its budget left, steps it may still keep (the first included), the token
    limit of one step."""

    extra_steps: int
    tokens_left: int
    steps_left: int
    step_max_tokens: int

    def after(self, prefix: str, options: GenerationOptions,
              gen: Generation) -> tuple[str, GenerationOptions, DraftAhead] | None:
        """The call that writes the next step if ``gen`` (written for ``prefix``) is kept, and
        the plan from there; None when no step is left to plan or keeping ``gen`` ends the
        request (the loop's stop rule: eos, a cut step, no budget, ``max_steps``)."""
        left = self.tokens_left - gen.tokens
        if self.extra_steps <= 0 or gen.finish_reason != "delimiter" or left <= 0 or self.steps_left <= 1:
            return None
        options = dataclasses.replace(options, max_new_tokens=min(self.step_max_tokens, left))
        return (prefix + gen.text + STEP_DELIMITER, options,
                DraftAhead(self.extra_steps - 1, left, self.steps_left - 1, self.step_max_tokens))


async def chain(generate: Generate, prefix: str, options: GenerationOptions, plan: DraftAhead) -> list[Generation]:
    """The first step, then each planned step, one ``generate`` call each. Only the first
    call's failure is raised: a later step is a guess, and its failure (logged) or a
    malformed answer ends the chain, so the loop then asks for that step itself, as the plain
    loop would."""
    gens = list(await generate([prefix], options))
    if len(gens) != 1:
        raise ScorerError("draft generator", f"returned {len(gens)} generations for 1 prefix")
    if not well_formed(gens[0]):
        return gens  # the loop's own check reports it
    while (step := plan.after(prefix, options, gens[-1])) is not None:
        prefix, options, plan = step
        try:
            got = await generate([prefix], options)
        except Exception as exc:  # noqa: BLE001 - see the docstring; cancellation is not caught
            log.warning("draft lookahead stopped: %s: %s", type(exc).__name__, exc)
            break
        if len(got) != 1 or not well_formed(got[0]):
            break
        gens.append(got[0])
    return gens


def chain_rows(run: Callable[[list[int], list[str], list[GenerationOptions]], list[Generation]],
               prefixes: Sequence[str], options: Sequence[GenerationOptions],
               plans: Sequence[DraftAhead | None]) -> list[list[Generation]]:
    """``chain`` for a batch, blocking: ``run(rows, prefixes, options)`` generates one step for
    each listed row (by index); every round runs the next step of all rows still planned in
    one ``run``. As in ``chain``, only the first round's failure is raised."""
    out = [[gen] for gen in run(list(range(len(prefixes))), list(prefixes), list(options))]
    calls: list[tuple[str, GenerationOptions, DraftAhead | None]] = list(zip(prefixes, options, plans))
    while True:
        live = []
        for i, (prefix, opts, plan) in enumerate(calls):
            step = plan.after(prefix, opts, out[i][-1]) if plan is not None and well_formed(out[i][-1]) else None
            calls[i] = step if step is not None else (prefix, opts, None)
            if step is not None:
                live.append(i)
        if not live:
            return out
        try:
            got = run(live, [calls[i][0] for i in live], [calls[i][1] for i in live])
        except Exception as exc:  # noqa: BLE001 - as in ``chain``
            log.warning("draft lookahead stopped: %s: %s", type(exc).__name__, exc)
            return out
        for i, gen in zip(live, got):
            out[i].append(gen)


def well_formed(gen: object) -> bool:
    """A ``Generation`` whose token count and finish reason a plan can continue from."""
    return (isinstance(gen, Generation) and isinstance(gen.tokens, int) and not isinstance(gen.tokens, bool)
            and gen.tokens >= 0 and isinstance(gen.text, str))


async def generate_ahead(generator, prefix: str, options: GenerationOptions, plan: DraftAhead) -> list[Generation]:
    """The draft call with lookahead: the generator's own ``generate_ahead`` (a served pool
    runs the chain in one call), else ``chain`` over its ``generate``."""
    own = getattr(generator, "generate_ahead", None)
    if own is not None:
        return list(await own(prefix, options, plan))
    return await chain(generator.generate, prefix, options, plan)
