"""Load-aware thresholds (arbitrage_common.threshold_control): the control law with time passed in."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from arbitrage_common import config as C
from arbitrage_common.policies import POLICY_NAMES, make_policy
from arbitrage_common.threshold_control import (
    ADJUSTABLE_POLICIES,
    FEWER_TARGET_CALLS,
    REFERENCE_REQUEST_S,
    LoadController,
)

BUDGET = 400.0


def _spec(**kw) -> C.LoadControlSpec:
    return C.LoadControlSpec(**{"enabled": True, "latency_budget_ms": BUDGET, **kw})


def _ctl(**kw) -> LoadController:
    """An enabled controller whose first window opens at t = 0."""
    ctl = LoadController(_spec(**kw))
    ctl.update(0.0)
    return ctl


def _drive(ctl: LoadController, latency_ms: float, start: float, seconds: float, step: float = 0.1) -> float:
    """Latency samples every ``step`` seconds for ``seconds``; the time reached."""
    t = start
    for _ in range(round(seconds / step)):
        t = round(t + step, 6)
        ctl.observe_latency(latency_ms, t)
    return t


def _at(ctl: LoadController, t: float) -> float:
    ctl.update(t)
    return ctl.offset


def test_offset_rises_under_sustained_overload_and_falls_back_to_zero():
    ctl = _ctl()
    assert ctl.threshold_for("arbitrage", 0.5, 0.0) == 0.5
    offsets, t = [], 0.0
    for _ in range(5):
        t = _drive(ctl, 2 * BUDGET, t, 1.0)
        offsets.append(_at(ctl, t))
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert offsets[-1] == pytest.approx(5 * 0.05)  # error clamped to 1: gain per interval
    assert ctl.threshold_for("arbitrage", 0.5, t) == pytest.approx(0.75)
    t = _drive(ctl, 0.5 * BUDGET, t, 60.0)  # half the budget: error -0.5, decay 0.02 * 0.5 per interval
    assert ctl.offset == 0.0
    assert ctl.threshold_for("arbitrage", 0.5, t) == 0.5


def test_offset_never_leaves_its_bounds():
    ctl = _ctl(max_offset=0.2)
    t = _drive(ctl, 100 * BUDGET, 0.0, 30.0)
    assert ctl.offset == pytest.approx(0.2)
    assert ctl.threshold_for("arbitrage", 0.9, t) == 1.0  # base + offset, capped at the range
    assert ctl.threshold_for("rsd", 0.1, t) == 0.0
    _drive(ctl, 0.0, t, 120.0)
    assert ctl.offset == 0.0


def _floats(lo: float, hi: float):
    # No subnormals: a model test earlier in the session may have set torch's flush-denormal
    # mode, under which hypothesis refuses to generate them.
    return st.floats(lo, hi, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(samples=st.lists(st.tuples(_floats(0, 50), _floats(0, 5000), st.integers(0, 64)), max_size=60),
       base=_floats(0, 1), max_offset=_floats(0.01, 1), limit=_floats(0, 1), gain=_floats(0.01, 1))
def test_thresholds_stay_within_range_bounds_and_never_toward_more_target_calls(samples, base, max_offset, limit,
                                                                                gain):
    spec = _spec(max_offset=max_offset, gain=gain, decay=gain, in_flight_budget=8,
                 threshold_limits={"arbitrage": limit, "rsd": limit})
    ctl, t = LoadController(spec), 0.0
    for dt, latency, in_flight in samples:
        t += dt
        ctl.observe_in_flight(in_flight, t)
        ctl.observe_latency(latency, t)
        assert 0.0 <= ctl.offset <= max_offset
        up, down = ctl.threshold_for("arbitrage", base, t), ctl.threshold_for("rsd", base, t)
        assert base <= up <= 1.0 and (up == pytest.approx(base) or up <= limit + 1e-9)
        assert 0.0 <= down <= base and (down == pytest.approx(base) or down >= limit - 1e-9)
        assert up - base <= max_offset + 1e-6 and base - down <= max_offset + 1e-6


def test_within_the_deadband_the_offset_holds():
    ctl = _ctl(deadband=0.1)
    t = _drive(ctl, 2 * BUDGET, 0.0, 3.0)
    held = ctl.offset
    assert held > 0
    for latency in (1.08 * BUDGET, 0.92 * BUDGET, BUDGET):
        ctl.observe_latency(latency, t)  # pull the EWMA into the band before the next windows
        for _ in range(40):
            ctl.observe_latency(latency, t)
        t = _drive(ctl, latency, t, 5.0)
        assert ctl.offset == pytest.approx(held)
    t = _drive(ctl, 1.2 * BUDGET, t, 5.0)  # out of the band: moves again
    assert ctl.offset > held


def test_updates_are_rate_limited_to_one_per_interval():
    ctl = _ctl(interval_s=2.0)
    ctl.update(0.0)
    for i in range(1, 200):  # 1.99 s of heavy overload and many admissions: no update yet
        ctl.observe_latency(10 * BUDGET, i * 0.01)
        assert ctl.threshold_for("arbitrage", 0.5, i * 0.01) == 0.5
    assert ctl.offset == 0.0 and ctl.snapshot()["updates"] == 0
    ctl.observe_latency(10 * BUDGET, 2.0)
    assert ctl.offset == pytest.approx(0.05) and ctl.snapshot()["updates"] == 1
    for i in range(1, 100):
        ctl.observe_latency(10 * BUDGET, 2.0 + i * 0.02)
    assert ctl.offset == pytest.approx(0.05)
    assert _at(ctl, 4.0) == pytest.approx(0.10)


def test_missed_intervals_count_but_idle_only_decays():
    ctl = _ctl(max_offset=0.3, decay=0.02)
    t = _drive(ctl, 10 * BUDGET, 0.0, 6.0)
    assert ctl.offset == pytest.approx(0.3)
    # The last sample (at t) opened [t, t+1): busy. Then no target call until t+5: four idle
    # intervals (error -1 each), and the stale EWMA is forgotten.
    assert _at(ctl, t + 5.0) == pytest.approx(0.3 - 4 * 0.02)
    assert ctl.latency_ewma_ms is None and ctl.snapshot()["error"] == -1.0
    assert _at(ctl, t + 1000.0) == 0.0


def test_a_window_busy_only_at_its_start_is_not_busy_throughout():
    ctl = _ctl(gain=0.05, decay=0.02)
    ctl.observe_latency(2 * BUDGET, 0.5)     # one overloaded sample, then silence for 9.5 s
    assert _at(ctl, 10.0) == 0.0                        # up 0.05 once, then nine idle intervals down
    ctl = _ctl(gain=0.2, decay=0.02)
    ctl.observe_latency(2 * BUDGET, 0.5)
    assert _at(ctl, 3.0) == pytest.approx(0.2 - 2 * 0.02)   # [0, 1) busy: up; [1, 3) idle: down twice


def test_calls_in_flight_without_completions_are_not_idle():
    ctl = _ctl()
    t = _drive(ctl, 2 * BUDGET, 0.0, 2.0)
    raised = ctl.offset
    ctl.call_started(t)  # one slow call, no completion for 3 s: the last latency stands
    assert _at(ctl, t + 3.0) > raised
    ctl.call_finished(t, t + 3.5, sample=False)  # cancelled: counted out, no sample
    assert ctl.in_flight == 0 and ctl.latency_ewma_ms == pytest.approx(2 * BUDGET)


def test_in_flight_budget_uses_the_time_weighted_mean():
    ctl = LoadController(C.LoadControlSpec(enabled=True, in_flight_budget=4))
    ctl.observe_in_flight(0, 0.0)
    ctl.observe_in_flight(16, 0.5)   # 16 in flight for the second half: mean 8, twice the budget
    assert _at(ctl, 1.0) == pytest.approx(0.05)
    assert ctl.snapshot()["error"] == pytest.approx(1.0)
    ctl.observe_in_flight(4, 1.0)    # exactly on budget: holds
    assert _at(ctl, 2.0) == pytest.approx(0.05)
    ctl.observe_in_flight(0, 2.0)    # none in flight, no samples: idle
    assert _at(ctl, 3.0) == pytest.approx(0.03)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 32), budget=st.integers(1, 32),
       gaps=st.lists(_floats(0.01, 3.7), min_size=1, max_size=40))
def test_q_is_the_time_weighted_mean_whenever_the_updates_fall(n, budget, gaps):
    """``n`` calls in flight the whole time: Q is ``n`` at every update, however sparse or
    off the interval grid the events are (the area and the span cover the same time)."""
    ctl = LoadController(C.LoadControlSpec(enabled=True, in_flight_budget=budget))
    ctl.observe_in_flight(n, 0.0)
    t, updates = 0.0, 0
    for gap in gaps:
        t += gap
        ctl.update(t)
        if ctl.snapshot()["updates"] > updates:
            updates = ctl.snapshot()["updates"]
            assert ctl.snapshot()["error"] == pytest.approx(min(1.0, max(-1.0, n / budget - 1)))


def test_load_on_the_in_flight_budget_holds_the_offset_with_sparse_events():
    # 8 in flight all along against a budget of 16: error -0.5 at every update, never a raise.
    ctl = LoadController(C.LoadControlSpec(enabled=True, in_flight_budget=16))
    ctl.observe_in_flight(8, 0.0)
    for t in (1.95, 2.0, 3.95, 4.0, 5.9, 7.85):
        ctl.update(t)
        assert ctl.snapshot()["error"] == pytest.approx(-0.5) and ctl.offset == 0.0
    # One target call always in flight at a budget of 1: on budget, so a raised offset holds.
    ctl = LoadController(C.LoadControlSpec(enabled=True, in_flight_budget=1, max_offset=0.3))
    ctl.observe_in_flight(2, 0.0)          # twice the budget for 3 s: up 0.05 per interval
    ctl.observe_in_flight(1, 3.0)
    held = ctl.offset
    assert held == pytest.approx(0.15)
    for k in range(1, 40):                 # events every 0.7 s, off the 1 s grid
        assert _at(ctl, 3.0 + 0.7 * k) == pytest.approx(held)


def test_call_helpers_count_in_flight_and_time_calls():
    ctl = _ctl(latency_alpha=1.0)
    ctl.call_started(0.0)
    ctl.call_started(0.1)
    assert ctl.in_flight == 2
    ctl.call_finished(0.0, 0.3)
    assert ctl.in_flight == 1 and ctl.latency_ewma_ms == pytest.approx(300.0)
    ctl.call_finished(0.1, 0.9)
    assert ctl.in_flight == 0 and ctl.latency_ewma_ms == pytest.approx(800.0)


def test_a_negative_in_flight_count_counts_as_zero():
    """A count that went below zero (a finish reported twice) is 0, never a negative load."""
    ctl = _ctl()
    ctl.observe_in_flight(-3, 0.5)
    assert ctl.in_flight == 0
    ctl.call_finished(0.5, 0.6, sample=False)
    assert ctl.in_flight == 0


def test_request_durations_are_averaged_with_the_documented_weight():
    """``D`` is an EWMA with weight 0.2 per ended request: 10 s then 20 s gives
    0.8 * 10 + 0.2 * 20 = 12 s (the first duration is taken as is)."""
    ctl = _ctl()
    ctl.observe_request(10.0, 0.0)
    assert ctl.request_s_ewma == pytest.approx(10.0)
    ctl.observe_request(20.0, 0.0)
    assert ctl.request_s_ewma == pytest.approx(12.0)


def test_a_partly_idle_window_averages_in_flight_over_its_busy_time():
    """Q is the in-flight integral over the window's busy span: 8 calls for half of a 1 s
    window is a mean of 4 (error -0.5 against 8); with the update only at t = 3, the same
    half second over the one busy interval is again a mean of 4 (twice a budget of 2: up
    0.05), and the two idle intervals after it decay 0.02 each."""
    ctl = LoadController(C.LoadControlSpec(enabled=True, in_flight_budget=8))
    ctl.observe_in_flight(8, 0.0)
    ctl.observe_in_flight(0, 0.5)
    assert _at(ctl, 1.0) == 0.0 and ctl.snapshot()["error"] == pytest.approx(-0.5)
    ctl = LoadController(C.LoadControlSpec(enabled=True, in_flight_budget=2))
    ctl.observe_in_flight(8, 0.0)
    ctl.observe_in_flight(0, 0.5)
    assert _at(ctl, 3.0) == pytest.approx(0.05 - 2 * 0.02)


def test_latency_exactly_on_the_deadband_edges_holds_the_offset():
    """The deadband is closed: ``|e| == deadband`` holds. 0.25 and budgets of 400 are exact
    in binary, so e is exactly +-0.25 at 500 and 300 ms."""
    ctl = _ctl(deadband=0.25, latency_alpha=1.0)
    ctl.observe_latency(2 * BUDGET, 0.5)
    held = _at(ctl, 1.0)
    assert held == pytest.approx(0.05)
    for t, latency, error in ((1.0, 500.0, 0.25), (2.0, 300.0, -0.25)):
        ctl.observe_latency(latency, t + 0.5)
        assert _at(ctl, t + 1.0) == held
        assert ctl.snapshot()["error"] == error


def test_bad_latency_samples_are_ignored():
    ctl = _ctl()
    for bad in (float("nan"), float("inf"), -1.0, True):
        ctl.observe_latency(bad, 0.5)
    assert ctl.latency_ewma_ms is None


@pytest.mark.parametrize("name", ADJUSTABLE_POLICIES)
def test_the_offset_means_fewer_target_calls_for_each_policy(name):
    ctl = _ctl()
    t = _drive(ctl, 2 * BUDGET, 0.0, 4.0)
    base = 0.5
    used = ctl.threshold_for(name, base, t)
    assert (used - base) * FEWER_TARGET_CALLS[name] == pytest.approx(ctl.offset)
    assert used == (0.7 if name == "arbitrage" else 0.3)
    scores = [i / 100 for i in range(101)]
    at_base = [s for s in scores if make_policy(name, base).route_to_target(s)]
    at_used = [s for s in scores if make_policy(name, used).route_to_target(s)]
    assert set(at_used) < set(at_base)  # strictly fewer steps to the target, and no new ones


@pytest.mark.parametrize("name", sorted(set(POLICY_NAMES) - set(ADJUSTABLE_POLICIES)))
def test_other_policies_keep_their_threshold(name):
    ctl = _ctl()
    t = _drive(ctl, 10 * BUDGET, 0.0, 5.0)
    assert ctl.offset > 0
    base = make_policy(name).threshold  # None for draft / target
    assert ctl.threshold_for(name, base, t) == base
    assert not ctl.applies(name)


def test_an_explicit_client_threshold_is_honoured():
    ctl = _ctl()
    t = _drive(ctl, 10 * BUDGET, 0.0, 5.0)
    assert ctl.threshold_for("arbitrage", 0.5, t, explicit=True) == 0.5
    assert ctl.threshold_for("rsd", 0.5, t, explicit=True) == 0.5
    assert ctl.threshold_for("arbitrage", 0.5, t) > 0.5


def test_off_or_not_listed_means_unchanged():
    off = LoadController(C.LoadControlSpec())
    _drive(off, 10 * BUDGET, 0.0, 5.0)
    assert off.threshold_for("arbitrage", 0.5, 5.0) == 0.5
    only_rsd = _ctl(policies=["rsd"])
    t = _drive(only_rsd, 10 * BUDGET, 0.0, 5.0)
    assert only_rsd.threshold_for("arbitrage", 0.5, t) == 0.5
    assert only_rsd.threshold_for("rsd", 0.5, t) < 0.5


def test_threshold_limits_bound_the_move_and_never_reverse_it():
    ctl = _ctl(max_offset=0.5, threshold_limits={"arbitrage": 0.8, "rsd": 0.25})
    t = _drive(ctl, 10 * BUDGET, 0.0, 20.0)
    assert ctl.offset == pytest.approx(0.5)
    assert ctl.threshold_for("arbitrage", 0.5, t) == 0.8
    assert ctl.threshold_for("rsd", 0.5, t) == 0.25
    assert ctl.threshold_for("arbitrage", 0.9, t) == 0.9   # already past the limit: left alone
    assert ctl.threshold_for("rsd", 0.1, t) == 0.1


def test_closed_loop_settles_on_the_budget_then_returns_when_load_falls():
    """A fake target pool: steps arrive at ``rate``/s, router scores uniform, arbitrage sends
    the share above the threshold; latency = 100 ms / (1 - utilisation). Overloaded at the base
    threshold; the controller must settle with latency inside the deadband, without cycling."""
    spec = _spec(max_offset=0.4)
    ctl, t, capacity = LoadController(spec), 0.0, 4.0
    history = []

    def latency(rate: float, threshold: float) -> float:
        utilisation = rate * (1.0 - threshold) / capacity
        return min(5000.0, 100.0 / max(0.02, 1.0 - utilisation))

    for rate, seconds in ((10.0, 90.0), (4.0, 90.0)):
        for _ in range(round(seconds / 0.1)):
            t = round(t + 0.1, 6)
            threshold = ctl.threshold_for("arbitrage", 0.5, t)
            ctl.observe_latency(latency(rate, threshold), t)
            history.append((rate, ctl.offset, latency(rate, threshold)))
        if rate == 10.0:
            assert latency(rate, 0.5) > 2 * BUDGET  # the pool is really overloaded at the base
            tail = history[-300:]  # the last 30 s at the high rate
            offsets = [o for _, o, _ in tail]
            assert max(offsets) - min(offsets) < 0.02
            assert all(0.85 * BUDGET <= lat <= 1.15 * BUDGET for _, _, lat in tail)
    assert ctl.offset == 0.0  # load fell: back to the base threshold


def test_config_default_is_off_and_not_rendered():
    cfg = C.default_config()
    assert cfg.policy.load_control == C.LoadControlSpec() and not cfg.policy.load_control.enabled
    assert cfg.policy.load_control.policies == ("arbitrage", "rsd")
    assert "load_control" not in C.render_serve_config(cfg)["applications"][0]["args"]["policy"]


def test_config_enabled_renders_and_round_trips():
    cfg = C.default_config()
    lc = _spec(in_flight_budget=8, threshold_limits={"arbitrage": 0.9})
    on = cfg.model_copy(update={"policy": C.PolicySpec(load_control=lc)})
    args = C.render_serve_config(on)["applications"][0]["args"]
    assert args["policy"]["load_control"]["latency_budget_ms"] == BUDGET
    assert C.AppConfig.model_validate(args).policy.load_control == lc


@pytest.mark.parametrize(("kw", "field"), [
    ({"enabled": True}, "latency_budget_ms / in_flight_budget"),
    ({"policies": ["random"]}, "policies: 'random'"),
    ({"policies": ["oracle"]}, "policies: 'oracle'"),
    ({"policies": ["rsd", "rsd"]}, "policies: lists a policy twice"),
    ({"enabled": True, "latency_budget_ms": 100, "policies": []}, "policies: an enabled"),
    ({"threshold_limits": {"draft": 0.5}}, "threshold_limits: 'draft'"),
    ({"threshold_limits": {"rsd": 1.5}}, "threshold_limits.rsd"),
    ({"gain": 0}, "load_control.gain"),
    ({"decay": 2}, "load_control.decay"),
    ({"deadband": 1}, "load_control.deadband"),
    ({"max_offset": 0}, "load_control.max_offset"),
    ({"interval_s": 0}, "load_control.interval_s"),
    ({"latency_alpha": 0}, "load_control.latency_alpha"),
    ({"latency_budget_ms": -5}, "load_control.latency_budget_ms"),
    ({"in_flight_budget": 0}, "load_control.in_flight_budget"),
    ({"bogus": 1}, "load_control.bogus"),
])
def test_config_errors_name_the_field(kw, field):
    data = C.default_config().model_dump(mode="json")
    data["policy"]["load_control"] = kw
    with pytest.raises(ValidationError) as info:
        C.AppConfig.model_validate(data)
    assert field in str(info.value)


@pytest.mark.parametrize("seed", range(3))
def test_noisy_latency_does_not_make_it_cycle(seed):
    """The same fake pool with +-40% noise on every sample (seeded): the offset stays in a narrow
    band around its equilibrium and mean latency on budget."""
    import random

    rng, ctl, t, tail = random.Random(seed), _ctl(max_offset=0.4), 0.0, []
    for i in range(900):
        t = round(t + 0.1, 6)
        threshold = ctl.threshold_for("arbitrage", 0.5, t)
        utilisation = 10.0 * (1.0 - threshold) / 4.0
        sample = min(5000.0, 100.0 / max(0.02, 1.0 - utilisation)) * rng.uniform(0.6, 1.4)
        ctl.observe_latency(sample, t)
        if i >= 600:
            tail.append((ctl.offset, sample))
    offsets = [o for o, _ in tail]
    assert max(offsets) - min(offsets) < 0.03
    assert 0.9 * BUDGET <= sum(s for _, s in tail) / len(tail) <= 1.1 * BUDGET


def test_the_documented_example_config_is_valid():
    import re
    from pathlib import Path

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "SERVING.md").read_text()
    section = doc[doc.index("## Load-aware thresholds"):]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))
    data = C.default_config().model_dump(mode="json")
    data["policy"] = example["policy"]
    lc = C.AppConfig.model_validate(data).policy.load_control
    assert lc.enabled and lc.latency_budget_ms == 400 and lc.threshold_limits == {"arbitrage": 0.9}


# -- the target pool's autoscaler first (can_scale) ------------------------------------------


def test_while_the_target_pool_can_add_replicas_the_offset_only_falls():
    ctl = _ctl()
    t = _drive(ctl, 2 * BUDGET, 0.0, 4.0)
    raised = ctl.offset
    assert raised == pytest.approx(0.2)
    ctl.update(t, can_scale=True)            # the pool can grow: overload no longer raises it
    t = _drive(ctl, 2 * BUDGET, t, 5.0)
    assert ctl.offset == pytest.approx(raised - 5 * 0.02)  # each interval counted as idle
    assert ctl.snapshot()["error"] == pytest.approx(1.0) and ctl.snapshot()["can_scale"] == 1  # measured error kept
    t = _drive(ctl, 2 * BUDGET, t, 60.0)
    assert ctl.offset == 0.0
    ctl.update(t, can_scale=False)           # at its max: the controller sheds load again
    _drive(ctl, 2 * BUDGET, t, 2.0)
    assert ctl.offset == pytest.approx(0.1) and not ctl.can_scale


def _autoscaled_pool(demand: float, seconds: float = 600.0, max_replicas: int = 8):
    """The controller beside a target pool that autoscales on rows (Serve's rule: desired =
    ceil(rows / target_ongoing_requests), up after 5 s, down after 60 s). Demand: ``demand``
    rows/s at threshold 0.5, uniform router scores (threshold t sends demand * (1 - t) / 0.5);
    each replica serves 160 rows/s, latency 200 ms / (1 - utilisation); rows held = rate x
    latency (Little). ``can_scale`` as the coordinator computes it from ``serve.status()``.
    Returns (time, replicas, offset, latency ms) every 0.1 s."""
    ctl = LoadController(C.LoadControlSpec(enabled=True, latency_budget_ms=300.0, max_offset=0.3))
    replicas, wanted, since, t, history = 4, None, 0.0, 0.0, []
    for i in range(round(seconds / 0.1)):
        t = round(t + 0.1, 6)
        upscaling = wanted is not None and wanted > replicas
        ctl.update(t, can_scale=replicas < max_replicas or upscaling)
        rate = demand * (1 - ctl.threshold_for("arbitrage", 0.5, t)) / 0.5
        latency = 0.2 / (1 - min(0.98, rate / (replicas * 160.0)))
        ctl.observe_latency(latency * 1000, t)
        if i % 10 == 0:  # one autoscaling decision a second
            desired = max(1, min(max_replicas, math.ceil(rate * latency / 16.0)))
            if desired == replicas:
                wanted = None
            elif wanted is None or (desired > replicas) != (wanted > replicas):
                wanted, since = desired, t
            elif t - since >= (5.0 if desired > replicas else 60.0):
                replicas, wanted = desired, None
        history.append((t, replicas, ctl.offset, latency * 1000))
    return history


def test_the_offset_stays_zero_while_the_autoscaler_can_still_add_replicas():
    """Before the fix the controller cut the rows the autoscaler scales on, the pool shrank,
    latency rose and the offset rose with it: 2 of 8 replicas at offset 0.3. Now the pool grows
    to what its load needs and the threshold stays at its base."""
    history = _autoscaled_pool(demand=400.0)
    assert all(offset == 0.0 for _, replicas, offset, _ in history if replicas < 8)
    assert history[-1][1] == 8 and history[-1][2] == 0.0


def test_the_offset_sheds_only_load_that_the_pool_at_its_max_cannot_carry():
    history = _autoscaled_pool(demand=800.0)
    assert all(offset == 0.0 for t, replicas, offset, _ in history if t < 30 and replicas < 8)
    first_raise = next(t for t, _, offset, _ in history if offset > 0)
    assert next(t for t, replicas, _, _ in history if replicas == 8) <= first_raise
    tail = history[-1000:]   # settled: the pool at its max, latency held on the budget
    assert {replicas for _, replicas, _, _ in tail} == {8}
    assert all(0.85 * 300 <= latency <= 1.15 * 300 for *_, latency in tail)
    assert 0.1 < tail[-1][2] < 0.3


# -- long requests: the loop's delay is a request's duration ---------------------------------


def _requests_closed_loop(duration_s: float, seconds: float) -> list[tuple[float, float, float]]:
    """The fake pool of the closed-loop test, with requests as the coordinator runs them: one
    admitted every 0.1 s with the threshold of that moment, which acts on the target's load for
    ``duration_s`` (0: only the moment it is admitted); at its end the coordinator reports its
    duration. Returns (time, offset, latency ms) every 0.1 s."""
    ctl, t, active, total, history = _ctl(max_offset=0.4), 0.0, [], 0.0, []
    for _ in range(round(seconds / 0.1)):
        t = round(t + 0.1, 6)
        threshold = ctl.threshold_for("arbitrage", 0.5, t)
        active.append((t, threshold))
        total += threshold
        utilisation = 10.0 * (1.0 - total / len(active)) / 4.0
        latency = min(5000.0, 100.0 / max(0.02, 1.0 - utilisation))
        while active and active[0][0] <= t - duration_s + 1e-9:
            admitted, ended = active.pop(0)
            total -= ended
            ctl.observe_request(t - admitted, t)
        ctl.observe_latency(latency, t)
        history.append((t, ctl.offset, latency))
    return history


@pytest.mark.parametrize("duration_s", [0.0, 30.0, 60.0])
def test_requests_of_any_length_settle_on_the_budget_without_cycling(duration_s):
    """Unscaled, requests of 30 s made the offset cycle between 0.07 and 0.40 (a 55 s period):
    a threshold fixed at admission acts for a whole request. Gain and decay scaled by
    REFERENCE_REQUEST_S / duration keep the loop stable."""
    seconds = max(180.0, 10 * duration_s)
    tail = _requests_closed_loop(duration_s, seconds)[-round(seconds / 3 / 0.1):]
    offsets = [offset for _, offset, _ in tail]
    assert max(offsets) - min(offsets) < 0.02 and 0.1 < offsets[-1] < 0.3
    assert all(0.85 * BUDGET <= latency <= 1.15 * BUDGET for *_, latency in tail)


def test_gain_and_decay_scale_with_request_duration_beyond_the_reference():
    ctl = _ctl()
    assert ctl.gain_scale() == 1.0 and ctl.request_s_ewma is None
    ctl.observe_request(REFERENCE_REQUEST_S, 0.0)
    assert ctl.gain_scale() == 1.0               # up to the reference: as before
    for bad in (float("nan"), float("inf"), -1.0, True):
        ctl.observe_request(bad, 0.0)
    assert ctl.request_s_ewma == REFERENCE_REQUEST_S
    slow = _ctl()
    slow.observe_request(4 * REFERENCE_REQUEST_S, 0.0)
    assert slow.gain_scale() == pytest.approx(0.25)
    _drive(slow, 2 * BUDGET, 0.0, 4.0)
    assert slow.offset == pytest.approx(4 * 0.05 * 0.25)


# -- config: what the controller could never act on ------------------------------------------


def _validate(load_control: dict | None = None, policy: dict | None = None, target: dict | None = None):
    data = C.default_config().model_dump(mode="json")
    if load_control is not None:
        data["policy"]["load_control"] = load_control
    data["policy"].update(policy or {})
    data["pools"]["target"].update(target or {})
    return C.AppConfig.model_validate(data)


def _problems(**kw) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        _validate(**kw)
    return C.validation_problems(info.value)


@pytest.mark.parametrize("field", ["interval_s", "latency_budget_ms", "in_flight_budget", "gain"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    (where, message), = _problems(load_control={"enabled": True, "latency_budget_ms": 300, field: value})
    assert where == f"policy.load_control.{field}" and "finite" in message


def test_non_finite_numbers_are_refused_everywhere_in_the_config():
    (where, _), = _problems(target={"autoscaling_config": {"max_replicas": 2, "upscale_delay_s": float("inf")}})
    assert where == "pools.target.autoscaling_config.upscale_delay_s"


@pytest.mark.parametrize(("policy", "limits", "name"), [
    ({"threshold": 0.5}, {"arbitrage": 0.4}, "arbitrage"),     # a ceiling below the base
    ({"threshold": 0.5}, {"arbitrage": 0.5}, "arbitrage"),     # at it: no room either
    ({}, {"rsd": 0.9}, "rsd"),                                  # rsd's own default base, 0.5
    ({"default": "rsd", "threshold": 0.2}, {"rsd": 0.3}, "rsd"),  # a floor above the configured base
])
def test_a_threshold_limit_that_leaves_the_controller_no_room_is_refused(policy, limits, name):
    (where, message), = _problems(load_control={"enabled": True, "latency_budget_ms": 300,
                                                "threshold_limits": limits}, policy=policy)
    assert where == f"policy.load_control.threshold_limits.{name}" and "could never move" in message


def test_the_limits_of_a_controller_that_is_off_are_not_checked():
    cfg = _validate(load_control={"enabled": False, "threshold_limits": {"arbitrage": 0.4}}, policy={"threshold": 0.5})
    assert not cfg.policy.load_control.enabled


def test_threshold_limits_past_the_base_are_accepted():
    cfg = _validate(load_control={"enabled": True, "latency_budget_ms": 300,
                                  "threshold_limits": {"arbitrage": 0.9, "rsd": 0.1}}, policy={"threshold": 0.6})
    assert cfg.policy.load_control.threshold_limits == {"arbitrage": 0.9, "rsd": 0.1}


@pytest.mark.parametrize(("scaling", "text"), [
    ({"look_back_period_s": 5}, "look_back_period_s: 5 must be greater than metrics_interval_s, 10 (Serve's default)"),
    ({"look_back_period_s": 10, "metrics_interval_s": 10}, "look_back_period_s: 10 must be greater"),
    ({"metrics_interval_s": 40}, "look_back_period_s: 30 (Serve's default) must be greater"),
])
def test_a_look_back_period_not_above_the_metrics_interval_is_refused(scaling, text):
    (where, message), = _problems(target={"autoscaling_config": {"max_replicas": 2, **scaling}})
    assert where == "pools.target.autoscaling_config" and message.startswith(text)
    ok = _validate(target={"autoscaling_config": {"max_replicas": 2, "look_back_period_s": 11}})
    assert ok.pools.target.autoscaling_config.look_back_period_s == 11
