"""The config file's JSON Schema and docs/CONFIG.md, the reference of every field, both from
the pydantic ``AppConfig`` (`arbitrage config schema`, `arbitrage config reference`). Pure: no
Ray, nothing but the models; a field's type and bounds come from the schema, its default
from the model, so the reference says what validation does."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

COMMAND = "arbitrage config reference"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Sibling fields of one model type are documented once, under a placeholder.
PLACEHOLDERS = {"PoolSpec": "<role>", "GroupSpec": "<group>"}
_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))

HEADER = f"""\
# Config reference

Generated from the pydantic models (`arbitrage_common/config/`; `cluster`:
`arbitrage_common/kuberay/spec.py`) by `{COMMAND}`; do not edit by hand: change a field's
description in its model and run the command again (`{COMMAND} --check`, run by
`tests/unit/test_config_reference.py`, fails while this file differs).

Every field of an AppConfig file (`configs/local-cpu.yaml`, `configs/presets/*.yaml`; the `args`
of a rendered Serve YAML), as a dotted path. `pools.<role>` stands for each pool, `cluster.<group>`
for each worker group. In descriptions, *None* is YAML `null` (or the field left out, where the
default is `null`). The bounds column is what a field accepts on its own; rules between fields
are in the descriptions, checked when the config loads. Unknown fields are refused.

- Check a file: `arbitrage config check FILE` (every rule, Ray Serve's own option checks, GPU
  fit; `--paths` the model paths too). Shipped presets: `arbitrage config list`,
  [PRESETS.md](PRESETS.md).
- In an editor: `arbitrage config schema > arbitrage-config.schema.json`, then the line
  `# yaml-language-server: $schema=arbitrage-config.schema.json` in the YAML file (VS Code's YAML
  extension, any editor with yaml-language-server) completes fields and flags wrong types, bounds
  and unknown fields as you type. The schema has no rules between fields; `config check` does.
- How the config becomes the Serve YAML and the RayService: [SERVING.md](SERVING.md#configuration-one-config-many-renderings),
  [KUBERAY.md](KUBERAY.md).
"""


def config_schema() -> dict[str, Any]:
    """The JSON Schema of an AppConfig file (pydantic's, validation mode), with its dialect."""
    from ..config import AppConfig

    return {"$schema": JSON_SCHEMA_DIALECT, **AppConfig.model_json_schema(mode="validation")}


@dataclass(frozen=True)
class Row:
    path: str  # dotted, placeholders for siblings of one model type
    model: str  # the model the field belongs to (a $defs name, or AppConfig)
    field: str
    type: str
    default: str
    bounds: str
    description: str


@dataclass(frozen=True)
class Section:
    path: str  # "" for the top level
    intro: str
    rows: tuple[Row, ...]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``PoolSpec | None`` -> PoolSpec), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _nested_model(a)) is not None), None)


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return "mapping"
    kind = prop.get("type")
    if kind == "array":
        return f"list of {_type(prop['items'])}" if "items" in prop else "list"
    if kind == "object":
        values = prop.get("additionalProperties")
        return f"mapping (string to {_type(values)})" if isinstance(values, dict) else "mapping"
    return str(kind)


def _code(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _bounds(prop: dict[str, Any]) -> str:
    out = []
    for p in [prop, *prop.get("anyOf", ())]:
        out += [f"{sign} {p[key]:g}" for key, sign in _BOUNDS if key in p]
        if "enum" in p:
            out.append("one of " + ", ".join(_code(v) for v in p["enum"]))
        if "const" in p:
            out.append("exactly " + _code(p["const"]))
        if "pattern" in p:
            out.append(f"matches `{p['pattern']}`")
    return ", ".join(out)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    return _code(to_jsonable_python(value))


def _text(text: str) -> str:
    """One line of Markdown table cell: whitespace collapsed, ``|`` escaped, and ``<`` escaped
    outside code spans (``<group>`` would be read as an HTML tag)."""
    text = " ".join(text.replace("``", "`").split()).replace("|", "\\|")
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def _doc(model: type[BaseModel]) -> str:
    return _text(model.__doc__ or "")


def sections() -> list[Section]:
    """Every model of the config, depth first, with a row per field."""
    from ..config import AppConfig

    schema = AppConfig.model_json_schema(mode="validation")
    out: list[Section] = []

    def walk(model: type[BaseModel], path: str, intro: str) -> None:
        props = (schema if model is AppConfig else schema["$defs"][model.__name__])["properties"]
        nested = {name: _nested_model(f.annotation) for name, f in model.model_fields.items()}
        rows, children, seen = [], [], set()
        for name, field in model.model_fields.items():
            prop = props[name]
            full = f"{path}.{name}" if path else name
            rows.append(Row(full, model.__name__, name, _type(prop), _default(field), _bounds(prop),
                            _text(prop.get("description", ""))))
            child = nested[name]
            if child is None or child in seen:
                continue
            seen.add(child)
            siblings = [n for n, m in nested.items() if m is child]
            if len(siblings) > 1:
                at = f"{path}.{PLACEHOLDERS.get(child.__name__, '<name>')}".lstrip(".")
                each = ", ".join(f"`{f'{path}.{n}'.lstrip('.')}`" for n in siblings)
                children.append((child, at, f"`{at}` is each of {each}. {_doc(child)}"))
            else:
                # A list of models (tolerations): its fields are each entry's.
                at = f"{full}[]" if get_origin(field.annotation) is list else full
                children.append((child, at, _doc(child) or rows[-1].description))
        out.append(Section(path, intro.strip(), tuple(rows)))
        for child, at, text in children:
            walk(child, at, text)

    walk(AppConfig, "", _doc(AppConfig))
    return out


def rows() -> list[Row]:
    return [row for section in sections() for row in section.rows]


def render_reference() -> str:
    """docs/CONFIG.md."""
    lines = [HEADER]
    for section in sections():
        lines += [f"## {f'`{section.path}`' if section.path else 'Top level'}", ""]
        if section.intro:
            lines += [section.intro, ""]
        lines += ["| field | type | default | bounds | description |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{r.path}` | {r.type} | {r.default} | {r.bounds} | {r.description} |" for r in section.rows]
        lines.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip("\n") + "\n"
