"""The retry policy as pure decisions, without sleeping."""

from __future__ import annotations

import pytest

from autocalls_async import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
    UnprocessableEntityError,
)
from autocalls_async._retry import Decision, is_retry_safe


def half() -> float:
    return 0.5


def error(cls: type[APIError], status: int, retry_after: float | None = None) -> APIError:
    return cls("x", status=status, retry_after=retry_after)


SAFE = [
    error(RateLimitError, 429, 3.0),
    error(InternalServerError, 503),
    APIConnectionError("refused", sent=False),
    APITimeoutError("connect timeout", sent=False),
]
UNSAFE = [
    error(InternalServerError, 500),
    error(InternalServerError, 502),
    error(InternalServerError, 504),
    APITimeoutError("read timeout", sent=True),
    APIConnectionError("dropped", sent=True),
]
NEVER = [
    error(AuthenticationError, 401),
    error(UnprocessableEntityError, 422),
    error(APIError, 400),
]


@pytest.mark.parametrize("exc", SAFE)
def test_safe_failures_are_retried_by_default(exc: Exception) -> None:
    """429, 503 and requests that never left are retried: the server cannot have processed them."""
    policy = RetryPolicy()
    assert isinstance(policy.decide(exc, 0, half), Decision)  # type: ignore[arg-type]
    assert is_retry_safe(exc)  # type: ignore[arg-type]


@pytest.mark.parametrize("exc", UNSAFE)
def test_unsafe_failures_need_the_opt_in(exc: Exception) -> None:
    """500/502/504, read timeouts and dropped connections may have been processed."""
    assert RetryPolicy().decide(exc, 0, half) is None  # type: ignore[arg-type]
    assert RetryPolicy(retry_unsafe=True).decide(exc, 0, half) is not None  # type: ignore[arg-type]
    assert not is_retry_safe(exc)  # type: ignore[arg-type]


@pytest.mark.parametrize("exc", NEVER)
def test_other_answers_are_never_retried(exc: Exception) -> None:
    """A 4xx would fail the same way again, opt-in or not."""
    assert RetryPolicy(retry_unsafe=True).decide(exc, 0, half) is None  # type: ignore[arg-type]


def test_retry_budget_is_max_retries() -> None:
    """After max_retries retries, the error is raised."""
    policy = RetryPolicy(max_retries=2)
    exc = error(InternalServerError, 503)
    assert policy.decide(exc, 1, half) is not None
    assert policy.decide(exc, 2, half) is None
    assert RetryPolicy(max_retries=0).decide(exc, 0, half) is None


def test_retry_after_is_honoured_in_full_and_pauses_the_limiter_for_429() -> None:
    """A 429's Retry-After becomes a shared pause; a 503's a plain wait."""
    assert RetryPolicy().decide(error(RateLimitError, 429, 58.0), 0, half) == Decision(58.0, True)
    assert RetryPolicy().decide(error(InternalServerError, 503, 9.0), 0, half) == Decision(9.0)


def test_enormous_retry_after_is_not_waited_for() -> None:
    """A Retry-After beyond max_retry_after raises at once, for the caller to schedule."""
    assert RetryPolicy().decide(error(RateLimitError, 429, 3600.0), 0, half) is None
    assert RetryPolicy(max_retry_after=4000).decide(error(RateLimitError, 429, 3600.0), 0, half)


@pytest.mark.parametrize(("retries", "low", "high"), [(0, 0.25, 0.5), (1, 0.5, 1.0), (5, 4.0, 8.0)])
def test_backoff_is_exponential_with_equal_jitter(retries: int, low: float, high: float) -> None:
    """Half of each wait is fixed, half random, doubling up to backoff_max."""
    policy = RetryPolicy()
    assert policy.backoff(retries, lambda: 0.0) == low
    assert policy.backoff(retries, lambda: 1.0) == high
    no_hint = RetryPolicy(max_retries=9).decide(error(RateLimitError, 429), retries, lambda: 0.0)
    assert no_hint == Decision(low, pause_limiter=True)


def test_policy_validation() -> None:
    """Negative settings are refused."""
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="backoff_base"):
        RetryPolicy(backoff_base=-1.0)
