"""The transformers generator has no device code (it decodes on the CPU): a draft or target pool
on that backend that reserves GPUs gets a warning from `arbitrage config check` naming the field,
and ModelSpec.backend's description no longer says it decodes on GPU."""
from __future__ import annotations

import pytest
import yaml

from arbitrage_common import config as C
from arbitrage_common.cli.config_cmd import check_file
from arbitrage_common.presets import resource_problems


def _with(role: str, **pool) -> C.AppConfig:
    data = C.default_config().model_dump(mode="json")
    data["pools"][role].update(pool)
    return C.AppConfig.model_validate(data)


@pytest.mark.parametrize("role", ["draft", "target"])
def test_gpus_on_a_transformers_generator_are_reported_naming_the_field(role):
    errors, warnings = resource_problems(_with(role, ray_actor_options={"num_cpus": 1, "num_gpus": 0.5}))
    assert not errors
    (finding,) = warnings
    assert finding.field == f"pools.{role}.ray_actor_options.num_gpus"
    assert "0.5 GPU(s)" in finding.message and "CPU only" in finding.message and "'vllm'" in finding.message


def test_gpus_in_placement_bundles_are_reported_too():
    (finding,) = resource_problems(_with("target", placement_group_bundles=[{"CPU": 1, "GPU": 1}]))[1]
    assert finding.field == "pools.target.placement_group_bundles"


@pytest.mark.parametrize("options", [{"num_cpus": 1}, {"num_cpus": 1, "num_gpus": 0}])
def test_a_generator_without_gpus_and_a_scorer_with_them_pass(options):
    assert resource_problems(_with("draft", ray_actor_options=options)) == ([], [])
    assert resource_problems(_with("router", ray_actor_options={"num_cpus": 1, "num_gpus": 0.25})) == ([], [])


def test_config_check_shows_the_warning(tmp_path):
    data = C.default_config().model_dump(mode="json")
    data["pools"]["draft"]["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    report = check_file(path)
    assert any(w.startswith("pools.draft.ray_actor_options.num_gpus: reserves 1 GPU(s)") for w in report["warnings"])


def test_the_backend_description_does_not_promise_gpu_decoding():
    text = C.ModelSpec.model_fields["backend"].description
    assert "CPU or GPU" not in text and "CPU only" in text
