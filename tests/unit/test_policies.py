import math

import pytest

from arbitrage_common.errors import InvalidArgument
from arbitrage_common.policies import POLICIES, POLICY_NAMES, make_policy


def test_registry_names_and_specs():
    assert POLICY_NAMES == ("draft", "target", "rsd", "arbitrage", "oracle", "random")
    specs = {name: POLICIES[name].describe() for name in POLICY_NAMES}  # as the coordinator lists models
    assert all(spec["name"] == name for name, spec in specs.items())
    assert specs["oracle"]["threshold_range"] == [-1.0, 1.0]
    assert specs["oracle"]["default_threshold"] == 0.0
    assert specs["oracle"]["runs_both"] is True
    assert specs["rsd"]["scorer"] == "prm"
    assert specs["arbitrage"]["scorer"] == "router"
    assert specs["draft"]["threshold_range"] is None


def test_defaults():
    assert make_policy("rsd").threshold == 0.5
    assert make_policy("arbitrage").threshold == 0.5
    assert make_policy("oracle").threshold == 0.0
    assert make_policy("random").threshold == 0.5
    # draft/target take no threshold; a given one is ignored
    assert make_policy("draft", 0.3).threshold is None
    assert make_policy("target").threshold is None


def test_fixed_policies():
    assert make_policy("draft").route_to_target() is False
    assert make_policy("target").route_to_target() is True


def test_rsd_keeps_draft_at_or_above_threshold():
    p = make_policy("rsd", 0.6)
    assert p.route_to_target(0.6) is False
    assert p.route_to_target(0.9) is False
    assert p.route_to_target(0.59) is True


def test_arbitrage_routes_strictly_above_threshold():
    p = make_policy("arbitrage", 0.7)
    assert p.route_to_target(0.7) is False
    assert p.route_to_target(0.71) is True
    assert p.route_to_target(0.1) is False


def test_oracle_on_advantage():
    p = make_policy("oracle", -0.2)
    assert p.route_to_target(-0.1) is True
    assert p.route_to_target(-0.2) is False
    assert make_policy("oracle").route_to_target(0.0) is False


def test_random_policy_without_a_seed_routes_as_seed_0_every_time():
    """An unset seed is 0 (as for sampling): the same request routes the same way each time."""
    def routes(policy):
        return [policy.route_to_target() for _ in range(64)]

    unset = [routes(make_policy("random", 0.5)) for _ in range(3)]
    zero = routes(make_policy("random", 0.5, seed=0))
    assert unset[0] == unset[1] == unset[2] == zero and 0 < sum(zero) < 64


@pytest.mark.parametrize("seed", [True, 1.5, "7"])
def test_random_refuses_a_seed_that_is_not_an_integer(seed):
    """A bool is an int to Python but no seed a client meant: refused, naming the field."""
    with pytest.raises(InvalidArgument) as err:
        make_policy("random", 0.5, seed=seed)
    assert err.value.field == "seed"


def test_random_is_seeded_and_respects_extremes():
    p1, p2 = make_policy("random", 0.5, seed=7), make_policy("random", 0.5, seed=7)
    seq1 = [p1.route_to_target() for _ in range(50)]
    seq2 = [p2.route_to_target() for _ in range(50)]
    assert seq1 == seq2
    assert 10 < sum(seq1) < 40
    never, always = make_policy("random", 0.0, seed=1), make_policy("random", 1.0, seed=1)
    assert not any(never.route_to_target() for _ in range(100))
    assert all(always.route_to_target() for _ in range(100))


def test_unknown_policy():
    with pytest.raises(InvalidArgument) as err:
        make_policy("greedy")
    assert err.value.field == "policy"
    assert "greedy" in str(err.value) and "arbitrage" in str(err.value)


@pytest.mark.parametrize("name,value", [("rsd", 1.5), ("rsd", -0.01), ("arbitrage", 2), ("random", -1),
                                        ("oracle", 1.01), ("oracle", math.nan), ("rsd", math.inf),
                                        ("rsd", "0.5"), ("rsd", True)])
def test_threshold_out_of_range(name, value):
    with pytest.raises(InvalidArgument) as err:
        make_policy(name, value)
    assert err.value.field == "threshold"
    assert str(err.value).startswith("threshold: must be")
    assert f"'{name}'" in str(err.value)


def test_threshold_message_names_range():
    with pytest.raises(InvalidArgument, match=r"^threshold: must be in \[0, 1\] for policy 'rsd', got 1.5$"):
        make_policy("rsd", 1.5)
    assert make_policy("oracle", -1).threshold == -1.0


def test_scored_policy_without_score_is_a_programming_error():
    with pytest.raises(TypeError):
        make_policy("rsd").route_to_target(None)
