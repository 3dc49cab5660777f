"""Prefix-cache affinity benchmark: the target pool on vLLM with 2 replicas, affinity on and off.

Two apps run side by side on one local cluster, identical but for the target pool's
``session_affinity``. The same synthetic problems go to both over gRPC, batch by batch,
alternating which app goes first, so machine noise falls on both alike. Printed (JSON), per
concurrency level (fresh problems per level, so caches start cold) and phase: the target
pool's prefix-cache hit rate (token hits / token queries, summed over its replicas, from
each replica's ``info()``; warm-up requests are left out), the target calls' latency as the
coordinator measured it (``stage_ms.target`` of target-written steps: routing, queueing and
the engine), the engine's own time per call, each replica's share of the calls, and the
on/off ratios.

Run in the vLLM venv (docs/VLLM.md), from the repository root::

    .venv-vllm/bin/python -m services.affinity_bench --n 16 --concurrency 1 4
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from arbitrage_common.client import Client, build_request, source_name
from arbitrage_common.config import AppConfig, PolicySpec, default_config, render_serve_config
from arbitrage_common.synthetic import generate_problems

PHASES = {"on": True, "off": False}
# Each target engine: one OpenMP thread, unpinned, so the two replicas of a phase share the
# cores instead of both binding to the one core use_backend gives the target role.
TARGET_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_config(phase: str, policy: str, threshold: float | None, replicas: int, http: int,
                 grpc: int) -> AppConfig:
    """The embedded default with the target pool on vLLM (``replicas`` of it) and the draft on
    transformers; router / PRM only when the policy needs them."""
    from services.local import use_backend

    data = use_backend(default_config(), "vllm").model_dump(mode="json")
    data.update(name=f"affinity-{phase}", http={"port": http}, grpc={"port": grpc},
                policy=PolicySpec(default=policy, threshold=threshold).model_dump(mode="json"))
    draft, target = data["pools"]["draft"], data["pools"]["target"]
    draft["model"].update(backend="transformers", engine=None)
    draft["ray_actor_options"].pop("runtime_env", None)
    target.update(num_replicas=replicas, session_affinity=PHASES[phase])
    target["ray_actor_options"]["runtime_env"]["env_vars"].update(TARGET_ENV)
    for role, needed in (("router", policy == "arbitrage"), ("prm", policy in ("rsd", "oracle"))):
        if not needed:
            data["pools"][role] = None
    return AppConfig.model_validate(data)


def replica_infos(app: str, replicas: int, tries: int = 200) -> dict[int, dict[str, Any]]:
    """``info()`` of every target replica, keyed by pid. A call without a session id takes
    Serve's random two-choice, so ask until each replica has answered."""
    from ray import serve

    handle = serve.get_deployment_handle("target", app_name=app)
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        got = handle.info.remote().result(timeout_s=120)
        seen[got["pid"]] = got
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"{app}: only {len(seen)} of {replicas} target replicas answered info()")


def _totals(infos: dict[int, dict[str, Any]]) -> dict[int, tuple[float, ...]]:
    """pid -> (prefix-cache token hits, token queries, calls, engine seconds)."""
    return {pid: (i["prefix_cache"]["hits"], i["prefix_cache"]["queries"], i["batches"], i["forward_s"])
            for pid, i in infos.items()}


