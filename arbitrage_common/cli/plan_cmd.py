"""`arbitrage plan`: replicas, GPUs and worker-group Pods per pool for an arrival rate and a
p95 SLO (RSD and Arbitrage side by side at matched accuracy); `plan profile` measures its
inputs; `plan check` compares its predictions with locust runs on this machine."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .argtypes import finite_positive_float, positive_int, unit_float
from .subcommands import FlagsBeforeSubcommand

DEFAULT_PROFILE = "runs/plan/profile.json"


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="capacity planner: replicas / GPUs / Pods per pool for a rate and a p95 SLO")
    # Every flag of `plan` defaults to None (or False): `FlagsBeforeSubcommand` tells one given before a
    # subcommand by it; `_plan` fills in the defaults.
    p.add_argument("--profile", help=f"from `arbitrage plan profile` (default: {DEFAULT_PROFILE})")
    p.add_argument("--rate", type=finite_positive_float, help="arrivals per second to plan for")
    p.add_argument("--slo-ms", type=finite_positive_float, help="p95 end-to-end latency to hold, ms")
    p.add_argument("--policy", help="arbitrage (default), rsd, target or draft; not with --bench")
    p.add_argument("--target-fraction", type=unit_float,
                   help="share of steps the target writes, arbitrage and rsd only (default: the profile's, if "
                        "measured with this --policy); not with --bench")
    p.add_argument("--bench", help="bench.json of `arbitrage bench`: plan RSD and Arbitrage at its matched accuracy "
                                   "(their target fractions; no --policy or --target-fraction)")
    p.add_argument("--preset", help="GPUs per pool and worker-group Pods for this preset (or cpu-demo)")
    p.add_argument("--seed", type=int, help="seed of the simulation (default: 0)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)
    plan_sub = p.add_subparsers(dest="plan_cmd", action=FlagsBeforeSubcommand)
    prof = plan_sub.add_parser("profile", help="measure per-pool service time vs batch size, in this process with "
                                               "the transformers backend (no vllm pools), and, with --grpc, overheads "
                                               "and steps per request from a running service")
    prof.add_argument("--config", help="AppConfig whose checkpoints are profiled (default: the embedded default)")
    prof.add_argument("--grpc", help="HOST:PORT of the running service to measure steps per request and "
                                     "overheads against (it times no pool; API key from $ARBITRAGE_API_KEY)")
    prof.add_argument("--app", help="Serve application name (gRPC metadata)")
    prof.add_argument("--policy", default="arbitrage")
    prof.add_argument("--n", type=positive_int, default=20, help="requests for the calibration")
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--cores", type=_cores_arg,
                      help="CPU cores the pools' replicas share when planned (default: the CPUs this process may use, "
                           "on which the pools are timed, with or without --grpc); 'none' plans every replica on "
                           "cores of its own (Pods with CPUs of their own), with no core-load refusal")
    prof.add_argument("--out", default=DEFAULT_PROFILE)
    prof.set_defaults(func=_profile)
    check = plan_sub.add_parser("check", help="predicted vs measured p95 at 30/60/85%% of measured capacity "
                                              "(starts the embedded default, runs locust open-loop)")
    check.add_argument("--config", help="AppConfig of the service started here (default: the embedded default)")
    check.add_argument("--policy", default="arbitrage")
    check.add_argument("--fractions", default="0.3,0.6,0.85", help="shares of the measured capacity")
    check.add_argument("--duration", type=finite_positive_float, default=60.0, help="seconds of load per rate")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--out", default="runs/plan-check")
    check.set_defaults(func=_check)


OWN_CORES = "none"  # `plan profile --cores none`: the profile's cores null, no replica shares cores


def _cores_arg(text: str) -> float | str:
    """argparse type of ``plan profile --cores``: a finite number > 0, or ``none``."""
    if text.strip().lower() == OWN_CORES:
        return OWN_CORES
    try:
        return finite_positive_float(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'none')") from None


def existing_file(path: str, flag: str, hint: str = "") -> Path:
    """``path`` as a Path; ValueError naming ``flag`` when it is missing or not a file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag}: {path} does not exist{hint}")
    if not p.is_file():
        raise ValueError(f"{flag}: {path} is {'a directory' if p.is_dir() else 'not a regular file'}, not a file"
                         f"{hint}")
    return p


