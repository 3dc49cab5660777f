"""The payoff arithmetic: the speedup curve of Arbitrage over RSD, its summary, the oracle
bound, RSD's waste and the savings bound, on hand-built sweep points."""
import pytest

from arbitrage_common.evaluation import payoff
from arbitrage_common.evaluation.sweep import SweepPoint


def _pt(policy, threshold, accuracy, target_step_fraction, latency_s_mean):
    return SweepPoint(policy=policy, threshold=threshold, accuracy=accuracy, acceptance_rate=0.5,
                      target_step_fraction=target_step_fraction, latency_s_mean=latency_s_mean, n=100)


# Accuracy levels: RSD reaches 0.6, 0.8 and 0.9; Arbitrage 0.6 and 0.8 (so 0.9 is RSD's only).
# At 0.8 Arbitrage's cheapest-latency point (0.2) and its fewest-target-steps point (0.05) differ.
DRAFT = _pt("draft", None, 0.5, 0.0, 1.0)
TARGET = _pt("target", None, 0.81, 1.0, 4.0)
RSD = [_pt("rsd", 0.3, 0.6, 0.4, 2.0), _pt("rsd", 0.5, 0.8, 0.6, 3.0), _pt("rsd", 0.7, 0.9, 0.8, 3.6)]
ARB = [_pt("arbitrage", 0.1, 0.6, 0.1, 1.5), _pt("arbitrage", 0.2, 0.8, 0.3, 2.0),
       _pt("arbitrage", 0.05, 0.8, 0.25, 2.4)]
ORACLE = [_pt("oracle", 0.0, 0.6, 0.05, 1.2)]  # reaches 0.6 only
POINTS = [DRAFT, TARGET, *RSD, *ARB, *ORACLE]

LEVEL_06 = {"accuracy_level": 0.6, "latency_ratio": 1.333, "target_steps_ratio": 4.0,
            "rsd_threshold": 0.3, "arbitrage_threshold": 0.1}
LEVEL_08 = {"accuracy_level": 0.8, "latency_ratio": 1.5, "target_steps_ratio": 2.4,
            "rsd_threshold": 0.5, "arbitrage_threshold": 0.2}


def test_curve_has_only_levels_both_policies_reach():
    curve = payoff.speedup_curve(POINTS)
    assert [r["accuracy_level"] for r in curve] == [0.6, 0.8]


def test_curve_ratios_at_each_level():
    assert payoff.speedup_curve(POINTS) == [LEVEL_06, LEVEL_08]


def test_cheapest_latency_and_fewest_target_steps_are_different_points():
    by_latency = payoff.cheapest(POINTS, "arbitrage", 0.8)
    by_steps = payoff.cheapest(POINTS, "arbitrage", 0.8, "target_step_fraction")
    assert (by_latency.threshold, by_steps.threshold) == (0.2, 0.05)
    # the ratio's latency uses the 2.0 s point, its target steps the 0.25 point: 0.6 / 0.25
    assert payoff.ratio_at(POINTS, 0.8)["target_steps_ratio"] == 2.4
    assert payoff.ratio_at(POINTS, 0.8)["arbitrage_threshold"] == 0.2


def test_cheapest_is_none_when_the_policy_reaches_no_level():
    assert payoff.cheapest(POINTS, "arbitrage", 0.9) is None


def test_ratio_at_is_none_when_one_policy_does_not_reach_the_level():
    assert payoff.ratio_at(POINTS, 0.9) is None


def test_curve_is_empty_without_arbitrage_points():
    assert payoff.speedup_curve([DRAFT, TARGET, *RSD]) == []


def test_summary_maxima_come_from_different_levels():
    summary = payoff.speedup_summary(POINTS)
    assert summary["max_latency_ratio"] == LEVEL_08
    assert summary["max_target_steps_ratio"] == LEVEL_06


def test_summary_at_target_minus_one_point():
    # target 0.81 - 0.01 = 0.8
    assert payoff.speedup_summary(POINTS)["at_target_minus_1pt"] == LEVEL_08


def test_summary_at_draft_target_midpoint():
    # (0.5 + 0.81) / 2 = 0.655 lies between the 0.6 and 0.8 points: 27.5% of the way on each
    # frontier. Latency: RSD 2.0 + 0.275 * 1.0 = 2.275 s, Arbitrage 1.5 + 0.275 * 0.5 = 1.6375 s.
    # Target steps: RSD 0.4 + 0.275 * 0.2 = 0.455, Arbitrage 0.1 + 0.275 * 0.15 = 0.14125.
    # The thresholds are the cheapest points reaching the level (RSD 0.5, Arbitrage 0.2).
    assert payoff.speedup_summary(POINTS)["at_midpoint"] == {
        "accuracy_level": 0.655, "latency_ratio": 1.389, "target_steps_ratio": 3.221,
        "rsd_threshold": 0.5, "arbitrage_threshold": 0.2}


def test_cost_at_interpolates_on_the_frontier_only():
    assert payoff.cost_at(POINTS, "rsd", 0.7) == pytest.approx(2.5)       # halfway from 2.0 s to 3.0 s
    assert payoff.cost_at(POINTS, "rsd", 0.55) == 2.0                    # below the cheapest point: its cost
    assert payoff.cost_at(POINTS, "rsd", 0.95) is None                   # past the best point
    # Arbitrage's 2.4 s point reaches 0.8 like the 2.0 s one: not on the latency frontier.
    assert [p.threshold for p in payoff.frontier(POINTS, "arbitrage", "latency_s_mean")] == [0.1, 0.2]


