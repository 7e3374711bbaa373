"""The local limiter, on a virtual clock: the guarantee, FIFO order, pauses, max_wait."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocalls_async import InvalidRequestError, LocalRateLimiter, RateLimit, RateLimitTimeout
from autocalls_async._ratelimit import FifoGate, Limiter
from autocalls_async._stores import MemoryStore

from .virtual_time import run_virtual

EPS = 1e-6
_keys = itertools.count()


def fresh_key() -> str:
    return f"key-{next(_keys)}"


caller = st.tuples(
    st.floats(0, 5, allow_nan=False),  # arrival (s after start)
    st.floats(0, 0.5, allow_nan=False) | st.just(0.0),  # send delay after the grant
    st.none() | st.floats(0, 5, allow_nan=False),  # cancel after (s after arrival)
)
pause = st.tuples(st.floats(0, 5, allow_nan=False), st.floats(0, 2, allow_nan=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    callers=st.lists(caller, min_size=1, max_size=30),
    pauses=st.lists(pause, max_size=3),
    requests=st.integers(1, 6),
    period=st.sampled_from([0.5, 1.0, 60.0]),
    burst=st.none() | st.integers(1, 6),
)
def test_guarantee_fifo_and_pauses_hold_for_any_schedule(
    callers: list[tuple[float, float, float | None]],
    pauses: list[tuple[float, float]],
    requests: int,
    period: float,
    burst: int | None,
) -> None:
    """Random arrivals, late sends, cancellations and pauses never break the limiter's promises,
    whatever the burst."""
    rate = RateLimit(requests, period, burst=None if burst is None else min(burst, requests))
    bursts = rate.bursts

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(rate, clock=asyncio.get_running_loop().time)
        key = fresh_key()
        t0 = loop.time()
        entered: list[int] = []
        arrival: dict[int, float] = {}
        grants: list[tuple[int, float]] = []
        starts: list[float] = []
        issued: list[tuple[float, float]] = []  # (issued at, paused until)

        async def one(index: int, at: float, send_delay: float) -> None:
            await asyncio.sleep(at)
            entered.append(index)
            arrival[index] = loop.time()
            async with limiter.slot(key) as slot:
                grants.append((index, loop.time()))
                try:
                    await asyncio.sleep(send_delay)
                finally:
                    starts.append(loop.time())
                    slot.sent()

        async def pauser(at: float, seconds: float) -> None:
            await asyncio.sleep(at)
            issued.append((loop.time(), loop.time() + seconds))
            await limiter.pause(key, seconds)

        async def canceller(task: asyncio.Task[None], after: float) -> None:
            await asyncio.sleep(after)
            task.cancel()

        tasks = []
        for index, (at, send_delay, cancel_after) in enumerate(callers):
            task = asyncio.create_task(one(index, at, send_delay))
            tasks.append(task)
            if cancel_after is not None:
                tasks.append(asyncio.create_task(canceller(task, at + cancel_after)))
        tasks += [asyncio.create_task(pauser(at, s)) for at, s in pauses]
        await asyncio.gather(*tasks, return_exceptions=True)

        # 1. Never more than `requests` starts in any rolling `period`.
        starts.sort()
        for first, last in zip(starts, starts[requests:], strict=False):
            assert last - first >= period - EPS, (first, last)
        # 2. First come, first served among those that were granted.
        granted = {index for index, _ in grants}
        assert [index for index, _ in grants] == [i for i in entered if i in granted]
        # 3. No grant while a pause is in force.
        for index, when in grants:
            for at, until in issued:
                assert not at + EPS < when < until - EPS, (index, when, at, until)
        # 4. The burst: k + 1 consecutive starts, k >= burst, span (k + 1 - burst) spacings
        # (less the tolerance).
        tolerance = period / requests * rate.margin / 2
        for i, j in itertools.combinations(range(len(starts)), 2):
            if j - i >= bursts and bursts < requests:
                least = (j - i + 1 - bursts) * rate.interval - tolerance
                assert starts[j] - starts[i] >= least - EPS, (i, j, bursts)
        # 5. Work-conserving: a grant comes as soon as the window, the spacing and pauses
        # allow, never later (computed from the real starts, which the schedule's records
        # never exceed). A pause (a 429) after a burst spaces the token evenly from then on.
        before: list[float] = []
        tat = -float("inf")
        for (index, when), start in zip(grants, sorted(starts), strict=False):
            paused_until = max((u for at, u in issued if at <= when + EPS), default=-1.0)
            window = before[-requests] + rate.window if len(before) >= requests else -1.0
            learned = any(at <= when + EPS for at, _ in issued) and len(before) > 1
            spacing = tat - (bursts - 1) * rate.interval if bursts < requests else -1.0
            if learned:
                spacing = tat
            previous = before[-1] if before else -1.0  # one grant at a time
            earliest = max(arrival[index], previous, window, spacing, paused_until)
            assert when <= earliest + EPS, (index, when, earliest)
            before.append(start)
            tat = max(tat, start) + rate.interval
        # Every caller that was not cancelled got through.
        assert all(t.done() for t in tasks)
        assert loop.time() - t0 < 10_000

    run_virtual(scenario)


def test_full_sustained_rate_on_virtual_clock() -> None:
    """100 queued calls: 5 at once, then 5 more each window, to the microsecond: the full rate
    of a rolling window, never one start more."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(RateLimit(5, 60.0), clock=asyncio.get_running_loop().time)
        key = fresh_key()
        starts: list[float] = []

        async def one() -> None:
            async with limiter.slot(key) as slot:
                starts.append(loop.time())
                slot.sent()

        await asyncio.gather(*(one() for _ in range(100)))
        return starts

    starts = run_virtual(scenario)
    groups = [starts[i : i + 5] for i in range(0, 100, 5)]
    assert all(max(group) - min(group) < 1e-6 for group in groups)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(groups)]
    # The first burst had no due time to keep to: its records are dated a tolerance early
    # (60 x 1.01 later the window has room); from then on 60 x 1.02 apart.
    assert gaps[0] == pytest.approx(60.0 * 1.01, abs=1e-3)
    assert min(gaps[1:]) == pytest.approx(60.0 * 1.02, abs=1e-3)
    assert max(gaps[1:]) == pytest.approx(60.0 * 1.02, abs=1e-3)


