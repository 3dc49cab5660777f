"""Load shapes (locust ``LoadTestShape``): steady, ramp, spike, each bounded by the duration.
``tick()`` returns (users, spawn rate) or None to stop."""
from __future__ import annotations

from locust import LoadTestShape

from .settings import LoadSettings


class _Bounded(LoadTestShape):
    settings = LoadSettings.from_env()

    def users_at(self, t: float, peak: int) -> int:
        raise NotImplementedError

    def tick(self):
        t = self.get_run_time()
        s = self.settings
        if t >= s.duration_s:
            return None
        return max(1, self.users_at(t, s.users)), s.spawn_rate  # locust takes < 1/s: one user every 1/rate s


class SteadyShape(_Bounded):
    """``users`` for the whole run."""

    def users_at(self, t: float, peak: int) -> int:
        return peak


class RampShape(_Bounded):
    """1 user up to ``users`` over the first 60% of the run, then held."""

    def users_at(self, t: float, peak: int) -> int:
        ramp = 0.6 * self.settings.duration_s
        return peak if t >= ramp else 1 + int((peak - 1) * t / ramp)


class SpikeShape(_Bounded):
    """A quarter of ``users``, all of them during the middle fifth of the run, then a quarter again."""

    def users_at(self, t: float, peak: int) -> int:
        d = self.settings.duration_s
        return peak if 0.4 * d <= t < 0.6 * d else max(1, peak // 4)


SHAPES = {"steady": SteadyShape, "ramp": RampShape, "spike": SpikeShape}
