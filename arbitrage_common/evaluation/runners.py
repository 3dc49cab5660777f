"""Where a sweep's requests run: in-process on memoized backends, or against a served endpoint.

Both return a ``Trace`` per problem, so the sweep, the waste and the bound do not care which.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..interfaces import GenerationOptions, ScoreItem
from ..loop import Models, run_loop
from ..training.remote_router_data import OracleStep, oracle_step
from .memo import Charge, GenerationCache, ScoreCache
from .metrics import spearman
from .tasks import Task, TaskProblem


@dataclass
class Trace:
    """What the evaluation needs of one answered request."""

    text: str
    steps: list[OracleStep]
    draft_tokens_kept: int
    draft_tokens_discarded: int
    target_steps: int
    seconds: float

    @classmethod
    def from_loop(cls, result, seconds: float) -> Trace:
        steps = [OracleStep(s.text, s.source, s.score, s.discarded_draft_text, s.draft_score) for s in result.steps]
        u = result.usage
        return cls(result.text, steps, u.draft_tokens_kept, u.draft_tokens_discarded, u.steps_by_source.get("target", 0),
                   seconds)

    @classmethod
    def from_reply(cls, reply, seconds: float) -> Trace:
        steps = [oracle_step(s) for s in reply.steps]
        u = reply.usage
        return cls(reply.text, steps, u.draft_tokens_kept, u.draft_tokens_discarded, u.target_steps, seconds)


def generation_caches(backends: dict) -> dict:
    """Memo caches of the two generators; runners of one problem set may share them."""
    return {role: GenerationCache(backends[role], role) for role in ("draft", "target")}


class InProcessRunner:
    """Memoized backends: every distinct call runs once at batch 1, timed; a request's latency
    is the sum of its calls' seconds (as if it ran alone)."""

    latency_note = ("sweep latency = sum of batch-1 call times measured once per distinct call; "
                    "wallclock = real end-to-end runs at the matched thresholds")

    def __init__(self, backends: dict, shared: dict | None = None):
        self.backends = backends
        self.caches = {**(shared or generation_caches(backends)),
                       "prm": ScoreCache(backends["prm"], "prm"), "router": ScoreCache(backends["router"], "router")}

    def warm_up(self, task: Task) -> None:
        """So the first timed call is not an outlier."""
        from ..steps import render_prompt

        for role in ("draft", "target"):
            self.backends[role].generate_batch([render_prompt(task.problems[0].prompt)], GenerationOptions(max_new_tokens=8))

    def run(self, task: Task, policy: str, threshold: float | None) -> list[Trace]:
        async def all_() -> list[Trace]:
            out = []
            for i, p in enumerate(task.problems):  # sequential: the caches are not shared-safe
                charge = Charge()
                models = Models(**{role: cache.view(charge) for role, cache in self.caches.items()})
                out.append(Trace.from_loop(await run_loop(task.request(p, policy, threshold, i), models), charge.seconds))
            return out

        return asyncio.run(all_())

    def prm_improved(self, problem: TaskProblem, history: Sequence[tuple[str, str]], draft: str,
                     target: str) -> bool | None:
        """PRM(target step) > PRM(draft step): the judge where the task has no step checker."""
        score = self.caches["prm"].lookup
        items = [ScoreItem(problem.prompt.strip(), tuple(history), text) for text in (target, draft)]
        return score(items[0])[0] > score(items[1])[0]

    def router_spearman(self, task: Task, oracle_traces: Sequence[Trace]) -> dict | None:
        """Router score of each draft step against its oracle advantage, on oracle(0) trajectories."""
        scores, advantages = [], []
        for problem, trace in zip(task.problems, oracle_traces):
            history: list[tuple[str, str]] = []
            for step in trace.steps:
                draft = step.discarded_draft_text if step.source == "target" else step.text
                if step.score is not None and draft is not None:
                    item = ScoreItem(problem.prompt.strip(), tuple(history), draft)
                    scores.append(self.caches["router"].lookup(item)[0])
                    advantages.append(step.score)
                history.append((step.text, step.source))
        if len(scores) < 3:
            return None
        return {"spearman": round(spearman(scores, advantages), 4), "steps": len(scores),
                "on": "held-out bench problems, oracle(tau=0) trajectories"}

    def confirm(self, task: Task, picks: dict[str, float | None], n: int) -> dict:
        """The matched thresholds run again for real, no memoization, interleaved problem by problem."""
        from ..backends.async_adapters import ThreadedGenerator, ThreadedScorer

        b = self.backends
        models = Models(draft=ThreadedGenerator(b["draft"]), target=ThreadedGenerator(b["target"]),
                        prm=ThreadedScorer(b["prm"]), router=ThreadedScorer(b["router"]))
        problems = task.problems[:n]
        seconds = {name: 0.0 for name in picks}
        texts: dict[str, list[str]] = {name: [] for name in picks}

        async def run_all() -> None:
            for i, p in enumerate(problems):
                for name, threshold in picks.items():
                    t0 = time.perf_counter()
                    result = await run_loop(task.request(p, name, threshold, i), models)
                    seconds[name] += time.perf_counter() - t0
                    texts[name].append(result.text)

        asyncio.run(run_all())
        out: dict = {name: {"threshold": picks[name], "latency_s_mean": round(seconds[name] / len(problems), 5),
                            "accuracy": round(sum(task.grade(p, t) for p, t in zip(problems, texts[name]))
                                              / len(problems), 4)} for name in picks}
        out["n"] = len(problems)
        if "rsd" in out and "arbitrage" in out and seconds["arbitrage"] > 0:
            out["latency_ratio_rsd_over_arbitrage"] = round(seconds["rsd"] / seconds["arbitrage"], 3)
        return out


class EndpointRunner:
    """Real gRPC requests, one at a time: latency is end-to-end wall time as clients see it.
    The server's prompt template, limits, PRM and router apply; there is no PRM to ask, so
    waste is judged only by a task's step checker."""

    latency_note = "every point is real gRPC requests, one at a time: end-to-end wall time"

    def __init__(self, call, tag: str = "bench"):
        self.call, self.tag = call, tag  # call(GenerateRequest) -> GenerateResponse

    def warm_up(self, task: Task) -> None:
        return None

    def run(self, task: Task, policy: str, threshold: float | None) -> list[Trace]:
        from ..client import build_request

        out = []
        for i, p in enumerate(task.problems):
            request = build_request(p.prompt, policy, max_steps=task.max_steps, threshold=threshold,
                                    request_id=f"{self.tag}-{policy}-{threshold}-{i}")
            t0 = time.perf_counter()
            try:
                reply = self.call(request)
            except RuntimeError as exc:
                raise RuntimeError(f"{task.name} problem {p.id}: {exc}") from exc
            out.append(Trace.from_reply(reply, time.perf_counter() - t0))
        return out

    def prm_improved(self, *args) -> bool | None:
        return None

    def router_spearman(self, task: Task, oracle_traces: Sequence[Trace]) -> dict | None:
        return None

    def confirm(self, task: Task, picks: dict, n: int) -> dict:
        return {}
