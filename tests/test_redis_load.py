"""The Redis store under load: many waiting calls and tokens on a few connections, polls that
do not write, a grant whose answer was lost, Redis's eviction policy. Real redis-server, the
emulator as the judge of starts; the multi-process runs behind a latency proxy are in
``test_redis_network``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import resources
from typing import Any

import pytest
from redis.asyncio import Redis

from autocalls_async import (
    AsyncAutocalls,
    AutocallsAccounts,
    LimiterUnavailableError,
    RateLimit,
    RateLimitTimeout,
)
from autocalls_async._redis import DEFAULT_MAX_CONNECTIONS, RedisRateLimiter
from autocalls_async.testing import MockAutocalls

from .latency_proxy import LatencyProxy
from .redis_server import RedisServer, require_redis_server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def inspector(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def clients(inspector: Redis) -> int:
    """Connections to Redis other than the inspector's own."""
    listed = await inspector.client_list()
    me = await inspector.client_id()
    return sum(1 for entry in listed if int(entry["id"]) != me)


@contextlib.asynccontextmanager
async def peak_clients(inspector: Redis) -> AsyncIterator[list[int]]:
    """Samples ``CLIENT LIST`` every 5 ms meanwhile; yields [peak] (filled in at the end)."""
    peak = [await clients(inspector)]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], await clients(inspector))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.005):
                    await stop.wait()

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        stop.set()
        await task


@pytest.mark.timing
async def test_a_thousand_waiting_calls_with_max_wait_never_fail(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """1,000 concurrent calls with max_wait on one token: each is answered or RateLimitTimeout,
    never LimiterUnavailableError (was: all failed with MaxConnectionsError past 100), on at
    most ``max_connections`` connections; the emulator's strict window sees no 429."""
    rate = RateLimit(20, 1.0)
    async with (
        MockAutocalls(rate_limit=(20, 1.0)) as server,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter,
        AsyncAutocalls(
            "tok-thousand", base_url=server.base_url, limiter=limiter, max_wait=2.0
        ) as client,
        peak_clients(inspector) as peak,
    ):
        results = await asyncio.gather(
            *(
                client.generate_reply(assistant_id=123, customer_identifier=f"c{i}", message="Hi")
                for i in range(1000)
            ),
            return_exceptions=True,
        )
    unexpected = [r for r in results if isinstance(r, BaseException)]
    unexpected = [r for r in unexpected if not isinstance(r, RateLimitTimeout)]
    answered = sum(1 for r in results if not isinstance(r, BaseException))
    print(f"\n1,000 waiting calls: {answered} answered, peak {peak[0]} Redis connections")
    assert not unexpected, {type(r).__name__: str(r) for r in unexpected[:3]}
    # About 20 a second for 2 s, less on a loaded machine (the 1,000 calls take a while to
    # queue: under coverage, longer than some callers' max_wait).
    assert 1 <= answered <= 20 * (2 + 1) + 20
    assert server.count(status=429) == 0
    assert peak[0] <= DEFAULT_MAX_CONNECTIONS


@pytest.mark.timing
async def test_two_thousand_tokens_and_a_thousand_waiters_on_a_few_connections(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """2,000 tokens with one call each and 1,000 waiting calls on one more token, on one
    limiter: every call is served or times out within its max_wait, over at most
    ``max_connections`` connections (was: 150 tokens all failed)."""
    rate = RateLimit(50, 1.0)
    loop = asyncio.get_running_loop()
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter,
        peak_clients(inspector) as peak,
    ):
        starts: list[float] = []

        async def take(key: str, deadline: float | None) -> None:
            async with limiter.slot(key, deadline=deadline) as slot:
                if key == "hot":
                    starts.append(loop.time())
                slot.sent()

        # The 2,000 tokens' calls take seconds of this process's CPU (four store operations
        # each, more under coverage); the hot token's waiters, queued a moment before, share
        # the connections meanwhile, first come first served.
        deadline = loop.time() + 6.0
        started = loop.time()
        hot = [asyncio.create_task(take("hot", deadline)) for _ in range(1000)]
        await asyncio.sleep(0.1)
        many = [asyncio.create_task(take(f"tok{i}", None)) for i in range(2000)]
        results = await asyncio.gather(*hot, *many, return_exceptions=True)
        elapsed = loop.time() - started
    hot_results, many_results = results[:1000], results[1000:]
    served = sum(1 for r in hot_results if r is None)
    print(
        f"\n2,000 tokens + 1,000 waiters: {elapsed:.2f}s, hot token served {served}, "
        f"peak {peak[0]} Redis connections"
    )
    assert all(r is None for r in many_results), {repr(r) for r in many_results if r}
    assert all(r is None or isinstance(r, RateLimitTimeout) for r in hot_results), {
        repr(r) for r in hot_results if r is not None
    }
    assert served >= 1
    starts.sort()
    for first, last in zip(starts, starts[rate.requests :], strict=False):
        assert last - first >= rate.period - 0.002
    assert peak[0] <= DEFAULT_MAX_CONNECTIONS


class Counting:
    """Wraps a registered script: counts its calls, and those that wrote (answered 1)."""

    def __init__(self, script: Callable[..., Awaitable[Any]]) -> None:
        self.script = script
        self.calls = 0
        self.written = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        answer = await self.script(*args, **kwargs)
        if not isinstance(answer, list):
            self.written += 1
        return answer


@pytest.mark.timing
async def test_polls_do_not_write(redis_server: RedisServer, prefix: str) -> None:
    """A process polling while another holds the grant reads and writes nothing (was: a write
    per poll, each losing the compare-and-set to the others'); only real changes write."""
    rate = RateLimit(10, 1.0)
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as holder,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as waiter,
    ):
        store = waiter.redis_store
        reads, writes = Counting(store._read), Counting(store._cas)
        store._read, store._cas = reads, writes  # type: ignore[assignment]
        reports = Counting(getattr(store, "_report", store._cas))  # none before queue reports
        store._report = reports  # type: ignore[assignment]

        async def wait() -> None:
            async with waiter.slot("tok") as slot:
                slot.sent()

        async with holder.slot("tok") as slot:  # held, unsent, for 1.2 s (a slow connect)
            task = asyncio.create_task(wait())
            await asyncio.sleep(1.2)
            polls, written = reads.calls, writes.written + reports.written
            slot.sent()
        await task
    print(f"\nwhile held for 1.2 s: {polls} polls, {written} writes")
    assert polls >= 15  # it did poll (every 4 to 50 ms)
    # Its queue's report, then its renewal once half of the report's grace has passed.
    assert written <= 4


