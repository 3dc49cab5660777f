"""`arbitrage analyze` on a hand-built router dataset: which steps improve, RSD replayed at
thresholds, the router's calls for the same gains, and the report."""
import pytest

from arbitrage_common.evaluation import analyze as an


def _row(problem_id, advantage, prm_draft, draft_correct=None, target_correct=None):
    return {"problem_id": problem_id, "advantage": advantage, "prm_draft": prm_draft,
            "prm_target": prm_draft + advantage, "draft_correct": draft_correct, "target_correct": target_correct}


# Judged by the PRM (no step checker): rows a, e and g improve (advantage > 0); c and f tie at 0.
ROWS = [
    _row(0, 0.5, 0.10),   # a  improves
    _row(0, -0.2, 0.20),  # b
    _row(0, 0.0, 0.30),   # c
    _row(1, -0.1, 0.40),  # d
    _row(1, 0.3, 0.60),   # e  improves
    _row(1, 0.0, 0.80),   # f
    _row(2, 0.2, 0.85),   # g  improves
    _row(2, -0.3, 0.95),  # h
]
FLAGS = [True, False, False, False, True, False, True, False]
# Highest first: a(improves) f e(improves) b g(improves) d c h
SCORES = [0.9, 0.6, 0.2, 0.3, 0.7, 0.8, 0.5, 0.1]


@pytest.mark.parametrize("draft_correct,target_correct,advantage,expected", [
    (False, True, -0.5, True),   # the checker wins over a negative advantage
    (True, True, 0.5, False),
    (False, False, 0.9, False),
    (True, False, 0.9, False),
])
def test_improves_uses_the_step_checker_when_both_are_set(draft_correct, target_correct, advantage, expected):
    assert an.improves(_row(0, advantage, 0.5, draft_correct, target_correct)) is expected


@pytest.mark.parametrize("advantage,expected", [(0.01, True), (0.0, False), (-0.3, False)])
def test_improves_uses_the_advantage_without_the_checker(advantage, expected):
    assert an.improves(_row(0, advantage, 0.5)) is expected


def test_improves_uses_the_advantage_when_only_one_checker_field_is_set():
    assert an.improves(_row(0, -0.5, 0.5, draft_correct=False, target_correct=None)) is False


def test_rsd_replay_at_a_threshold():
    # tau 0.5 routes a, b, c, d: 4 of 8 calls, 1 improves
    (entry,) = an.rsd_replay(ROWS, [0.5])
    assert entry == {"rsd_threshold": 0.5, "rsd_target_fraction": 0.5, "improving_calls": 1, "rsd_waste": 0.75,
                     "oracle_target_fraction": 0.125, "savings_bound": 4.0}


def test_rsd_replay_over_thresholds():
    table = an.rsd_replay(ROWS, [0.3, 0.7, 0.9])
    # 0.3: a, b (1 gain); 0.7: a-e (2 gains); 0.9: a-g (3 gains)
    assert [e["rsd_target_fraction"] for e in table] == [0.25, 0.625, 0.875]
    assert [e["improving_calls"] for e in table] == [1, 2, 3]
    assert [e["rsd_waste"] for e in table] == [0.5, 0.6, 0.5714]
    assert [e["oracle_target_fraction"] for e in table] == [0.125, 0.25, 0.375]
    assert [e["savings_bound"] for e in table] == [2.0, 2.5, 2.333]


def test_rsd_replay_routing_nothing_has_no_waste_and_no_bound():
    (entry,) = an.rsd_replay(ROWS, [0.05])
    assert entry["rsd_target_fraction"] == 0.0
    assert entry["rsd_waste"] is None
    assert entry["savings_bound"] is None


@pytest.mark.parametrize("gains,calls", [(1, 1), (2, 3), (3, 5)])
def test_router_calls_for_takes_highest_scores_first(gains, calls):
    assert an.router_calls_for(gains, FLAGS, SCORES) == calls


def test_router_calls_for_is_none_when_the_gains_are_out_of_reach():
    assert an.router_calls_for(4, FLAGS, SCORES) is None


def test_router_calls_for_zero_gains_is_zero():
    assert an.router_calls_for(0, FLAGS, SCORES) == 0


def test_rsd_replay_with_router_scores():
    table = an.rsd_replay(ROWS, [0.5, 0.7, 0.9], router_scores=SCORES)
    # 0.5: RSD 4 calls, 1 gain, router 1 call: share (4 - 1) / (4 - 1)
    # 0.7: RSD 5 calls, 2 gains, router 3 calls: share (5 - 3) / (5 - 2)
    # 0.9: RSD 7 calls, 3 gains, router 5 calls: share (7 - 5) / (7 - 3)
    assert [e["router_target_fraction"] for e in table] == [0.125, 0.375, 0.625]
    assert [e["router_saving"] for e in table] == [4.0, 1.667, 1.4]
    assert [e["realised_share"] for e in table] == [1.0, 0.667, 0.5]


