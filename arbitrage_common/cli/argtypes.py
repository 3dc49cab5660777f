"""argparse value types whose errors name the argument (argparse adds the name)."""
from __future__ import annotations

import argparse
import math


def _int_at_least(minimum: int, wording: str, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")
# The API's fields (protos/arbitrage/v1): int32 step and token limits, an int64 seed.
positive_int32 = _int_at_least(1, "a positive integer", 2**31 - 1)
int64 = _int_at_least(-(2**63), "an integer", 2**63 - 1)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def finite_positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a rate, a duration, an SLO): not nan, not inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite number (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1] (a threshold on a score or a probability)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def mix_list(text: str) -> tuple[str, ...]:
    """argparse type: a problem mix or a comma list of them."""
    from ..synthetic import parse_mixes

    try:
        return parse_mixes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("mix: ")) from exc
