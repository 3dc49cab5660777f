"""The step loop: per step, the policy decides which model's step is kept.

Pure asyncio over the ``Generator`` / ``Scorer`` protocols: no Ray, no torch. Only text
crosses between models, so draft and target may use different tokenizers.

Use::

    result = await run_loop(request, models)

or, to send each step as soon as it is decided::

    stream = stream_loop(request, models)      # validates now, runs nothing yet
    async for step in stream:                  # StepRecord, in order
        ...
    stream.result                              # LoopResult; set when the last step is yielded

On a missed deadline both raise ``DeadlineExceeded`` whose ``.partial`` (also
``stream.result``) holds the steps kept so far, and ``.waiting_on`` the model whose call the
loop was waiting for. Cancellation propagates untouched. When a
generator answers ``"context"`` (no room left in its context), the request ends with
``finish_reason "length"`` keeping its steps; at the first step that is the prompt's fault,
``InvalidArgument`` naming the field the prompt came in (``LoopRequest.prompt_field``; chat:
``messages[i].content``).

Step pipelining (``LoopRequest.pipeline``, policies with a scorer that run one model per
step: ``arbitrage``, ``rsd``): while the scorer reads draft step k, the draft already writes
step k+1 from the prefix with step k kept, with the options the loop would give that call
(the token budget left once step k is kept). If step k is kept and the request goes on,
that early draft is step k+1's draft; if step k goes to the target, it is cancelled and
dropped. No early draft is started when keeping step k would end the request (eos, a cut
step, the token budget, ``max_steps``), and one still running when the request ends
(deadline, error, cancellation, ``aclose``) is cancelled and awaited. A kept step's text,
source, score and tokens are those of the plain loop; ``Usage`` counts the early drafts
(see ``accounting.Usage``).

Draft lookahead (``LoopRequest.lookahead`` = n, the same policies; ``arbitrage_common.lookahead``):
one draft call writes step k and up to n steps after it, each from the prefix with the ones
before kept, and one scorer call scores them all (each over the history with the drafts
before it kept). While the policy keeps the draft, the next steps are decided from those
drafts and scores with no call; a step that goes to the target drops the rest. A kept
step's text, source, score and tokens are those of the plain loop (each stashed step is used
only if its prefix, options and history are the ones the plain loop would use); ``Usage``
books the stashed drafts as early drafts, and the scorer counts include the dropped ones.
Lookahead and pipelining are two ways to spend the same guess, and do not combine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .accounting import LoopFinishReason, LoopResult, Stage, StepRecord, Usage
from .errors import DeadlineExceeded, InvalidArgument, ScorerError
from .interfaces import Generation, GenerationOptions, Generator, ScoreItem, Scorer, Source
from .lookahead import DraftAhead, generate_ahead, well_formed
from .policies import Policy
from .steps import DEFAULT_PROMPT_TEMPLATE, PROBLEM_FIELD, as_written, build_prefix

T = TypeVar("T")
_FINISH_REASONS = ("delimiter", "eos", "length", "context")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument(name, f"must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LoopRequest:
    """One request. ``max_new_tokens`` bounds the kept steps' tokens over the whole request
    (each counted in its writer's tokenizer); ``step_max_tokens`` bounds one generator call;
    ``options.max_new_tokens`` is ignored (set per call). ``deadline_s`` counts from the
    start of the loop. Validated on construction (``InvalidArgument``)."""

    prompt: str
    policy: Policy
    max_steps: int = 16
    max_new_tokens: int = 512
    step_max_tokens: int = 64
    options: GenerationOptions = field(default_factory=GenerationOptions)
    deadline_s: float | None = None
    # Generators continue the problem rendered by this template; scorers read the raw problem.
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    # Step pipelining (module docstring): the draft writes step k+1 while step k is scored.
    # Same outputs; extra draft calls for steps that go to the target. Off by default here;
    # the service sets it from ``limits.step_pipelining``.
    pipeline: bool = False
    # Draft lookahead (module docstring): steps drafted and scored ahead per draft call; 0 off.
    # The service sets it from ``limits.draft_lookahead``.
    lookahead: int = 0
    # The field a client sent the problem in (chat: "messages[i].content"), named by its errors.
    prompt_field: str = "prompt"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgument(self.prompt_field, "must not be empty")
        if not isinstance(self.policy, Policy):
            raise InvalidArgument("policy", f"must be a Policy, got {type(self.policy).__name__}")
        if PROBLEM_FIELD not in self.prompt_template:
            raise InvalidArgument("prompt_template", f"must contain {PROBLEM_FIELD}")
        _positive_int("max_steps", self.max_steps)
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_int("step_max_tokens", self.step_max_tokens)
        if not isinstance(self.pipeline, bool):
            raise InvalidArgument("pipeline", f"must be a bool, got {self.pipeline!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 0:
            raise InvalidArgument("lookahead", f"must be an integer >= 0, got {self.lookahead!r}")
        if self.lookahead and self.pipeline:
            raise InvalidArgument("lookahead", "cannot be combined with pipeline (both guess that a step is kept)")
        temperature = self.options.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument("temperature", f"must be a finite number >= 0, got {temperature!r}")
        if self.deadline_s is not None:
            d = self.deadline_s
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
                raise InvalidArgument("deadline_s", f"must be a finite number of seconds > 0, got {d!r}")


@dataclass(frozen=True)
class Models:
    """The models a request may use. ``prm`` and ``router`` are optional; ``check`` says
    whether a policy can run on what is configured."""

    draft: Generator
    target: Generator
    prm: Scorer | None = None
    router: Scorer | None = None

    def check(self, policy: Policy) -> None:
        """Raise ``InvalidArgument('policy')`` if the policy needs a scorer that is missing."""
        if policy.scorer is not None and getattr(self, policy.scorer) is None:
            raise InvalidArgument("policy", f"policy {policy.name!r} needs a {policy.scorer} scorer, "
                                            f"and none is configured")


class _DeadlinePassed(Exception):
    """Internal: turned into DeadlineExceeded with the partial result by the loop; ``stage``:
    the model call it passed during, if any."""

    def __init__(self, stage: Stage | None = None) -> None:
        self.stage = stage


class _ContextFull(Exception):
    """Internal: a generator had no room left in its context for this step."""

    def __init__(self, source: Source) -> None:
        self.source = source


@dataclass(frozen=True)
class _Speculation:
    """An early draft: step k+1's draft call, started while step k is scored."""

    prefix: str
    options: GenerationOptions
    task: asyncio.Task[list[Generation]]


@dataclass(frozen=True)
class _Ahead:
    """A step drafted ahead (lookahead) and its score: the call and history it assumed."""

    prefix: str
    options: GenerationOptions
    history: tuple[tuple[str, Source], ...]
    gen: Generation
    score: float | None  # None until the scorer call that reads it has answered


class LoopStream:
    """Async iterator of ``StepRecord``; ``.result`` holds the ``LoopResult`` once the last
    step is yielded (or the partial one after ``DeadlineExceeded``), else None."""

    def __init__(self, request: LoopRequest, models: Models) -> None:
        models.check(request.policy)
        self.request = request
        self.models = models
        self.result: LoopResult | None = None
        self.usage = Usage()
        self.steps: list[StepRecord] = []
        self._gen: AsyncIterator[StepRecord] | None = None
        self._t0 = 0.0
        self._deadline: float | None = None
        self._stage_ms: dict[str, float] = {}
        self._spec: _Speculation | None = None
        self._ahead: list[_Ahead] = []

    # -- iteration ---------------------------------------------------------------------
    def __aiter__(self) -> LoopStream:
        return self

    async def __anext__(self) -> StepRecord:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop early (e.g. the client went away); safe to call at any time."""
        if self._gen is not None:
            await self._gen.aclose()  # type: ignore[attr-defined]

    async def _run(self) -> AsyncIterator[StepRecord]:
        req = self.request
        self._t0 = time.perf_counter()
        self._deadline = None if req.deadline_s is None else self._t0 + req.deadline_s
        try:
            while True:
                try:
                    record = await self._step(len(self.steps))
                except _ContextFull as full:
                    if not self.steps:  # nothing decided yet: the prompt itself does not fit
                        raise InvalidArgument(req.prompt_field, f"leaves no room in the {full.source} model's "
                                                                f"context") from None
                    # The context filled up mid-request: the request ends here and keeps its steps.
                    self.result = self._result("length")
                    return
                self.steps.append(record)
                reason = self._stop_reason(record)
                if reason is not None:
                    self.result = self._result(reason)
                yield record
                if reason is not None:
                    return
        except _DeadlinePassed as passed:
            self.result = self._result("deadline")
            raise DeadlineExceeded(self.result, waiting_on=passed.stage) from None
        finally:
            # Whatever ended the request (also an error, cancellation or aclose at a yield),
            # an early draft still out is cancelled and awaited: no task outlives the stream.
            if self._spec is not None:
                await self._drop_speculation()
            self._drop_ahead()

    def _stop_reason(self, record: StepRecord) -> LoopFinishReason | None:
        return self._stop_after(record.finish_reason, self._tokens_left(), len(self.steps))

    def _stop_after(self, finish_reason: str, tokens_left: int, steps: int) -> LoopFinishReason | None:
        """Why the request ends once a step with ``finish_reason`` is kept, leaving
        ``tokens_left`` of the budget and ``steps`` steps kept; None if it goes on."""
        if finish_reason == "eos":
            return "eos"
        if finish_reason == "length" or tokens_left <= 0:
            return "length"
        if steps >= self.request.max_steps:
            return "max_steps"
        return None

    def _result(self, reason: LoopFinishReason) -> LoopResult:
        return LoopResult(prompt=self.request.prompt, steps=list(self.steps), finish_reason=reason,
                          usage=self.usage, total_seconds=time.perf_counter() - self._t0)

    def _tokens_left(self) -> int:
        return self.request.max_new_tokens - sum(step.tokens for step in self.steps)

    # -- one step ----------------------------------------------------------------------
    async def _step(self, index: int) -> StepRecord:
        policy, usage = self.request.policy, self.usage
        self._stage_ms = {}
        history = tuple((step.text, step.source) for step in self.steps)
        texts = [text for text, _ in history]
        prefix = build_prefix(self.request.prompt, texts, self.request.prompt_template)
        score: float | None = None

        if policy.scorer is None and not policy.runs_both:
            # draft / target / random: decide first, so only the chosen model runs.
            source: Source = "target" if policy.route_to_target(None) else "draft"
            gen = await self._generate(source, prefix)
            return self._record(index, source, gen, score, None)

        problem = self.request.prompt.strip()
        # Until the step is decided the draft counts as discarded, so a deadline in the
        # middle of the step still accounts for the tokens spent (``_scored_draft`` books its
        # draft before it scores it).
        if self.request.lookahead and not policy.runs_both:
            assert policy.scorer is not None
            draft, score = await self._scored_draft(prefix, history, problem, policy.scorer)
        else:
            draft = await self._draft(prefix)
            score = None
            usage.draft_tokens_discarded += draft.tokens

        # The draft's step is the target's proposal: the target keeps the run of it that it would
        # write itself (same output) and decodes only the rest.
        proposal = as_written(draft.text, draft.finish_reason)
        if policy.runs_both:
            target: Generation | None = await self._generate("target", prefix, proposal)
            assert target is not None
            s_draft, s_target = await self._score("prm", [
                ScoreItem(problem, history, draft.text), ScoreItem(problem, history, target.text)])
            # The same step is no advantage, exactly: in a batch the two identical items can score
            # a few 1e-8 apart, which would let other requests' rows flip this step's source.
            score, draft_score = (0.0 if target.text == draft.text else s_target - s_draft), s_draft
            to_target = policy.route_to_target(score)
        else:
            assert policy.scorer is not None
            if self.request.pipeline:
                self._speculate(texts, draft)
            if score is None:
                (score,) = await self._score(policy.scorer, [ScoreItem(problem, history, draft.text)])
            draft_score = score if policy.scorer == "prm" else None
            to_target = policy.route_to_target(score)
            target = None
            if to_target:
                await self._drop_speculation()  # it continued a step that is not kept
                self._drop_ahead()
                target = await self._generate("target", prefix, proposal)

        if to_target:
            assert target is not None
            return self._record(index, "target", target, score, draft.text, draft_score)
        usage.draft_tokens_discarded -= draft.tokens
        return self._record(index, "draft", draft, score, None, draft_score)

    def _record(self, index: int, source: Source, gen: Generation, score: float | None,
                discarded_draft: str | None, draft_score: float | None = None) -> StepRecord:
        """Book the kept step (target tokens are booked at generation time)."""
        self.usage.steps_by_source[source] += 1
        if source == "draft":
            self.usage.draft_tokens_kept += gen.tokens
        return StepRecord(index=index, text=gen.text, source=source, score=score,
                          draft_discarded=discarded_draft is not None, discarded_draft_text=discarded_draft,
                          tokens=gen.tokens, finish_reason=gen.finish_reason, stage_ms=self._stage_ms,
                          draft_score=draft_score)

    # -- step pipelining ---------------------------------------------------------------
    def _speculate(self, texts: list[str], draft: Generation) -> None:
        """Start step k+1's draft call as if ``draft`` (step k) were kept: the prefix and
        options the plain loop would use then. Not when keeping it would end the request."""
        tokens_left = self._tokens_left() - draft.tokens
        if self._stop_after(draft.finish_reason, tokens_left, len(self.steps) + 1) is not None:
            return
        if self._deadline is not None and time.perf_counter() >= self._deadline:
            return  # the scorer call is refused next anyway
        prefix = build_prefix(self.request.prompt, [*texts, draft.text], self.request.prompt_template)
        options = self._options(tokens_left)
        model = self.models.draft

        async def call() -> list[Generation]:
            return await model.generate([prefix], options)

        self._spec = _Speculation(prefix, options, asyncio.create_task(call(), name="arbitrage-early-draft"))

    async def _draft(self, prefix: str) -> Generation:
        """This step's draft: the early draft started for this very call, else a new call."""
        spec, options = self._spec, self._options(self._tokens_left())
        if spec is None:
            return await self._generate("draft", prefix)
        if spec.prefix != prefix or spec.options != options:  # cannot happen: never serve another call's draft
            await self._drop_speculation()
            return await self._generate("draft", prefix)
        waited = False

        async def wait() -> list[Generation]:
            # From here on it is this step's draft call, as the plain loop's call would be.
            nonlocal waited
            waited = True
            self.usage.speculative_drafts_used += 1
            return await spec.task

        try:
            # Booked: only the time still waited for it; the rest overlapped the scorer. Past the
            # deadline ``_timed`` refuses before waiting, as it refuses the plain loop's call: the
            # request ended first, so the early draft stays in ``self._spec`` and ``_run``'s
            # finally books it discarded (with its tokens if it had finished), never used.
            gens = await self._timed("draft", wait)
        finally:
            if waited:
                self._spec = None
                if not spec.task.done():  # the deadline passed while waiting
                    await _cancel(spec.task)
        return self._check("draft", gens)

    async def _drop_speculation(self) -> None:
        """Cancel the early draft (if any), wait for it to end, book it as discarded."""
        spec, self._spec = self._spec, None
        if spec is None:
            return
        self.usage.speculative_drafts_discarded += 1
        gens = await _cancel(spec.task)
        if isinstance(gens, (list, tuple)) and len(gens) == 1 and isinstance(gens[0], Generation) \
                and isinstance(gens[0].tokens, int) and not isinstance(gens[0].tokens, bool) and gens[0].tokens > 0:
            self.usage.speculative_draft_tokens_discarded += gens[0].tokens

    # -- draft lookahead ---------------------------------------------------------------
    async def _scored_draft(self, prefix: str, history: tuple[tuple[str, Source], ...], problem: str,
                            role: Stage) -> tuple[Generation, float]:
        """This step's draft and score: stashed by an earlier call when it drafted this very
        step, else one draft call with lookahead and one scorer call for all it wrote."""
        options = self._options(self._tokens_left())
        if self._ahead:
            ahead = self._ahead[0]
            if (ahead.prefix, ahead.options, ahead.history) == (prefix, options, history) and ahead.score is not None:
                if self._deadline is not None and time.perf_counter() >= self._deadline:
                    raise _DeadlinePassed  # as the plain loop's next call would
                self._ahead.pop(0)
                self.usage.speculative_drafts_used += 1
                self.usage.draft_tokens_discarded += ahead.gen.tokens  # until the step is decided
                return ahead.gen, ahead.score
            self._drop_ahead()  # cannot happen: never use a step drafted for another call
        plan = DraftAhead(self.request.lookahead, self._tokens_left(), self.request.max_steps - len(self.steps),
                          self.request.step_max_tokens)
        model = self.models.draft
        gens = await self._timed("draft", lambda: generate_ahead(model, prefix, options, plan))
        draft = self._check("draft", gens[:1] if isinstance(gens, list) and gens else gens)
        # Stash each step drafted ahead with the call and history the plain loop would give it.
        at, last, seen = (prefix, options, plan), draft, history
        for k, extra in enumerate(gens[1:], start=1):
            step = at[2].after(at[0], at[1], last)
            if step is None or not well_formed(extra) or extra.finish_reason not in ("delimiter", "eos", "length"):
                self._book_dropped(gens[k:])  # e.g. a "context" step: the plain loop asks for it itself
                break
            seen = (*seen, (last.text, "draft"))
            self._ahead.append(_Ahead(step[0], step[1], seen, extra, None))
            at, last = step, extra
        # Until scored, the stash books as dropped if the scorer call fails (``_run``'s finally).
        items = [ScoreItem(problem, history, draft.text)] + [ScoreItem(problem, a.history, a.gen.text)
                                                             for a in self._ahead]
        self.usage.draft_tokens_discarded += draft.tokens  # until the step is decided
        scores = await self._score(role, items)
        self._ahead = [dataclasses.replace(a, score=s) for a, s in zip(self._ahead, scores[1:])]
        return draft, scores[0]

    def _drop_ahead(self) -> None:
        """Drop the steps drafted ahead (their step went to the target, or the request ended)."""
        stashed, self._ahead = self._ahead, []
        self._book_dropped([a.gen for a in stashed])

    def _book_dropped(self, gens: Sequence[object]) -> None:
        for gen in gens:
            self.usage.speculative_drafts_discarded += 1
            if well_formed(gen):
                self.usage.speculative_draft_tokens_discarded += gen.tokens  # type: ignore[attr-defined]

    # -- model calls -------------------------------------------------------------------
    def _options(self, tokens_left: int) -> GenerationOptions:
        return dataclasses.replace(self.request.options,
                                   max_new_tokens=min(self.request.step_max_tokens, tokens_left))

    async def _generate(self, source: Source, prefix: str, proposal: str = "") -> Generation:
        model = self.models.draft if source == "draft" else self.models.target
        options = self._options(self._tokens_left())
        if proposal:
            options = dataclasses.replace(options, proposal=proposal)
        gens = await self._timed(source, lambda: model.generate([prefix], options))
        return self._check(source, gens)

    def _check(self, source: Source, gens: object) -> Generation:
        """Validate one generator call's answer; book target tokens."""
        role = f"{source} generator"
        if not isinstance(gens, (list, tuple)) or len(gens) != 1:
            got = len(gens) if isinstance(gens, (list, tuple)) else type(gens).__name__
            raise ScorerError(role, f"returned {got} generations for 1 prefix")
        gen = gens[0]
        if isinstance(gen.tokens, bool) or not isinstance(gen.tokens, int) or gen.tokens < 0:
            raise ScorerError(role, f"token count must be an integer >= 0, got {gen.tokens!r}")
        if gen.finish_reason not in _FINISH_REASONS:
            raise ScorerError(role, f"unknown finish_reason {gen.finish_reason!r}")
        if gen.finish_reason == "context":
            raise _ContextFull(source)
        if source == "target":
            self.usage.target_tokens += gen.tokens
        return gen

    async def _score(self, role: Stage, items: Sequence[ScoreItem]) -> list[float]:
        scorer = self.models.prm if role == "prm" else self.models.router
        assert scorer is not None  # Models.check ran at construction
        scores = await self._timed(role, lambda: scorer.score(items))
        if role == "prm":
            self.usage.prm_calls += len(items)
        else:
            self.usage.router_calls += len(items)
        if not isinstance(scores, (list, tuple)) or len(scores) != len(items):
            got = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
            raise ScorerError(role, f"returned {got} scores for {len(items)} items")
        out = []
        for s in scores:
            try:
                value = float(s)
            except (TypeError, ValueError):
                raise ScorerError(role, f"returned a non-number score {s!r}") from None
            if not math.isfinite(value):
                raise ScorerError(role, f"returned a non-finite score {value!r}")
            out.append(value)
        return out

    async def _timed(self, stage: Stage, call: Callable[[], Awaitable[T]]) -> T:
        """Await one model call under the remaining deadline, booking its wall time.

        asyncio.timeout rather than wait_for: ``expired()`` tells our deadline apart from a
        TimeoutError raised by the model itself, and it does not run the call in a new task.
        """
        remaining = None if self._deadline is None else self._deadline - time.perf_counter()
        if remaining is not None and remaining <= 0:
            raise _DeadlinePassed
        started = time.perf_counter()
        timeout = asyncio.timeout(remaining)
        try:
            async with timeout:
                return await call()
        except TimeoutError:
            if timeout.expired():
                raise _DeadlinePassed(stage) from None
            raise
        finally:
            seconds = time.perf_counter() - started
            self.usage.stage_seconds[stage] += seconds
            self._stage_ms[stage] = self._stage_ms.get(stage, 0.0) + seconds * 1000.0


async def _cancel(task: asyncio.Task[T]) -> T | None:
    """Cancel ``task`` if it still runs and wait until it has ended (its own error is not
    raised here); its result if it finished first, else None."""
    task.cancel()
    await asyncio.wait([task])
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def stream_loop(request: LoopRequest, models: Models) -> LoopStream:
    """Validate now (``InvalidArgument``), run lazily: iterate the returned stream to get
    each ``StepRecord`` as soon as it is decided; ``stream.result`` holds the ``LoopResult``."""
    return LoopStream(request, models)


async def run_loop(request: LoopRequest, models: Models) -> LoopResult:
    """Run the loop to its end and return the ``LoopResult``."""
    stream = stream_loop(request, models)
    async for _ in stream:
        pass
    assert stream.result is not None
    return stream.result