@pytest.mark.timing
async def test_a_grant_whose_answer_was_lost_is_recognised(
    redis_server: RedisServer, prefix: str
) -> None:
    """The connection drops after the grant's write committed, before its answer: the retry
    sees its own ticket as holder and the call goes ahead at once (was: the retry lost the
    compare-and-set to its own write and the token stalled for a whole lease)."""
    cas = resources.files("autocalls_async").joinpath("lua", "cas.lua").read_text("utf-8")
    sha = hashlib.sha1(cas.encode()).hexdigest().encode()
    loop = asyncio.get_running_loop()
    async with LatencyProxy(redis_server.port) as proxy:
        async with RedisRateLimiter(
            proxy.url, rate_limit=RateLimit(10, 1.0), prefix=prefix, lease=3.0
        ) as limiter:
            async with limiter.slot("warm") as slot:  # scripts loaded, connections made
                slot.sent()
            # The next grant's compare-and-set (its new value names a holder) loses its answer.
            proxy.drop_reply_after = b'"holder":"'
            assert sha  # the marker sits in that command's arguments
            started = loop.time()
            async with limiter.slot("tok") as slot:
                granted = loop.time() - started
                slot.sent()
            # The token is not held by a lost grant: the next call is one interval away.
            async with limiter.slot("tok") as slot:
                second = loop.time() - started
                slot.sent()
        assert proxy.dropped == 1
    print(f"\nreply lost: granted after {granted:.3f}s, next after {second:.3f}s")
    assert granted < 1.0
    assert second < 1.0


@pytest.mark.timing
async def test_connections_reset_mid_run_are_retried(
    redis_server: RedisServer, prefix: str
) -> None:
    """Every connection to Redis reset twice while two limiters share a token (a failover, a
    proxy restarting): each operation is retried once on a new connection, no call fails, the
    window holds, and no grant is stranded for a lease."""
    rate = RateLimit(10, 1.0)
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    async with (
        LatencyProxy(redis_server.port, delay=0.002) as proxy,
        RedisRateLimiter(proxy.url, rate_limit=rate, prefix=prefix, lease=3.0) as one,
        RedisRateLimiter(proxy.url, rate_limit=rate, prefix=prefix, lease=3.0) as two,
    ):

        async def take(limiter: RedisRateLimiter) -> None:
            async with limiter.slot("tok") as slot:
                starts.append(loop.time())
                slot.sent()

        async def reset() -> int:
            dropped = 0
            for _ in range(2):
                await asyncio.sleep(0.5)
                dropped += proxy.drop_all()
            return dropped

        started = loop.time()
        results = await asyncio.gather(
            reset(), *(take(one if n % 2 else two) for n in range(16)), return_exceptions=True
        )
        elapsed = loop.time() - started
    assert results[0] >= 2, results[0]  # connections were reset
    assert all(r is None for r in results[1:]), results[1:]
    starts.sort()
    for first, last in zip(starts, starts[rate.requests :], strict=False):
        assert last - first >= rate.period - 0.002
    assert elapsed < 16 * rate.interval + 2.0  # no lease (3 s) lost to a stranded grant


