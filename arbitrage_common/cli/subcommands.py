"""Flags given to a command before its subcommand (`plan --policy rsd check`, `serve --backend
vllm bench`). argparse parses a subcommand into a namespace of its own and copies all of it,
defaults included, over what the command parsed, so such a flag was silently dropped."""
from __future__ import annotations

import argparse


class FlagsBeforeSubcommand(argparse._SubParsersAction):
    """``add_subparsers(action=FlagsBeforeSubcommand)``: a flag given to the command before the
    subcommand applies to it when the subcommand takes that flag too (given on both sides, with
    one value), and is refused, named, when it does not. The command's own flags must default
    to None (or False), so that any other value was given, even one equal to the subcommand's
    default (``--seed 0``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, sub = values[0], self._name_parser_map.get(values[0])
        given = {a.dest: a.option_strings[0] for a in parser._actions
                 if a.option_strings and getattr(namespace, a.dest, a.default) is not a.default}
        if sub is None or not given:  # argparse names an unknown subcommand
            return super().__call__(parser, namespace, values, option_string)
        command = parser.prog.split()[-1]
        takes = {a.dest for a in sub._actions if a.option_strings}
        for dest, flag in given.items():
            if dest not in takes:
                parser.error(f"{flag}: a `{command}` flag; `{command} {name}` does not take it")
        # Parsed over the values given to the command: argparse leaves a default out where the
        # namespace has the field, so ``unset`` is left where the subcommand was not given it.
        unset = object()
        subns, extras = sub.parse_known_args(values[1:], argparse.Namespace(**dict.fromkeys(given, unset)))
        for dest, flag in given.items():
            before, after = getattr(namespace, dest), getattr(subns, dest)
            if after is unset:
                setattr(subns, dest, before)
            elif after != before:
                parser.error(f"{flag}: {before} given to `{command}` and {after} to `{command} {name}`; give it once")
        setattr(namespace, self.dest, name)
        vars(namespace).update(vars(subns))
        if extras:  # refused by the top parser, as argparse leaves them
            vars(namespace).setdefault(argparse._UNRECOGNIZED_ARGS_ATTR, []).extend(extras)
