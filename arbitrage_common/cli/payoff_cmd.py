"""`arbitrage analyze` (payoff of a model pair from its router dataset) and `arbitrage
regime-map` (where Arbitrage pays off on the bundled models)."""
from __future__ import annotations

import sys
from pathlib import Path

from .argtypes import mix_list, non_negative_int, positive_float, positive_int, unit_float
from .output import emit_json


def add_payoff_parsers(sub) -> None:
    an = sub.add_parser("analyze", help="will Arbitrage pay off for a model pair? RSD waste, the bound on a "
                                        "router's target-call savings, and target GPUs saved at a load")
    an.add_argument("--data", required=True, help="router dataset (`router data`, in-process or --endpoint)")
    an.add_argument("--router", help="also score the rows with this router: what it realises of the bound")
    an.add_argument("--rsd-threshold", type=unit_float, default=0.5,
                    help="the RSD operating point of the headline, in [0, 1]")
    an.add_argument("--profile", help="planner profile (`arbitrage plan profile`): with --rate and --slo-ms, "
                                      "plan the target pool for RSD, the bound and the router")
    an.add_argument("--rate", type=positive_float, help="arrivals per second to plan for")
    an.add_argument("--slo-ms", type=positive_float, help="p95 latency to hold, ms")
    an.add_argument("--preset", help="with --profile: GPUs per pool for this preset")
    an.add_argument("--out", help="also write the JSON here")
    an.set_defaults(func=_analyze)

    rm = sub.add_parser("regime-map", help="sweep mixes x PRM kinds x router kinds: where Arbitrage pays off")
    rm.add_argument("--n", type=positive_int, default=150, help="problems per mix")
    rm.add_argument("--seed", type=non_negative_int, default=3000)
    rm.add_argument("--mix", type=mix_list, default=("math", "olympiad"), help="comma list of mixes")
    rm.add_argument("--models-dir", help="bundled checkpoints (default: $ARBITRAGE_HOME/models, else the installed bundle)")
    rm.add_argument("--grid", choices=["full", "tiny"], default="full", help="tiny: 7 points per cell (CI)")
    rm.add_argument("--confirm-n", type=non_negative_int, default=0,
                    help="problems of a wall-clock confirmation per cell (0: none)")
    rm.add_argument("--out", default="runs/regime")
    rm.add_argument("--no-progress", action="store_true")
    rm.set_defaults(func=_regime_map)


def _analyze(args) -> int:
    from ..evaluation.analyze import analyze, plan_savings
    from .plan_cmd import load_profile, uncalibrated_warning

    planning = (args.profile, args.rate, args.slo_ms)
    if any(v is not None for v in planning) and None in planning:
        raise ValueError("--profile, --rate and --slo-ms go together (the planner needs all three)")
    if args.preset and args.profile is None:
        raise ValueError("--preset: only with --profile")
    profile = load_profile(args.profile) if args.profile else None  # before the rows: a bad one fails fast
    rows = _read_rows(args.data)
    scores = _router_scores(args.router, rows) if args.router else None
    result = analyze(rows, rsd_threshold=args.rsd_threshold, router_scores=scores)
    result["data"] = args.data
    if args.profile:
        cfg = None
        if args.preset:
            from ..kuberay.targets import target_config

            cfg = target_config(args.preset)
        result["planned"] = plan_savings(profile, result["headline"], args.rate, args.slo_ms, cfg)
        result["planned"]["profile_warning"] = warning = uncalibrated_warning(profile, args.profile)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        _headroom_warnings(result["planned"])
    emit_json(result, args.out)
    return 0


def _headroom_warnings(planned: dict) -> None:
    """On stderr, as `plan` warns of them: a plan without headroom, or one that meets the SLO at
    its seed only, is no saving to count on (``planned.<name>.headroom_warning`` and
    ``sampling_warning`` in the JSON)."""
    for name in ("rsd", "bound", "router"):
        for key in ("headroom_warning", "sampling_warning"):
            if warning := (planned.get(name) or {}).get(key):
                print(f"warning: planned.{name}: {warning}", file=sys.stderr)


def _read_rows(path: str) -> list[dict]:
    """The router dataset's rows; ValueError naming --data (and, from ``read_jsonl``, the file
    and the first line that is not a JSON object)."""
    from ..training.router_data import read_jsonl

    try:
        return read_jsonl(path)
    except ValueError as exc:
        raise ValueError(f"--data: {exc}") from None


def _router_scores(router: str, rows: list[dict]) -> list[float]:
    from ..backends.scorers import load_step_scorer
    from ..training.router import score_rows

    if not Path(router).exists():
        raise ValueError(f"--router: {router}: no such checkpoint")
    return score_rows(load_step_scorer(router), rows)


def _regime_map(args) -> int:
    from ..evaluation.regime import TINY_GRID, run_regime_map
    from ..paths import models_dir

    summary = run_regime_map(args.out, args.n, args.seed, args.mix, args.models_dir or str(models_dir()),
                             grid=TINY_GRID if args.grid == "tiny" else None, confirm_n=args.confirm_n,
                             show_progress=not args.no_progress)
    emit_json(summary)
    return 0

