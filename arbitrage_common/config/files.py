"""Config files: load one, and say what is wrong with it one line per field."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from .app import AppConfig


def yaml_error(exc: Exception) -> str:
    """One line for a YAML parse error: what is wrong and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validation_problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, message) of every error of a pydantic ValidationError, each message on one
    line. A whole-config validator's error has no location: its message starts with the field
    it blames (``"grpc.port: ..."``), which becomes the field."""
    out = []
    for err in exc.errors():
        msg = " ".join(err["msg"].removeprefix("Value error, ").split())
        field = prefix + _loc(err["loc"]) if err["loc"] else ""
        if not field:
            named = re.match(r"([\w.\[\]]+): (.*)", msg, re.DOTALL)
            field, msg = (prefix + named[1], named[2]) if named else (prefix.rstrip(".") or "(top level)", msg)
        out.append((field, msg))
    return out


class ConfigError(ValueError):
    """A config file that does not validate: one line per problem, ``<file>: <field>: <message>``
    (what ``arbitrage config check`` prints), instead of pydantic's multi-line dump."""

    def __init__(self, file: str | Path, problems: list[tuple[str, str]]):
        self.file = str(file)
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.file}: {field}: {message}" for field, message in self.problems]

    def __reduce__(self):
        return (type(self), (self.file, self.problems))


def load_config(path: str | Path) -> AppConfig:
    """An AppConfig from a YAML (or JSON) file. Relative model paths stay relative: they
    resolve against ``base_dir`` or the builder's working directory. A file that does not
    validate raises ``ConfigError`` naming the file and each field at fault."""
    import yaml

    text = Path(path).read_text()  # OSError (missing, a directory) names the path itself
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML: {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")  # noqa: TRY004 (a config error)
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, validation_problems(exc)) from None

