"""`arbitrage plan profile` times pools with the transformers backend in its own process (the
transformers generator has no device code: CPU only): a config with a vLLM pool is refused,
naming each such pool's ``model.backend``, before any model loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from arbitrage_common.cli.main import main
from arbitrage_common.config import default_config, load_config
from arbitrage_common.planning import profile

ROOT = Path(__file__).resolve().parents[2]
GPU_PRESET = ROOT / "configs" / "presets" / "llama-1b-8b.yaml"


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(profile, "_generator", refuse)
    monkeypatch.setattr("arbitrage_common.backends.scorers.load_step_scorer", refuse)


def test_a_vllm_pool_is_refused_naming_its_backend_field(no_model_loads):
    cfg = load_config(str(GPU_PRESET))
    assert {role for role, spec in cfg.pools.configured() if spec.model.backend == "vllm"} == {"draft", "target"}
    with pytest.raises(ValueError) as exc:
        profile.profile_pools(cfg)
    msg = str(exc.value)
    assert msg.startswith("pools.draft.model.backend is 'vllm', pools.target.model.backend is 'vllm': ")
    assert "router" not in msg.split(":")[0]  # transformers scorers are profiled
    assert "--grpc measures only steps per request" in msg and "by hand" in msg


def test_the_cli_refuses_before_building_anything(monkeypatch, capsys, tmp_path, no_model_loads):
    called = []
    monkeypatch.setattr(profile, "build_profile", lambda *a, **kw: called.append(a))
    out = tmp_path / "p.json"
    assert main(["plan", "profile", "--config", str(GPU_PRESET), "--out", str(out)]) == 1
    assert "pools.draft.model.backend is 'vllm'" in capsys.readouterr().err
    assert not called and not out.exists()


def test_a_transformers_config_passes_the_check():
    profile.check_profilable(default_config())


def test_the_docs_do_not_send_gpu_users_to_plan_profile():
    """The assumed GPU profile's note and docs/LOADTEST.md must not name a command that cannot
    measure a vLLM pool as the way to replace it."""
    import json

    note = json.loads((ROOT / "docs" / "examples" / "gpu-profile-llama-1b-8b.assumed.json").read_text())["measured"]["note"]
    assert "Replace with `arbitrage plan profile" not in note and "refuses vLLM pools" in note
    loadtest = (ROOT / "docs" / "LOADTEST.md").read_text()
    assert "replace it with `plan profile --grpc`" not in " ".join(loadtest.split())
    assert "`pools.<role>.model.backend`" in loadtest
