"""Entry point: builds the subcommand tree; heavy imports happen inside each command."""
from __future__ import annotations

import argparse
import sys

from .config_cmd import add_config_parser
from .engine_cmd import add_bench_parser, add_router_parser
from .k8s_cmd import add_k8s_parser
from .loadtest_cmd import add_loadtest_parser
from .models_cmd import add_models_parser, add_train_parser
from .payoff_cmd import add_payoff_parsers
from .plan_cmd import add_plan_parser
from .serve_cmd import add_serve_parsers

ERROR_EXIT = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arbitrage", description="Arbitrage Serve: step-level speculative reasoning")
    sub = parser.add_subparsers(dest="command", required=True)
    add_models_parser(sub)
    add_train_parser(sub)
    add_router_parser(sub)
    add_bench_parser(sub)
    add_payoff_parsers(sub)
    add_serve_parsers(sub)
    add_config_parser(sub)
    add_k8s_parser(sub)
    add_loadtest_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        # Known failures (bad checkpoint, invalid field) print one clear line, no traceback.
        print(f"arbitrage: error: {exc}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
