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
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _shown_default(action: argparse.Action) -> str | None:
    """An option's default as --help shows it; None where there is none worth showing (None,
    False, an empty list) or its help already says it (names "default", or the value in parentheses)."""
    text, value = action.help or "", action.default
    if (not action.option_strings or value is None or isinstance(value, bool) or value == argparse.SUPPRESS
            or "default" in text):
        return None
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    value = str(value)
    return None if not value or f"({value})" in text else value


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help (see ``_shown_default``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, value = action.help or "", _shown_default(action)
        if value is None or text == argparse.SUPPRESS:
            return text
        return f"{text} (default: {value.replace('%', '%%')})".lstrip()


def _parsers(parser: argparse.ArgumentParser):
    """The parser and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:  # argparse keeps the subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


class _InvalidChoice(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """A subcommand that is optional (``plan``, ``serve``) reads the value of a misspelt flag as
    its name: ``plan --rates 4`` would say "invalid choice: '4'". The misspelt flag is named instead."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        try:
            return super().parse_known_args(args, namespace)
        except _InvalidChoice as exc:
            known = {o for p in _parsers(self) for a in p._actions for o in a.option_strings}
            unknown = [t for t in args if t.startswith("--") and t != "--" and t.split("=", 1)[0] not in known]
            argparse.ArgumentParser.error(self, f"unrecognized arguments: {' '.join(unknown)}" if unknown else str(exc))

    def error(self, message: str):
        if "invalid choice" in message:
            raise _InvalidChoice(message)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="arbitrage", description="Arbitrage Serve: step-level speculative reasoning")
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
    for p in _parsers(parser):  # subparsers do not inherit formatter_class
        p.formatter_class = _DefaultsFormatter
        for action in p._actions:
            if action.help is None and (value := _shown_default(action)) is not None:
                action.help = f"(default: {value.replace('%', '%%')})"  # one without help shows its default too
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C in a long command (`serve` handles its own while it runs)
        print("arbitrage: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (ValueError, RuntimeError) as exc:
        # Known failures (bad checkpoint, invalid field) print one clear line, no traceback; a
        # config that does not validate one per problem (`<file>: <field>: <message>`).
        from ..config import ConfigError

        for line in exc.lines() if isinstance(exc, ConfigError) else [str(exc)]:
            print(f"arbitrage: error: {line}", file=sys.stderr)
        return ERROR_EXIT
    except OSError as exc:  # a path that cannot be read or written: missing, a directory, under a file...
        print(f"arbitrage: error: {_os_error(exc)}", file=sys.stderr)
        return ERROR_EXIT


def _os_error(exc: OSError) -> str:
    """``<path>: <strerror>`` (e.g. ``runs/x.json: Is a directory``), else the exception's own text."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)


if __name__ == "__main__":
    sys.exit(main())
