"""The `arbitrage` command line on the bundled models: small N, real models, no timing asserts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def arbitrage(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "arbitrage_common.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900, check=False,
                          env=None if env is None else {**os.environ, **env})


def test_models_eval_prints_every_field(tmp_path):
    out = tmp_path / "eval.json"
    proc = arbitrage("models", "eval", "--n", "6", "--seed", "4242", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    assert result["n"] == 6 and result["seed"] == 4242
    for role in ("draft", "target"):
        r = result[role]
        for key in ("final_accuracy", "wellformed_rate", "ms_per_step_b1", "ms_per_step_b16", "params"):
            assert key in r
        assert set(r["step_accuracy"]) <= {"easy", "medium", "hard"}
        assert 0.0 <= r["final_accuracy"] <= 1.0
    assert result["target"]["params"] > 5 * result["draft"]["params"]
    assert 0.5 <= result["prm"]["auroc"] <= 1.0
    assert result["target_draft_latency_ratio"] > 0


@pytest.mark.parametrize("args,name", [
    (["models", "eval", "--n", "0"], "--n"),
    (["models", "eval", "--n", "x"], "--n"),
    (["models", "eval", "--seed", "-1"], "--seed"),
    (["bench", "--n", "-3"], "--n"),
    (["train", "lm", "--role", "huge", "--out", "x", "--steps", "1"], "--role"),
])
def test_bad_arguments_are_rejected_naming_the_argument(args, name):
    proc = arbitrage(*args)
    assert proc.returncode == 2
    assert f"argument {name}" in proc.stderr


def test_missing_checkpoint_fails_cleanly_and_writes_nothing(tmp_path):
    out = tmp_path / "eval.json"
    proc = arbitrage("models", "eval", "--n", "2", "--models-dir", str(tmp_path / "none"), "--out", str(out))
    assert proc.returncode == 1
    assert str(tmp_path / "none" / "draft") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and proc.stdout == ""


def test_bench_small_n_writes_all_outputs(tmp_path):
    out = tmp_path / "bench"
    proc = arbitrage("bench", "--n", "6", "--seed", "31337", "--out", str(out), "--confirm-n", "2", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    policies = {p["policy"] for p in result["points"]}
    assert policies == {"draft", "target", "rsd", "arbitrage", "oracle"}
    for p in result["points"]:
        assert set(p) >= {"policy", "threshold", "accuracy", "acceptance_rate", "target_step_fraction", "latency_s_mean"}
        assert 0.0 <= p["acceptance_rate"] <= 1.0 and 0.0 <= p["target_step_fraction"] <= 1.0
    draft = next(p for p in result["points"] if p["policy"] == "draft")
    target = next(p for p in result["points"] if p["policy"] == "target")
    assert draft["target_step_fraction"] == 0.0 and target["target_step_fraction"] == 1.0
    assert draft["acceptance_rate"] == 1.0 and target["acceptance_rate"] == 0.0
    assert {"accuracy_level", "latency_ratio_rsd_over_arbitrage", "target_steps_ratio_rsd_over_arbitrage"} <= set(result["matched"])
    assert "spearman" in result["router"]
    assert result["wallclock"]["n"] == 2
    for name in ("points.csv", "accuracy_vs_acceptance.png", "accuracy_vs_target_fraction.png",
                 "accuracy_vs_latency.png", "bench.json"):
        assert (out / name).is_file()


@pytest.mark.parametrize("args,model", [
    (["models", "eval", "--n", "1"], "draft"),
    (["bench", "--n", "1", "--no-progress"], "draft"),
    (["router", "data", "--n", "1"], "draft"),
    (["router", "eval", "--data", "rows.jsonl"], "router"),
    (["regime-map", "--n", "1", "--grid", "tiny", "--no-progress"], ""),
])
def test_model_defaults_follow_arbitrage_home_not_the_cwd(tmp_path, args, model):
    """Like `serve` and `config`, the CLI's default checkpoints are ``paths.models_dir()``: with
    ARBITRAGE_HOME set they come from there, even where the cwd has a models/ folder."""
    home = tmp_path / "home"
    if "--data" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    proc = arbitrage(*args, env={"ARBITRAGE_HOME": str(home)})  # cwd: the checkout, which has models/
    assert proc.returncode == 1, proc.stderr
    assert str(home / "models" / model) in proc.stderr and "Traceback" not in proc.stderr
