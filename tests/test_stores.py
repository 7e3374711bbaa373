"""The stores and the limiter front on their failure paths: a store that fails while a grant
is out, a store that always needs a round trip, a host file that is corrupt, from another boot,
held by another process, or inherited across a fork."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import pytest

from autocalls_async import HostRateLimiter, LocalRateLimiter, RateLimit
from autocalls_async._ratelimit import Limiter, _Grant
from autocalls_async._schedule import TokenState
from autocalls_async._stores import MemoryStore

from .virtual_time import run_virtual, stall

T = TypeVar("T")
RATE = RateLimit(5, 1.0, burst=1)  # evenly spaced: each start moves the next grant
KEY = "token"


class Flaky(MemoryStore):
    """A process store that can be told to fail, or to answer only after a round trip."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.failing = False
        self.remote = False

    def try_update(
        self, key: str, update: Callable[[TokenState, float], T]
    ) -> tuple[bool, T | None]:
        if self.failing:
            raise RuntimeError("store down")
        if self.remote:
            return False, None
        return super().try_update(key, update)

    async def update(self, key: str, update: Callable[[TokenState, float], T]) -> T:
        await asyncio.sleep(0.001)  # a round trip
        if self.failing:
            raise RuntimeError("store down")
        return await super().update(key, update)


def test_a_failed_report_counts_as_a_start_at_the_lease_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store fails as the start is reported: logged, and the next grant waits for the
    lease to run out plus one gap (the worst case: a write at the lease's very end)."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        store = Flaky(loop.time)
        limiter = Limiter(store, RATE, lease=1.0)
        grant = await limiter.acquire(KEY)
        store.failing = True
        grant.sent()
        store.failing = False
        began = loop.time()
        async with limiter.slot(KEY) as slot:
            slot.sent()
        return loop.time() - began

    assert run_virtual(scenario) == pytest.approx(1.0 + RATE.interval, abs=0.06)
    assert "could not be reported" in caplog.text


def test_a_failed_report_counts_in_the_window_at_the_lease_end() -> None:
    """With bursts (2 per 1 s), the lost report is a start at the lease's end: the grant after
    it goes at once (one start in the window), the one after that a window later."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        store = Flaky(loop.time)
        limiter = Limiter(store, RateLimit(2, 1.0), lease=1.0)
        grant = await limiter.acquire(KEY)
        store.failing = True
        grant.sent()
        store.failing = False
        began = loop.time()
        starts = []
        for _ in range(2):
            async with limiter.slot(KEY) as slot:
                starts.append(loop.time() - began)
                slot.sent()
        return starts

    second, third = run_virtual(scenario)
    assert second == pytest.approx(1.0, abs=0.01)  # the lease ran out: counted, not held
    assert third == pytest.approx(1.0 + RateLimit(2, 1.0).window, abs=0.01)


def test_reports_and_renewals_through_a_store_that_needs_round_trips() -> None:
    """A store that always needs a round trip (like Redis): reports and renewals run as tasks,
    the spacing holds, a slow connect keeps its grant, and aclose() waits for the reports."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        store = Flaky(loop.time)
        store.remote = True
        starts: list[float] = []
        async with Limiter(store, RATE, lease=1.0) as limiter:

            async def one(delay: float) -> None:
                async with limiter.slot(KEY) as slot:
                    await asyncio.sleep(delay)  # 2.5 s: renewed twice, as tasks
                    assert isinstance(slot, _Grant) and slot.may_send()
                    starts.append(loop.time())
                    slot.sent()

            await asyncio.gather(one(2.5), one(0.0), one(0.0))
        return starts

    starts = run_virtual(scenario)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # Never closer than the schedule allows; late by at most a few 1 ms round trips.
    assert all(RATE.interval - 0.002 <= gap <= RATE.interval + 0.004 for gap in gaps), gaps


def test_failed_renewals_and_a_lost_lease(caplog: pytest.LogCaptureFixture) -> None:
    """Renewals that fail are logged and the lease runs out; a holder whose loop stalled past
    its lease learns at the next renewal that it lost it, and may never write on it."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")

    async def scenario() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        store = Flaky(loop.time)
        limiter = Limiter(store, RATE, lease=1.0)
        failed = await limiter.acquire(KEY)
        store.failing = True
        await asyncio.sleep(0.5)  # a renewal fails
        store.failing = False
        expired = failed.may_send()
        await asyncio.sleep(0.6)
        after_lease = failed.may_send()
        failed.give_back()
        await asyncio.sleep(1.5)
        stalled = await limiter.acquire(KEY)
        stall(1.5)  # past the lease: the renewal that was due could not run
        await asyncio.sleep(0.4)  # it runs now, and hears the lease is gone
        lost = stalled.may_send()
        stalled.give_back()
        store.remote = True
        remote = await limiter.acquire(KEY)
        store.failing = True
        await asyncio.sleep(0.4)  # a renewal as a task, failing
        store.failing = False
        remote.give_back()
        await limiter.aclose()
        return expired, after_lease, lost

    expired, after_lease, lost = run_virtual(scenario)
    assert expired is True  # still within the lease measured before the failure
    assert after_lease is False and lost is False
    assert caplog.text.count("could not be reported") >= 2


def test_a_store_that_fails_while_callers_wait(caplog: pytest.LogCaptureFixture) -> None:
    """Every waiter hears the store's failure; the fallback is used where there is one."""

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        store = Flaky(loop.time)
        limiter = Limiter(store, RATE, lease=1.0)
        first = await limiter.acquire(KEY)
        waiters = [asyncio.create_task(limiter.acquire(KEY)) for _ in range(3)]
        await asyncio.sleep(0)
        store.failing = True
        first.sent()  # fails too: logged
        results = await asyncio.gather(*waiters, return_exceptions=True)
        return [type(r).__name__ for r in results]

    assert run_virtual(scenario) == ["RuntimeError"] * 3


def test_limiter_arguments_are_checked() -> None:
    store = MemoryStore()
    with pytest.raises(TypeError, match="rate_limit"):
        Limiter(store, "5/60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease"):
        Limiter(store, RATE, lease=0.1)
    with pytest.raises(ValueError, match="background_share"):
        Limiter(store, RATE, background_share=-1)
    assert repr(LocalRateLimiter(RATE)) == "<LocalRateLimiter process 5/1s evenly spaced>"
    host = HostRateLimiter("/some/where", rate_limit=RATE)
    assert (
        host.path == "/some/where"
        and repr(host) == "<HostRateLimiter /some/where 5/1s evenly spaced>"
    )
    assert host.kind == "host"
