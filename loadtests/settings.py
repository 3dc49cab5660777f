"""What one load run does: the request mix, the transport, the shape. Passed to the locust
process as JSON in ``ARBITRAGE_LOAD`` (locust owns the command line). Pure logic."""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

ENV = "ARBITRAGE_LOAD"
TRANSPORTS: tuple[str, ...] = ("grpc", "grpc-stream", "http", "http-sse", "openai", "openai-chat")
Shape = Literal["steady", "ramp", "spike"]
# The closed loop's flags and their LoadSettings fields: an open loop (--rate) has no use for them.
CLOSED_LOOP_FLAGS = (("--users", "users"), ("--spawn-rate", "spawn_rate"), ("--shape", "shape"))


def open_loop_conflict(rate: float, given: dict[str, object]) -> str:
    """The refusal of closed-loop flags (``given``: flag -> value) beside ``--rate``: an open
    loop runs Poisson arrivals from one scheduler user, so they would be ignored."""
    named = " and ".join(f"{flag} {value}" for flag, value in given.items())
    return (f"--rate {rate:g} with {named}: an open loop (Poisson arrivals from one scheduler user) ignores "
            f"{', '.join(given)}; leave {'them' if len(given) > 1 else 'it'} out, or leave out --rate for a "
            f"closed loop")


@dataclass(frozen=True)
class Mix:
    """Per-request problems (seeded draws from the synthetic task) and routing knobs."""

    policy: str | None = None          # None: the server's default
    threshold: float | None = None
    hard_prob: float = 0.2              # share of problems with a hard final step (difficulty)
    problem_mix: str | None = None      # a named mix (synthetic.MIXES: math, olympiad) instead of hard_prob
    max_steps: int | None = None
    seed: int = 0
    pool_size: int = 512                # distinct problems drawn; requests cycle through them

    def __post_init__(self) -> None:
        if not 0.0 <= self.hard_prob <= 1.0:
            raise ValueError(f"--hard-prob: must lie in [0, 1], got {self.hard_prob}")
        from arbitrage_common.synthetic import MIXES

        if self.problem_mix is not None and self.problem_mix not in MIXES:
            raise ValueError(f"--mix: unknown mix {self.problem_mix!r} (choose from {', '.join(MIXES)})")
        if self.pool_size <= 0:
            raise ValueError(f"pool_size: must be > 0, got {self.pool_size}")

    def prompts(self) -> list[str]:
        return list(self.answers())

    def answers(self) -> dict[str, int]:
        """Each prompt of the seeded pool (in order) and its correct answer."""
        from arbitrage_common.synthetic import generate_mix, generate_problems

        if self.problem_mix is not None:
            problems = generate_mix(self.pool_size, self.seed, self.problem_mix)
        else:
            problems = generate_problems(self.pool_size, self.seed, hard_prob=self.hard_prob)
        return {p.prompt: p.answer for p in problems}


@dataclass(frozen=True)
class LoadSettings:
    host_grpc: str = "127.0.0.1:9000"
    host_http: str = "http://127.0.0.1:8000"
    app: str | None = None
    transport: str = "grpc"
    mix: Mix = field(default_factory=Mix)
    users: int = 4
    spawn_rate: float = 4.0
    duration_s: float = 60.0
    shape: str = "steady"
    rate: float | None = None           # open loop: Poisson arrivals per second (no users, spawn rate, shape)
    max_in_flight: int = 256            # open loop: more in flight are dropped and counted
    timeout_s: float = 120.0
    slo_ms: float | None = None
    records: str | None = None          # per-request JSONL written here when the run stops

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport: expected one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.shape not in ("steady", "ramp", "spike"):
            raise ValueError(f"--shape: expected steady, ramp or spike, got {self.shape!r}")
        for flag, value in (("--rate", self.rate), ("--duration", self.duration_s), ("--timeout", self.timeout_s),
                            ("--spawn-rate", self.spawn_rate), ("--slo-ms", self.slo_ms)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag}: must be a finite number > 0, got {value}")
        if self.users <= 0:
            raise ValueError(f"--users: must be > 0, got {self.users}")
        if self.rate is not None:
            self._check_open_loop()

    def _check_open_loop(self) -> None:
        """A value equal to the default cannot be told from one left out here; the CLI, which
        can, refuses those too (``open_loop_conflict``)."""
        defaults = {f.name: f.default for f in fields(self)}
        given = {flag: getattr(self, name) for flag, name in CLOSED_LOOP_FLAGS
                 if getattr(self, name) != defaults[name]}
        if given:
            raise ValueError(open_loop_conflict(self.rate, given))

    @property
    def client_timeout_s(self) -> float:
        """How long the client waits for a reply: a margin over the deadline it sends the service
        (``timeout_s``), so the service answers a missed deadline itself (gRPC DEADLINE_EXCEEDED
        is the client's own; HTTP 504 ``deadline_exceeded``) rather than the client giving up first."""
        return self.timeout_s + max(5.0, 0.1 * self.timeout_s)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> LoadSettings:
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        data = json.loads(raw)
        data["mix"] = Mix(**data.get("mix", {}))
        return cls(**data)


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times (seconds from start) of a Poisson process: exponential gaps, seeded."""
    if not (math.isfinite(rate) and rate > 0 and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"poisson arrivals: rate and duration must be finite and > 0, got {rate} and {duration_s}")
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)
