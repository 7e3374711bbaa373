"""Issue 14 in BulkRunner: stop paying for failures known in advance (stop_on, unknown
assistants, normalised identifiers), against the emulator on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from autocalls_async import (
    AsyncAutocalls,
    AuthenticationError,
    Budget,
    BudgetExceededError,
    ClientClosedError,
    InsufficientBalanceError,
    InvalidRequestError,
    RateLimit,
)
from autocalls_async.bulk import (
    BulkRequest,
    BulkResult,
    BulkRunner,
    SkippedAssistantError,
    error_code,
)
from autocalls_async.identifiers import e164
from autocalls_async.testing import Fault, MockAutocalls

Make = Callable[..., AsyncAutocalls]


def rows(*assistants: int) -> list[dict[str, Any]]:
    return [
        {"assistant_id": a, "customer_identifier": f"+1555000{n:04d}", "message": f"m{n}"}
        for n, a in enumerate(assistants, 1)
    ]


async def run(runner: BulkRunner) -> dict[Any, BulkResult]:
    async with runner:
        return {result.id: result async for result in runner}


async def test_unknown_assistant_is_asked_once(server: MockAutocalls, make_client: Make) -> None:
    """After ASSISTANT_NOT_FOUND the assistant's other rows are skipped, not sent; the other
    assistants' rows all go."""
    runner = BulkRunner(make_client(server.base_url), rows(999, 123, 999, 999, 123, 999))
    results = await run(runner)
    assert server.count() == 3
    assert server.count(404) == 1
    assert error_code(results[1].error) == "ASSISTANT_NOT_FOUND"  # type: ignore[arg-type]
    for row in (3, 4, 6):
        error = results[row].error
        assert isinstance(error, SkippedAssistantError) and error.assistant_id == 999
        assert error_code(error) == "SKIPPED_ASSISTANT_NOT_FOUND"
        assert "for row 1 of this run" in str(error)
        assert results[row].sent is False
        assert results[row].to_json()["error_code"] == "SKIPPED_ASSISTANT_NOT_FOUND"
    assert results[2].ok and results[5].ok
    assert runner.unknown_assistants == {999: 1}


async def test_without_skipping_every_row_is_sent(server: MockAutocalls, make_client: Make) -> None:
    """skip_unknown_assistants=False restores one request per row."""
    runner = BulkRunner(
        make_client(server.base_url), rows(999, 999, 999), skip_unknown_assistants=False
    )
    results = await run(runner)
    assert server.count(404) == 3
    assert {error_code(r.error) for r in results.values()} == {"ASSISTANT_NOT_FOUND"}  # type: ignore[arg-type]


async def test_another_error_tries_the_next_row(server: MockAutocalls, make_client: Make) -> None:
    """A first row failing for another reason says nothing about the assistant: the next row
    is tried alone, and once one is answered the rest flow."""
    server.inject(Fault.status(503), times=2)
    client = make_client(server.base_url, max_retries=0, retry_policy=None)
    results = await run(BulkRunner(client, rows(123, 123, 123, 123)))
    assert [r.ok for _, r in sorted(results.items())] == [False, False, True, True]
    assert server.count() == 4


async def test_assistant_deleted_during_the_run(server: MockAutocalls, make_client: Make) -> None:
    """An assistant that answered and then 404s: the rows pulled after it are skipped."""
    client = make_client(server.base_url)
    requests = rows(123, 123, 123, 123, 123)

    def source() -> Any:
        for n, row in enumerate(requests, 1):
            if n == 3:
                server.assistants.discard(123)
            yield row

    runner = BulkRunner(client, source(), concurrency=1)
    results = await run(runner)
    assert results[1].ok and results[2].ok
    assert error_code(results[3].error) == "ASSISTANT_NOT_FOUND"  # type: ignore[arg-type]
    assert isinstance(results[4].error, SkippedAssistantError)
    assert server.count() == 3


async def test_balance_stops_the_run_and_in_flight_calls_finish(make_client: Make) -> None:
    """At the first INSUFFICIENT_BALANCE nothing new is sent; rows waiting for a slot end as
    not sent; stopped_by says why."""
    async with MockAutocalls(rate_limit=None, balance=3) as server:
        client = make_client(server.base_url, rate_limit=RateLimit(5, 0.5))
        runner = BulkRunner(client, rows(*[123] * 10))
        results = await run(runner)
    assert server.count() == 4 and server.count(402) == 1
    assert sum(r.ok for r in results.values()) == 3
    assert runner.stopped_by is not None
    assert isinstance(runner.stopped_by.error, InsufficientBalanceError)
    not_sent = [r for r in results.values() if isinstance(r.error, ClientClosedError)]
    assert len(not_sent) == 6 and all(not r.sent for r in not_sent)
    assert client.closed


