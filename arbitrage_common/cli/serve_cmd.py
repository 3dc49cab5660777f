"""`arbitrage serve` (run / render / bench) and `arbitrage generate` (gRPC client).

Heavy imports (Ray, grpc, the services package) happen inside the commands.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

from ..policies import POLICY_NAMES
from .argtypes import finite_positive_float, int64, positive_float, positive_int, positive_int32
from .subcommands import FlagsBeforeSubcommand

DEFAULT_ENDPOINT = "127.0.0.1:9000"  # arbitrage_common.client.DEFAULT_ENDPOINT (not imported: keeps --help light)
CLIENT_DEADLINE_MARGIN_S = 2.0  # generate --timeout: how much longer than timeout_s the client waits
# Ray reads its metrics export interval from this variable in every process it starts.
METRICS_INTERVAL_ENV = "RAY_metrics_report_interval_ms"
RAY_METRICS_INTERVAL_S = 10.0  # Ray's default export interval


def add_serve_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="run the service (embedded default: local Ray, bundled models, "
                                         "gRPC :9000, HTTP :8000)")
    serve.add_argument("--config", help="AppConfig YAML (default: the embedded local CPU config)")
    serve.add_argument("--address", help="connect to this Ray cluster instead of starting a local one")
    serve.add_argument("--backend", choices=("transformers", "vllm"),
                       help="run the draft and target pools on this backend (default: as the config says); vllm: "
                            "one vLLM engine per pool with CPU settings for the bundled models, router and PRM stay "
                            "on transformers (docs/VLLM.md). Also applies to --render")
    serve.add_argument("--metrics-port", type=positive_int, help="local cluster: serve Prometheus metrics on this "
                                                                   "port (default: a port Ray picks)")
    serve.add_argument("--metrics-interval-s", type=positive_float,
                       help=f"local cluster: export metrics every this many seconds (default: "
                            f"${METRICS_INTERVAL_ENV} in ms if set, else Ray's {RAY_METRICS_INTERVAL_S:g} s); 2 gives "
                            f"`arbitrage loadtest --metrics` a fresh sample every 2 s, at some CPU cost")
    serve.add_argument("--render", action="store_true", help="print the Serve YAML rendered from the config and exit")
    serve.add_argument("-o", "--out", help="with --render: write the YAML here")
    serve.set_defaults(func=_serve)
    serve_sub = serve.add_subparsers(dest="serve_cmd", action=FlagsBeforeSubcommand)  # its flags default to None
    bench = serve_sub.add_parser("bench", help="serving overhead, throughput at N clients / 1, startup seconds")
    bench.add_argument("--config", help="AppConfig YAML (models of the in-process reference, and of the "
                                        "service when it is started here)")
    bench.add_argument("--endpoint", help="bench a running service at HOST:PORT (gRPC) instead of starting one; "
                                          "its API key, if it has one, from $ARBITRAGE_API_KEY")
    bench.add_argument("--backend", choices=("transformers", "vllm"),
                       help="when starting the service: its draft and target pools on this backend, as `serve "
                            "--backend` (the in-process reference stays on transformers)")
    bench.add_argument("--app", help="Serve application name (gRPC metadata) when several apps run")
    bench.add_argument("--n", type=positive_int, default=16,
                       help="problems of the overhead comparison; throughput runs two sets of max(n, 4 x concurrency) "
                            "problems, each at both loads")
    bench.add_argument("--seed", type=int, default=3000)
    bench.add_argument("--policy", choices=POLICY_NAMES,  # checked before a service starts
                       help="policy (default: the config's)")
    bench.add_argument("--concurrency", type=positive_int, default=16)
    bench.add_argument("--repeats", type=positive_int, default=1,
                       help="run the throughput rounds this many times over fresh problems; above 1 it also prints "
                            "each repeat's throughput_scaling with their mean, standard deviation and standard error")
    bench.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    bench.set_defaults(func=_bench)

    gen = sub.add_parser("generate", help="ask a running service (gRPC; API key from $ARBITRAGE_API_KEY)",
                         description="Ask a running service over gRPC. A service with API keys needs one: "
                                     "export ARBITRAGE_API_KEY=<key> (sent as 'authorization: Bearer <key>').")
    gen.add_argument("prompt")
    gen.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"HOST:PORT of the gRPC API ({DEFAULT_ENDPOINT}); "
                                                                  "API key from $ARBITRAGE_API_KEY")
    gen.add_argument("--app", help="Serve application name (gRPC metadata) when several apps run")
    gen.add_argument("--policy", help="draft, target, rsd, arbitrage, oracle, random (default: the server's)")
    gen.add_argument("--threshold", type=float)
    gen.add_argument("--max-steps", type=positive_int32)
    gen.add_argument("--max-new-tokens", type=positive_int32)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int64)
    gen.add_argument("--timeout", type=finite_positive_float,
                     help="request deadline, seconds: the server's timeout_s, and the client waits at most "
                          f"{CLIENT_DEADLINE_MARGIN_S:g} s longer")
    gen.add_argument("--stream", action="store_true", help="print steps as they are decided, marked by source")
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON (with --stream: one JSON object a line, each event)")
    gen.set_defaults(func=_generate)


def _config(path: str | None):
    from ..config import default_config, load_config

    return load_config(path) if path else default_config()


# -- serve ----------------------------------------------------------------------------------
def _config_for(args):
    """The config of ``--config`` (or the embedded default) with ``--backend`` applied."""
    cfg = _config(args.config)
    if args.backend:
        from services.local import use_backend

        cfg = use_backend(cfg, args.backend)
    return cfg


def metrics_interval_s(flag: float | None, env: dict[str, str]) -> float | None:
    """The metrics export interval a local cluster started now gets: the flag, else the
    environment's, else Ray's default; None for a malformed environment value."""
    if flag is not None:
        return flag
    raw = env.get(METRICS_INTERVAL_ENV)
    if raw is None:
        return RAY_METRICS_INTERVAL_S
    try:
        return int(raw) / 1000.0
    except ValueError:
        return None


def metrics_line(urls: list[str], interval_s: float | None) -> str:
    """The banner's line saying where the service's Prometheus metrics are (for `loadtest
    --metrics`) and how often they change there."""
    if not urls:
        return "  metrics: no Ray node reports a metrics export port"
    every = "at the cluster's export interval" if interval_s is None else f"exported every {interval_s:g} s"
    hint = "" if interval_s is not None and interval_s <= 2 else "; --metrics-interval-s 2 for 2 s samples"
    return f"  metrics  {' '.join(urls)}  (Prometheus, {every}: `arbitrage loadtest --metrics URL`{hint})"


def _serve(args) -> int:
    started = time.perf_counter()
    if args.out and not args.render:
        raise ValueError("-o/--out: only with --render (it names the file the rendered Serve YAML goes to)")
    if args.metrics_interval_s is not None:
        if args.address:  # the cluster's processes read it when they start, not from this client
            raise ValueError("--metrics-interval-s: a local cluster only; a cluster at --address exports at the "
                             f"interval it was started with (${METRICS_INTERVAL_ENV})")
        os.environ[METRICS_INTERVAL_ENV] = str(max(round(args.metrics_interval_s * 1000), 1))
    cfg = _config_for(args)
    if args.render:
        from ..config import render_serve_yaml

        text = render_serve_yaml(cfg)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0

    from services import local

    interval = metrics_interval_s(args.metrics_interval_s, dict(os.environ))
    try:
        info = local.start(cfg, address=args.address, metrics_port=args.metrics_port)  # cleans up if it fails
    except KeyboardInterrupt:
        return 130
    stop = threading.Event()
    # Ctrl-C and SIGTERM both stop the service cleanly (also when started with SIGINT ignored).
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"arbitrage serve: ready in {time.perf_counter() - started:.1f} s\n"
              f"  gRPC  {info['grpc']}  (arbitrage.v1.ArbitrageService, grpc.health.v1.Health, reflection)\n"
              f"  HTTP  {info['http']}  (/v1/generate, /v1/completions, /v1/chat/completions, /v1/models, "
              f"/healthz, /docs)\n"
              f"{metrics_line(info.get('metrics', []), None if args.address else interval)}\n"
              f"  default policy: {cfg.policy.default}.  Ctrl-C stops.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        print("arbitrage serve: shutting down", flush=True)
        try:
            # On a shared cluster (--address) only this application goes; others keep running.
            local.stop(shutdown_ray=not args.address, app_name=cfg.name if args.address else None)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    print("arbitrage serve: stopped", flush=True)
    return 0


def _bench(args) -> int:
    started = time.perf_counter()
    from services.bench import run_serve_bench

    # Ray forwards the cluster's log lines to this process's stdout; they go to stderr here,
    # so stdout holds the figures alone (``--json`` output parses).
    with contextlib.redirect_stdout(sys.stderr):
        result = run_serve_bench(_config_for(args), endpoint=args.endpoint, app=args.app, n=args.n,
                                 seed=args.seed, policy=args.policy, concurrency=args.concurrency, started=started,
                                 repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    return 0


# -- generate -------------------------------------------------------------------------------
def _request(args):
    from ..client import build_request

    return build_request(args.prompt, args.policy, temperature=args.temperature, seed=args.seed,
                         threshold=args.threshold, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                         timeout_s=args.timeout)


def _step_line(step) -> str:
    from ..client import source_name

    source = source_name(step)
    mark = " (draft replaced)" if step.draft_discarded else ""
    score = f" score={step.score:.3f}" if step.HasField("score") else ""
    return f"[{step.index}] {source:<6}{score}{mark}\n    " + step.text.replace("\n", "\n    ")


def _summary_line(r) -> str:
    answer = r.answer if r.HasField("answer") else "none"
    u = r.usage
    return (f"answer: {answer} | finish: {r.finish_reason} | policy: {r.policy} | steps: {len(r.steps)} "
            f"(target {u.target_steps}) | acceptance: {u.acceptance_rate:.2f} | {r.total_ms:.0f} ms")


def _generate(args) -> int:
    from ..client import Client, ServiceError, to_dict

    # The client's own deadline also bounds time queued before a coordinator takes the request,
    # which timeout_s does not count; the margin lets the server's answer (with its steps count) come first.
    deadline = args.timeout + CLIENT_DEADLINE_MARGIN_S if args.timeout else None
    with Client(args.endpoint, args.app) as client:
        try:
            if args.stream:
                for message in client.stream(_request(args), timeout=deadline):
                    if args.json:  # one JSON object a line: {"step": ...} events, then {"summary": ...}
                        print(json.dumps(to_dict(message)), flush=True)
                    elif message.WhichOneof("event") == "step":
                        print(_step_line(message.step), flush=True)
                    else:
                        print(_summary_line(message.summary))
            else:
                reply = client.generate(_request(args), timeout=deadline)
                if args.json:
                    print(json.dumps(to_dict(reply), indent=2))
                else:
                    print(reply.text)
                    print(_summary_line(reply))
        except ServiceError as exc:
            print(f"arbitrage: error: {exc.code}: {exc.details}{exc.hint}", file=sys.stderr)
            return 1
    return 0
