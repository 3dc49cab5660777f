"""The commands the shipped configs' comments tell a user to run exist (they parse with the CLI)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from arbitrage_common.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/presets/*.yaml")])
# The configs whose comments name no `arbitrage ...` command; every other one names at least
# one, so a scan that silently finds nothing there fails instead of passing vacuously.
WITHOUT_COMMANDS = {"cpu-demo.yaml", "serve-local-cpu.yaml"}


def _commands(path: Path) -> list[str]:
    """Every `arbitrage ...` in backticks in a comment line; placeholders ('...') skipped."""
    comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]
    found = [m for line in comments for m in re.findall(r"`(arbitrage [^`]*)`", line)]
    return [c for c in found if "..." not in c]


def test_the_scan_finds_the_commands():
    assert "arbitrage serve --config configs/local-cpu.yaml --render -o configs/serve-local-cpu.yaml" in \
        _commands(ROOT / "configs" / "local-cpu.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_command_a_config_names_parses(path, capsys):
    commands = _commands(path)
    if path.name not in WITHOUT_COMMANDS:
        assert commands, f"{path.name}: no `arbitrage ...` command found in its comments"
    for command in commands:
        try:
            build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"{path.name}: `{command}` is not a command: {capsys.readouterr().err.strip()}")


def test_a_command_that_does_not_exist_fails_the_parse():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "render"])
