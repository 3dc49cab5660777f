"""``arbitrage serve bench``: serving overhead, throughput scaling and startup, measured in
one run (ratios, since the machine is noisy). Prints figures; asserts nothing.

- overhead = mean end-to-end gRPC latency / mean in-process loop latency, same problems,
  same policy, same checkpoints, one request at a time; the in-process loop is the plain one
  (no step pipelining, no draft lookahead, whatever the config turns on). The in-process loop and the gRPC
  call alternate problem by problem (the order flips every problem), so drift in the
  machine's speed hits both alike;
- ``serving_overhead`` compares with the plain in-process loop (every step reads its whole
  context, as the issue's first figure did); ``serving_overhead_same_work`` with the
  in-process loop whose generators and scorers keep each request's prefix cache, as the
  served pools do, so it is the cost of serving alone;
- scaling = requests/s with ``concurrency`` clients / requests/s with one client sending
  back to back, over the same problems at both loads (``scaling_rounds``: two sets of
  ``max(n, 4 x concurrency)`` problems, each run once at each load, in an order symmetric in time, so drift
  in the machine's speed hits both loads alike; ``repeats`` times over fresh sets, for the
  ratio's spread within one run: ``scaling_spread``). Each request is a fresh session, so no
  transformers cache carries over; an engine's prefix cache (vLLM, which caches by content) is
  emptied before each round when the bench started the service;
- startup = seconds from the start of the command until the service answered (only when
  the bench starts the service itself);
- where the scaling comes from (only when the bench starts the service, on Linux): the whole
  machine's busy CPU over each load's rounds (``/proc/stat``), as cores busy and CPU ms per
  request. ``throughput_scaling`` is the ratio of cores busy times the inverse ratio of CPU
  per request: more cores kept busy, or less CPU per request in bigger batches; and how big
  the batches were, as rows per forward pass of each pool (``pool_batches``).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from arbitrage_common.config import GENERATOR_ROLES, AppConfig
from arbitrage_common.synthetic import extract_answer, generate_problems

from .process_cpu import cpu_by_role, process_cpu
from .validation import RequestFields, prepare


def _in_process_models(cfg: AppConfig):
    from arbitrage_common.backends.async_adapters import ThreadedGenerator, ThreadedScorer
    from arbitrage_common.backends.hf_generator import HFStepGenerator
    from arbitrage_common.backends.scorers import load_step_scorer
    from arbitrage_common.loop import Models

    p = cfg.pools

    def scorer(spec):
        return ThreadedScorer(load_step_scorer(cfg.resolve_path(spec.model.path), threads=spec.model.threads,
                                               trust_remote_code=spec.model.trust_remote_code,
                                               prefix_cache_mb=spec.model.prefix_cache_mb)) \
            if spec is not None else None

    def generator(spec):
        mb = spec.model.prefix_cache_mb
        cache = {} if mb is None else {"prefix_cache_bytes": mb * 2**20}
        return ThreadedGenerator(HFStepGenerator(cfg.resolve_path(spec.model.path), threads=spec.model.threads,
                                                 trust_remote_code=spec.model.trust_remote_code, **cache))

    return Models(draft=generator(p.draft), target=generator(p.target), router=scorer(p.router), prm=scorer(p.prm))


def _in_process(cfg: AppConfig, policy: str) -> Callable[[str, bool], tuple[float, int | None]]:
    """``run(prompt, cached)``: one request through the in-process loop on its own event loop
    (seconds, answer); ``cached``: its generators and scorers keep the request's prefix cache,
    as the pools do."""
    import dataclasses

    from arbitrage_common.loop import run_loop

    models = _in_process_models(cfg)
    loop = asyncio.new_event_loop()
    counter = itertools.count()

    roles = [role for role in ("draft", "target", "router", "prm") if getattr(models, role) is not None]

    def with_session(session: str):
        return dataclasses.replace(models, **{role: getattr(models, role).bound(session) for role in roles})

    async def one(prompt: str, cached: bool):
        # The plain loop, whatever the config turns on: pipelining and lookahead only pay where
        # calls cost a hop, and their dropped guesses would slow the reference down.
        request = dataclasses.replace(prepare(RequestFields(prompt=prompt, policy=policy), cfg).request,
                                      pipeline=False, lookahead=0)
        session = f"bench-{next(counter)}"
        used = with_session(session) if cached else models
        started = time.perf_counter()
        result = await run_loop(request, used)
        seconds = time.perf_counter() - started
        for role in roles:
            getattr(used, role).release()
        return seconds, extract_answer(result.text)

    def run(prompt: str, cached: bool) -> tuple[float, int | None]:
        return loop.run_until_complete(one(prompt, cached))

    return run


def _grpc_client(endpoint: str, app: str | None):
    from arbitrage_common.client import Client, build_request

    client = Client(endpoint, app)

    def call(prompt: str, policy: str) -> tuple[float, int | None, int]:
        """(seconds, answer, output tokens: the kept steps' tokens, draft's and target's)."""
        started = time.perf_counter()
        reply = client.generate(build_request(prompt, policy), timeout=600)
        tokens = reply.usage.draft_tokens_kept + reply.usage.target_tokens
        return time.perf_counter() - started, (reply.answer if reply.HasField("answer") else None), tokens

    return client, call


def scaling_rounds(first: list[str], second: list[str], concurrency: int) -> list[tuple[str, list[str], int]]:
    """The timed rounds of ``throughput_scaling``, in order, as (load, prompts, clients), load
    being "many" or "one": each set once at ``concurrency`` clients and once at one, so both
    loads do the same work; the order (N, 1 | 1, N) is symmetric in time, so a drift in speed
    hits both loads alike."""
    return [("many", first, concurrency), ("one", first, 1), ("one", second, 1), ("many", second, concurrency)]


def scaling_spread(by_repeat: list[dict[str, float]]) -> dict[str, Any]:
    """Each repeat's ``throughput_scaling`` (its own rounds' requests/s at N clients over those
    at one: ``{"one": seconds, "many": seconds}`` for the same requests), their mean, sample
    standard deviation and standard error of the mean."""
    ratios = [walls["one"] / walls["many"] for walls in by_repeat]
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    return {"throughput_scaling_by_repeat": [round(r, 3) for r in ratios],
            "throughput_scaling_repeat_mean": round(statistics.mean(ratios), 3),
            "throughput_scaling_repeat_sd": round(sd, 3),
            "throughput_scaling_repeat_se": round(sd / len(ratios) ** 0.5, 3)}


PROC_STAT = Path("/proc/stat")


def busy_cpu_seconds(stat_text: str, ticks_per_s: int) -> float:
    """Busy CPU seconds since boot of every core, from the text of ``/proc/stat``: user, nice,
    system, irq and softirq; not idle, iowait or steal (a hypervisor's time, not this
    machine's work)."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
            return (user + nice + system + irq + softirq) / ticks_per_s
    raise ValueError("/proc/stat: no aggregate 'cpu' line")


def _machine_cpu_seconds() -> float | None:
    """This machine's busy CPU seconds since boot, or None where there is no ``/proc/stat``."""
    try:
        return busy_cpu_seconds(PROC_STAT.read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def _reset_engine_caches(cfg: AppConfig, app: str | None) -> bool:
    """Empty every generator pool's engine prefix cache (a no-op on transformers pools); False
    if an engine could not."""
    from ray import serve

    return all(serve.get_deployment_handle(role, app_name=app or cfg.name).reset_prefix_cache.remote().result()
               for role in GENERATOR_ROLES)


PoolBatches = dict[str, tuple[int, int]]  # role -> (forward passes, rows)


def pool_batches(cfg: AppConfig, app: str | None = None) -> PoolBatches:
    """(forward passes, rows run) so far by each pool that batches in its one replica. Left
    out: vLLM pools (the engine batches inside; the replica counts calls) and pools of several
    replicas (a handle reaches only one of them)."""
    from ray import serve

    out = {}
    for role, spec in cfg.pools.configured():
        if spec.model.backend != "vllm" and spec.max_replicas() == 1:
            info = serve.get_deployment_handle(role, app_name=app or cfg.name).info.remote().result()
            out[role] = (info["batches"], info["items"])
    return out


def batches_between(before: PoolBatches, after: PoolBatches) -> PoolBatches:
    """(forward passes, rows) each pool ran between two ``pool_batches``."""
    return {role: (passes - before.get(role, (0, 0))[0], rows - before.get(role, (0, 0))[1])
            for role, (passes, rows) in after.items()}


def rows_per_batch(ran: PoolBatches) -> dict[str, float]:
    """Rows per forward pass of each pool that ran any."""
    return {role: round(rows / passes, 2) for role, (passes, rows) in ran.items() if passes > 0}


def run_serve_bench(cfg: AppConfig, endpoint: str | None = None, app: str | None = None, n: int = 16,
                    seed: int = 3000, policy: str | None = None, concurrency: int = 16,
                    started: float | None = None, repeats: int = 1) -> dict[str, Any]:
    from . import local

    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")

    started = time.perf_counter() if started is None else started
    policy = policy or cfg.policy.default
    out: dict[str, Any] = {"policy": policy, "problems": n, "concurrency": concurrency}
    owns_service = endpoint is None
    try:
        if owns_service:
            endpoint = local.start(cfg)["grpc"]
        channel, call = _grpc_client(endpoint, app)
        problems = generate_problems(n, seed)
        prompts = [p.prompt for p in problems]
        call(prompts[0], policy)  # the first request also proves the service answers
        if owns_service:
            out["startup_s"] = round(time.perf_counter() - started, 2)

        # Throughput: problems of their own, none repeated within a round (an engine's prefix
        # cache reuses work by content): a warm-up wave, then the rounds of ``scaling_rounds``.
        per_set = max(n, 4 * concurrency)
        load = [p.prompt for p in generate_problems(concurrency + 2 * per_set * repeats, seed + 1)]
        sets = [load[concurrency + k * per_set:concurrency + (k + 1) * per_set] for k in range(2 * repeats)]
        tokens = {"one": 0, "many": 0}  # load -> output tokens
        walls: list[dict[str, float]] = [{"one": 0.0, "many": 0.0} for _ in range(repeats)]  # load -> seconds
        # load -> busy CPU seconds of the machine, and by role; only for a service on this machine
        cpu = {"one": 0.0, "many": 0.0} if owns_service and _machine_cpu_seconds() is not None else None
        by_role: dict[str, dict[str, float]] = {"one": {}, "many": {}}
        # load -> role -> (forward passes, rows) over the load's rounds; only for the bench's own service
        batches: dict[str, PoolBatches] = {"one": {}, "many": {}}
        caches_reset = owns_service  # every round's engine prefix caches emptied (False if one was not)

        def timed_round(repeat: int, load_: str, prompts_: list[str], clients: int) -> None:
            nonlocal caches_reset
            if owns_service:
                caches_reset = _reset_engine_caches(cfg, app) and caches_reset
            processes = process_cpu(app or cfg.name) if cpu is not None else {}
            ran_before = pool_batches(cfg, app) if owns_service else {}
            cpu_begun, begun = _machine_cpu_seconds(), time.perf_counter()
            with ThreadPoolExecutor(clients) as ex:
                replies = list(ex.map(lambda p: call(p, policy), prompts_))
            walls[repeat][load_] += time.perf_counter() - begun
            if cpu is not None:
                cpu[load_] += _machine_cpu_seconds() - cpu_begun
                for role, seconds in cpu_by_role(processes, process_cpu(app or cfg.name)).items():
                    by_role[load_][role] = by_role[load_].get(role, 0.0) + seconds
            tokens[load_] += sum(r[2] for r in replies)
            if owns_service:
                for role, (passes, rows_) in batches_between(ran_before, pool_batches(cfg, app)).items():
                    total = batches[load_].get(role, (0, 0))
                    batches[load_][role] = (total[0] + passes, total[1] + rows_)

        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(lambda p: call(p, policy), load[:concurrency]))
        rounds = [scaling_rounds(sets[2 * k], sets[2 * k + 1], concurrency) for k in range(repeats)]
        for round_ in rounds[0][:2]:
            timed_round(0, *round_)

        # Serving overhead, in the middle of the rounds: one request at a time, the in-process
        # loop and the gRPC call alternating problem by problem.
        inproc = _in_process(cfg, policy)
        inproc(prompts[0], False)  # warm-up
        inproc(prompts[0], True)
        rows: dict[str, list] = {"plain": [], "cached": [], "grpc": []}
        for i, prompt in enumerate(prompts):
            order = ("plain", "cached", "grpc") if i % 2 == 0 else ("grpc", "cached", "plain")
            for kind in order:
                rows[kind].append(call(prompt, policy) if kind == "grpc" else inproc(prompt, kind == "cached"))
        grpc_rows = rows["grpc"]
        grpc_s = [r[0] for r in grpc_rows]
        inproc_s, inproc_answers = [r[0] for r in rows["plain"]], [r[1] for r in rows["plain"]]
        cached_s = [r[0] for r in rows["cached"]]

        for round_ in rounds[0][2:]:
            timed_round(0, *round_)
        for k in range(1, repeats):
            for round_ in rounds[k]:
                timed_round(k, *round_)
        channel.close()
    finally:
        if owns_service:
            local.stop()

    wall1, walln = (sum(w[load_] for w in walls) for load_ in ("one", "many"))
    tokens1, tokensn = tokens["one"], tokens["many"]
    requests = 2 * per_set * repeats
    rps1, rpsn = requests / wall1, requests / walln
    out.update({
        "in_process_ms_mean": round(1000 * statistics.mean(inproc_s), 1),
        "in_process_cached_ms_mean": round(1000 * statistics.mean(cached_s), 1),
        "grpc_ms_mean": round(1000 * statistics.mean(grpc_s), 1),
        "serving_overhead": round(statistics.mean(grpc_s) / statistics.mean(inproc_s), 3),
        "serving_overhead_median": round(statistics.median(grpc_s) / statistics.median(inproc_s), 3),
        "serving_overhead_same_work": round(statistics.mean(grpc_s) / statistics.mean(cached_s), 3),
        "scaling_requests_per_load": requests,
        "rps_1_client": round(rps1, 3),
        f"rps_{concurrency}_clients": round(rpsn, 3),
        "throughput_scaling": round(rpsn / rps1, 3),
        # The same problems at both loads; sampled steps can still differ run to run, so the
        # tokens say how much work each load's requests carried.
        "output_tokens_per_request_1_client": round(tokens1 / requests, 1),
        f"output_tokens_per_request_{concurrency}_clients": round(tokensn / requests, 1),
        "output_tokens_per_s_1_client": round(tokens1 / wall1, 1),
        f"output_tokens_per_s_{concurrency}_clients": round(tokensn / walln, 1),
        "token_throughput_scaling": round((tokensn / walln) / (tokens1 / wall1), 3),
        **(scaling_spread(walls) if repeats > 1 else {}),
        "engine_prefix_caches_reset": caches_reset,
        **(_cpu_figures(cpu, by_role, wall1, walln, requests, concurrency) if cpu else {}),
        **({"rows_per_batch_by_pool_1_client": rows_per_batch(batches["one"]),
            f"rows_per_batch_by_pool_{concurrency}_clients": rows_per_batch(batches["many"])}
           if owns_service else {}),
        "accuracy_in_process": round(sum(a == p.answer for a, p in zip(inproc_answers, problems)) / n, 3),
        "accuracy_grpc": round(sum(r[1] == p.answer for r, p in zip(grpc_rows, problems)) / n, 3),
        "answers_agree": round(sum(r[1] == a for r, a in zip(grpc_rows, inproc_answers)) / n, 3),
    })
    return out


def _cpu_figures(cpu: dict[str, float], by_role: dict[str, dict[str, float]], wall1: float, walln: float,
                 requests: int, concurrency: int) -> dict[str, Any]:
    def per_request(spent: dict[str, float]) -> dict[str, float]:  # the costliest role first
        return {role: round(1000 * seconds / requests, 2)
                for role, seconds in sorted(spent.items(), key=lambda kv: -kv[1])}

    return {"cores_busy_1_client": round(cpu["one"] / wall1, 3),
            f"cores_busy_{concurrency}_clients": round(cpu["many"] / walln, 3),
            "cpu_ms_per_request_1_client": round(1000 * cpu["one"] / requests, 1),
            f"cpu_ms_per_request_{concurrency}_clients": round(1000 * cpu["many"] / requests, 1),
            "cpu_ms_per_request_by_role_1_client": per_request(by_role["one"]),
            f"cpu_ms_per_request_by_role_{concurrency}_clients": per_request(by_role["many"])}