def read_json(path: str, flag: str) -> Any:
    """The JSON document in ``path``; ValueError naming ``flag`` and the file when it is not JSON."""
    try:
        return json.loads(existing_file(path, flag).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag}: {path}: not valid JSON ({exc})") from None


def load_profile(path: str, flag: str = "--profile"):
    """The planner profile in ``path``; ValueError naming ``flag`` and the file for a missing,
    malformed or incomplete one."""
    from ..planning.planner import Profile

    existing_file(path, flag, "; run `arbitrage plan profile` first")
    try:
        return Profile.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag}: {path}: not valid JSON ({exc})") from None
    except ValueError as exc:  # a field Profile.from_dict refused, named
        raise ValueError(f"{flag}: {path}: {exc}") from None


def config_from(path: str | None, flag: str = "--config"):
    """The AppConfig in ``path`` (the embedded default for None); ValueError naming ``flag``
    for a path that is missing or not a file."""
    from ..config import default_config, load_config

    if not path:
        return default_config()
    existing_file(path, flag)
    return load_config(path)


def _profile(args) -> int:
    from ..planning.planner import check_policy
    from ..planning.profile import build_profile, check_profilable, check_service, local_cores

    check_policy(args.policy)  # before any model loads
    cfg = config_from(args.config)
    check_profilable(cfg)  # a vLLM pool cannot be timed here: refused before any model loads
    if args.grpc:  # before the pools are timed (seconds a pool), not after
        check_service(args.grpc, args.app)
    # The pools are timed in this process, on its CPUs, in every mode (--grpc only adds the request
    # shape and overheads): left out, --cores is those CPUs, never null (a GPU's own device each).
    cores = local_cores() if args.cores is None else None if args.cores == OWN_CORES else args.cores
    prof = build_profile(cfg, args.grpc, args.app, args.policy, args.n, args.seed, cores)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof.as_dict(), indent=2) + "\n")
    print(json.dumps(prof.as_dict(), indent=2))
    shared = (f"the replicas share {cores:g} cores" if cores is not None
              else "cores null: every replica on cores of its own (--cores none)")
    print(f"arbitrage plan profile: wrote {out} ({shared})")
    return 0


def _fraction_at_matched(bench: dict, policy: str, path: str) -> float:
    """The target-step fraction of the bench's matched ``policy`` point; ValueError naming the
    file and the field when it is missing or not a number in [0, 1]."""
    matched = bench.get("matched") or {}
    point = matched.get(policy) if isinstance(matched, dict) else None
    if not point:
        # `arbitrage bench` writes matched.<policy> null when no threshold of it reached the level
        what = (f"matched.{policy} is {point!r}: no {policy} point reached the matched accuracy" if matched
                else "its matched section is missing or empty")
        raise ValueError(f"--bench: {path}: no matched {policy} point ({what})")
    field = f"matched.{policy}.target_step_fraction"
    if not isinstance(point, dict) or "target_step_fraction" not in point:
        raise ValueError(f"--bench: {path}: {field} is missing (a bench.json of `arbitrage bench` has it)")
    fraction = point["target_step_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--bench: {path}: {field} must be a number in [0, 1], got {fraction!r}")
    return float(fraction)


