"""Issue 11 around the lanes: bulk work is BACKGROUND by default, its ETA counts the slots other
traffic took, and the limit the server states is exposed, warned about, or adopted."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from autocalls_async import (
    AsyncAutocalls,
    InvalidRequestError,
    LimiterUnavailableError,
    LocalRateLimiter,
    Priority,
    RateLimit,
    RateLimiter,
    Slot,
    cli,
)
from autocalls_async._client import ClientStats
from autocalls_async._ratelimit import Limiter
from autocalls_async._wire import stated_limit
from autocalls_async.bulk import BulkRunner, generated_requests
from autocalls_async.cli import job as cli_job
from autocalls_async.cli import progress as cli_progress
from autocalls_async.testing import Fault, MockAutocalls

from .test_cli import ThreadedServer

FAST = RateLimit(100, 1.0)


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockAutocalls]:
    """The emulator in a thread, for the command line's own event loop."""
    with ThreadedServer(rate_limit=None) as server:
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", "cli-token")
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        yield server


class Recorder:
    """A limiter that notes each call's lane, around a real one."""

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.rate_limit = inner.rate_limit
        self.lanes: list[Priority] = []

    @contextlib.asynccontextmanager
    async def slot(
        self, key: str, *, deadline: float | None = None, priority: Priority = Priority.INTERACTIVE
    ) -> AsyncIterator[Slot]:
        self.lanes.append(priority)
        async with self.inner.slot(key, deadline=deadline, priority=priority) as slot:
            yield slot

    async def pause(self, key: str, seconds: float) -> None:
        await self.inner.pause(key, seconds)


# ---------------------------------------------------------------------- bulk lanes


async def test_bulk_runner_rows_are_background_unless_asked(
    server: MockAutocalls, token: str
) -> None:
    """BulkRunner sends in the BACKGROUND lane by default; priority= changes it."""
    for priority, expected in ((None, Priority.BACKGROUND), *((p, p) for p in Priority)):
        recorder = Recorder(LocalRateLimiter(FAST))
        async with AsyncAutocalls(token, base_url=server.base_url, limiter=recorder) as client:
            options: dict[str, Any] = {} if priority is None else {"priority": priority}
            async with BulkRunner(client, generated_requests(3), **options) as run:
                assert all([result.ok async for result in run])
            await client.generate_reply(assistant_id=123, customer_identifier="web", message="x")
        assert recorder.lanes == [expected] * 3 + [Priority.INTERACTIVE]


async def test_bulk_runner_refuses_a_priority_that_is_not_one(
    server: MockAutocalls, token: str
) -> None:
    async with AsyncAutocalls(token, base_url=server.base_url, rate_limit=None) as client:
        with pytest.raises(InvalidRequestError, match="Priority.BACKGROUND"):
            BulkRunner(client, [], priority=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "expected"),
    [((), Priority.BACKGROUND), (("--priority", "interactive"), Priority.INTERACTIVE)],
)
def test_bulk_command_priority(
    threaded: MockAutocalls,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    option: tuple[str, ...],
    expected: Priority,
) -> None:
    """`autocalls-async bulk` is BACKGROUND unless --priority interactive."""
    seen: list[Priority] = []

    class Runner(BulkRunner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self.priority)

    monkeypatch.setattr(cli_job, "BulkRunner", Runner)
    source = tmp_path / "in.csv"
    source.write_text("assistant_id,customer_identifier,message\n123,a,hi\n")
    argv = ["bulk", str(source), "--out", str(tmp_path / "out.jsonl"), "--progress", "off"]
    argv += ["--rate-limit", "100/1", *option]
    assert cli.main(argv) == 0
    assert seen == [expected]


# ---------------------------------------------------------------------- the ETA