def test_rsd_replay_with_router_scores_routing_nothing():
    (entry,) = an.rsd_replay(ROWS, [0.05], router_scores=SCORES)
    assert entry["router_target_fraction"] == 0.0
    assert entry["router_saving"] is None
    assert entry["realised_share"] is None


def test_analyze_headline_is_at_rsd_threshold():
    out = an.analyze(ROWS, rsd_threshold=0.7, thresholds=(0.3,))
    assert [e["rsd_threshold"] for e in out["by_rsd_threshold"]] == [0.3, 0.7]
    assert out["headline"]["rsd_threshold"] == 0.7
    assert out["headline"]["rsd_waste"] == 0.6
    assert out["headline"]["savings_bound"] == 2.5


def test_analyze_counts_and_improvable_share():
    out = an.analyze(ROWS)
    assert out["steps"] == 8
    assert out["problems"] == 3
    assert out["improvable_share"] == 0.375
    assert out["improvement_judged_by"] == "PRM (advantage > 0)"
    assert out["headline"]["rsd_threshold"] == 0.5
    assert "router" not in out


def test_analyze_reading_of_the_headline():
    out = an.analyze(ROWS, rsd_threshold=0.7)
    assert out["reading"] == ("60% of RSD's target calls improve nothing at threshold 0.7; a perfect router would "
                              "need 2.50x fewer target calls for the same gains (Arbitrage can pay off)")


def test_analyze_reading_when_rsd_routes_nothing():
    out = an.analyze(ROWS, rsd_threshold=0.05)
    assert out["reading"] == "RSD sends no step to the target at this threshold: nothing to save"


def test_analyze_with_step_checker_rows():
    rows = [_row(0, -0.4, 0.2, False, True), _row(0, 0.4, 0.3, True, True),
            _row(1, 0.1, 0.4, False, False), _row(1, 0.0, 0.9, True, True)]
    out = an.analyze(rows, rsd_threshold=0.5)
    assert out["improvement_judged_by"] == "step checker"
    assert out["improvable_share"] == 0.25
    assert out["headline"]["improving_calls"] == 1
    assert out["headline"]["rsd_waste"] == 0.6667


def test_check_rows_names_data_when_rows_are_empty():
    with pytest.raises(ValueError, match=r"^--data: the router dataset is empty"):
        an.analyze([])


def test_check_rows_names_data_when_prm_draft_is_missing():
    rows = [dict(r) for r in ROWS]
    rows[1]["prm_draft"] = None
    del rows[3]["prm_draft"]
    with pytest.raises(ValueError, match=r"^--data: 2 of 8 rows have no prm_draft"):
        an.analyze(rows)


def test_analyze_spearman_note_with_router_scores():
    # average ranks: advantages (8, 2, 4.5, 3, 7, 4.5, 6, 1), scores (8, 5, 2, 3, 6, 7, 4, 1):
    # rho = 28.5 / sqrt(41.5 * 42) = 0.6826
    out = an.analyze(ROWS, router_scores=SCORES)
    assert out["router"] == {"spearman": 0.6826, "paper": "0.13-0.17", "beats_paper": True}
    assert out["headline"]["router_target_fraction"] == 0.125


def test_plan_savings_gives_the_bound_fewer_target_replicas_than_rsd_at_a_high_rate():
    from arbitrage_common.evaluation.analyze import plan_savings
    from arbitrage_common.planning.model import ServiceCurve
    from arbitrage_common.planning.planner import Profile

    curves = {"draft": ServiceCurve(5, 1), "router": ServiceCurve(8, 0.5), "prm": ServiceCurve(8, 0.5),
              "target": ServiceCurve(40, 4)}
    prof = Profile(curves, dict.fromkeys(curves, 16), 2.0, 5.0, (5, 6, 7), None, {})
    entry = {"rsd_target_fraction": 0.8, "oracle_target_fraction": 0.2, "router_target_fraction": 0.4}
    out = plan_savings(prof, entry, rate=150.0, slo_ms=3000)
    assert out["rsd"]["target_fraction"] == 0.8 and out["bound"]["target_fraction"] == 0.2
    assert out["rsd"]["target_replicas"] > out["router"]["target_replicas"] > out["bound"]["target_replicas"] >= 1
    assert out["bound"]["target_replicas_saved_vs_rsd"] == out["rsd"]["target_replicas"] - out["bound"]["target_replicas"]
    assert "target_gpus" not in out["rsd"]  # GPUs only with a preset


def _small_profile():
    from arbitrage_common.planning.model import ServiceCurve
    from arbitrage_common.planning.planner import Profile

    curves = {"draft": ServiceCurve(5, 1), "router": ServiceCurve(8, 0.5), "prm": ServiceCurve(8, 0.5),
              "target": ServiceCurve(40, 4)}
    return Profile(curves, dict.fromkeys(curves, 16), 2.0, 5.0, (5, 6, 7), None, {})