def _target_fraction(args, prof, policy: str) -> tuple[float, str]:
    """The target fraction to plan ``policy`` at, and where it came from: ``--target-fraction``,
    else the policy itself (draft: 0, target: 1), else the profile's measured one, but only if
    measured with this policy."""
    from ..planning.planner import check_policy

    check_policy(policy)
    fixed = {"draft": (0.0, "never calls the target"), "target": (1.0, "writes every step with the target")}
    if policy in fixed:
        value, why = fixed[policy]
        if args.target_fraction is not None and args.target_fraction != value:
            raise ValueError(f"--target-fraction: policy {policy!r} {why} (its fraction is {value:g}), got "
                             f"{args.target_fraction:g}; leave --target-fraction out")
        return value, f"policy {policy!r}, which {why}"
    if args.target_fraction is not None:
        return args.target_fraction, "--target-fraction"
    fraction, measured_with = prof.measured.get("target_fraction"), prof.measured.get("policy")
    if fraction is None:
        raise ValueError("--target-fraction: the profile has no measured fraction; give one (0..1)")
    if measured_with != policy:
        with_what = f"policy {measured_with!r}" if measured_with else "a policy it does not record"
        raise ValueError(f"--target-fraction: the profile's fraction {fraction:.3f} was measured with {with_what}, "
                         f"not --policy {policy!r}; give --target-fraction or profile "
                         f"with `arbitrage plan profile --policy {policy}`")
    # A calibrated profile's comes from its capacity run; plan profile's from a few requests one at
    # a time (one per entry of steps), a noisy sample of one mix.
    where = prof.measured.get("target_fraction_source") or f"{len(prof.steps)} requests one at a time"
    return fraction, f"the profile (measured with policy {policy!r} in {where})"


def uncalibrated_warning(prof, path: str) -> str | None:
    """A warning for a CPU profile (``cores``) that `plan check` has not calibrated (no
    ``measured.scaled_by``), else None: timed in this process with the hops measured one request
    at a time, it leaves out what requests cost each other inside the running service."""
    if prof.cores is None or "scaled_by" in prof.measured:
        return None
    return (f"{path} is an uncalibrated CPU profile (pools timed in process, hops measured one request at a "
            f"time): plans from it are optimistic under load (the service saturates at a lower rate, with a "
            f"higher p95, than predicted); `arbitrage plan check` writes profile-calibrated.json (in its --out, "
            f"runs/plan-check) to plan with")


def assumed_shape_warning(prof) -> str | None:
    """The profile's ``measured.request_shape`` when it was assumed (no --grpc), else None."""
    shape = prof.measured.get("request_shape")
    if not (isinstance(shape, str) and shape.startswith("assumed")):
        return None
    return f"the profile's request shape was assumed, not measured by `plan profile --grpc` ({shape})"