async def test_401_stops_the_run(make_client: Make) -> None:
    """A wrong token is learned once, not once per row."""
    async with MockAutocalls(rate_limit=None, tokens=["right"]) as server:
        client = make_client(server.base_url, api_token="wrong", rate_limit=RateLimit(5, 0.5))
        runner = BulkRunner(client, rows(123, 456, 123, 456, 123))
        results = await run(runner)
    assert server.count(401) == 1 and server.count() == 1  # in flight: one row at a time
    assert runner.stopped_by is not None
    assert isinstance(runner.stopped_by.error, AuthenticationError)
    assert len(results) == 5


async def test_stop_on_nothing_sends_every_row(make_client: Make) -> None:
    """stop_on=() keeps sending after INSUFFICIENT_BALANCE (each row fails on its own)."""
    async with MockAutocalls(rate_limit=None, balance=1) as server:
        runner = BulkRunner(make_client(server.base_url), rows(123, 123, 123), stop_on=())
        results = await run(runner)
    assert server.count() == 3 and server.count(402) == 2
    assert runner.stopped_by is None and len(results) == 3
    with pytest.raises(InvalidRequestError, match="stop_on must be AutocallsError subclasses"):
        BulkRunner(make_client("http://127.0.0.1:9/api"), [], stop_on=(ValueError,))  # type: ignore[arg-type]


async def test_budget_stops_without_cancelling_reserved_calls(
    server: MockAutocalls, make_client: Make
) -> None:
    """Under a Budget the run stops at BudgetExceededError, but the calls that hold budget are
    still sent (the client is not closed)."""
    client = make_client(server.base_url, budget=Budget(replies=4), rate_limit=RateLimit(5, 0.5))
    runner = BulkRunner(client, rows(*[123] * 10))
    results = await run(runner)
    assert server.count() == 4 and sum(r.ok for r in results.values()) == 4
    assert runner.stopped_by is not None
    assert isinstance(runner.stopped_by.error, BudgetExceededError)
    refused = [r for r in results.values() if isinstance(r.error, BudgetExceededError)]
    assert refused and all(not r.sent for r in refused)
    assert error_code(refused[0].error) == "BUDGET_EXCEEDED"  # type: ignore[arg-type]
    assert not client.closed


async def test_held_rows_end_as_not_sent_on_stop(make_client: Make) -> None:
    """A stop during the first row: the held rows are yielded as ClientClosedError."""
    async with MockAutocalls(rate_limit=None, reply_delay=0.3) as server:
        runner = BulkRunner(make_client(server.base_url), rows(123, 123, 123))
        async with runner:

            async def collect() -> list[BulkResult]:
                return [result async for result in runner]

            task = asyncio.create_task(collect())
            async with asyncio.timeout(10):
                while server.count() < 1:
                    await asyncio.sleep(0.01)
            runner.stop(close_client=False)
            results = await task
        assert server.count() == 1
    assert sorted(r.id for r in results) == [1, 2, 3]
    held = [r for r in results if isinstance(r.error, ClientClosedError)]
    assert [r.id for r in held] == [2, 3]
    assert "stopped before this row was sent" in str(held[0].error)


async def test_identifiers_are_checked_per_row(server: MockAutocalls, make_client: Make) -> None:
    """With normalize_identifier, a refused identifier fails its own row, named, unsent; the
    spellings of one number are one conversation in input order."""
    client = make_client(server.base_url, normalize_identifier=e164("US"))
    source = [
        BulkRequest(1, 123, "+1 (415) 555-1234", "a"),
        BulkRequest(2, 123, "555-12", "b"),
        BulkRequest(3, 123, "415-555-1234", "c"),
        BulkRequest(4, 123, "+14155551234", "d"),
    ]
    results = await run(BulkRunner(client, source))
    error = results[2].error
    assert isinstance(error, InvalidRequestError)
    assert str(error).startswith("row 2: customer_identifier '555-12' is not a possible")
    assert results[2].to_json()["error_code"] == "INVALID_ROW"
    assert server.count() == 3
    assert server.conversations[(123, "+14155551234")].messages == ["a", "c", "d"]
