"""docs/CONFIG.md is the generated reference of every AppConfig field (`arbitrage config
reference`), and `arbitrage config schema` prints a JSON Schema that accepts the shipped configs
and refuses, field by field, what AppConfig refuses."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from arbitrage_common.cli.config_reference import COMMAND, config_schema, render_reference, rows
from arbitrage_common.cli.main import main
from arbitrage_common.config import AppConfig, load_config, render_serve_yaml

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "CONFIG.md"
# AppConfig files (a rendered Serve YAML, serve-*.yaml, holds one as its application's args).
APP_CONFIGS = sorted(p for p in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/presets/*.yaml")]
                     if not p.name.startswith("serve-"))


def _schema_fields(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, field) -> the field's schema, for AppConfig and every model under it."""
    models = {"AppConfig": schema, **schema["$defs"]}
    return {(model, name): prop for model, s in models.items() for name, prop in s["properties"].items()}


def test_the_committed_reference_is_the_generators_output():
    assert REFERENCE.read_text() == render_reference(), f"docs/CONFIG.md is stale: run `{COMMAND}`"


def test_the_reference_says_it_is_generated_and_by_what():
    head = "\n".join(REFERENCE.read_text().splitlines()[:6])
    assert "Generated" in head and f"`{COMMAND}`" in head and "do not edit" in head


