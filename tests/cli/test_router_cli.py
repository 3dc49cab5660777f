"""`arbitrage router data | train | eval` end to end on the bundled models (small N)."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from arbitrage_common.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def arbitrage(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "arbitrage_common.cli", *args], cwd=cwd,
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
    # The dataset says how it was made, beside it (runs/ is not in git): one command that parses.
    made = json.loads((tmp_path / "rows.meta.json").read_text())
    assert summary["meta"] == str(tmp_path / "rows.meta.json")
    assert made["n"] == 24 and made["seed"] == 7 and made["mix"] == ["math"] and made["rows"] == len(rows)
    assert made["labelling_prm"].endswith("prm") and made["command"].startswith("arbitrage router data --n 24 --seed 7 ")
    assert build_parser().parse_args(shlex.split(made["command"])[1:]).out == str(data)

    trained = arbitrage("router", "train", "--kind", "verifier-head", "--data", str(data), "--init", "models/prm",
                        "--out", str(out), "--label-margin", "0.5")
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["kind"] == "verifier_head" and {a["balance_classes"] for a in meta["ablation"]} == {True, False}
    # The margin relabels the rows at training time: fewer positives than at 0.
    assert meta["label_margin"] == 0.5
    assert meta["positive_rate_raw"] < summary["positive"] / summary["rows"] + 1e-9
    card = (out / "README.md").read_text()
    assert f"--out {out}" in card and made["command"] in card  # the card's remake commands: data, then router
    assert meta["data_made_by"] == made["command"]

    evaluated = arbitrage("router", "eval", "--data", str(data), "--router", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert -1.0 <= result["spearman"] <= 1.0 and result["error_structure"]["steps"] == result["held_out_steps"]
    # The card's figure is what the documented eval command prints (both rank the router's logits).
    assert result["spearman"] == meta["held_out_spearman_vs_oracle_advantage"]
    # With no --router, the bundled one, wherever the command runs from.
    bundled = arbitrage("router", "eval", "--data", str(data), cwd=tmp_path)
    assert bundled.returncode == 0, bundled.stderr
    assert json.loads(bundled.stdout)["router"] == str(ROOT / "models" / "router")


def test_router_train_on_a_missing_dataset_names_the_path(tmp_path):
    missing = tmp_path / "none.jsonl"
    run = arbitrage("router", "train", "--kind", "verifier-head", "--data", str(missing), "--out", str(tmp_path / "r"))
    assert run.returncode != 0 and str(missing) in run.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind,flags", [
    ("verifier-head", ["--steps", "5"]), ("verifier-head", ["--lr", "0.1"]), ("verifier-head", ["--device", "cpu"]),
    ("verifier-head", ["--ablation-steps", "3"]), ("verifier-head", ["--annotate"]), ("classifier", ["--l2", "0.1"]),
])
def test_router_train_refuses_a_flag_its_kind_does_not_use(tmp_path, capsys, kind, flags):
    out = tmp_path / "r"
    code = main(["router", "train", "--kind", kind, "--data", str(tmp_path / "none.jsonl"), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 1 and f"{flags[0]}: does not apply to --kind {kind}" in err, err
    assert not out.exists()


def test_router_train_lets_no_annotate_pass_with_a_verifier_head(tmp_path, capsys):
    """A verifier head reads history unannotated anyway: --no-annotate is true, not ignored."""
    code = main(["router", "train", "--kind", "verifier-head", "--no-annotate", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "r")])
    assert code == 1 and "none.jsonl" in capsys.readouterr().err  # it got as far as the data
