"""The limiter and the per-conversation order, end to end against a strict emulator.

Rates are scaled (5 per second) and tolerances are wide enough for a noisy shared machine;
the tight numbers are in benchmarks/.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
import tracemalloc
from collections.abc import Callable

import pytest

from autocalls_async import AsyncAutocalls, RateLimit
from autocalls_async.testing import MockAutocalls

#: Every test here judges real time: elapsed times, spacing, the server's window.
pytestmark = pytest.mark.timing
Make = Callable[..., AsyncAutocalls]
FIVE_PER_SECOND = RateLimit(5, 1.0)
IDEAL_INTERVAL = 1.0 / 5


def most_in_any_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t - start < period))
    return best


async def gather_calls(client: AsyncAutocalls, count: int, prefix: str = "c") -> float:
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.gather(
        *(
            client.generate_reply(
                assistant_id=123, customer_identifier=f"{prefix}{i}", message=f"m{i}"
            )
            for i in range(count)
        )
    )
    return loop.time() - began


@pytest.mark.slow
async def test_21_calls_at_full_rate_without_429(make_client: Make) -> None:
    """21 gathered calls: zero 429s, never 6 in a second, within 12% of 20 intervals."""
    async with MockAutocalls(rate_limit=(5, 1.0)) as server:
        client = make_client(server.base_url, rate_limit=FIVE_PER_SECOND)
        elapsed = await gather_calls(client, 21)
        arrivals = [r.time for r in server.requests]
    assert server.count(status=429) == 0
    assert client.stats.rate_limited == 0
    assert len(arrivals) == 21
    assert most_in_any_window(arrivals, 1.0) <= 5
    ideal = 20 * IDEAL_INTERVAL
    assert ideal <= elapsed <= ideal * 1.12, elapsed


@pytest.mark.slow
async def test_two_clients_share_one_tokens_budget(make_client: Make, token: str) -> None:
    """Two clients with one token share one window: 12 calls need 2 windows, no 429."""
    async with MockAutocalls(rate_limit=(5, 1.0)) as server:
        a = make_client(server.base_url, rate_limit=FIVE_PER_SECOND, api_token=token)
        b = make_client(server.base_url, rate_limit=FIVE_PER_SECOND, api_token=token)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.gather(gather_calls(a, 6, "a"), gather_calls(b, 6, "b"))
        elapsed = loop.time() - began
    assert server.count(status=429) == 0
    assert elapsed >= 2 * FIVE_PER_SECOND.window
    assert most_in_any_window([r.time for r in server.requests], 1.0) <= 5


@pytest.mark.slow
async def test_two_tokens_do_not_slow_each_other(make_client: Make) -> None:
    """Each token has its own budget: 2 x 6 calls take about 5 intervals, not 11."""
    async with MockAutocalls(rate_limit=(5, 1.0)) as server:
        a = make_client(server.base_url, rate_limit=FIVE_PER_SECOND, api_token="token-a")
        b = make_client(server.base_url, rate_limit=FIVE_PER_SECOND, api_token="token-b")
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.gather(gather_calls(a, 6, "a"), gather_calls(b, 6, "b"))
        elapsed = loop.time() - began
    assert server.count(status=429) == 0
    assert 5 * IDEAL_INTERVAL <= elapsed < 8 * IDEAL_INTERVAL


async def test_one_customers_messages_arrive_in_order(make_client: Make) -> None:
    """8 messages for one customer reach the server one at a time, in call order, while other
    customers' calls finish at once."""
    async with MockAutocalls(rate_limit=None, reply_delay=0.1) as server:
        client = make_client(server.base_url)
        loop = asyncio.get_running_loop()
        began = loop.time()
        finished: dict[str, float] = {}

        async def call(customer: str, message: str) -> None:
            await client.generate_reply(
                assistant_id=123, customer_identifier=customer, message=message
            )
            finished[message] = loop.time() - began

        calls = []
        for i in range(8):
            calls.append(call("same", f"same-{i}"))
            calls.append(call(f"other-{i}", f"other-{i}"))
        await asyncio.gather(*calls)
    assert server.conversations[(123, "same")].messages == [f"same-{i}" for i in range(8)]
    same = [r.time for r in server.requests if r.body and r.body["customer_identifier"] == "same"]
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(same))  # one at a time
    assert max(finished[f"other-{i}"] for i in range(8)) < 0.6
    assert finished["same-7"] >= 0.75
    assert len(client._order) == 0  # no per-conversation state left behind


@pytest.mark.slow
async def test_20000_waiting_calls_are_cheap_and_cancel_fast(make_client: Make) -> None:
    """20,000 queued calls: under 0.25 CPU-s per s and 8 KB each; cancelling takes under 3 s
    and the next call goes as soon as the limiter allows."""
    async with MockAutocalls(rate_limit=None) as server:
        client = make_client(server.base_url, rate_limit=RateLimit(1, 3.0, margin=0.0))
        await client.generate_reply(assistant_id=123, customer_identifier="first", message="m")
        loop = asyncio.get_running_loop()
        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        tasks = [
            asyncio.create_task(
                client.generate_reply(assistant_id=123, customer_identifier=f"w{i}", message="m")
            )
            for i in range(20_000)
        ]
        await asyncio.sleep(0.2)  # every task has started and is queued
        used, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per_call = (used - base) / len(tasks)
        cpu_before, wall_before = time.process_time(), loop.time()
        await asyncio.sleep(1.0)
        cpu_per_second = (time.process_time() - cpu_before) / (loop.time() - wall_before)
        began = loop.time()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cancel_seconds = loop.time() - began
        cancelled_at = time.monotonic()
        await client.generate_reply(assistant_id=123, customer_identifier="next", message="m")
        *_, previous, following = server.requests
    assert per_call < 8 * 1024, per_call
    assert cpu_per_second < 0.25, cpu_per_second
    assert cancel_seconds < 3.0, cancel_seconds
    # Not held back by 20,000 cancelled waiters: it starts when the spacing allows.
    assert following.time - max(previous.time + 3.0, cancelled_at) < 1.0
    assert len(server.requests) <= 3  # the first, maybe w0 (if set-up took > 3 s), the next
    assert client.stats.waiting == 0 and len(client._order) == 0


async def test_gate_opens_when_the_request_is_written_not_when_it_is_answered(
    make_client: Make,
) -> None:
    """The limiter's gate is released as soon as a request is on the wire: a slow reply does
    not hold back the next customer's call."""
    async with MockAutocalls(rate_limit=None, reply_delay=0.5) as server:
        client = make_client(server.base_url, rate_limit=RateLimit(100, 1.0))
        await asyncio.gather(
            *(
                client.generate_reply(assistant_id=123, customer_identifier=f"c{i}", message="m")
                for i in range(3)
            )
        )
        arrivals = sorted(r.time for r in server.requests)
    assert arrivals[-1] - arrivals[0] < 0.3  # not 2 x 0.5 s: each went once written


async def test_borrowed_session_counts_the_send_at_hand_over(make_client: Make) -> None:
    """With a caller's session (no probe on its requests) the gate opens at hand-over."""
    import aiohttp

    async with MockAutocalls(rate_limit=None, reply_delay=0.5) as server:
        async with aiohttp.ClientSession() as session:
            client = make_client(server.base_url, rate_limit=RateLimit(100, 1.0), session=session)
            await asyncio.gather(
                *(
                    client.generate_reply(
                        assistant_id=123, customer_identifier=f"c{i}", message="m"
                    )
                    for i in range(3)
                )
            )
            await client.close()
        arrivals = sorted(r.time for r in server.requests)
    assert arrivals[-1] - arrivals[0] < 0.3
