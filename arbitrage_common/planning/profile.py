"""``arbitrage plan profile``: the planner's inputs, measured.

1. Per-pool service time against batch size: each pool's transformers backend, in this
   process, on the bundled (or configured) checkpoints, on prefixes of real solutions at a
   random step (seeded; for the target, steps the draft writes differently, with the draft's
   step as the proposal, as a rewrite runs), timed at batch sizes 1..max; a line
   ``base + per_item * b`` is fitted. The transformers generator runs on the CPU, so a config
   with a vLLM pool is refused (``check_profilable``): its curve would be CPU timings of another
   engine.
2. With ``--grpc``: the overheads the pools do not see and the request shape, from a few
   one-at-a-time requests to the running service (the one client module): steps per request
   and target-step fraction of the policy, per-call hop and per-request overhead (measured
   latency minus the pools' stage times the service reports). It times no pool. Without it,
   the step limit and no overheads are assumed (``measured.request_shape`` says which).
A benchmark tool: it loads models, so it is never imported by the serving path."""
from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import replace

from ..config import AppConfig
from ..interfaces import GenerationOptions, ScoreItem
from ..steps import as_written, build_prefix
from ..synthetic import generate_problems
from .model import CALLS_PER_STEP, ServiceCurve
from .planner import TIMED_ON_EVERY_STEP, TIMED_ON_REWRITES, Profile

BATCH_SIZES = (1, 2, 4, 8, 16)


