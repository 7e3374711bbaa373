"""The retry policy as pure decisions: given what went wrong, retry or not, and after how long.

Only what the server cannot have processed is retried by default: a 429 (the throttle answers
before the application runs), a 503 (maintenance mode or overload) and a request that never
left (connection refused, DNS, TLS, a connect timeout). A 500, 502, 504, a read timeout or a
connection dropped after the request was written may already have appended the message and
charged the account, so they are retried only with ``retry_unsafe=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ._errors import (
    APIConnectionError,
    APIError,
    AutocallsError,
    InternalServerError,
    RateLimitError,
)

__all__ = ["Decision", "RetryPolicy"]


@attrs.frozen
class Decision:
    """Retry after ``delay`` seconds; ``pause_limiter`` makes every waiter on the token wait."""

    delay: float
    pause_limiter: bool = False


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """When to retry a failed attempt, and how long to wait first.

    ``AsyncAutocalls(retry_policy=RetryPolicy(...))`` for full control; by default the client
    builds one from its ``max_retries`` and ``retry_unsafe``. Only failures the service cannot
    have processed are retried (a 429, a 503, a request that never left), unless
    ``retry_unsafe``; ``Retry-After`` is honoured in full, else the backoff is exponential with
    "equal jitter" (half fixed, half random).
    """

    #: Retries after the first attempt.
    max_retries: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    #: Also retry what may have been processed: 500, 502, 504, read timeouts, dropped connections.
    retry_unsafe: bool = False
    #: Seconds: the first backoff, doubled at each retry up to ``backoff_max``.
    backoff_base: float = attrs.field(default=0.5, validator=_positive)
    backoff_max: float = attrs.field(default=8.0, validator=_positive)  #: seconds
    #: A ``Retry-After`` longer than this is not waited for: the error is raised at once, with
    #: its ``retry_after``, for the caller to schedule (a maintenance window can say an hour).
    max_retry_after: float = attrs.field(default=120.0, validator=_positive)

    def backoff(self, retries_done: int, random: Callable[[], float]) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**retries_done)
        return ceiling / 2.0 + random() * ceiling / 2.0

    def decide(
        self, error: AutocallsError, retries_done: int, random: Callable[[], float]
    ) -> Decision | None:
        """Return how to retry after ``error``, or None to raise it."""
        if retries_done >= self.max_retries:
            return None
        if isinstance(error, RateLimitError):
            return self._after(error.retry_after, retries_done, random, pause=True)
        if isinstance(error, InternalServerError):
            if error.status == 503:
                return self._after(error.retry_after, retries_done, random, pause=False)
            return self._unsafe(retries_done, random)
        if isinstance(error, APIConnectionError):
            if not error.sent:
                return Decision(self.backoff(retries_done, random))
            return self._unsafe(retries_done, random)
        return None  # other answers (4xx, a bad body) would fail the same way again

    def _after(
        self,
        retry_after: float | None,
        retries_done: int,
        random: Callable[[], float],
        *,
        pause: bool,
    ) -> Decision | None:
        if retry_after is None:
            return Decision(self.backoff(retries_done, random), pause_limiter=pause)
        if retry_after > self.max_retry_after:
            return None
        return Decision(retry_after, pause_limiter=pause)

    def _unsafe(self, retries_done: int, random: Callable[[], float]) -> Decision | None:
        return Decision(self.backoff(retries_done, random)) if self.retry_unsafe else None


def is_retry_safe(error: AutocallsError) -> bool:
    """True when the failed request cannot have been processed by the service."""
    if isinstance(error, APIConnectionError):
        return not error.sent
    return isinstance(error, APIError) and error.status in (429, 503)
