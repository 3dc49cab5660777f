"""The shipped presets, `arbitrage config check/list`, and the startup model-path check. No weights."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arbitrage_common import config as C
from arbitrage_common import presets as P
from arbitrage_common.cli.config_cmd import check_file
from arbitrage_common.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
PRESETS = P.list_presets()
REGIMES = {"llama-1b-8b", "qwen-math-1.5b-7b", "llama-8b-awq-8b"}


def test_the_three_paper_regimes_are_shipped():
    assert {p.stem for p in PRESETS} == REGIMES


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_renders(path):
    cfg = C.load_config(path)
    rendered = yaml.safe_load(C.render_serve_yaml(cfg))
    assert C.application_config(rendered["applications"][0]) == cfg
    assert cfg.base_dir == "/models"
    for role in C.GENERATOR_ROLES:
        spec = getattr(cfg.pools, role)
        assert spec.model.backend == "vllm" and spec.model.engine is not None
        assert spec.ray_actor_options.num_gpus is not None and spec.autoscaling_config is not None
        if spec.model.engine.tensor_parallel_size > 1:
            assert sum(b.get("GPU", 0) for b in spec.placement_group_bundles) >= spec.model.engine.tensor_parallel_size
    assert cfg.pools.prm.model.path == "Skywork-o1-Open-PRM-Qwen-2.5-1.5B"
    assert cfg.pools.router.model.path == f"routers/{path.stem}"
    assert {cfg.pools.router.model.backend, cfg.pools.prm.model.backend} == {"transformers"}
    # YAML double quotes turn "\b" into a backspace: the template must hold a literal \boxed{}
    template = cfg.prompt.template
    assert "\\boxed{}" in template and "{problem}" in template and cfg.prompt.step_delimiter == "\n\n"
    assert all(ch == "\n" or ch.isprintable() for ch in template)
    assert "<|begin_of_text|>" not in template  # the tokenizer adds the BOS
    report = check_file(path)
    assert report["ok"], report["errors"]
    assert report["warnings"] == []


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_gpu_pods_need_no_node_label(path):
    """A GPU group's Pods ask for nvidia.com/gpu, which already keeps them on GPU nodes. A node
    selector on a label only GPU feature discovery sets (nvidia.com/gpu.present) would leave them
    Pending where none runs (GKE's managed drivers, EKS with the device plugin alone)."""
    cluster = C.load_config(path).cluster
    shapes = {"head": cluster.head, **{g: cluster.group(g) for g in ("draft", "target", "scorers", "coordinator")}}
    for name, shape in shapes.items():
        assert shape.node_selector == {}, f"{path.name}: cluster.{name}.node_selector: {shape.node_selector}"


def test_one_preset_runs_the_target_tensor_parallel():
    targets = [C.load_config(p).pools.target for p in PRESETS]
    tp = [t for t in targets if t.model.engine.tensor_parallel_size > 1]
    assert tp and all(t.placement_group_strategy == "STRICT_PACK" for t in tp)


def _write(tmp_path, data, name="broken.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _preset_data(stem="llama-1b-8b") -> dict:
    return yaml.safe_load((P.PRESETS_DIR / f"{stem}.yaml").read_text())


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["pools"]["target"]["model"]["engine"].update(tensor_parallel_size=0),
     "pools.target.model.engine.tensor_parallel_size"),
    (lambda d: d["pools"]["draft"]["model"].update(enigne={}), "pools.draft.model.enigne"),
    (lambda d: d["pools"]["prm"]["model"].update(backend="vllm"), "pools.prm.model.backend"),
    (lambda d: d["pools"]["target"]["model"]["engine"].update(tensor_parallel_size=2), "pools.target"),
    (lambda d: d["pools"]["draft"]["model"]["engine"].update(gpu_memory_utilization=0.9),
     "pools.draft.model.engine.gpu_memory_utilization"),
    (lambda d: d["pools"]["target"].update(placement_group_bundles=[{"CPU": 1, "GPU": 1}]) or
     d["pools"]["target"]["model"]["engine"].update(tensor_parallel_size=2),
     "pools.target.placement_group_bundles"),
    (lambda d: d["pools"]["target"].update(placement_group_bundles=[{"CPU": 1, "GPU": 1}],
                                           ray_actor_options={"num_cpus": 2}), "pools.target"),
])
def test_a_broken_preset_names_the_file_and_the_field(tmp_path, capsys, edit, field):
    data = _preset_data()
    edit(data)
    path = _write(tmp_path, data)
    report = check_file(path)
    assert not report["ok"] and any(e.startswith(field + ":") for e in report["errors"]), report["errors"]
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {field}:" in err