def _inputs(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for p in generate_problems(n, seed):
        steps = p.solution_steps()
        k = rng.randrange(len(steps))
        out.append((p.prompt, steps[:k]))
    return out


def _time(fn, repeats: int) -> float:
    fn()  # warm
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(runs)


def rewrites(cfg: AppConfig, target, options: GenerationOptions, n: int, seed: int, draft=None,
             ) -> tuple[list[str], list[GenerationOptions]]:
    """``n`` prefixes of real solutions where the draft's step differs from the target's (the
    steps a router or PRM sends to the target), each with the draft's step as its proposal, as
    the loop sends it: the target's service time is that of a rewrite, not of a random step.
    ``draft``: the draft pool's generator, if loaded already (else loaded here)."""
    if draft is None:
        draft = _generator(cfg.pools.draft, cfg)
    picked: list[tuple[str, GenerationOptions]] = []
    for attempt in range(8):  # about one step in four differs on the bundled pair
        prefixes = [build_prefix(prompt, steps, cfg.prompt.template)
                    for prompt, steps in _inputs(4 * n, seed + 1000 * (attempt + 1))]
        for prefix, mine, theirs in zip(prefixes, draft.generate_batch(prefixes, options),
                                        target.generate_batch(prefixes, options)):
            if mine.text != theirs.text:
                picked.append((prefix, replace(options, proposal=as_written(mine.text, mine.finish_reason))))
        if len(picked) >= n:
            break
    if not picked:
        raise ValueError("plan profile: the draft and target write the same step on every sampled prefix")
    picked = (picked * n)[:n]  # a pair that rarely differs: reuse the rewrites found
    return [p for p, _ in picked], [o for _, o in picked]


def check_profilable(cfg: AppConfig) -> None:
    """ValueError naming ``pools.<role>.model.backend`` of every pool this command cannot time:
    it loads each pool's transformers backend here, and the transformers generator has no
    device code (CPU only), so a vLLM pool would get CPU timings of another engine."""
    fields = [f"pools.{role}.model.backend is {spec.model.backend!r}" for role, spec in cfg.pools.configured()
              if spec.model.backend != "transformers"]
    if fields:
        raise ValueError(
            f"{', '.join(fields)}: `plan profile` times each pool with the transformers backend in this "
            f"process (its generator runs on the CPU), so it cannot time a vLLM engine nor a generator on a GPU; --grpc "
            f"measures only steps per request, the target-step fraction and the hop and per-request overheads of "
            f"the running service, no pool's service time. Profile a config whose pools use backend "
            f"'transformers', or write the vLLM pools' curves (base_ms, per_item_ms) into a profile by hand, as "
            f"docs/examples/gpu-profile-llama-1b-8b.assumed.json does")


def _generator(spec, cfg: AppConfig):
    """A pool's transformers generator, as configured."""
    from ..backends.hf_generator import HFStepGenerator

    return HFStepGenerator(cfg.resolve_path(spec.model.path), threads=spec.model.threads,
                           trust_remote_code=spec.model.trust_remote_code)


def profile_pools(cfg: AppConfig, batch_sizes=BATCH_SIZES, seed: int = 0, repeats: int = 3,
                  step_tokens: int | None = None, rewrites_only: bool = True) -> tuple[dict[str, ServiceCurve], dict]:
    """Service curves per pool; ``rewrites_only``: time the target on rewrites (``rewrites``),
    as arbitrage and RSD call it, not on every step, as the target policy does."""
    from ..backends.scorers import load_step_scorer

    check_profilable(cfg)  # before any model loads

    inputs = _inputs(max(batch_sizes), seed)
    options = GenerationOptions(max_new_tokens=step_tokens or cfg.limits.step_max_tokens)
    curves, points, generators = {}, {}, {}
    for role, spec in cfg.pools.configured():  # generators first: the draft is loaded before the target
        path = cfg.resolve_path(spec.model.path)
        if role in ("draft", "target"):
            gen = generators[role] = _generator(spec, cfg)
            prefixes = [build_prefix(prompt, steps, cfg.prompt.template) for prompt, steps in inputs]
            rows = [options] * len(prefixes)
            if role == "target" and rewrites_only:
                prefixes, rows = rewrites(cfg, gen, options, len(inputs), seed, generators.get("draft"))
            run = lambda b, gen=gen, prefixes=prefixes, rows=rows: gen.generate_batch(prefixes[:b], rows[:b])
            one = lambda i, gen=gen, prefixes=prefixes, rows=rows: gen.generate_batch([prefixes[i]], rows[i:i + 1])
        else:
            scorer = load_step_scorer(path, threads=spec.model.threads, annotate_history=spec.model.annotate_history,
                                      trust_remote_code=spec.model.trust_remote_code)
            items = [ScoreItem(prompt, tuple((s, "draft") for s in steps[:-1]), steps[-1] if steps else "x")
                     for prompt, steps in inputs]
            run = lambda b, scorer=scorer, items=items: scorer.score_batch(items[:b])
            one = lambda i, scorer=scorer, items=items: scorer.score_batch([items[i]])
        sizes = [b for b in batch_sizes if b <= spec.max_batch_size]
        ms = [_time(lambda b=b, run=run: run(b), repeats) for b in sizes]
        singles = [_time(lambda i=i, one=one: one(i), 1) for i in range(len(inputs))]  # call-to-call spread
        cv = statistics.pstdev(singles) / statistics.mean(singles)
        curves[role] = ServiceCurve.fit(sizes, ms, cv)
        points[role] = dict(zip(map(str, sizes), (round(m, 2) for m in ms)))
    return curves, points


def local_cores() -> float:
    """The CPUs this process may run on (its affinity, not the machine's count): the cores the
    pools timed here shared, and so a CPU profile's default ``cores``."""
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (not Linux)
        return float(os.cpu_count() or 1)


HEALTH_TIMEOUT_S = 5.0


def check_service(endpoint: str, app: str | None, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """ValueError naming ``--grpc`` when the service there does not answer its health check:
    checked before the pools are timed, which takes seconds a pool."""
    from ..client import Client

    with Client(endpoint, app) as client:
        if not client.healthy(timeout=timeout_s):
            raise ValueError(f"--grpc: {endpoint}: the gRPC health check did not answer SERVING within "
                             f"{timeout_s:g} s; start the service (`arbitrage serve`) or point --grpc at it")


def measure_service(endpoint: str, app: str | None, policy: str, n: int, seed: int,
                    max_steps: int | None = None) -> dict:
    """One request at a time: steps, target fraction, and overheads beyond the pools' stages."""
    from ..client import Client, build_request

    steps, target_steps, gaps, calls = [], 0, [], 0
    with Client(endpoint, app) as client:
        for i, p in enumerate(generate_problems(n, seed + 1)):
            t0 = time.perf_counter()
            reply = client.generate(build_request(p.prompt, policy, max_steps=max_steps, request_id=f"profile-{i}"))
            wall = (time.perf_counter() - t0) * 1000.0
            stage = sum(getattr(s.stage_ms, f) for s in reply.steps for f in ("draft", "target", "router", "prm"))
            steps.append(len(reply.steps))
            target_steps += reply.usage.target_steps
            calls += sum(bool(getattr(s.stage_ms, f)) for s in reply.steps for f in ("draft", "target", "router",
                                                                                    "prm"))
            gaps.append((wall, stage))
    return {"steps": steps, "target_fraction": target_steps / max(sum(steps), 1), "calls_per_request": calls / n,
            "wall_ms_mean": statistics.mean(g[0] for g in gaps), "stage_ms_mean": statistics.mean(g[1] for g in gaps)}


def build_profile(cfg: AppConfig, endpoint: str | None, app: str | None, policy: str, n: int, seed: int,
                  cores: float | None, max_steps: int | None = None) -> Profile:
    rewrites_only = CALLS_PER_STEP.get(policy, ((), None))[1] == "target"
    curves, points = profile_pools(cfg, seed=seed, rewrites_only=rewrites_only)
    measured: dict = {"service_ms_by_batch": points,
                      "target_steps": TIMED_ON_REWRITES if rewrites_only else TIMED_ON_EVERY_STEP}
    # Without a service to measure, every request is assumed to run to the step limit with no
    # hop or request overhead; the profile says so, since that overstates the work per request.
    steps: tuple[int, ...] = (cfg.limits.default_max_steps,)
    hop = overhead = 0.0
    measured["request_shape"] = (f"assumed: {steps[0]} steps a request (limits.default_max_steps), no hop or "
                                 f"request overhead; measure it with --grpc")
    if endpoint:
        m = measure_service(endpoint, app, policy, n, seed, max_steps)
        steps = tuple(m["steps"])
        # The service's stage times include the hop to each pool; what is left of the wall time
        # (proxy, gRPC, coordinator) is the per-request overhead. Hops: stage time beyond the
        # pools' own batch-1 service time, spread over the calls.
        always, routed = CALLS_PER_STEP[policy]
        per_step = sum(curves[r].ms(1) for r in always) + (curves[routed].ms(1) * m["target_fraction"]
                                                           if routed else 0.0)
        pure = per_step * statistics.mean(steps)
        hop = max(m["stage_ms_mean"] - pure, 0.0) / max(m["calls_per_request"], 1)
        overhead = max(m["wall_ms_mean"] - m["stage_ms_mean"], 0.0)
        measured.update({k: m[k] for k in ("target_fraction", "calls_per_request", "wall_ms_mean", "stage_ms_mean")})
        measured["policy"] = policy
        measured["request_shape"] = f"measured: {n} requests to {endpoint}"
    return Profile(curves, {r: s.max_batch_size for r, s in cfg.pools.configured()}, round(hop, 3),
                   round(overhead, 3), steps, cores, measured)