def test_reference_check_passes_on_the_committed_file_and_fails_on_drift(tmp_path, capsys):
    assert main(["config", "reference", "--check", "--out", str(REFERENCE)]) == 0
    drifted = tmp_path / "CONFIG.md"
    drifted.write_text(REFERENCE.read_text().replace("| `limits.max_steps` | integer | `64`", "| `limits.max_steps` "
                                                                                             "| integer | `65`"))
    assert main(["config", "reference", "--check", "--out", str(drifted)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["config", "reference", "--check", "--out", str(tmp_path / "missing.md")]) == 1
    assert main(["config", "reference", "--out", str(drifted)]) == 0
    assert drifted.read_text() == REFERENCE.read_text()


def test_every_field_has_a_description():
    missing = [f"{model}.{name}" for (model, name), prop in _schema_fields(config_schema()).items()
               if not (prop.get("description") or "").strip()]
    assert not missing, f"fields without a description: {missing}"
    assert all(row.description.strip() for row in rows())


def test_every_field_of_every_model_is_in_the_reference():
    documented = {(row.model, row.field) for row in rows()}
    assert documented == set(_schema_fields(config_schema()))


def test_siblings_of_one_model_share_a_placeholder():
    paths = {row.path for row in rows()}
    assert "pools.<role>.autoscaling_config.target_ongoing_requests" in paths
    assert "pools.<role>.model.engine.enable_prefix_caching" in paths
    assert "cluster.<group>.memory" in paths and "cluster.coordinator.gpus" in paths  # its own model
    assert {"pools.draft", "pools.target", "pools.router", "pools.prm"} <= paths
    assert not any(p.startswith(("pools.draft.", "cluster.draft.")) for p in paths)
    assert "`pools.<role>` is each of `pools.draft`, `pools.target`, `pools.router`, `pools.prm`." in render_reference()


def test_the_fields_of_a_list_of_models_are_documented_per_entry():
    paths = {row.path for row in rows()}
    assert {"cluster.<group>.tolerations[].operator", "cluster.head.tolerations[].tolerationSeconds"} <= paths
    assert "## `cluster.<group>.tolerations[]`" in render_reference()


def test_rows_carry_types_defaults_bounds_and_cross_field_rules():
    by_path = {row.path: row for row in rows()}
    assert by_path["limits.draft_lookahead"].bounds == ">= 0, <= 8"
    assert by_path["pools.<role>.model.path"].default == "required"
    assert by_path["pools.<role>.max_ongoing_requests"].default == "`32`"  # PoolSpec's own, not the base's
    assert by_path["coordinator.max_ongoing_requests"].default == "`64`"
    assert by_path["pools.<role>.autoscaling_config.target_ongoing_requests"].default == "`8.0`"
    assert by_path["pools.<role>.placement_group_strategy"].bounds.startswith('one of `"PACK"`')
    assert by_path["pools.<role>.ray_actor_options.resources"].default == "`{}`"
    assert by_path["pools.<role>.autoscaling_config.look_back_period_s"].type == "number or null"
    assert "metrics_interval_s" in by_path["pools.<role>.autoscaling_config.look_back_period_s"].description
    assert "look_back_period_s" in by_path["pools.<role>.autoscaling_config.metrics_interval_s"].description
    assert "needs placement_group_bundles" in by_path["pools.<role>.placement_group_strategy"].description.lower()


def _schema_from_the_command(capsys) -> dict[str, Any]:
    assert main(["config", "schema"]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_schema_prints_pydantics_validation_schema(capsys):
    schema = _schema_from_the_command(capsys)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {k: v for k, v in schema.items() if k != "$schema"} == AppConfig.model_json_schema(mode="validation")


@pytest.mark.parametrize("path", APP_CONFIGS, ids=[p.name for p in APP_CONFIGS])
def test_the_schema_accepts_every_shipped_config(path, capsys):
    validator = jsonschema.Draft202012Validator(_schema_from_the_command(capsys))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in
              validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors
    # and the args of its Serve YAML (stand-ins for what Serve changes in place)
    args = yaml.safe_load(render_serve_yaml(load_config(path)))["applications"][0]["args"]
    assert not list(validator.iter_errors(args))


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()
BROKEN = {
    "unknown top-level field": ("replicas", 2),
    "unknown pool field": ("pools.draft.max_batch", 8),
    "unknown engine field": ("pools.draft.model.engine", {"max_model_len": 4096, "swap_space": 4}),
    "draft_lookahead above 8": ("limits.draft_lookahead", 9),
    "negative min_replicas": ("pools.target.autoscaling_config", {"min_replicas": -1, "max_replicas": 2}),
    "zero max_batch_size": ("pools.draft.max_batch_size", 0),
    "port past 65535": ("http.port", 70000),
    "gpu_memory_utilization above 1": ("pools.draft.model.engine", {"gpu_memory_utilization": 1.5}),
    "backend not an engine": ("pools.draft.model.backend", "onnx"),
    "wrong type": ("limits.max_steps", "many"),
    "required pool missing": ("pools.target", _DELETE),
}


@pytest.mark.parametrize("change", list(BROKEN.values()), ids=list(BROKEN))
def test_the_schema_refuses_what_appconfig_refuses_field_by_field(change, capsys):
    validator = jsonschema.Draft202012Validator(_schema_from_the_command(capsys))
    data = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "local-cpu.yaml").read_text()))
    if change[0].startswith("pools.draft.model.engine"):
        data["pools"]["draft"]["model"]["backend"] = "vllm"  # engine is for vLLM pools only
    _set(data, *change)
    assert list(validator.iter_errors(data)), f"the schema accepts {change}"
    with pytest.raises(ValidationError) as refused:
        AppConfig.model_validate(data)
    field = change[0].rsplit(".", 1)[-1]
    assert any(field in map(str, e["loc"]) for e in refused.value.errors())  # refused for that field


def test_the_generator_imports_no_ray():
    code = ("import sys\n"
            "from arbitrage_common.cli.config_reference import config_schema, render_reference\n"
            "render_reference(); config_schema()\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_docs_link_the_reference_and_name_every_top_level_field():
    serving = (ROOT / "docs" / "SERVING.md").read_text()
    section = serving.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert "[CONFIG.md](CONFIG.md)" in section
    assert [name for name in AppConfig.model_fields if f"`{name}" not in section] == []
    assert "[docs/CONFIG.md](docs/CONFIG.md)" in (ROOT / "README.md").read_text()