def test_full_sustained_rate_evenly_spaced_on_virtual_clock() -> None:
    """burst=1: 100 queued calls start exactly one interval apart: the full rate, no burst."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(
            RateLimit(5, 60.0, burst=1), clock=asyncio.get_running_loop().time
        )
        key = fresh_key()
        starts: list[float] = []

        async def one() -> None:
            async with limiter.slot(key) as slot:
                starts.append(loop.time())
                slot.sent()

        await asyncio.gather(*(one() for _ in range(100)))
        return starts

    starts = run_virtual(scenario)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The first start had no due time to keep to: the next is one minimum gap after it
    # (spacing x 1.01); from then on every start is on the grid, spacing x 1.02 apart.
    assert gaps[0] == pytest.approx(12.0 * 1.01, abs=1e-3)
    assert min(gaps[1:]) == pytest.approx(12.0 * 1.02, abs=1e-3)
    assert max(gaps[1:]) == pytest.approx(12.0 * 1.02, abs=1e-3)


def test_late_send_pushes_the_next_start_back() -> None:
    """A request written late (a slow TLS handshake) spaces the next one from its real start."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(
            RateLimit(1, 1.0, margin=0.0), clock=asyncio.get_running_loop().time
        )
        key = fresh_key()
        starts: list[float] = []

        async def one(delay: float) -> None:
            async with limiter.slot(key) as slot:
                await asyncio.sleep(delay)
                starts.append(loop.time())
                slot.sent()

        await asyncio.gather(one(0.7), one(0.0), one(0.0))
        return starts

    a, b, c = run_virtual(scenario)
    assert b - a == pytest.approx(1.0)
    assert c - b == pytest.approx(1.0)


def test_max_wait_fails_fast_when_the_wait_is_certain() -> None:
    """With four calls queued ahead at 1 per second, max_wait=2 fails at once, sending nothing."""

    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(
            RateLimit(1, 1.0, margin=0.0), clock=asyncio.get_running_loop().time
        )
        key = fresh_key()
        granted = 0

        async def one(deadline: float | None) -> None:
            nonlocal granted
            async with limiter.slot(key, deadline=deadline) as slot:
                granted += 1
                slot.sent()

        queued = [asyncio.create_task(one(None)) for _ in range(4)]
        await asyncio.sleep(0)
        began = loop.time()
        with pytest.raises(RateLimitTimeout, match="max_wait"):
            await one(loop.time() + 2.0)
        elapsed = loop.time() - began
        await asyncio.gather(*queued)
        return elapsed, granted

    elapsed, granted = run_virtual(scenario)
    assert elapsed == 0.0
    assert granted == 4