# ---------------------------------------------------------------------- eviction policy


@pytest.mark.parametrize(
    ("policy", "maxmemory", "warned"),
    [
        ("noeviction", "64mb", False),
        ("allkeys-lru", "64mb", True),
        ("allkeys-random", "64mb", True),
        ("volatile-lru", "64mb", True),  # our keys carry a TTL: evictable
        ("volatile-ttl", "64mb", True),
        ("allkeys-lru", "0", False),  # no memory limit: nothing is ever evicted
    ],
)
async def test_eviction_policy_is_read_once_and_warned_about(
    policy: str, maxmemory: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that may evict the limiter's keys gets one WARNING naming the fix."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    server = RedisServer(
        require_redis_server(), "--maxmemory", maxmemory, "--maxmemory-policy", policy
    ).start()
    try:
        async with RedisRateLimiter(server.url, rate_limit=RateLimit(50, 1.0)) as limiter:
            for _ in range(3):
                async with limiter.slot("tok") as slot:
                    slot.sent()
    finally:
        server.stop()
    messages = [r.getMessage() for r in caplog.records if "evict" in r.getMessage()]
    if warned:
        assert len(messages) == 1, messages
        assert policy in messages[0] and "noeviction" in messages[0]
    else:
        assert messages == []


async def test_volatile_policies_do_evict_the_limiters_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Why volatile-* is warned about: under memory pressure Redis evicts our key (it has a
    TTL) while keys without one stay."""
    server = RedisServer(
        require_redis_server(), "--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru"
    ).start()
    try:
        async with (
            Redis.from_url(server.url) as admin,
            RedisRateLimiter(server.url, rate_limit=RateLimit(1, 30.0)) as limiter,
        ):
            async with limiter.slot("tok") as slot:
                slot.sent()
            key = limiter.redis_key("tok")
            assert await admin.exists(key)
            with contextlib.suppress(Exception):  # OOM once nothing evictable is left
                for n in range(400):
                    await admin.set(f"filler:{n}", b"x" * 20_000)
            assert not await admin.exists(key)
    finally:
        server.stop()
    assert "volatile-lru" in caplog.text


async def test_unreadable_info_is_not_an_error(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """INFO refused (an ACL without it): the limiter works, the check is skipped quietly."""
    user = f"u{uuid.uuid4().hex[:6]}"
    await inspector.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-info")
    try:
        url = redis_server.url.replace("redis://", f"redis://{user}:pw@")
        async with (
            RedisRateLimiter(url, prefix=prefix) as limiter,
            limiter.slot("tok") as slot,
        ):
            slot.sent()
    finally:
        await inspector.execute_command("ACL", "DELUSER", user)


@pytest.mark.timing
async def test_a_busy_borrowed_pool_is_waited_for(redis_server: RedisServer, prefix: str) -> None:
    """A caller's own client with a pool smaller than our gate: callers wait for a connection
    (MaxConnectionsError is not an outage), within their max_wait."""
    loop = asyncio.get_running_loop()
    mine = Redis.from_url(redis_server.url, max_connections=2)
    try:
        async with RedisRateLimiter(mine, rate_limit=RateLimit(100, 1.0), prefix=prefix) as lim:

            async def take(n: int) -> None:
                async with lim.slot(f"tok{n}", deadline=loop.time() + 5.0) as slot:
                    slot.sent()

            results = await asyncio.gather(*(take(n) for n in range(200)), return_exceptions=True)
        assert all(r is None for r in results), {repr(r) for r in results if r is not None}
    finally:
        await mine.aclose()


def test_max_connections_is_checked() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        RedisRateLimiter("redis://127.0.0.1:1/0", max_connections=0)


@pytest.mark.timing
async def test_an_outage_met_while_waiting_for_a_connection_fails_at_once(
    prefix: str,
) -> None:
    """Redis down: callers queued behind the gate fail at once, not one timeout each."""
    server = RedisServer(require_redis_server()).start()
    port = server.port
    server.stop()
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(
        f"redis://127.0.0.1:{port}/0", prefix=prefix, timeout=0.3, max_connections=1
    ) as limiter:

        async def take(n: int) -> None:
            async with limiter.slot(f"tok{n}"):
                pytest.fail("must not be granted")

        started = loop.time()
        results = await asyncio.gather(*(take(n) for n in range(20)), return_exceptions=True)
        elapsed = loop.time() - started
    assert all(isinstance(r, LimiterUnavailableError) for r in results), results
    assert elapsed < 2.0


@pytest.mark.timing
async def test_a_schedule_an_earlier_version_wrote_is_kept_and_converted(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """A key left by an earlier version (a JSON string, not a hash) is read as the schedule,
    its due time kept, and converted at the first write."""
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(
        redis_server.url, rate_limit=RateLimit(10, 1.0), prefix=prefix
    ) as limiter:
        key = limiter.redis_key("tok")
        seconds, micros = await inspector.time()
        due = int(seconds) + int(micros) / 1e6 + 0.5
        state = {"due": due, "last": due - 0.05, "holder": None}
        await inspector.set(key, json.dumps(state), px=5000)
        started = loop.time()
        async with limiter.slot("tok") as slot:
            waited = loop.time() - started
            slot.sent()
        assert await inspector.type(key) == b"hash"
        # Again from an empty one.
        await inspector.set(key, json.dumps({"due": None}), px=5000)
        async with limiter.slot("tok") as slot:
            slot.sent()
        assert await inspector.type(key) == b"hash"
    assert waited >= 0.5 - 0.05


async def test_a_slow_store_is_blamed_not_the_tokens_window(
    redis_server: RedisServer, prefix: str
) -> None:
    """Idle tokens, a Redis 0.4 s away each way, max_wait shorter than a round trip: the
    RateLimitTimeout says the window had room and the store did not answer in time (it said
    "the next one is 0.0s away", blaming the token's limit), and nothing was sent."""
    rate = RateLimit(5, 1.0)
    async with (
        LatencyProxy(redis_server.port, delay=0.4) as proxy,
        RedisRateLimiter(proxy.url, rate_limit=rate, prefix=prefix) as limiter,
    ):
        results = await asyncio.gather(
            *(_slot(limiter, f"idle-{n}", max_wait=0.3) for n in range(20)),
            return_exceptions=True,
        )
    assert all(isinstance(r, RateLimitTimeout) for r in results), results
    for result in results:
        text = str(result)
        assert "window had room" in text and "redis store" in text, text
        assert "away" not in text and "nothing was sent" in text, text


async def _slot(limiter: RedisRateLimiter, key: str, *, max_wait: float) -> None:
    deadline = asyncio.get_running_loop().time() + max_wait
    async with limiter.slot(key, deadline=deadline) as slot:
        slot.sent()


@pytest.mark.timing
async def test_many_tokens_behind_a_far_redis_are_pipelined_not_serialised(
    redis_server: RedisServer, prefix: str
) -> None:
    """120 tokens x 3 calls at once, Redis 25 ms away each way (a 50 ms round trip), 8
    connections, max_wait 5 s: every window has room for its token's 3 calls, so every call
    is answered, in about a token's chain of batches (grant, report and next grant, ...), not
    one batch per token in turn. A token's operations of one batch are one read and one write,
    so each call costs a couple of Redis operations. (Each call waited behind a token's
    second operation of a batch done alone, two round trips each: about a third timed out.)"""
    tokens, calls = 120, 3
    async with (
        MockAutocalls(rate_limit=(5, 1.0), window="rolling") as server,
        LatencyProxy(redis_server.port, delay=0.025) as proxy,
        RedisRateLimiter(
            proxy.url, rate_limit=RateLimit(5, 1.0, margin=0.1), prefix=prefix, max_connections=8
        ) as limiter,
        AutocallsAccounts(
            base_url=server.base_url, limiter=limiter, max_wait=5.0, max_retries=0
        ) as accounts,
    ):
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            *(
                accounts.client(f"token-{t}").generate_reply(
                    assistant_id=123, customer_identifier=f"c{i}", message="hi"
                )
                for t in range(tokens)
                for i in range(calls)
            ),
            return_exceptions=True,
        )
        elapsed = asyncio.get_running_loop().time() - started
        counts = dict(limiter.redis_store.counts)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, (len(failed), failed[:3])
    assert len(server.requests) == tokens * calls
    # A token's chain is 4 batches of 2 round trips (0.4 s here); the pool's 100 connections
    # hold 33 tokens' calls at once: about 2 s in all. Generous: a busy 2-core machine.
    assert elapsed < 4.5, elapsed
    # A token's chain is 4 batches for its 3 calls (its report and next grant share one read
    # and one write): measured 1.5 reads and 1.5 writes per call (4/3 at best). Each of a
    # token's operations read and written alone cost 2.3 reads and 2.0 writes per call.
    per_call = {name: value / (tokens * calls) for name, value in counts.items()}
    assert per_call["reads"] <= 1.9 and per_call["writes"] <= 1.9, per_call
