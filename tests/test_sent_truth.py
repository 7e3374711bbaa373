"""``sent`` is always the truth (issue 10, item 7): once an attempt may have been processed, the
call raises that attempt's error whatever ends the retries (max_wait, close, a limiter outage,
a 429 after it), so neither the caller nor ``BulkResult.sent`` reads "nothing was sent"."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls, RateLimit, RetryPolicy
from autocalls_async.bulk import BulkRequest, BulkResult
from autocalls_async.testing import Fault, MockAutocalls

Make = Callable[..., AsyncAutocalls]
UNSAFE = RetryPolicy(retry_unsafe=True, backoff_base=0.01, backoff_max=0.02)


async def ask(client: AsyncAutocalls, **options: Any) -> sdk.Reply:
    return await client.generate_reply(
        assistant_id=123, customer_identifier="+1", message="pay once", **options
    )


def processed(server: MockAutocalls) -> int:
    return server.count(processed=True)


def assert_reported_as_sent(error: sdk.AutocallsError) -> None:
    assert isinstance(error, sdk.InternalServerError) and error.status == 500
    assert any("may have been processed" in note for note in error.__notes__)
    result = BulkResult(BulkRequest(1, 123, "+1", "pay once"), error=error)
    assert result.sent and result.maybe_processed
    assert result.to_json()["sent"] is True and result.to_json()["maybe_processed"] is True


async def test_no_slot_within_max_wait_after_a_processed_500(
    server: MockAutocalls, make_client: Make
) -> None:
    """retry_unsafe + max_wait: the 500 was processed, the retry finds no slot within max_wait.
    Raised before: RateLimitTimeout ("nothing was sent"), and BulkResult.sent was False."""
    server.inject(Fault.status(500, processed=True))
    client = make_client(server.base_url, rate_limit=RateLimit(1, 5.0), retry_policy=UNSAFE)
    with pytest.raises(sdk.AutocallsError) as caught:
        await ask(client, max_wait=0.3)
    assert_reported_as_sent(caught.value)
    assert "RateLimitTimeout" in caught.value.__notes__[0]
    assert processed(server) == 1


async def test_a_429_that_ends_the_retries_after_a_processed_500(
    server: MockAutocalls, make_client: Make
) -> None:
    """500 (processed), retried, then 429 with no retry left: the 500 is raised, not the 429."""
    server.inject(Fault.status(500, processed=True))
    server.inject(Fault.rate_limited(retry_after=0))
    policy = RetryPolicy(max_retries=1, retry_unsafe=True, backoff_base=0.01)
    client = make_client(server.base_url, retry_policy=policy)
    with pytest.raises(sdk.AutocallsError) as caught:
        await ask(client)
    assert_reported_as_sent(caught.value)
    assert server.count(status=429) == 1 and processed(server) == 1


async def test_close_during_a_429_pause_after_a_processed_500(
    server: MockAutocalls, make_client: Make
) -> None:
    """500 (processed), then a 429 whose Retry-After pauses the retry, then close(): the
    earlier 500 is raised. Before, the last error (the 429) was judged and ClientClosedError
    said nothing was sent."""
    server.inject(Fault.status(500, processed=True))
    server.inject(Fault.rate_limited(retry_after=30))
    client = make_client(server.base_url, retry_policy=UNSAFE, rate_limit=RateLimit(100, 1.0))
    call = asyncio.create_task(ask(client))
    async with asyncio.timeout(10):
        while server.count(status=429) < 1:  # noqa: ASYNC110 - waiting for the server's record
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(sdk.AutocallsError) as caught:
        await call
    assert_reported_as_sent(caught.value)
    assert "closed" in caught.value.__notes__[0]


async def test_close_with_nothing_processed_still_says_not_sent(
    server: MockAutocalls, make_client: Make
) -> None:
    """The same pause after a 503 (not processed): ClientClosedError, sent is False."""
    server.inject(Fault.status(503, headers={"Retry-After": "30"}))
    client = make_client(server.base_url, retry_policy=UNSAFE)
    call = asyncio.create_task(ask(client))
    async with asyncio.timeout(10):
        while not server.requests:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(sdk.ClientClosedError) as caught:
        await call
    result = BulkResult(BulkRequest(1, 123, "+1", "x"), error=caught.value)
    assert not result.sent and not result.maybe_processed
    assert processed(server) == 0


class FailingLimiter:
    """A shared limiter whose store goes down after the first slot (a Redis outage)."""

    def __init__(self) -> None:
        self.rate_limit = RateLimit(100, 1.0)
        self.slots = 0

    @contextlib.asynccontextmanager
    async def slot(
        self, key: str, *, deadline: float | None = None, priority: object = None
    ) -> AsyncIterator[Any]:
        self.slots += 1
        if self.slots > 1:
            raise sdk.LimiterUnavailableError("the limiter's store is unreachable")

        class Sent:
            def sent(self) -> None:
                pass

        yield Sent()

    async def pause(self, key: str, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def test_a_limiter_outage_after_a_processed_500(
    server: MockAutocalls, make_client: Make
) -> None:
    """The retry cannot get a slot because the limiter's store is down: the 500 is raised."""
    server.inject(Fault.status(500, processed=True))
    limiter = FailingLimiter()
    client = make_client(server.base_url, limiter=limiter, retry_policy=UNSAFE)
    with pytest.raises(sdk.AutocallsError) as caught:
        await ask(client)
    assert_reported_as_sent(caught.value)
    assert "LimiterUnavailableError" in caught.value.__notes__[0]
    assert limiter.slots == 2


async def test_a_dropped_connection_then_max_wait(server: MockAutocalls, make_client: Make) -> None:
    """A connection dropped after the request was written (processed) counts as sent too."""
    server.inject(Fault.drop(processed=True))
    client = make_client(server.base_url, rate_limit=RateLimit(1, 5.0), retry_policy=UNSAFE)
    with pytest.raises(sdk.APIConnectionError) as caught:
        await ask(client, max_wait=0.3)
    assert caught.value.sent
    result = BulkResult(BulkRequest(1, 123, "+1", "x"), error=caught.value)
    assert result.sent and result.maybe_processed
    assert processed(server) == 1


@pytest.mark.parametrize(
    "limiter", [RateLimit(5, 60.0), "redis://localhost", 5], ids=["RateLimit", "str", "int"]
)
def test_a_limiter_that_is_not_a_limiter_is_refused(limiter: object) -> None:
    """limiter=RateLimit(...) was accepted and failed later with AttributeError."""
    with pytest.raises(sdk.InvalidRequestError, match=r"pass rate_limit=RateLimit\(\.\.\.\)"):
        AsyncAutocalls("t", base_url="http://127.0.0.1:1/api", limiter=limiter)  # type: ignore[arg-type]