def test_plan_savings_reports_an_rsd_that_cannot_meet_the_slo_beside_the_routers_plan():
    from arbitrage_common.evaluation.analyze import plan_savings

    entry = {"rsd_target_fraction": 0.9, "oracle_target_fraction": 0.1}  # no-load p95: RSD ~460 ms, bound ~230 ms
    out = plan_savings(_small_profile(), entry, rate=2.0, slo_ms=300)
    assert out["rsd"]["unreachable"].startswith("--slo-ms: p95 300 ms is not reachable")
    assert out["bound"]["replicas"] == {"draft": 1, "router": 1, "target": 1}
    assert "target_replicas_saved_vs_rsd" not in out["bound"]  # nothing planned to save against


def test_plan_savings_fails_only_when_nothing_can_be_planned():
    from arbitrage_common.evaluation.analyze import plan_savings

    with pytest.raises(ValueError, match="neither RSD nor a router can be planned: rsd: .*; bound: "):
        plan_savings(_small_profile(), {"rsd_target_fraction": 0.9, "oracle_target_fraction": 0.1}, 2.0, 100)


@pytest.mark.parametrize("cores,warned", [(None, False), (2.0, True), ("calibrated", False)])
def test_analyze_with_a_profile_warns_of_an_uncalibrated_cpu_profile(tmp_path, capsys, cores, warned):
    """As `plan` does: a CPU profile `plan check` has not calibrated plans optimistically."""
    import dataclasses
    import json

    from arbitrage_common.cli.main import main

    prof = _small_profile()
    if cores is not None:
        measured = {"scaled_by": 1.1} if cores == "calibrated" else {}
        prof = dataclasses.replace(prof, cores=2.0, measured=measured)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof.as_dict()))
    rows = [{"problem_id": i // 2, "problem": "P", "history": [], "draft_step": "d", "advantage": adv,
             "prm_draft": prm, "label": 0} for i, (prm, adv) in enumerate([(0.1, 0.4), (0.2, 0.0), (0.8, 0.0),
                                                                          (0.9, 0.0)])]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["analyze", "--data", str(data), "--profile", str(path), "--rate", "1", "--slo-ms", "2000"]) == 0
    out, err = capsys.readouterr()
    planned = json.loads(out)["planned"]
    assert "bound" in planned
    if warned:
        assert planned["profile_warning"].startswith(f"{path} is an uncalibrated CPU profile")
        assert f"warning: {path} is an uncalibrated CPU profile" in err
    else:
        assert planned["profile_warning"] is None and "warning" not in err


def _saturating_profile():
    """Only the target pool takes time (100 ms a call, one at a time): at 19.4 req/s RSD at a target
    fraction of 0.5 keeps its one replica at load 0.97, past the planner's headroom."""
    from arbitrage_common.planning.model import ServiceCurve
    from arbitrage_common.planning.planner import Profile

    curves = {"draft": ServiceCurve(1, 0), "router": ServiceCurve(1, 0), "prm": ServiceCurve(1, 0),
              "target": ServiceCurve(100, 0)}
    return Profile(curves, dict.fromkeys(curves, 1), 0.0, 0.0, (1,), None, {})


def test_plan_savings_keeps_each_plans_predicted_p95_and_warnings():
    """Were dropped: a plan without headroom read as plain savings, with no p95."""
    from arbitrage_common.evaluation.analyze import plan_savings

    out = plan_savings(_saturating_profile(), {"rsd_target_fraction": 0.5, "oracle_target_fraction": 0.25},
                       rate=19.4, slo_ms=1e6)
    assert out["rsd"]["headroom_warning"].startswith("no headroom: pool target is at load 0.970")
    assert out["bound"]["headroom_warning"] is None
    for name in ("rsd", "bound"):
        assert out[name]["predicted_p95_ms"] > 0 and out[name]["stalled_pools"] == {}
        assert out[name]["sampling_warning"] is None  # an SLO far above the p95 holds at every seed


def test_analyze_with_a_profile_warns_of_a_plan_without_headroom(tmp_path, capsys):
    import json

    from arbitrage_common.cli.main import main

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_saturating_profile().as_dict()))
    # RSD at threshold 0.5 sends the two rows under it to the target (0.5); one of them improves (0.25)
    rows = [{"problem_id": i // 2, "problem": "P", "history": [], "draft_step": "d", "advantage": adv,
             "prm_draft": prm, "label": 0} for i, (prm, adv) in enumerate([(0.1, 0.4), (0.2, 0.0), (0.8, 0.0),
                                                                          (0.9, 0.0)])]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["analyze", "--data", str(data), "--profile", str(path), "--rate", "19.4",
                 "--slo-ms", "1000000"]) == 0
    out, err = capsys.readouterr()
    planned = json.loads(out)["planned"]
    assert planned["rsd"]["headroom_warning"].startswith("no headroom: pool target")
    assert "warning: planned.rsd: no headroom: pool target is at load 0.970" in err
    assert "planned.bound" not in err