def test_summary_without_draft_and_target_points_has_no_headline_levels():
    summary = payoff.speedup_summary([*RSD, *ARB])
    assert summary["at_target_minus_1pt"] is None
    assert summary["at_midpoint"] is None
    assert summary["curve"] == [LEVEL_06, LEVEL_08]


def test_oracle_bound_skips_levels_the_oracle_does_not_reach():
    table = payoff.oracle_bound(POINTS, [0.6, 0.8])
    assert [r["accuracy_level"] for r in table] == [0.6]


def test_oracle_bound_realised_share():
    # (RSD - Arbitrage) / (RSD - oracle) = (0.4 - 0.1) / (0.4 - 0.05) = 0.857; 0.4 / 0.05 = 8
    assert payoff.oracle_bound(POINTS, [0.6]) == [{
        "accuracy_level": 0.6, "rsd_target_fraction": 0.4, "oracle_target_fraction": 0.05,
        "arbitrage_target_fraction": 0.1, "oracle_target_steps_ratio": 8.0, "realised_share": 0.857}]


def test_pooled_share_weights_levels_by_the_oracles_saving():
    # Level 0.6: RSD 0.5, oracle 0.1, Arbitrage 0.2 (saves 0.3 of 0.4). Level 0.7: RSD 0.62,
    # oracle 0.6, Arbitrage 0.7 (share -4 on a 0.02 gap). Pooled: (0.3 - 0.08) / 0.42.
    points = [_pt("rsd", 0.5, 0.6, 0.5, 2.0), _pt("oracle", 0.0, 0.6, 0.1, 2.0), _pt("arbitrage", 0.3, 0.6, 0.2, 1.8),
              _pt("rsd", 0.6, 0.7, 0.62, 2.2), _pt("oracle", -0.1, 0.7, 0.6, 2.0),
              _pt("arbitrage", 0.2, 0.7, 0.7, 2.1)]
    table = payoff.oracle_bound(points, [0.6, 0.7])
    assert [r["realised_share"] for r in table] == [0.75, -4.0]
    assert payoff.bound_summary(points)["realised_share_pooled"] == 0.524


def test_realised_share_is_none_when_rsd_and_oracle_fractions_are_equal():
    points = [_pt("rsd", 0.5, 0.7, 0.4, 2.0), _pt("oracle", 0.0, 0.7, 0.4, 2.0),
              _pt("arbitrage", 0.3, 0.7, 0.3, 1.8)]
    (row,) = payoff.oracle_bound(points, [0.7])
    assert row["realised_share"] is None
    assert row["oracle_target_steps_ratio"] == 1.0


def test_bound_summary():
    summary = payoff.bound_summary(POINTS)
    assert [r["accuracy_level"] for r in summary["table"]] == [0.6]
    assert summary["max_oracle_saving"]["oracle_target_steps_ratio"] == 8.0
    # the maximum latency ratio is at 0.8, which the oracle does not reach
    assert summary["at_max_latency_ratio"] is None
    assert summary["realised_share_pooled"] == 0.857  # one level: its own share


def test_waste_is_the_share_of_calls_that_improve_nothing():
    assert payoff.waste([True, False, False, False]) == 0.75
    assert payoff.waste([True, True]) == 0.0


def test_waste_of_no_calls_is_none():
    assert payoff.waste([]) is None


def test_savings_bound():
    assert payoff.savings_bound(0.6) == 2.5
    assert payoff.savings_bound(0.0) == 1.0


@pytest.mark.parametrize("share", [None, 1.0])
def test_savings_bound_is_none_without_a_finite_bound(share):
    assert payoff.savings_bound(share) is None


def test_spearman_note():
    assert payoff.spearman_note(0.2) == {"spearman": 0.2, "paper": "0.13-0.17", "beats_paper": True}
    assert payoff.spearman_note(0.15)["beats_paper"] is False
    assert payoff.spearman_note(None)["beats_paper"] is None


def test_bound_keeps_a_level_that_rounds_up():
    # 200/300 shows as 0.6667, which its own points miss: the bound must use the exact level.
    points = [_pt("rsd", 0.5, 200 / 300, 0.6, 2.0), _pt("arbitrage", 0.5, 200 / 300, 0.3, 1.0),
              _pt("oracle", 0.0, 200 / 300, 0.1, 1.0)]
    table = payoff.bound_summary(points)["table"]
    assert [(r["accuracy_level"], r["oracle_target_steps_ratio"], r["realised_share"]) for r in table] == [
        (0.6667, 6.0, 0.6)]


def test_curve_leaves_out_levels_near_the_drafts_own_accuracy():
    # ... or beat it by less than one point (one lucky problem at n = 200).
    points = [_pt("draft", None, 0.5, 0.0, 1.0), _pt("rsd", 0.1, 0.5, 0.4, 2.0), _pt("arbitrage", 0.1, 0.505, 0.2, 1.5),
              _pt("rsd", 0.5, 0.7, 0.6, 3.0), _pt("arbitrage", 0.5, 0.7, 0.3, 2.0)]
    assert [r["accuracy_level"] for r in payoff.speedup_curve(points)] == [0.7]
