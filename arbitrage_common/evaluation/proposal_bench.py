"""The target's rewrite with and without the draft's step as its proposal (token-level
speculation in ``backends.hf_generator``), on the steps the bundled router sends to the target.

``python -m arbitrage_common.evaluation.proposal_bench`` walks ``--problems`` synthetic problems
with the bundled draft and router, keeping the target's step where the router's score passes
the threshold, as the arbitrage loop does, and collects those routed steps (prefix and
discarded draft step). It then times the target on them, B rows per call (B = 1 and 8), with
the proposal and without, calls alternating so that load drift hits both alike:

- ``cold``: no session cache, so every call prefills its whole context;
- ``cached``: the row's context already cached (as when the target pool's session cache holds
  it), so a call prefills only the proposal and the step's first token.

Prints ms per routed step each way, their ratio, the proposal tokens kept, and how many steps
came out the same (all of them, or the speculation is wrong). Figures only, no asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from ..config import default_config
from ..interfaces import Generation, GenerationOptions, ScoreItem, Source
from ..policies import make_policy
from ..steps import as_written, build_prefix
from ..synthetic import generate_problems

BATCHES = (1, 8)


def routed_steps(cfg, problems: int, seed: int, draft, target, router) -> list[tuple[str, Generation]]:
    """(prefix, draft step) of every step the router sends to the target, along the arbitrage
    trajectories of ``problems`` problems."""
    options = GenerationOptions(max_new_tokens=cfg.limits.step_max_tokens)
    routed = []
    for problem in generate_problems(problems, seed):
        policy = make_policy("arbitrage", cfg.policy.threshold if cfg.policy.default == "arbitrage" else None)
        history: list[tuple[str, Source]] = []
        for _ in range(cfg.limits.default_max_steps):
            prefix = build_prefix(problem.prompt, [text for text, _ in history])
            (step,) = draft.generate_batch([prefix], options)
            (score,) = router.score_batch([ScoreItem(problem.prompt.strip(), tuple(history), step.text)])
            source: Source = "draft"
            if policy.route_to_target(score):
                routed.append((prefix, step))
                (step,), source = target.generate_batch([prefix], options), "target"
            history.append((step.text, source))
            if step.finish_reason != "delimiter":
                break
    return routed


def run(problems: int = 24, seed: int = 5100, repeats: int = 3) -> dict:
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer

    cfg = default_config()
    path = lambda role: cfg.resolve_path(getattr(cfg.pools, role).model.path)
    draft = HFStepGenerator(path("draft"), threads=1)
    plain = HFStepGenerator(path("target"), threads=1, verify_proposals=False)
    verifying = HFStepGenerator(path("target"), threads=1)
    router = load_step_scorer(path("router"), threads=1)
    routed = routed_steps(cfg, problems, seed, draft, plain, router)
    budget = cfg.limits.step_max_tokens
    out: dict = {"problems": problems, "routed_steps": len(routed)}
    for mode in ("cold", "cached"):
        for batch in BATCHES:
            times = {"plain": [], "proposal": []}
            same = 0
            before = dict(verifying.speculation)
            for rep in range(repeats):
                for start in range(0, len(routed) - batch + 1, batch):
                    rows = routed[start:start + batch]
                    prefixes = [prefix for prefix, _ in rows]
                    proposals = [GenerationOptions(budget, proposal=as_written(g.text, g.finish_reason)) for _, g in rows]
                    results = {}
                    order = ("plain", "proposal") if (start // batch + rep) % 2 == 0 else ("proposal", "plain")
                    for kind in order:
                        model = plain if kind == "plain" else verifying
                        sessions = [f"{kind}-{rep}-{start}-{i}" for i in range(batch)] if mode == "cached" else None
                        if sessions:  # cache the context: a one-token step leaves its keys/values
                            model.generate_batch(prefixes, GenerationOptions(1), sessions)
                        began = time.perf_counter()
                        results[kind] = model.generate_batch(prefixes, GenerationOptions(budget) if kind == "plain"
                                                             else proposals, sessions)
                        times[kind].append((time.perf_counter() - began) / batch)
                        for session in sessions or ():
                            model.release(session)
                    same += sum((a.text, a.tokens) == (b.text, b.tokens)
                                for a, b in zip(results["plain"], results["proposal"]))
            proposed = verifying.speculation["proposed"] - before["proposed"]
            accepted = verifying.speculation["accepted"] - before["accepted"]
            plain_ms, proposal_ms = 1000 * statistics.mean(times["plain"]), 1000 * statistics.mean(times["proposal"])
            out[f"{mode}_batch_{batch}"] = {
                "plain_ms_per_step": round(plain_ms, 2), "proposal_ms_per_step": round(proposal_ms, 2),
                "ratio": round(plain_ms / proposal_ms, 3), "steps": len(times["plain"]) * batch,
                "same_output": same, "proposal_tokens": proposed,
                "kept_fraction": round(accepted / proposed, 3) if proposed else None}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--seed", type=int, default=5100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.problems, args.seed, args.repeats), indent=2))


if __name__ == "__main__":
    main()
