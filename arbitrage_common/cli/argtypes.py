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


def _float_where(accepts, wording: str):
    """An argparse float type that takes the numbers ``accepts`` holds true for."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must {wording}, got {text}")
        return value

    return parse


positive_float = _float_where(lambda v: v > 0, "be > 0")
# A rate, a duration, an SLO: not nan, not inf.
finite_positive_float = _float_where(lambda v: math.isfinite(v) and v > 0, "be a finite number > 0")
finite_float = _float_where(math.isfinite, "be a finite number")
# A threshold on a score, or a probability.
unit_float = _float_where(lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]")


def mix_list(text: str) -> tuple[str, ...]:
    """argparse type: a problem mix or a comma list of them."""
    from ..synthetic import parse_mixes

    try:
        return parse_mixes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("mix: ")) from exc