def test_eta_counts_the_slots_other_traffic_took() -> None:
    """Before a few starts: the limit's pace. Then the pace this run measured (never faster
    than the limit), and the share of slots others took in the progress figures."""
    rate = RateLimit(5, 1.0)
    clock = cli_progress.StartClock(LocalRateLimiter(rate))
    meter = cli_progress.Meter(100, rate, ClientStats(), starts=clock)
    # nothing started yet: the first row starts at once, the 99 others an interval apart
    assert meter.eta() == pytest.approx(99 * rate.interval)
    assert meter.share() is None and "other traffic" not in meter.figures()
    for n in range(cli_progress.PACE_MIN_STARTS):  # interactive calls took every other slot
        clock.recent.append(n * 2 * rate.interval)
        clock.recent_lost.append(1)  # each start waited through one slot another call took
    clock.count = len(clock.recent)
    assert meter.eta() == pytest.approx(100 * 2 * rate.interval)
    assert meter.share() == pytest.approx(0.5)
    assert "(50% of slots to other traffic)" in meter.figures()
    clock.recent.clear()
    for n in range(cli_progress.PACE_WINDOW + 3):  # alone again: the last starts at the full rate
        clock.recent.append(1000 + n * rate.interval * 0.99)
        clock.recent_lost.append(0)
    assert meter.eta() == pytest.approx(100 * rate.interval)
    assert meter.share() == 1.0 and "other traffic" not in meter.figures()
    # Slow, but no slot went to anyone else (reply latency, a small --concurrency): no
    # "other traffic" (it said 76% when nothing else used the token).
    clock.recent.clear()
    for n in range(cli_progress.PACE_WINDOW):
        clock.recent.append(2000 + n * 4 * rate.interval)
        clock.recent_lost.append(0)
    assert meter.share() == pytest.approx(0.25) and "other traffic" not in meter.figures()
    meter.answered = 100
    assert meter.eta() == 0.0


@pytest.mark.timing
async def test_the_start_clock_keeps_the_last_starts(server: MockAutocalls, token: str) -> None:
    clock = cli_progress.StartClock(LocalRateLimiter(attrs.evolve(FAST, burst=1)))
    for _ in range(cli_progress.PACE_WINDOW + 2):
        async with clock.slot(token) as slot:
            slot.sent()
    assert len(clock.recent) == cli_progress.PACE_WINDOW
    pace = clock.pace()
    assert pace is not None and pace >= FAST.interval * 0.5


# ---------------------------------------------------------------------- the server's limit


def test_stated_limit_is_per_minute_and_a_positive_whole_number() -> None:
    assert stated_limit("5") == RateLimit(5, 60.0)
    assert stated_limit(" 300 ", margin=0.1) == RateLimit(300, 60.0, margin=0.1)
    for text in (None, "", "0", "-5", "5.5", "５", "10000000", "many"):
        assert stated_limit(text) is None, text
    assert stated_limit("5", policy="5;w=1") == RateLimit(5, 1.0)
    assert stated_limit("5", policy='"default";q=5;w=0.5') == RateLimit(5, 0.5)
    for policy in ("5", "5;w=0", "5;w=abc", "5;w=999999", "5;window=1"):
        assert stated_limit("5", policy=policy) == RateLimit(5, 60.0), policy


def test_from_server_is_its_default_with_a_flag() -> None:
    """Equal to its default (every client of a token must use one rate); the repr tells."""
    follow = RateLimit.from_server()
    assert follow == RateLimit(5, 60.0) and follow.follows_server
    assert repr(follow) == "RateLimit.from_server(default=RateLimit(5, 60, margin=0.02))"
    assert str(follow) == "5/60s"
    assert RateLimit.from_server(RateLimit(2, 1.0)) == RateLimit(2, 1.0)
    assert RateLimit(1, 12.0).same_rate(RateLimit(5, 60.0))
    assert not RateLimit(5, 1.0).same_rate(RateLimit(5, 60.0))
    with pytest.raises(TypeError, match="default must be a RateLimit"):
        RateLimit.from_server((5, 60))  # type: ignore[arg-type]