def test_ray_serve_own_validation_is_applied(tmp_path):
    data = _preset_data("qwen-math-1.5b-7b")
    data["pools"]["target"]["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}  # bundle 0 has 1 GPU: fits
    assert check_file(_write(tmp_path, data))["ok"]
    data["pools"]["target"]["ray_actor_options"] = {"num_cpus": 4}  # bundle 0 has 1 CPU
    errors = check_file(_write(tmp_path, data))["errors"]
    assert any(e.startswith("pools.target: Ray Serve refuses") and "first bundle" in e for e in errors)


def test_not_yaml_and_not_a_mapping_are_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed\n")
    assert check_file(bad)["errors"][0].startswith("(file): not YAML")
    bad.write_text("- a list\n")
    assert check_file(bad)["errors"] == ["(top level): expected a mapping"]
    assert check_file(tmp_path / "absent.yaml")["errors"][0].startswith("(file): cannot read")


def test_serve_yamls_are_checked_through_their_args(tmp_path):
    assert check_file(ROOT / "configs" / "serve-local-cpu.yaml")["ok"]
    data = yaml.safe_load((ROOT / "configs" / "serve-local-cpu.yaml").read_text())
    data["applications"][0]["import_path"] = "elsewhere:app"
    data["applications"][0]["args"]["limits"]["max_steps"] = 0
    errors = check_file(_write(tmp_path, data))["errors"]
    assert "applications[0].import_path: 'elsewhere:app' is not 'services.app:build_app'" in errors
    assert any(e.startswith("applications[0].args.limits.max_steps:") for e in errors)


def test_default_check_covers_presets_and_configs(capsys):
    assert main(["config", "check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {Path(f["file"]).name for f in report["files"]}
    assert {p.name for p in PRESETS} | {"local-cpu.yaml", "gpu-example.yaml", "serve-local-cpu.yaml"} <= names


def test_config_list(capsys):
    assert main(["config", "list", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == REGIMES
    assert rows["qwen-math-1.5b-7b"]["pools"]["target"]["gpus_per_replica"] == 2
    assert rows["llama-1b-8b"]["gpus_one_replica_each"] == 2


# -- model paths -----------------------------------------------------------------------------
def _checkpoint(path: Path, architectures=("LlamaForCausalLM",), **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": list(architectures), **config}))
    (path / "model.safetensors").write_bytes(b"")  # only its presence is checked: no weights are read
    (path / "tokenizer.json").write_text("{}")
    return path


def _local_cfg(tmp_path, **paths) -> C.AppConfig:
    data = _preset_data()
    data["base_dir"] = str(tmp_path)
    for role, path in paths.items():
        data["pools"][role]["model"]["path"] = path
    return C.AppConfig.model_validate(data)


def _good_models(tmp_path) -> dict:
    _checkpoint(tmp_path / "draft")
    _checkpoint(tmp_path / "target")
    _checkpoint(tmp_path / "router", ["Qwen2ForSequenceClassification"], id2label={"0": "LABEL_0"})
    _checkpoint(tmp_path / "prm", ["Qwen2ForSequenceClassification"])
    return {"draft": "draft", "target": "target", "router": "router", "prm": "prm"}


def test_model_paths_pass_when_every_pool_has_its_kind_of_checkpoint(tmp_path):
    P.check_model_paths(_local_cfg(tmp_path, **_good_models(tmp_path)))


def test_a_missing_path_names_the_pool_and_the_resolved_path(tmp_path):
    paths = _good_models(tmp_path)
    cfg = _local_cfg(tmp_path, **{**paths, "target": "nowhere/Llama-3.1-8B-Instruct", "prm": str(tmp_path / "gone")})
    with pytest.raises(P.ModelPathError) as info:
        P.check_model_paths(cfg)
    message = str(info.value)
    assert f"pools.target.model.path: {tmp_path / 'nowhere' / 'Llama-3.1-8B-Instruct'}: checkpoint directory " \
           f"does not exist ('nowhere/Llama-3.1-8B-Instruct' resolved against base_dir '{tmp_path}')" in message
    assert f"pools.prm.model.path: {tmp_path / 'gone'}: checkpoint directory does not exist" in message
    assert [p.field for p in info.value.problems] == ["pools.target.model.path", "pools.prm.model.path"]
    assert isinstance(info.value, RuntimeError)  # the CLI prints it as one clear error
    copy = pickle.loads(pickle.dumps(info.value))  # Ray ships it from where the app is built
    assert str(copy) == message and copy.problems == info.value.problems


def test_config_check_paths_fails_on_the_shipped_presets_here(capsys):
    # no /models on this machine: every pool of every preset is named
    assert main(["config", "check", "--paths", str(PRESETS[0])]) == 1
    err = capsys.readouterr().err
    for role in ("draft", "target", "router", "prm"):
        assert f"pools.{role}.model.path: /models/" in err


def test_not_a_checkpoint(tmp_path):
    paths = _good_models(tmp_path)
    (tmp_path / "target" / "model.safetensors").unlink()
    (tmp_path / "target" / "model.bin").write_bytes(b"")
    [problem] = P.model_path_problems(_local_cfg(tmp_path, **paths))
    assert problem.field == "pools.target.model.path" and "no *.safetensors" in problem.message


@pytest.mark.parametrize("role,make,expect", [
    # Skywork's PRM: a causal LM plus a value head; as a scorer its head would be random
    ("prm", lambda p: _checkpoint(p, ["Qwen2ForPrmModel"]), "not a one-label *ForSequenceClassification"),
    ("router", lambda p: _checkpoint(p, ["Qwen2ForCausalLM"]), "would use a random head"),
    ("router", lambda p: _checkpoint(p, ["Qwen2ForSequenceClassification"], id2label={"0": "a", "1": "b"}),
     "has 2 labels"),
    ("draft", lambda p: _checkpoint(p, ["LlamaForSequenceClassification"]), "is not a causal LM"),
])
def test_a_checkpoint_of_the_wrong_kind_is_refused(tmp_path, role, make, expect):
    paths = _good_models(tmp_path)
    make(tmp_path / "other")
    [problem] = P.model_path_problems(_local_cfg(tmp_path, **{**paths, role: "other"}))
    assert problem.field == f"pools.{role}.model.path"
    assert problem.message.startswith(f"{tmp_path / 'other'}: ") and expect in problem.message


def test_an_lm_verifier_may_serve_as_prm(tmp_path):
    paths = _good_models(tmp_path)
    (_checkpoint(tmp_path / "verifier", ["LlamaForCausalLM"]) / P.LM_VERIFIER_FILE).write_text("{}")
    assert P.model_path_problems(_local_cfg(tmp_path, **{**paths, "prm": "verifier"})) == []


def test_the_verifier_file_name_matches_the_backend():
    from arbitrage_common.backends import lm_verifier

    assert lm_verifier.VERIFIER_FILE == P.LM_VERIFIER_FILE


def test_prequantized_methods_need_a_quantized_checkpoint(tmp_path):
    paths = _good_models(tmp_path)
    data = _preset_data()
    data["base_dir"] = str(tmp_path)
    for role, path in paths.items():
        data["pools"][role]["model"]["path"] = path
    data["pools"]["draft"]["model"]["engine"]["quantization"] = "awq"
    cfg = C.AppConfig.model_validate(data)
    [problem] = P.model_path_problems(cfg)
    assert problem.field == "pools.draft.model.path" and "no quantization_config" in problem.message
    (tmp_path / "draft" / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "awq", "bits": 4}}))
    assert P.model_path_problems(cfg) == []


def test_the_path_check_imports_no_engine():
    code = ("import sys, arbitrage_common.presets as p; p.check_model_paths; "
            "print([m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: llama-1b-8b"):
        P.preset_path("gpt-5")
    assert C.load_config(P.preset_path("llama-1b-8b")).name == "arbitrage-llama-1b-8b"
