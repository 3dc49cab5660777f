"""The Grafana dashboard (k8s/monitoring/grafana-dashboard.json): each panel's unit fits what
its queries return. Pure JSON checks; the metric names are checked in tests/k8s."""
from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "grafana-dashboard.json"
RATIO_UNITS = {"percentunit", "percent"}
_RATE = re.compile(r"\b(?:i?rate|increase)\(")


def _panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def _ratio(expr: str) -> bool:
    """A counter's rate divided by another rate (a share), not a bare per-second rate."""
    numerator, slash, denominator = expr.partition(" / ")
    return bool(slash) and bool(_RATE.search(numerator)) and bool(_RATE.search(denominator))


def test_percent_panels_plot_ratios_not_rates():
    """A rate (events per second) on a percent axis reads 0.5 errors/s as 50 %."""
    checked = 0
    for panel in _panels():
        if panel.get("fieldConfig", {}).get("defaults", {}).get("unit") not in RATIO_UNITS:
            continue
        for target in panel.get("targets", []):
            expr = target["expr"]
            if _RATE.search(expr):
                checked += 1
                assert _ratio(expr), f"{panel['title']!r} {target['refId']}: a rate on a percent axis: {expr}"
                assert "/s" not in target.get("legendFormat", ""), f"{panel['title']!r} {target['refId']}"
    assert checked >= 3


def test_the_error_ratio_divides_like_by_like():
    """Each series: the same metric and grouping above and below, the numerator narrowed by one
    status matcher, the denominator by one to the requests accepted (which statuses each keeps:
    tests/unit/test_dashboard_metrics.py)."""
    (panel,) = [p for p in _panels() if p["title"].startswith("Error ratio")]
    for target in panel["targets"]:
        numerator, slash, denominator = target["expr"].partition(" / ")
        assert slash, f"{target['refId']}: not a ratio"
        grouping = re.match(r"sum(?: by \(([^)]*)\))?", numerator).group(1)
        assert re.match(r"sum(?: by \(([^)]*)\))?", denominator).group(1) == grouping, target["refId"]
        (status,) = re.findall(r',(status(?:_code)?(?:!~|=~|!=)"[^"]*")', numerator)
        (accepted,) = re.findall(r',(status(?:_code)?=~"[^"]*")', denominator)
        assert numerator.replace("," + status, "") == denominator.replace("," + accepted, ""), target["refId"]
