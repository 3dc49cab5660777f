#!/usr/bin/env python3
"""The capacity planner on a grid of cases: one JSON line per case (replicas, GPUs, p95, or the
refusal, and the CPU seconds it took), to compare planner versions side by side:

    python scripts/plan_grid.py OUT.jsonl [--src TREE] [--only REGEX] [--cpu-s 150]

--src plans with another source tree (a checkout of an earlier commit); OUT is appended to and
cases already in it are skipped, so an interrupted run resumes. Cases: six profiles (CPU-sized
ones and docs/examples' GPU one), each pool on a GPU of its own or packed, four policies, rates a
quarter to four times the rate one replica a pool saturates at, SLOs 1.2 to 3 times the no-load
p95. Seeded: the same tree gives the same plans."""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKING = {"draft": 2, "target": 1, "router": 4, "prm": 4}  # replicas a GPU, as the llama-1b-8b preset
FRACTION = {"arbitrage": 0.25, "rsd": 0.4, "target": 1.0, "draft": 0.0}
RATE_X = (0.25, 0.5, 1.0, 2.0, 4.0)
SLO_X = (1.2, 1.5, 2.0, 3.0)


def profiles(planner, model):
    curve, profile = model.ServiceCurve, planner.Profile
    c = {"draft": curve(5, 1), "router": curve(8, 0.5), "prm": curve(8, 0.5), "target": curve(40, 4)}
    yield "small", profile(c, dict.fromkeys(c, 16), 2.0, 5.0, (5, 6, 7), None, {})
    c = {"draft": curve(150.0, 1.5), "router": curve(20.0, 2.0), "target": curve(520.0, 4.0)}
    yield "big_static", profile(c, {"draft": 64, "router": 32, "target": 64}, 3.0, 10.0, (20,), None, {})
    c = {"draft": curve(5, 1), "router": curve(8, 0.5), "target": curve(40, 4)}
    yield "packed_small", profile(c, dict.fromkeys(c, 16), 2.0, 5.0, (5, 6, 7), None, {},
                                  batching={"draft": "continuous", "target": "continuous"})
    example = profile.load(str(ROOT / "docs/examples/gpu-profile-llama-1b-8b.assumed.json"))
    yield "example", replace(example, replicas_per_device={})
    yield "one_pool", profile({"draft": curve(100, 0)}, {"draft": 1}, 0.0, 0.0, (1,), None, {})
    yield "slows", profile({"draft": curve(100, 1)}, {"draft": 64}, 0.0, 0.0, (10,), None, {},
                           batching={"draft": "continuous"})


def cases(planner, model):
    for name, base in profiles(planner, model):
        for policy in ("arbitrage", "rsd", "target", "draft"):
            w = planner.workload(base, policy, FRACTION[policy])
            if not w.pools() <= set(base.curves):
                continue
            loads = model.load_at_max_batch(planner._pools(base, w, {}), w, 1.0, base.session_affinity)
            one_replica = 1.0 / max(loads.values())  # the rate one replica a pool saturates at
            floor, _ = planner.no_load_p95(base, policy, FRACTION[policy])
            big = name in ("big_static", "example")  # 20 steps a request: slow to simulate
            for packed in (False, True):
                per_device = {p: k for p, k in PACKING.items() if p in base.curves} if packed else {}
                prof = replace(base, replicas_per_device=per_device)
                for rx in (RATE_X[:-1] if big else RATE_X):
                    for sx in (SLO_X[1:] if big else SLO_X):
                        yield (f"{name}|{policy}|{'packed' if packed else 'own'}|{rx}|{sx}", prof, policy,
                               round(rx * one_replica, 3), round(sx * floor, 1))


def _gpus(prof, replicas: dict[str, int]) -> int:
    """GPUs a plan occupies (written here: an earlier tree's planner may not count them)."""
    return sum(-(-n // prof.replicas_per_device.get(p, 1)) for p, n in replicas.items())


def _over_budget(*_):
    raise TimeoutError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON lines, appended to (cases already there are skipped)")
    ap.add_argument("--src", default=str(ROOT), help="source tree to plan with (default: this one)")
    ap.add_argument("--only", default="", help="cases whose name (profile|policy|own or packed|rate x|SLO x) matches")
    ap.add_argument("--cpu-s", type=float, default=150.0, help="CPU seconds a case before it is marked timeout")
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    from arbitrage_common.planning import model, planner

    out = Path(args.out)
    done = {json.loads(line)["case"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    signal.signal(signal.SIGPROF, _over_budget)
    with out.open("a") as f:
        for case, prof, policy, rate, slo in cases(planner, model):
            if case in done or not re.search(args.only, case):
                continue
            row = {"case": case, "rate": rate, "slo_ms": slo}
            begun = time.process_time()
            signal.setitimer(signal.ITIMER_PROF, args.cpu_s)
            try:
                r = planner.plan(prof, policy, FRACTION[policy], rate, slo)
                row.update(replicas=r["replicas"], gpus=_gpus(prof, r["replicas"]),
                           p95=r["predicted_p95_ms"], stalled=sorted(r["stalled_pools"]))
            except planner.Unreachable as exc:
                row.update(refused=str(exc)[:160])
            except TimeoutError:
                row.update(timeout=True)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            row["cpu_s"] = round(time.process_time() - begun, 2)
            f.write(json.dumps(row) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
