"""Router rows from oracle(0) reply steps (pure: no service)."""
from arbitrage_common.training.remote_router_data import OracleStep, rows_from_oracle


def test_rows_rebuild_history_draft_steps_and_labels():
    steps = [OracleStep("d0", "draft", 0.0, None), OracleStep("t1", "target", 0.9, "d1"),
             OracleStep("d2", "draft", 0.05, None), OracleStep("t3", "target", 0.4, None)]
    rows = rows_from_oracle(7, "P", steps, label_margin=0.1)
    # The last step lost its draft text: no row for it (never a guessed draft step).
    assert [r["draft_step"] for r in rows] == ["d0", "d1", "d2"]
    assert [r["label"] for r in rows] == [0, 1, 0] and [r["advantage"] for r in rows] == [0.0, 0.9, 0.05]
    assert rows[2]["history"] == [["d0", "draft"], ["t1", "target"]]
    assert rows[1]["target_step"] == "t1" and rows[0]["target_step"] is None
    assert {r["problem_id"] for r in rows} == {7} and [r["step_index"] for r in rows] == [0, 1, 2]
    assert all(r["draft_correct"] is None for r in rows)


def test_unscored_steps_make_no_rows_but_stay_in_history():
    rows = rows_from_oracle(0, "P", [OracleStep("a", "draft", None, None), OracleStep("b", "draft", 0.0, None)])
    assert len(rows) == 1 and rows[0]["history"] == [["a", "draft"]]


def test_rows_carry_both_prm_scores_when_the_reply_sends_the_draft_score():
    steps = [OracleStep("t0", "target", 0.5, "d0", draft_score=0.25), OracleStep("d1", "draft", -0.125, None, 0.75)]
    rows = rows_from_oracle(0, "P", steps)
    assert [(r["prm_draft"], r["prm_target"]) for r in rows] == [(0.25, 0.75), (0.75, 0.625)]
    assert [r["label"] for r in rows] == [1, 0]  # the paper's label: 1[advantage > 0]
    assert rows_from_oracle(0, "P", [OracleStep("a", "draft", 0.0, None)])[0]["prm_draft"] is None
