"""Routing policies: one small interface, a registry, and ``make_policy``.

RouteLLM-style: each policy names the scorer it reads (None, "prm" or "router") and maps
one score to a decision with ``route_to_target``. The step loop drives them:

- ``scorer is None`` (draft, target, random): decided before any model writes; the score
  is ignored, so only the chosen model runs.
- ``scorer`` set, not ``runs_both`` (rsd, arbitrage): the draft writes, the scorer scores
  the draft step, and the target runs only if ``route_to_target(score)``.
- ``runs_both`` (oracle): both write, the PRM scores both, and the score passed is the
  advantage PRM(target) - PRM(draft).

A policy instance belongs to one request (``random`` holds a seeded RNG).
"""
from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from .errors import InvalidArgument

ScorerKind = Literal["prm", "router"]


class Policy(ABC):
    """Decides, per step, whether the target writes the step."""

    name: ClassVar[str]
    description: ClassVar[str]
    scorer: ClassVar[ScorerKind | None] = None
    runs_both: ClassVar[bool] = False
    # None: the policy takes no threshold (a given one is ignored).
    threshold_range: ClassVar[tuple[float, float] | None] = None
    default_threshold: ClassVar[float | None] = None

    def __init__(self, threshold: float | None = None, seed: int | None = None) -> None:
        self.threshold = self._check_threshold(threshold)

    @classmethod
    def _check_threshold(cls, threshold: float | None) -> float | None:
        if cls.threshold_range is None:
            return None  # draft/target: nothing to threshold; a stray value is harmless
        if threshold is None:
            return cls.default_threshold
        lo, hi = cls.threshold_range
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise InvalidArgument("threshold", f"must be a number in [{lo:g}, {hi:g}] for policy "
                                               f"'{cls.name}', got {threshold!r}")
        value = float(threshold)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidArgument("threshold", f"must be in [{lo:g}, {hi:g}] for policy '{cls.name}', got {value:g}")
        return value

    @abstractmethod
    def route_to_target(self, score: float | None = None) -> bool:
        """True when the target should write (or, for oracle, keep) this step."""

    def _needs(self, score: float | None) -> float:
        # Programming error, not client input: the loop always passes the score it read.
        if score is None:
            raise TypeError(f"policy {self.name!r} decides on a {self.scorer} score; none was given")
        return score

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What the API shows in errors and /v1/models."""
        return {
            "name": cls.name,
            "description": cls.description,
            "scorer": cls.scorer,
            "runs_both": cls.runs_both,
            "threshold_range": list(cls.threshold_range) if cls.threshold_range else None,
            "default_threshold": cls.default_threshold,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold!r})"


POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy findable by ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


@register_policy
class DraftPolicy(Policy):
    name = "draft"
    description = "the draft model writes every step (cost and quality lower bound)"

    def route_to_target(self, score: float | None = None) -> bool:
        return False


@register_policy
class TargetPolicy(Policy):
    name = "target"
    description = "the target model writes every step (quality upper bound)"

    def route_to_target(self, score: float | None = None) -> bool:
        return True


@register_policy
class RSDPolicy(Policy):
    name = "rsd"
    description = "keep the draft step if PRM(draft step) >= threshold, else the target rewrites it"
    scorer = "prm"
    threshold_range = (0.0, 1.0)
    default_threshold = 0.5

    def route_to_target(self, score: float | None = None) -> bool:
        return not self._needs(score) >= self.threshold


@register_policy
class ArbitragePolicy(Policy):
    name = "arbitrage"
    description = "the target rewrites the step if router P(target better) > threshold"
    scorer = "router"
    threshold_range = (0.0, 1.0)
    default_threshold = 0.5

    def route_to_target(self, score: float | None = None) -> bool:
        return self._needs(score) > self.threshold


@register_policy
class OraclePolicy(Policy):
    name = "oracle"
    description = "both models write; keep the target step if PRM(target) - PRM(draft) > threshold"
    scorer = "prm"
    runs_both = True
    threshold_range = (-1.0, 1.0)
    default_threshold = 0.0

    def route_to_target(self, score: float | None = None) -> bool:
        return self._needs(score) > self.threshold


@register_policy
class RandomPolicy(Policy):
    name = "random"
    description = "the target writes each step with probability threshold (seeded per request)"
    threshold_range = (0.0, 1.0)
    default_threshold = 0.5

    def __init__(self, threshold: float | None = None, seed: int | None = None) -> None:
        super().__init__(threshold)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidArgument("seed", f"must be an integer, got {seed!r}")
        self._rng = random.Random(0 if seed is None else seed)  # unset seed is 0, as for sampling

    def route_to_target(self, score: float | None = None) -> bool:
        return self._rng.random() < self.threshold


POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def make_policy(name: str, threshold: float | None = None, seed: int | None = None) -> Policy:
    """A fresh policy for one request. Raises ``InvalidArgument`` ('policy' for an unknown
    name, 'threshold' for a value out of the policy's range or not finite)."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidArgument("policy", f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    return cls(threshold, seed)
