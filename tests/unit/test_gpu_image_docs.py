"""The GPU image recipes: a Dockerfile built FROM vLLM's image clears its ENTRYPOINT (`vllm
serve`, which would swallow KubeRay's `ray start` and `arbitrage serve` as its arguments), and
every GPU image checks at build time that vllm imports."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dockerfiles(doc: str) -> list[str]:
    return re.findall(r"```dockerfile\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.DOTALL)


def _import_checks(text: str) -> list[str]:
    return re.findall(r'python -c "(import [^"]*)"', text)


@pytest.mark.parametrize("doc", ["GPU.md"])  # VLLM.md points to it
def test_docs_images_from_vllms_image_clear_its_entrypoint_and_import_vllm(doc):
    snippets = [s for s in _dockerfiles(doc) if re.search(r"^FROM vllm/vllm-openai", s, re.MULTILINE)]
    assert snippets, f"docs/{doc}: no Dockerfile FROM vllm/vllm-openai"
    for snippet in snippets:
        assert re.search(r"^ENTRYPOINT \[\]$", snippet, re.MULTILINE), snippet
        checks = _import_checks(snippet)
        assert any(re.search(r"\bvllm\b", c) for c in checks), snippet
        assert re.search(r"^COPY \. /src$", snippet, re.MULTILINE), "the snippet installs /src: copy it first"


def test_the_k8s_gpu_variant_imports_vllm_at_build_time():
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    assert not re.search(r"^FROM vllm/", text, re.MULTILINE)  # Ray's image: no `vllm serve` ENTRYPOINT to clear
    assert re.search(r'if \[ "\$VARIANT" != "cpu" \]; then python -c "import vllm', text)
