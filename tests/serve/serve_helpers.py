"""Shared pieces of the serve tests: problems, the in-process engine, the policy to use."""
from __future__ import annotations

import asyncio
from pathlib import Path

from arbitrage_common.config import AppConfig
from arbitrage_common.loop import LoopResult, Models, run_loop
from arbitrage_common.synthetic import extract_answer, generate_problems
from services.validation import RequestFields, prepare

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
# A bundled checkpoint counts once its HF files exist (training writes them at the end).
REAL = {role: (MODELS / role / "config.json").is_file() and any((MODELS / role).glob("*.safetensors"))
        for role in ("draft", "target", "router", "prm")}
SLOW_APP = "slow"


def main_policy() -> str:
    """The richest policy whose models are all real checkpoints."""
    if REAL["router"] and REAL["draft"] and REAL["target"]:
        return "arbitrage"
    if REAL["prm"] and REAL["draft"] and REAL["target"]:
        return "rsd"
    return "target"


def problems(n: int, seed: int = 4242):
    return generate_problems(n, seed)


class InProcessEngine:
    """The same loop on the same checkpoints, in this process, no Ray: the reference."""

    def __init__(self, cfg: AppConfig) -> None:
        from arbitrage_common.backends.async_adapters import ThreadedGenerator, ThreadedScorer
        from arbitrage_common.backends.hf_generator import HFStepGenerator
        from arbitrage_common.backends.scorers import load_step_scorer

        p = cfg.pools
        self.cfg = cfg
        self._answers: dict[tuple[str, str], int | None] = {}
        self._answers: dict[tuple[str, str], int | None] = {}
        self.models = Models(
            draft=ThreadedGenerator(HFStepGenerator(cfg.resolve_path(p.draft.model.path), threads=1)),
            target=ThreadedGenerator(HFStepGenerator(cfg.resolve_path(p.target.model.path), threads=1)),
            router=ThreadedScorer(load_step_scorer(cfg.resolve_path(p.router.model.path), threads=1)),
            prm=ThreadedScorer(load_step_scorer(cfg.resolve_path(p.prm.model.path), threads=1)),
        )

    def run(self, prompt: str, policy: str, **fields) -> LoopResult:
        request = prepare(RequestFields(prompt=prompt, policy=policy, **fields), self.cfg).request
        return asyncio.run(run_loop(request, self.models))

    def answer(self, prompt: str, policy: str) -> int | None:
        """The in-process answer (memoized: the concurrency test asks twice)."""
        key = (prompt, policy)
        if key not in self._answers:
            self._answers[key] = extract_answer(self.run(prompt, policy).text)
        return self._answers[key]


def pool_items(app: str, role: str = "draft") -> int:
    """Step calls a pool has run so far (its replica's counter)."""
    from ray import serve

    return serve.get_deployment_handle(role, app_name=app).info.remote().result()["items"]


def assert_no_more_pool_calls(app: str, quiet_s: float = 6.0, budget_s: float = 40.0) -> None:
    """After a client went away, its loop stops calling the pools. On the slow app a running
    loop calls the draft pool at least every ~2 s (the batch window), so its call counter
    never stays still for ``quiet_s``; a stopped one does (the call in flight when the
    client left may still be counted while the counter settles)."""
    import time

    deadline = time.monotonic() + budget_s
    last, still_since = pool_items(app), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = pool_items(app)
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet_s:
            return
    raise AssertionError("the loop kept calling the pool after its client went away")
