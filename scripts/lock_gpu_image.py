#!/usr/bin/env python3
"""Resolve the GPU image's Python dependencies (k8s/Dockerfile, VARIANT=gpu) on PyPI and write
k8s/gpu-image.lock.txt, the set tests/k8s/test_gpu_image_deps.py checks offline.

    python scripts/lock_gpu_image.py            # rewrite k8s/gpu-image.lock.txt (network: PyPI)
    python scripts/lock_gpu_image.py --check    # resolve again; fail if it differs from the file

It resolves with `pip install --dry-run --ignore-installed --report` for the image's platform
(CPython of the Dockerfile's PYTHON_TAG, manylinux x86_64 up to glibc 2.35, binary wheels
only), so it runs on any machine, GPU or not:

  1. `vllm==<VLLM_VERSION>` alone; the torch, vllm and transformers it brings are the keep-file
     (the project's dependencies never move what vLLM itself resolves to);
  2. `vllm==<VLLM_VERSION>` plus the project's dependencies (pyproject.toml), constrained to the
     keep-file: the lock.

The Dockerfile's GPU step installs `vllm==<VLLM_VERSION>` and the project with the lock as
constraints (`pip install -c gpu-image.lock.txt "vllm==..." .`), so the image gets this
resolution: a package of Ray's base image that they need is moved to its locked version, the
others are left as the base image has them. A step pip cannot resolve (ResolutionImpossible)
fails here with pip's explanation. Local pip configuration (extra indexes, find-links,
constraints) is ignored so the answer is PyPI's; --index-url points it at a mirror.
Needs pip >= 23.1 (several --platform values, --report).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "k8s" / "Dockerfile"
LOCK = ROOT / "k8s" / "gpu-image.lock.txt"
KEEP = ("torch", "vllm", "transformers")  # pinned to what vLLM alone resolves to (step 1)
KEY = ("vllm", "torch", "transformers", "protobuf", "ray", "tokenizers", "grpcio")
GLIBC_MAX = 35  # the Ray GPU image is Ubuntu 22.04 (glibc 2.35)


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def platform_flags(python_version: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MAX, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    flags = [f for tag in tags for f in ("--platform", tag)]
    return flags + ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]


def resolve(pip: list[str], reqs: list[str], python_version: str, index_url: str,
            constraints: list[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL",
                        "PIP_NO_INDEX", "PIP_REQUIREMENT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--index-url", index_url,
               "--target", str(Path(tmp) / "target"), "--report", str(report),
               *platform_flags(python_version), *reqs]
        if constraints:
            cfile = Path(tmp) / "keep.txt"
            cfile.write_text("".join(c + "\n" for c in constraints))
            cmd += ["-c", str(cfile)]
        print("+", " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, check=False, env=env)
        if proc.returncode:
            sys.exit(f"pip could not resolve {' '.join(reqs)} (exit {proc.returncode}); see above")
        data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in data["install"]}


def lock_text(python_version: str, index_url: str) -> str:
    args = dockerfile_args()
    vllm = f"vllm=={args['VLLM_VERSION']}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = [sys.executable, "-m", "pip"]
    step1 = resolve(pip, [vllm], python_version, index_url)
    keep = [f"{name}=={step1[name]}" for name in KEEP]
    step2 = resolve(pip, [vllm, *project], python_version, index_url, keep)
    lines = [
        "# The GPU image's Python packages (k8s/Dockerfile, VARIANT=gpu), resolved on PyPI for",
        f"# CPython {python_version}, manylinux x86_64 (glibc <= 2.{GLIBC_MAX}), binary wheels:",
        "#   python scripts/lock_gpu_image.py     (regenerate after changing VLLM_VERSION,",
        "#                                         PYTHON_TAG or pyproject's dependencies)",
        "# tests/k8s/test_gpu_image_deps.py checks it against the Dockerfile and pyproject offline.",
        f"# image-python: {python_version}",
        f"# keep-file: {' '.join(keep)}",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(step2.items())]
    return "\n".join(lines) + "\n"


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([\w.-]+)==(\S+)$", text, re.MULTILINE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a fresh resolution differs from the file")
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    args = parser.parse_args()
    tag = dockerfile_args()["PYTHON_TAG"]  # py311
    python_version = f"{tag[2]}.{tag[3:]}"
    text = lock_text(python_version, args.index_url)
    if args.check:
        # Unpinned dependencies move with every release: only the versions that decide whether
        # the image builds and matches the tested line fail the check; the rest is reported.
        old, new = pins(LOCK.read_text()), pins(text)
        moved = {n: (old.get(n), new.get(n)) for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
        for name, (was, now) in sorted(moved.items()):
            print(f"{name}: {was} -> {now}")
        key = sorted(n for n in moved if n in KEY)
        if key:
            sys.exit(f"{', '.join(key)} moved: review, then run python scripts/lock_gpu_image.py")
        print(f"resolves; the key versions ({', '.join(KEY)}) match {LOCK.relative_to(ROOT)}")
        return
    LOCK.write_text(text)
    print(f"wrote {LOCK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