def test_max_wait_times_out_when_waiters_ahead_are_slow_to_send() -> None:
    """A wait that turns out longer than predicted still ends at the deadline."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(
            RateLimit(1, 1.0, margin=0.0), clock=asyncio.get_running_loop().time
        )
        key = fresh_key()

        async def slow_sender() -> None:
            async with limiter.slot(key) as slot:
                await asyncio.sleep(10)  # holds the gate: its request is not written yet
                slot.sent()

        holder = asyncio.create_task(slow_sender())
        await asyncio.sleep(0)
        began = loop.time()
        with pytest.raises(RateLimitTimeout):
            async with limiter.slot(key, deadline=loop.time() + 3.0):
                pass
        waited = loop.time() - began
        await holder
        return waited

    assert run_virtual(scenario) == pytest.approx(3.0)


def test_pause_longer_than_max_wait_fails_at_once() -> None:
    """A 429 pause of 30 s makes a call with max_wait=1 fail immediately."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(RateLimit(5, 1.0), clock=asyncio.get_running_loop().time)
        key = fresh_key()
        await limiter.pause(key, 30.0)
        began = loop.time()
        with pytest.raises(RateLimitTimeout):
            async with limiter.slot(key, deadline=loop.time() + 1.0):
                pass
        return loop.time() - began

    assert run_virtual(scenario) == 0.0


def test_cancelling_100k_waiters_is_linear_and_frees_the_gate() -> None:
    """Cancelled waiters give their place back; the next call is not held up by them."""

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(
            RateLimit(5, 60.0, burst=1), clock=asyncio.get_running_loop().time
        )
        key = fresh_key()
        async with limiter.slot(key) as slot:  # the token is now busy for one interval
            slot.sent()

        async def one() -> None:
            async with limiter.slot(key) as slot:
                slot.sent()

        waiters = [asyncio.create_task(one()) for _ in range(20_000)]
        await asyncio.sleep(0)
        for task in reversed(waiters):  # worst order for a deque.remove()-based lock
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        began = loop.time()
        await one()
        return loop.time() - began

    assert run_virtual(scenario) <= 12.0 * 1.02 + EPS


def test_one_token_one_rate_limit_per_process() -> None:
    """Two clients may not disagree about one token's limit: that would break the guarantee."""

    async def scenario() -> None:
        key = fresh_key()
        async with LocalRateLimiter(RateLimit(5, 1.0)).slot(key) as slot:
            slot.sent()
        with pytest.raises(InvalidRequestError) as caught:
            async with LocalRateLimiter(RateLimit(10, 1.0)).slot(key):
                pass
        assert "already limited to 5/1s by another live client" in str(caught.value)
        assert "must use the same rate" in str(caught.value) and "got 10/1s" in str(caught.value)
        assert "margin" not in str(caught.value).split("RateLimit(")[0]  # margins agree
        assert str(caught.value).endswith("use its rate_limit, RateLimit(5, 1, margin=0.02).")

    run_virtual(scenario)


def test_a_limit_with_another_margin_is_refused_naming_both_margins() -> None:
    """The margin spaces every start: refused, and the message says it is the margin that
    differs (it used to read "limited to 5/1s ... (got 5/1s)")."""

    async def scenario() -> str:
        key = fresh_key()
        async with LocalRateLimiter(RateLimit(5, 1.0)).slot(key) as slot:
            slot.sent()
        with pytest.raises(InvalidRequestError) as caught:
            async with LocalRateLimiter(RateLimit(5, 1.0, margin=0.1)).slot(key):
                pass
        return str(caught.value)

    message = run_virtual(scenario)
    assert "already limited to 5/1s with margin=0.02 by another live client" in message
    assert "must use the same margin too" in message and "got 5/1s with margin=0.1" in message

    async def both() -> str:
        key = fresh_key()
        async with LocalRateLimiter(RateLimit(5, 1.0)).slot(key) as slot:
            slot.sent()
        with pytest.raises(InvalidRequestError) as caught:
            async with LocalRateLimiter(RateLimit(10, 1.0, margin=0.1)).slot(key):
                pass
        return str(caught.value)

    message = run_virtual(both)
    assert "the same rate and the same margin, got 10/1s with margin=0.1" in message


