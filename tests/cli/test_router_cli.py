"""`arbitrage router data | train | eval` end to end on the bundled models (small N)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def arbitrage(*args):
    return subprocess.run([sys.executable, "-m", "arbitrage_common.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)


def test_router_data_train_eval_pipeline(tmp_path):
    data, out = tmp_path / "rows.jsonl", tmp_path / "router"
    made = arbitrage("router", "data", "--n", "24", "--seed", "7", "--out", str(data))
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert summary["rows"] == len(rows) and summary["positive"] == sum(r["label"] for r in rows) > 0
    for r in rows:  # the paper's label 1[advantage > 0], and the PRM scored both steps
        assert r["advantage"] == r["prm_target"] - r["prm_draft"] and r["label"] == int(r["advantage"] > 0)
    # Every dataset reports RSD's waste and the oracle's bound (at RSD threshold 0.5).
    headline = summary["payoff"]["headline"]
    routed = [r for r in rows if r["prm_draft"] < 0.5]
    assert headline["rsd_threshold"] == 0.5 and headline["improving_calls"] <= len(routed)
    assert headline["rsd_target_fraction"] == round(len(routed) / len(rows), 4)

    trained = arbitrage("router", "train", "--kind", "verifier-head", "--data", str(data), "--init", "models/prm",
                        "--out", str(out), "--label-margin", "0.5")
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["kind"] == "verifier_head" and {a["balance_classes"] for a in meta["ablation"]} == {True, False}
    # The margin relabels the rows at training time: fewer positives than at 0.
    assert meta["label_margin"] == 0.5
    assert meta["positive_rate_raw"] < summary["positive"] / summary["rows"] + 1e-9
    assert f"--out {out}" in (out / "README.md").read_text()  # the card's remake command

    evaluated = arbitrage("router", "eval", "--data", str(data), "--router", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert -1.0 <= result["spearman"] <= 1.0 and result["error_structure"]["steps"] == result["held_out_steps"]


def test_router_train_on_a_missing_dataset_names_the_path(tmp_path):
    missing = tmp_path / "none.jsonl"
    run = arbitrage("router", "train", "--kind", "verifier-head", "--data", str(missing), "--out", str(tmp_path / "r"))
    assert run.returncode != 0 and str(missing) in run.stderr and not (tmp_path / "r").exists()
