"""Load-aware thresholds: hold a latency SLO by routing fewer steps to the target under load.

A ``LoadController`` lives in one coordinator replica. It is told about every target-pool
call that replica makes (wall latency; target calls in flight, counted by the replica
itself), about every controlled request that ends (its duration), and, from the replica's
health probe, whether the target pool can still add replicas; at admission it turns a
request's base threshold into the one the request runs with (``threshold_for``). Pure
logic: no Ray, no clock; every method takes ``now`` (seconds, ``time.monotonic()`` in the
service, anything monotone in tests). Not thread-safe: one instance per replica, used from
its event loop.

Control law. The controller keeps one number, the *offset* ``o`` in ``[0, max_offset]``: how
far thresholds move toward fewer target calls. At most once per ``interval_s`` it updates:

- signals: ``L``, an EWMA of target-call latency (``latency_alpha`` per sample), and ``Q``,
  the time-weighted mean of target calls in flight since the last update (their integral over
  the window divided by the same window's length, however sparse the events);
- error: ``e = max(L / latency_budget_ms, Q / in_flight_budget) - 1`` over the budgets that
  are set, clamped to ``[-1, 1]`` (0 = exactly on budget, 1 = twice it, -1 = idle). An
  interval after the last activity (a latency sample, a call in flight) is idle: ``e = -1``,
  and ``L`` is forgotten (with nothing in flight no sample would ever correct it);
- capacity first: while the target pool can still add replicas (``can_scale``: fewer running
  than its autoscaling ``max_replicas``, or an upscale under way) every interval counts as
  idle: the offset only falls. Its autoscaler scales on the load the pool sees; cutting that
  load would make it remove replicas, raise latency and so the offset again, until the pool
  sat at a fraction of its size with a high offset. The controller sheds only the load a
  pool at full size cannot carry;
- deadband: ``|e| <= deadband``: ``o`` holds (the equilibrium: load on budget);
- ``e > deadband``: ``o += s * gain * e``; ``e < -deadband``: ``o -= s * decay * -e``;
  then ``o`` is clamped to ``[0, max_offset]``. When ``k`` whole intervals passed since the
  last update, each counts (the offset integrates the error over time): those up to the last
  activity with the measured error, the rest as idle;
- ``s = min(1, REFERENCE_REQUEST_S / D)`` with ``D`` an EWMA of how long controlled requests
  last (1 until one has ended). A request keeps the threshold it was admitted with, so a
  change of the offset reaches the target's load over about one request's duration: the
  loop's delay is ``D``. Scaling the gain by ``1 / D`` keeps ``gain x delay`` where it is
  stable; requests up to ``REFERENCE_REQUEST_S`` long see ``gain`` and ``decay`` unscaled.

It is an integral controller on a monotone plant (a larger offset sends fewer calls to the
target, so its latency and queue fall). With that delay scaling it settles where load is
within the deadband of the budget, with no steady-state error, for requests of any length
(tested in closed loop with simulated requests of 0, 30 and 60 s); noisy latency moves it
within a narrow band. ``decay`` below ``gain`` backs off more slowly than it raises: load
that returns does not meet a threshold already reset.

Per policy (``FEWER_TARGET_CALLS``): arbitrage routes when router score > threshold, so the
threshold used is ``min(base + o, limit)`` (limit 1 unless ``threshold_limits`` says lower);
rsd routes when PRM score < threshold, so it is ``max(base - o, limit)`` (limit 0 unless set
higher). It is never moved toward more target calls than ``base``. Every other policy
(draft, target, oracle, random) and every request whose client set the threshold itself
(``explicit=True``) keeps its base threshold: an explicit threshold is honoured as sent.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .policies import POLICIES

if TYPE_CHECKING:
    from .config import LoadControlSpec

# +1: a higher threshold sends fewer steps to the target (arbitrage: target iff score > t);
# -1: a lower threshold does (rsd: target iff PRM score < t). Left alone: draft and target
# (no threshold), oracle (runs the target on every step whatever its threshold) and random
# (a baseline whose threshold is its target rate, kept fixed as a reference).
FEWER_TARGET_CALLS: dict[str, int] = {"arbitrage": +1, "rsd": -1}
ADJUSTABLE_POLICIES: tuple[str, ...] = tuple(FEWER_TARGET_CALLS)
_DIGITS = 6  # thresholds reported as 0.65, not 0.6500000000000001
# Requests up to this long get the full gain and decay; longer ones scale both by
# REFERENCE_REQUEST_S / duration (the loop's delay is a request's duration). 10 s: in closed
# loop the unscaled defaults settle up to about 10 s and cycle from about 20 s.
REFERENCE_REQUEST_S = 10.0
_DURATION_ALPHA = 0.2  # EWMA weight of each ended request's duration


class LoadController:
    """The offset of one coordinator replica; see the module docstring for the law."""

    def __init__(self, spec: LoadControlSpec) -> None:
        self.spec = spec
        self._offset = 0.0
        self._error: float | None = None      # the last update's error (None: none yet)
        self._ewma: float | None = None       # target-call latency, ms
        self._last_activity: float | None = None  # last sample, or last moment a call was in flight
        self._last_update: float | None = None
        # Calls in flight: the current count, since when, and its integral over the window.
        self._in_flight: int | None = None    # None: never reported
        self._in_flight_since = 0.0
        self._in_flight_area = 0.0
        self._window_start = 0.0
        self._updates = 0
        self._can_scale = False               # the target pool can still add replicas (health probe)
        self._request_s: float | None = None  # EWMA of controlled requests' durations, s

    # -- state, for tests and debugging (the coordinator reads snapshot()) -----------------
    @property
    def offset(self) -> float:
        """How far thresholds are moved toward fewer target calls now (gauge this)."""
        return self._offset

    @property
    def latency_ewma_ms(self) -> float | None:
        return self._ewma

    @property
    def in_flight(self) -> int | None:
        return self._in_flight

    @property
    def can_scale(self) -> bool:
        """The target pool can still add replicas (as last told): the offset only falls."""
        return self._can_scale

    @property
    def request_s_ewma(self) -> float | None:
        return self._request_s

    def gain_scale(self) -> float:
        """``min(1, REFERENCE_REQUEST_S / D)``: what gain and decay are multiplied by."""
        if self._request_s is None or self._request_s <= REFERENCE_REQUEST_S:
            return 1.0
        return REFERENCE_REQUEST_S / self._request_s

    def snapshot(self) -> dict[str, float | int | None]:
        """The controller's state, for logs and metrics."""
        return {"offset": self._offset, "error": self._error, "latency_ewma_ms": self._ewma,
                "in_flight": self._in_flight, "updates": self._updates, "request_s": self._request_s,
                "can_scale": int(self._can_scale), "max_offset": self.spec.max_offset}

    def applies(self, policy_name: str, explicit: bool = False) -> bool:
        """Whether ``threshold_for`` may move this request's threshold."""
        return self.spec.enabled and not explicit and policy_name in self.spec.policies \
            and policy_name in FEWER_TARGET_CALLS

    def threshold_for(self, policy_name: str, base_threshold: float | None, now: float, *,
                      explicit: bool = False) -> float | None:
        """The threshold a request of ``policy_name`` runs with, from its base threshold (the
        configured or the policy's default). Returned unchanged when the controller is off, the
        policy is not controlled, the policy takes no threshold (None), or ``explicit``."""
        self.update(now)
        if base_threshold is None or not self.applies(policy_name, explicit):
            return base_threshold
        base = float(base_threshold)
        direction = FEWER_TARGET_CALLS[policy_name]
        lo, hi = POLICIES[policy_name].threshold_range or (0.0, 1.0)
        # Rounded for the report, then clamped again: rounding never crosses the base or the limit.
        if direction > 0:
            limit = min(self.spec.threshold_limits.get(policy_name, hi), hi)
            return max(base, min(round(base + self._offset, _DIGITS), limit))
        limit = max(self.spec.threshold_limits.get(policy_name, lo), lo)
        return min(base, max(round(base - self._offset, _DIGITS), limit))

    # -- what the coordinator reports ------------------------------------------------------
    def observe_latency(self, latency_ms: float, now: float) -> None:
        """One target call's wall latency (ms), as the request saw it (queueing and retries
        included). A negative or non-finite value is ignored."""
        self.update(now)
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) \
                or not math.isfinite(latency_ms) or latency_ms < 0:
            return
        alpha, self._last_activity = self.spec.latency_alpha, now
        self._ewma = float(latency_ms) if self._ewma is None else (1 - alpha) * self._ewma + alpha * latency_ms

    def observe_in_flight(self, in_flight: int, now: float) -> None:
        """The number of target calls this replica has in flight, from ``now`` on (report it
        whenever it changes). Negative values count as 0."""
        self.update(now)
        self._account_in_flight(now)
        if self._in_flight or in_flight > 0:
            self._last_activity = now
        self._in_flight = max(0, int(in_flight))

    def observe_request(self, seconds: float, now: float) -> None:
        """A request whose threshold the controller set ended after ``seconds`` (admission to
        end, whatever the outcome). A negative or non-finite value is ignored."""
        self.update(now)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not math.isfinite(seconds) or seconds < 0:
            return
        self._request_s = float(seconds) if self._request_s is None \
            else (1 - _DURATION_ALPHA) * self._request_s + _DURATION_ALPHA * seconds

    def call_started(self, now: float) -> None:
        """Convenience: a target call starts (the in-flight count goes up by one)."""
        self.observe_in_flight((self._in_flight or 0) + 1, now)

    def call_finished(self, started: float, now: float, *, sample: bool = True) -> None:
        """Convenience: the call begun at ``started`` ended; its latency is a sample unless
        ``sample`` is False (cancelled, or failed for a reason that says nothing about load)."""
        self.observe_in_flight((self._in_flight or 0) - 1, now)
        if sample:
            self.observe_latency((now - started) * 1000.0, now)

    # -- the law -----------------------------------------------------------------------------
    def update(self, now: float, can_scale: bool | None = None) -> float:
        """Apply the law if ``interval_s`` has passed since the last update; the offset after.
        Every other method calls this first; the coordinator also calls it from its health
        probe (so the offset falls after traffic stops) with ``can_scale``: whether the target
        pool can still add replicas (None: as last told; False until told)."""
        if can_scale is not None:
            self._can_scale = bool(can_scale)
        if self._last_update is None:  # the first call opens the first window
            self._last_update = self._window_start = self._in_flight_since = now
            return self._offset
        interval = self.spec.interval_s
        intervals = math.floor((now - self._last_update) / interval)
        if intervals < 1:
            return self._offset
        self._account_in_flight(now)
        if self._in_flight:
            self._last_activity = now
        # The intervals up to the last activity (a sample, a call in flight) were busy; any after
        # it were idle. A window busy only at its start is not taken as busy throughout.
        busy = 0
        if self._last_activity is not None and self._last_activity >= self._window_start:
            busy = min(intervals, math.floor((self._last_activity - self._last_update) / interval) + 1)
        if busy:
            # Q's area runs from _window_start to now; its span must cover the same time. All busy:
            # the whole window (the grid point last_update + intervals * interval lies at or before
            # now, and dividing by the shorter span would inflate Q). Some idle: nothing was in
            # flight after the last activity, so the area ends within the busy intervals.
            busy_end = now if busy == intervals else min(now, self._last_update + busy * interval)
            self._step(self._error_of(busy_end - self._window_start), busy)
        if busy < intervals:
            self._ewma = None  # idle now: the next busy window starts from its own samples
            self._step(-1.0, intervals - busy)
        self._in_flight_area, self._window_start = 0.0, now
        self._last_update += intervals * interval
        self._updates += 1
        return self._offset

    def _step(self, error: float, intervals: int) -> None:
        """``intervals`` intervals at ``error`` (reported as measured; acted on as idle while
        the target pool can still add replicas)."""
        self._error, band, scale = error, self.spec.deadband, self.gain_scale()
        if self._can_scale:
            error = -1.0
        if error > band:
            self._offset += scale * self.spec.gain * error * intervals
        elif error < -band:
            self._offset -= scale * self.spec.decay * -error * intervals
        self._offset = min(self.spec.max_offset, max(0.0, self._offset))

    def _account_in_flight(self, now: float) -> None:
        if self._in_flight is not None:
            self._in_flight_area += self._in_flight * max(0.0, now - self._in_flight_since)
        self._in_flight_since = now

    def _error_of(self, span: float) -> float:
        """The error of a busy window ``span`` seconds long (calls in flight averaged over it)."""
        spec, ratios = self.spec, []
        if spec.latency_budget_ms is not None and self._ewma is not None:
            ratios.append(self._ewma / spec.latency_budget_ms)
        if spec.in_flight_budget is not None and self._in_flight is not None:
            mean_in_flight = self._in_flight_area / span if span > 0 else float(self._in_flight)
            ratios.append(mean_in_flight / spec.in_flight_budget)
        if not ratios:  # busy, but nothing measured against a budget yet: hold
            return 0.0
        return min(1.0, max(-1.0, max(ratios) - 1.0))