def test_one_rate_written_two_ways_shares_the_token_and_keeps_both_guarantees() -> None:
    """Evenly spaced, RateLimit(10, 2) beside RateLimit(5, 1) (same rate, same margin) is
    accepted, as ``same_schedule`` says: the schedule is the spacing alone, so the starts keep
    the rolling window of each, 5 in any 1 s and 10 in any 2 s."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        store = MemoryStore(loop.time)
        key = fresh_key()
        limiters = [
            Limiter(store, RateLimit(5, 1.0, burst=1)),
            Limiter(store, RateLimit(10, 2.0, burst=1)),
        ]
        starts: list[float] = []

        async def one(limiter: Limiter) -> None:
            async with limiter.slot(key) as slot:
                starts.append(loop.time())
                slot.sent()

        await asyncio.gather(*(one(limiters[n % 2]) for n in range(24)))
        return starts

    starts = run_virtual(scenario)
    assert len(starts) == 24
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.2 * 1.01 - EPS
    for requests, period in ((5, 1.0), (10, 2.0)):
        assert max(sum(s <= t < s + period for t in starts) for s in starts) <= requests


def test_one_rate_as_two_windows_is_refused_naming_the_rate() -> None:
    """With bursts, 10 per 2 s is not 5 per 1 s (10 may start in one second): refused."""

    async def scenario() -> str:
        key = fresh_key()
        async with LocalRateLimiter(RateLimit(5, 1.0)).slot(key) as slot:
            slot.sent()
        with pytest.raises(InvalidRequestError) as caught:
            async with LocalRateLimiter(RateLimit(10, 2.0)).slot(key):
                pass
        with pytest.raises(InvalidRequestError) as evenly:
            async with LocalRateLimiter(RateLimit(5, 1.0, burst=1)).slot(key):
                pass
        return f"{caught.value}\n{evenly.value}"

    window, even = run_virtual(scenario).split("\n")
    assert "must use the same rate and period" in window and "got 10/2s" in window
    assert "must use the same burst" in even and "got 5/1s evenly spaced" in even


def test_fifo_gate_hands_over_in_order_and_survives_cancellation_at_handover() -> None:
    """A waiter cancelled just as the gate is handed to it passes the gate on."""

    async def scenario() -> list[str]:
        gate = FifoGate()
        order: list[str] = []
        await gate.acquire()

        async def waiter(name: str) -> None:
            await gate.acquire()
            order.append(name)
            gate.release()

        a = asyncio.create_task(waiter("a"))
        b = asyncio.create_task(waiter("b"))
        c = asyncio.create_task(waiter("c"))
        await asyncio.sleep(0)
        gate.release()  # handed to a ...
        a.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(a, b, c, return_exceptions=True)
        assert not gate.locked()
        return order

    assert run_virtual(scenario) == ["b", "c"]


def test_rate_limit_parsing_and_validation() -> None:
    """RateLimit.parse reads the CLI's forms; nonsense is refused with a hint."""
    assert RateLimit.parse("5/60") == RateLimit(5, 60.0)
    assert RateLimit.parse("5/1m") == RateLimit(5, 60.0)
    assert RateLimit.parse(" 10 / 0.5 ") == RateLimit(10, 0.5)
    assert str(RateLimit(5, 60)) == "5/60s"
    for bad in ("5", "five/60", "5/0x", "-1/5"):
        with pytest.raises(ValueError, match="REQUESTS/SECONDS"):
            RateLimit.parse(bad)
    for args in ((0, 1.0), (True, 1.0), (5, 0.0), (5, float("inf"))):
        with pytest.raises(ValueError, match="must be a positive"):
            RateLimit(*args)
    with pytest.raises(ValueError, match="margin"):
        RateLimit(5, 1.0, margin=1.5)


def test_max_wait_zero_takes_a_free_slot() -> None:
    """max_wait=0 means "only if a slot is free now": a free one is granted, a busy one refused."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        limiter = LocalRateLimiter(RateLimit(1, 1.0), clock=asyncio.get_running_loop().time)
        key = fresh_key()
        await asyncio.sleep(0.5)  # the clock has moved since the loop started
        async with limiter.slot(key, deadline=loop.time()) as slot:
            slot.sent()
        with pytest.raises(RateLimitTimeout):
            async with limiter.slot(key, deadline=loop.time()):
                pass

    run_virtual(scenario)
