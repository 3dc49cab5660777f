"""`arbitrage analyze` on a small fixture and `arbitrage regime-map` on a tiny grid (the bundled models)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def arbitrage(*args):
    return subprocess.run([sys.executable, "-m", "arbitrage_common.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, check=False)


def _row(pid, prm_draft, advantage, draft_correct=None, target_correct=None):
    return {"problem_id": pid, "problem": f"P{pid}", "history": [], "draft_step": "d", "advantage": advantage,
            "prm_draft": prm_draft, "draft_correct": draft_correct, "target_correct": target_correct, "label": 0}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_analyze_replays_rsd_on_rows_from_a_service(tmp_path):
    # Rows as `router data --endpoint` writes them: no step checker, the PRM's advantage judges.
    rows = [_row(0, 0.1, 0.4), _row(0, 0.2, 0.0), _row(1, 0.3, -0.1), _row(1, 0.4, 0.0),
            _row(2, 0.6, 0.2), _row(2, 0.8, 0.0), _row(3, 0.9, 0.0), _row(3, 0.95, 0.0)]
    proc = arbitrage("analyze", "--data", str(_write(tmp_path / "rows.jsonl", rows)))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    head = out["headline"]  # threshold 0.5: RSD calls the target on 4 steps; 1 of them improves
    assert head["rsd_threshold"] == 0.5 and head["rsd_target_fraction"] == 0.5
    assert head["rsd_waste"] == 0.75 and head["savings_bound"] == 4.0 and head["oracle_target_fraction"] == 0.125
    assert out["improvement_judged_by"] == "PRM (advantage > 0)" and out["improvable_share"] == 0.25
    assert out["steps"] == 8 and out["problems"] == 4
    assert "75% of RSD's target calls improve nothing" in out["reading"]


def test_analyze_names_what_is_missing(tmp_path):
    no_score = _write(tmp_path / "old.jsonl", [{**_row(0, None, 0.1)}])
    proc = arbitrage("analyze", "--data", str(no_score))
    assert proc.returncode == 1 and "--data: 1 of 1 rows have no prm_draft" in proc.stderr
    proc = arbitrage("analyze", "--data", str(no_score), "--rate", "2")
    assert proc.returncode == 1 and "--profile, --rate and --slo-ms go together" in proc.stderr
    proc = arbitrage("analyze", "--data", str(tmp_path / "none.jsonl"))
    assert proc.returncode == 1 and "router dataset not found" in proc.stderr


def test_regime_map_on_a_tiny_grid_writes_every_cell(tmp_path):
    out = tmp_path / "regime"
    proc = arbitrage("regime-map", "--n", "3", "--seed", "5", "--mix", "math,olympiad", "--grid", "tiny",
                     "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    cells = {(c["mix"], c["prm"], c["router"]) for c in summary["cells"]}
    kinds = {(c["prm"], c["router"]) for c in summary["cells"]}
    assert cells == {(mix, prm, router) for mix in ("math", "olympiad") for prm, router in kinds}
    assert ("independent", "classifier") in kinds and ("self-verifier", "verifier-head") in kinds
    assert summary["skipped"] == []
    for cell in summary["cells"]:
        bench = json.loads((out / cell["dir"] / "bench.json").read_text())
        assert len(bench["points"]) == 7 and bench["mix"] == cell["mix"] and bench["n"] == 3
        assert cell["draft_accuracy"] == next(p["accuracy"] for p in bench["points"] if p["policy"] == "draft")
        assert cell["rsd_waste"] is None or 0.0 <= cell["rsd_waste"] <= 1.0
    # The cells of one mix share the draft's and target's calls: same problems, same answers.
    by_mix = {}
    for cell in summary["cells"]:
        by_mix.setdefault(cell["mix"], set()).add((cell["draft_accuracy"], cell["target_accuracy"]))
    assert all(len(v) == 1 for v in by_mix.values())
    header = (out / "regime.csv").read_text().splitlines()[0]
    assert header.startswith("mix,prm,router,draft_accuracy,target_accuracy,rsd_waste,max_latency_ratio")
    assert (out / "regime_map.png").stat().st_size > 0
