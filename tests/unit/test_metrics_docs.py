"""docs/SERVING.md's Metrics section lists every metric services/ exports (with Ray's ``ray_``
prefix) and says histogram means are approximate under Ray's OpenTelemetry export, which the
installed ray does; docs/KUBERAY.md §9 points there and names no metric that is gone."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _section(doc: str, heading: str) -> str:
    text = (ROOT / "docs" / doc).read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _service_metrics() -> set[str]:
    """Every metric name services/ declares (every "arbitrage_*" string there is one)."""
    names = set()
    for path in (ROOT / "services").glob("*.py"):
        names |= set(re.findall(r'"(arbitrage_[a-z0-9_]+)"', path.read_text()))
    return names


def test_the_metrics_section_lists_every_metric_the_services_export():
    names = _service_metrics()
    assert {"arbitrage_pool_retries_total", "arbitrage_pool_proposal_tokens_total",
            "arbitrage_threshold_offset"} <= names
    section = _section("SERVING.md", "## Metrics")
    rows = {m.group(1) for m in re.finditer(r"^\| (.*?) \|", section, re.MULTILINE)}
    listed = set(re.findall(r"`ray_(arbitrage_[a-z0-9_]+)`", " ".join(rows)))
    assert names - listed == set(), f"not in docs/SERVING.md's Metrics table: {sorted(names - listed)}"
    assert listed - names == set(), f"documented but not exported: {sorted(listed - names)}"


def test_the_approximate_histogram_sum_is_ray_s_and_documented():
    import ray

    recorder = (Path(ray.__file__).parent / "_private" / "telemetry" / "open_telemetry_metric_recorder.py").read_text()
    assert "midpoint" in recorder  # the OpenTelemetry path rebuilds observations at bucket midpoints
    section = " ".join(_section("SERVING.md", "## Metrics").split())
    assert "midpoint" in section and "`_sum / _count` are approximate" in section


def test_kuberay_points_to_the_list_and_names_no_gone_metric():
    section = _section("KUBERAY.md", "## 9. Metrics")
    assert "[SERVING.md](SERVING.md), \"Metrics\"" in section
    gone = set(re.findall(r"ray_(arbitrage_[a-z0-9_]+)", section)) - _service_metrics()
    assert not gone, gone
