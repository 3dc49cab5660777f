"""Errors the step loop raises; the API layer maps them to status codes.

- ``InvalidArgument`` -> gRPC INVALID_ARGUMENT / HTTP 422, with the field named.
- ``ScorerError``     -> a model returned something unusable (NaN, wrong count): an
  internal error, never turned into a silent routing decision.
- ``DeadlineExceeded`` -> DEADLINE_EXCEEDED; carries the steps decided so far.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no runtime import: accounting is plain data, this avoids a cycle
    from .accounting import LoopResult


class InvalidArgument(ValueError):
    """Bad client input. ``field`` names the offending field; the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


class ScorerError(RuntimeError):
    """A scorer or generator returned an unusable result. ``role`` is e.g. 'prm', 'router',
    'draft generator'."""

    def __init__(self, role: str, message: str) -> None:
        self.role = role
        super().__init__(f"{role}: {message}")


class DeadlineExceeded(TimeoutError):
    """The request ran past its deadline. ``partial`` holds the steps kept so far
    (finish_reason 'deadline'); ``waiting_on``: the model (draft, target, router, prm) whose
    call the loop was waiting for when it passed, if any."""

    def __init__(self, partial: LoopResult, message: str = "deadline exceeded", *,
                 waiting_on: str | None = None) -> None:
        self.partial, self.waiting_on = partial, waiting_on
        super().__init__(f"{message} after {len(partial.steps)} steps")
