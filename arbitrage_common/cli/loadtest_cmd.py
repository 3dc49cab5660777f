"""`arbitrage loadtest`: locust, headless and bounded, against the embedded default (started
here) or a running service (--grpc / --http); writes the locust CSVs, summary.json and report.html."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..synthetic.problems import MIXES
from .argtypes import finite_float, finite_positive_float, positive_int, positive_int32, unit_float


def add_loadtest_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="locust load test: requests/s, latency percentiles, TTFS, time per step, "
                                        "goodput, pools over time (loadtests/)")
    where = p.add_argument_group("service (default: start the embedded default here)")
    where.add_argument("--grpc", help="HOST:PORT of a running service's gRPC API (API key from $ARBITRAGE_API_KEY)")
    where.add_argument("--http", help="base URL of a running service's HTTP API (API key from $ARBITRAGE_API_KEY)")
    where.add_argument("--app", help="Serve application name (gRPC metadata) when several apps run")
    where.add_argument("--config", help="AppConfig of the service started here (default: the embedded default)")
    where.add_argument("--metrics", action="append", default=[], metavar="URL",
                       help="Prometheus endpoint(s) of the service's Ray nodes, sampled for pools over time")
    load = p.add_argument_group("load")
    load.add_argument("--transport", help="grpc, grpc-stream, http, http-sse, openai, openai-chat (default: http "
                                           "with --http alone, else grpc)")
    # No argparse defaults: a closed-loop flag given beside --rate is refused, even at its default.
    load.add_argument("--users", type=positive_int, help="closed loop: concurrent users (peak; default 4)")
    load.add_argument("--spawn-rate", type=finite_positive_float, help="closed loop: users started per second "
                                                                        "(default 4)")
    load.add_argument("--shape", help="closed loop: steady (default), ramp or spike")
    load.add_argument("--rate", type=finite_positive_float, help="open loop: Poisson arrivals per second (replaces --users)")
    load.add_argument("--max-in-flight", type=positive_int, default=256, help="open loop: more are dropped, counted")
    load.add_argument("--duration", type=finite_positive_float, default=60.0, help="seconds of load")
    load.add_argument("--timeout", type=finite_positive_float, default=120.0, help="per-request deadline, seconds")
    load.add_argument("--slo-ms", type=finite_positive_float, help="goodput: share of requests done within this many ms")
    mix = p.add_argument_group("request mix")
    mix.add_argument("--policy", help="policy of every request (default: the server's)")
    mix.add_argument("--threshold", type=finite_float, help="policy threshold (unset: the server's policy.threshold for its default policy, "
                                                                   "else the policy's own default)")
    mix.add_argument("--hard-prob", type=unit_float, default=0.2, help="share of problems with a hard step (0..1)")
    mix.add_argument("--mix", dest="problem_mix", choices=sorted(MIXES),
                     help="a named problem mix instead of --hard-prob (olympiad: every problem has a hard step)")
    mix.add_argument("--max-steps", type=positive_int32,  # the API's int32 max_steps
                     help="steps a request at most (default: the server's)")
    mix.add_argument("--seed", type=int, default=0, help="seed of the problem draws and Poisson arrivals")
    p.add_argument("--out", default="runs/loadtest", help="output directory")
    p.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any request failed")
    p.add_argument("--no-progress", action="store_true", help="no live stats (default: live when a terminal)")
    p.set_defaults(func=_loadtest)


def _transport(args) -> str:
    """The transport to load: --transport, else the API of the one endpoint given. A transport
    whose endpoint was not given is refused: it would load the default 127.0.0.1 address, not
    the service named."""
    from loadtests.settings import TRANSPORTS

    transport = args.transport or ("http" if args.http and not args.grpc else "grpc")
    if transport not in TRANSPORTS:  # before the endpoint pairing, which would misname the mistake
        raise ValueError(f"--transport: expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if args.grpc or args.http:
        grpc = transport.startswith("grpc")
        if grpc and not args.grpc:
            raise ValueError(f"--transport {transport} loads the gRPC API, but only --http was given: add --grpc "
                             f"HOST:PORT, or pick an HTTP --transport (http, http-sse, openai, openai-chat)")
        if not grpc and not args.http:
            raise ValueError(f"--transport {transport} loads the HTTP API, but only --grpc was given: add --http "
                             f"URL, or pick --transport grpc or grpc-stream")
    return transport


def _check_mix(args) -> None:
    """--policy, and --threshold against its range, as the service checks them (``make_policy``):
    a bad one would fail every request. Without --policy the server's default policy decides
    the range, so the service checks --threshold."""
    if args.policy is None:
        return
    from ..errors import InvalidArgument
    from ..policies import make_policy

    try:
        make_policy(args.policy, args.threshold)
    except InvalidArgument as exc:
        raise ValueError(f"--{exc.field}: {exc.detail}") from None


def _counts(failures: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in failures.items())


def _outcome(summary: dict, fail_on_errors: bool) -> int:
    """The exit status, with a stderr line when requests failed: 1 when none succeeded (a run of
    errors measures nothing) or, with ``fail_on_errors``, when any failed; else a warning."""
    failures, sent = summary["failures_by_status"], summary["requests"]
    if not summary["succeeded"]:
        print(f"arbitrage loadtest: no request succeeded: {sent} sent, failed by status: {_counts(failures)}",
              file=sys.stderr)
        return 1
    if not failures:
        return 0
    failed = f"{sum(failures.values())} of {sent} request(s) failed ({_counts(failures)})"
    if fail_on_errors:
        print(f"arbitrage loadtest: {failed}", file=sys.stderr)
        return 1
    print(f"arbitrage loadtest: warning: {failed}; --fail-on-errors makes this exit 1", file=sys.stderr)
    return 0


def _loadtest(args) -> int:
    try:
        from loadtests.runner import run_local, run_locust
        from loadtests.settings import CLOSED_LOOP_FLAGS, LoadSettings, Mix, open_loop_conflict
    except ImportError as exc:
        raise RuntimeError(f"the load tests need locust: pip install -e '.[load]' ({exc})") from None

    transport = _transport(args)
    _check_mix(args)
    if args.config:
        from .plan_cmd import existing_file

        existing_file(args.config, "--config")
    mix = Mix(policy=args.policy, threshold=args.threshold, hard_prob=args.hard_prob, problem_mix=args.problem_mix,
              max_steps=args.max_steps, seed=args.seed)
    endpoints = {k: v for k, v in (("host_grpc", args.grpc), ("host_http", args.http)) if v}
    closed = {name: getattr(args, name) for _, name in CLOSED_LOOP_FLAGS if getattr(args, name) is not None}
    if args.rate is not None and closed:
        raise ValueError(open_loop_conflict(args.rate, {flag: closed[name] for flag, name in CLOSED_LOOP_FLAGS
                                                        if name in closed}))
    settings = LoadSettings(transport=transport, mix=mix, **closed, duration_s=args.duration, rate=args.rate,
                            max_in_flight=args.max_in_flight, timeout_s=args.timeout, slo_ms=args.slo_ms,
                            app=args.app, **endpoints)
    out = Path(args.out)
    progress = sys.stdout.isatty() and not args.no_progress
    if endpoints:
        summary = run_locust(settings, out, args.metrics, progress)
    else:
        summary = run_local(settings, out, args.config, progress)
    brief = {k: summary[k] for k in ("requests", "succeeded", "failures_by_status", "requests_per_s", "e2e_ms",
                                     "e2e_ms_all", "ttfs_ms", "time_per_step_ms", "target_step_fraction", "proposal_tokens_kept",
                                     "goodput")}
    print(json.dumps(brief, indent=2))
    print(f"arbitrage loadtest: report in {out / 'report.html'}, summary in {out / 'summary.json'}")
    if summary.get("pool_metrics_note"):
        print(f"arbitrage loadtest: note: {summary['pool_metrics_note']}", file=sys.stderr)
    return _outcome(summary, args.fail_on_errors)