async def call(client: AsyncAutocalls, n: int) -> None:
    await client.generate_reply(assistant_id=123, customer_identifier=f"c{n}", message="x")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_server_limit_that_differs_is_warned_about_once(
    token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stated limit is exposed; one warning names both limits; ours is kept."""
    caplog.set_level(logging.INFO, logger="autocalls_async")
    async with (
        MockAutocalls(rate_limit=(200, 60.0)) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=RateLimit(5, 1.0)) as client,
    ):
        assert client.stats.server_limit is None
        for n in range(3):
            await call(client, n)
        assert client.stats.server_limit == RateLimit(200, 60.0)
    (warning,) = warnings_of(caplog)
    assert "limit of 200/60s" in warning and "rate_limit is 5/1s" in warning
    assert token not in caplog.text


async def test_a_server_limit_that_matches_is_silent(
    token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """5/1s is 300 per minute: what a server stating 300 allows; a scaled emulator states its
    window (RateLimit-Policy). No header: nothing."""
    async with (
        MockAutocalls(rate_limit=(300, 60.0)) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=RateLimit(5, 1.0)) as client,
    ):
        await call(client, 0)
        assert client.stats.server_limit == RateLimit(300, 60.0)
    async with (
        MockAutocalls(rate_limit=(5, 1.0)) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=RateLimit(5, 1.0)) as client,
    ):
        await call(client, 0)
        assert client.stats.server_limit == RateLimit(5, 1.0)
    async with (
        MockAutocalls(rate_limit=None) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=RateLimit(5, 1.0)) as client,
    ):
        await call(client, 0)
        assert client.stats.server_limit is None
    assert not warnings_of(caplog)


@pytest.mark.timing
async def test_from_server_adopts_the_stated_limit_after_the_first_response(
    token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Default 5/1s; the server states 150 per minute (2.5/s): from the second call on, starts
    are 0.4 s apart (never faster than stated), no 429; a later 429 still pauses."""
    caplog.set_level(logging.INFO, logger="autocalls_async")
    follow = RateLimit.from_server(default=RateLimit(5, 1.0, burst=1))
    async with (
        MockAutocalls(rate_limit=(150, 60.0)) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=follow) as client,
    ):
        await call(client, 0)
        assert client.stats.server_limit == RateLimit(150, 60.0)
        limiter = client._limiter
        assert isinstance(limiter, Limiter) and isinstance(limiter.fallback, Limiter)
        adopted = RateLimit(150, 60.0, burst=1)  # the burst stays ours
        assert limiter.rate_limit == limiter.fallback.rate_limit == adopted
        await asyncio.gather(*(call(client, n) for n in range(1, 5)))
        gaps = [b.time - a.time for a, b in itertools.pairwise(server.requests)]
        assert all(gap >= 0.4 - 0.003 for gap in gaps), gaps
        server.inject(Fault.rate_limited(retry_after=1))
        await call(client, 5)  # 429, paused 1 s, retried
        refused = next(r.time for r in server.requests if r.status == 429)
        assert server.requests[-1].time - refused >= 1.0 - 0.003
        assert server.count(status=429) == 1 and client.stats.rate_limited == 1
    assert any("the server states: 150/60s" in r.getMessage() for r in caplog.records)


async def test_from_server_keeps_its_default_while_another_client_uses_the_token(
    token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another live client on the token at the default rate: adopting would break the one rate
    per token; the follower keeps the default and says why."""
    follow = RateLimit.from_server(default=RateLimit(5, 1.0))
    async with (
        MockAutocalls(rate_limit=(150, 60.0)) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=RateLimit(5, 1.0)) as other,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=follow) as client,
    ):
        await call(other, 0)
        await call(client, 1)
        await call(client, 2)
        (warning,) = [text for text in warnings_of(caplog) if "is kept" in text]
        assert "rate_limit 5/1s is kept" in warning and "another live client" in warning
        assert client.stats.server_limit == RateLimit(150, 60.0)


async def test_from_server_retries_adoption_when_the_store_is_down(
    token: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    follow = RateLimit.from_server(default=RateLimit(5, 1.0))
    async with (
        MockAutocalls(rate_limit=(600, 60.0)) as server,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=follow) as client,
    ):
        limiter = client._limiter
        assert limiter is not None
        original = limiter.adopt  # type: ignore[attr-defined]
        attempts = 0

        async def down_once(key: str, rate_limit: RateLimit) -> str | None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise LimiterUnavailableError("the store is down")
            return await original(key, rate_limit)  # type: ignore[no-any-return]

        monkeypatch.setattr(limiter, "adopt", down_once)
        await call(client, 0)
        assert limiter.rate_limit == RateLimit(5, 1.0)
        await call(client, 1)
        assert limiter.rate_limit == RateLimit(600, 60.0) and attempts == 2
    assert "could not be adopted now" in warnings_of(caplog)[0]


def test_from_server_needs_the_clients_own_limiter() -> None:
    with pytest.raises(InvalidRequestError, match="without limiter="):
        AsyncAutocalls(
            "t",
            rate_limit=RateLimit.from_server(),
            limiter=LocalRateLimiter(RateLimit(5, 60.0)),
        )
