"""arbitrage_pool_batch_size counts rows (prefixes generated, items scored) per forward pass: its
buckets must reach the most rows one pass can hold, and its description must say what it counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from arbitrage_common import config as C
from services import pools

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/presets/*.yaml")])


def _most_rows_per_call() -> int:
    """A scorer call scores the step and each lookahead step after it: 1 + the largest draft_lookahead."""
    (le,) = [m.le for m in C.LimitsSpec.model_fields["draft_lookahead"].metadata if getattr(m, "le", None)]
    return 1 + le


def _configs() -> list[C.AppConfig]:
    out = [C.default_config()]
    for path in BUNDLED:
        data = yaml.safe_load(path.read_text())
        out.append(C.application_config(data["applications"][0]) if "applications" in data
                   else C.AppConfig.model_validate(data))
    return out


def test_the_buckets_reach_the_most_rows_one_pass_of_a_bundled_config_holds():
    assert _most_rows_per_call() == 9
    most = max(spec.max_batch_size for cfg in _configs() for _, spec in cfg.pools.configured())
    assert most >= 64  # the presets' scorers
    assert pools.BATCH_ROWS_BOUNDARIES[-1] >= most * _most_rows_per_call()
    assert pools.BATCH_ROWS_BOUNDARIES == sorted(set(pools.BATCH_ROWS_BOUNDARIES))


@pytest.mark.parametrize("rows", [65, 200, 576])
def test_big_scorer_batches_land_in_a_bucket_not_in_inf(rows):
    assert any(rows <= bound for bound in pools.BATCH_ROWS_BOUNDARIES)


def test_the_description_says_rows_not_calls():
    text = pools.BATCH_ROWS_DESCRIPTION.lower()
    assert "rows" in text and "items scored" in text and "prefixes generated" in text
    assert "calls merged" not in text


def test_the_dashboard_panel_says_what_the_metric_counts():
    panels = json.loads((ROOT / "k8s" / "monitoring" / "grafana-dashboard.json").read_text())["panels"]
    (panel,) = [p for p in panels if any("arbitrage_pool_batch_size" in t["expr"] for t in p.get("targets", []))]
    assert "rows per forward pass" in panel["title"] and "calls merged" not in panel["title"]
    assert "items scored" in panel["description"]