def _plan(args) -> int:
    if args.rate is None or args.slo_ms is None:
        raise ValueError("plan: --rate and --slo-ms are required (or run `arbitrage plan profile` / `plan check`)")
    from ..planning.planner import Unreachable, gpus_and_pods, packing_warning, plan, stalled_note

    if args.bench and (args.policy is not None or args.target_fraction is not None):
        given = " and ".join(f for f, v in (("--policy", args.policy), ("--target-fraction", args.target_fraction))
                             if v is not None)
        raise ValueError(f"--bench: it plans rsd and arbitrage at the bench's matched-accuracy target fractions; "
                         f"leave out {given}, or leave out --bench to plan one policy")
    profile_path = DEFAULT_PROFILE if args.profile is None else args.profile
    seed = 0 if args.seed is None else args.seed
    prof = load_profile(profile_path)
    if args.bench:
        bench = read_json(args.bench, "--bench")
        if not isinstance(bench, dict):
            raise ValueError(f"--bench: {args.bench}: expected the JSON object of bench.json")
        source = f"--bench {args.bench} (matched accuracy)"
        runs = [("rsd", _fraction_at_matched(bench, "rsd", args.bench), source),
                ("arbitrage", _fraction_at_matched(bench, "arbitrage", args.bench), source)]
    else:
        policy = args.policy or "arbitrage"
        runs = [(policy, *_target_fraction(args, prof, policy))]
    cfg = None
    if args.preset:
        from ..kuberay.targets import target_config

        cfg = target_config(args.preset)
    # Each policy is planned on its own: one that cannot meet the SLO (RSD, say: the business
    # case at its strongest) is reported beside the others' plans, not in place of them.
    results, unreachable = [], []
    for policy, fraction, source in runs:
        try:
            r = plan(prof, policy, fraction, args.rate, args.slo_ms, seed)
        except Unreachable as exc:
            if len(runs) == 1:
                raise
            best = None if exc.best_p95_ms is None else round(exc.best_p95_ms, 1)
            r = {"policy": policy, "target_fraction": round(fraction, 4), "unreachable": str(exc),
                 "best_p95_ms": best}
            unreachable.append(r)
        r["target_fraction_source"] = source
        r["profile"] = profile_path
        r["profile_warning"] = uncalibrated_warning(prof, profile_path)
        r["request_shape"] = prof.measured.get("request_shape")
        if cfg is not None and "unreachable" not in r:
            r.update(gpus_and_pods(r["replicas"], cfg))
            r["packing_warning"] = packing_warning(prof, cfg, args.preset)
        results.append(r)
    if len(unreachable) == len(results):
        raise ValueError("plan: no policy can be planned: " + "; ".join(f"{r['policy']}: {r['unreachable']}"
                                                                        for r in unreachable))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"plan for {args.rate:g} req/s at a p95 SLO of {args.slo_ms:g} ms, profile {profile_path}")
    for warning in filter(None, (uncalibrated_warning(prof, profile_path), assumed_shape_warning(prof))):
        print(f"warning: {warning}")
    for r in results:
        head = f"{r['policy']:<10} target fraction {r['target_fraction']:.3f} (from {r['target_fraction_source']}):"
        if "unreachable" in r:
            best = "" if r["best_p95_ms"] is None else f" (best p95 reached {r['best_p95_ms']} ms)"
            print(f"{head} cannot be planned{best}: {r['unreachable']}")
            continue
        print(f"{head} replicas {r['replicas']}  predicted p50 {r['predicted_p50_ms']} ms, p95 "
              f"{r['predicted_p95_ms']} ms (no-load p95 {r['no_load_p95_ms']} ms)")
        cores = f", cores {r['core_load']}" if "core_load" in r else ""
        print(f"{'':<10} load at max batch {r['load_at_max_batch']}{cores} (1 = saturated)")
        for key in ("headroom_warning", "sampling_warning"):
            if r[key]:
                print(f"{'':<10} warning: {r[key]}")
        if r["stalled_pools"]:
            print(f"{'':<10} more replicas did not lower p95: {stalled_note(r['stalled_pools'], prof.replicas_per_device)}")
        if "gpus_per_pool" in r:
            print(f"{'':<10} GPUs requested {r['gpus_per_pool']} = {r['gpus_requested']}; the Pods provision "
                  f"{r['gpus_provisioned']} GPUs; worker groups {r['worker_groups']} (coordinator at its "
                  f"configured {r['coordinator_replicas']} replicas)")
            if r["packing_warning"]:
                print(f"{'':<10} warning: {r['packing_warning']}")
            for pool, v in r["above_config_max_replicas"].items():
                print(f"{'':<10} warning: pools.{pool} needs {v['planned']} replicas, above its autoscaling "
                      f"max_replicas ({v['max_replicas']}): raise it, then `make k8s`")
    return 0


def _fractions(text: str) -> list[float]:
    try:
        return [float(f) for f in text.split(",")]
    except ValueError:
        raise ValueError(f"--fractions: a comma list of shares of capacity in (0, 1), got {text!r}") from None


def _check(args) -> int:
    from ..planning.planner import check_policy

    check_policy(args.policy)  # before the service starts and the models load
    if args.config:
        existing_file(args.config, "--config")
    fractions = _fractions(args.fractions)
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"--fractions: shares of capacity in (0, 1), got {args.fractions}")
    try:
        from loadtests.plan_check import run_plan_check, verdict
    except ImportError as exc:
        raise RuntimeError(f"plan check needs locust: pip install -e '.[load]' ({exc})") from None
    table = run_plan_check(args.config, args.policy, fractions, args.duration, args.seed, Path(args.out))
    print(json.dumps(table, indent=2))
    # A measurement, not a gate: rows outside the tolerance are a warning, and the exit stays 0.
    print(f"arbitrage plan check: {verdict(table)}", file=sys.stderr)
    return 0