def run_batch(client: Client, prompts: list[str], max_steps: int) -> list[float]:
    """The prompts concurrently, one request each; the target stage ms of every target step."""
    def one(prompt: str) -> list[float]:
        reply = client.generate(build_request(prompt, max_steps=max_steps), timeout=600)
        return [s.stage_ms.target for s in reply.steps if source_name(s) == "target"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return [ms for steps in pool.map(one, prompts) for ms in steps]


def summarize(before: dict, after: dict, step_ms: list[float], requests: int) -> dict[str, Any]:
    delta = {pid: tuple(a - b for a, b in zip(after[pid], before[pid])) for pid in after}
    hits, queries, calls, engine_s = (sum(d[k] for d in delta.values()) for k in range(4))
    return {"requests": requests, "target_calls": len(step_ms),
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
            "prefix_cache_hits": hits, "prefix_cache_queries": queries,
            "replica_call_share": sorted(round(d[2] / calls, 3) for d in delta.values()) if calls else [],
            "target_step_ms_mean": round(statistics.fmean(step_ms), 2) if step_ms else None,
            "target_step_ms_median": round(statistics.median(step_ms), 2) if step_ms else None,
            # the same calls timed inside the replica: the engine alone, no routing or transport
            "engine_ms_per_call": round(1000 * engine_s / calls, 2) if calls else None}


def _ratio(key: str, on: dict, off: dict) -> float | None:
    return round(on[key] / off[key], 3) if on[key] and off[key] else None


def run_level(clients: dict[str, Client], apps: dict[str, str], prompts: list[str], concurrency: int, max_steps: int,
              replicas: int) -> dict[str, Any]:
    """Both phases on the same prompts, ``concurrency`` requests at a time, batch by batch,
    alternating which app goes first; counters are read before and after."""
    before = {p: _totals(replica_infos(app, replicas)) for p, app in apps.items()}
    step_ms: dict[str, list[float]] = {p: [] for p in apps}
    for k, i in enumerate(range(0, len(prompts), concurrency)):
        for p in (("on", "off") if k % 2 == 0 else ("off", "on")):
            step_ms[p] += run_batch(clients[p], prompts[i:i + concurrency], max_steps)
    after = {p: _totals(replica_infos(app, replicas)) for p, app in apps.items()}
    on, off = (summarize(before[p], after[p], step_ms[p], len(prompts)) for p in ("on", "off"))
    return {"concurrency": concurrency, "affinity_on": on, "affinity_off": off,
            "on_over_off": {key: _ratio(key, on, off) for key in (
                "prefix_cache_hit_rate", "target_step_ms_mean", "target_step_ms_median", "engine_ms_per_call")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="synthetic problems per concurrency level (the same ones in "
                                                      "both phases; fresh ones per level, so caches start cold)")
    ap.add_argument("--seed", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight, per level")
    ap.add_argument("--policy", default="target", help="'target' (every step on the target) or 'arbitrage'")
    ap.add_argument("--threshold", type=float, default=None, help="policy threshold (arbitrage: low routes often)")
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--replicas", type=int, default=2, help="target pool replicas")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from services.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only cluster
    http, grpc_port = _free_port(), _free_port()
    cfgs = {p: bench_config(p, args.policy, args.threshold, args.replicas, http, grpc_port) for p in PHASES}
    apps = {p: c.name for p, c in cfgs.items()}
    rendered = render_serve_config(cfgs["on"])
    started = time.perf_counter()
    ray.init(address="local", num_cpus=8, object_store_memory=256 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options=rendered["http_options"], grpc_options=rendered["grpc_options"])
        serve.run_many([serve.RunTarget(build_app(c), name=c.name, route_prefix=f"/{p}") for p, c in cfgs.items()])
        startup_s = time.perf_counter() - started
        channel = Client(f"127.0.0.1:{grpc_port}").channel  # one channel, one client per app
        clients = {p: Client(f"127.0.0.1:{grpc_port}", app, channel=channel) for p, app in apps.items()}
        # First calls of a fresh engine are slow: warm every replica (problems of another seed).
        warmup = [p.prompt for p in generate_problems(2 * args.replicas, args.seed + 99_999)]
        for p in apps:
            run_batch(clients[p], warmup, args.max_steps)
        levels = [run_level(clients, apps, [p.prompt for p in generate_problems(args.n, args.seed + 1000 * j)],
                            c, args.max_steps, args.replicas) for j, c in enumerate(args.concurrency)]
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {"policy": args.policy, "threshold": args.threshold, "problems_per_level": args.n, "seed": args.seed,
              "target_replicas": args.replicas, "startup_s": round(startup_s, 1), "levels": levels}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
