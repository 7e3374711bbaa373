"""RedisRateLimiter and RedisConversationStore against a real redis-server and the emulator."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import autocalls_async
from autocalls_async import (
    AsyncAutocalls,
    Conversation,
    ConversationStore,
    LimiterUnavailableError,
    LocalRateLimiter,
    RateLimit,
    RateLimiter,
    RateLimitTimeout,
)
from autocalls_async._redis import RedisConversationStore, RedisRateLimiter, redact_url
from autocalls_async.testing import Fault, MockAutocalls

from .redis_server import RedisServer, require_redis_server

EPS = 0.002  # timer granularity on a loaded machine


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test: tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def inspector(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def redis_now(client: Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


def assert_rolling(starts: list[float], rate: RateLimit) -> None:
    """Never more than ``rate.requests`` starts in any rolling ``rate.period``."""
    starts = sorted(starts)
    for first, last in zip(starts, starts[rate.requests :], strict=False):
        assert last - first >= rate.period - EPS, (first, last, starts)


# ---------------------------------------------------------------------- the limiter alone


async def test_two_limiters_share_one_schedule(redis_server: RedisServer, prefix: str) -> None:
    """Two limiters (two connection pools, as in two processes) space starts one interval apart."""
    rate = RateLimit(5, 0.5)
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as one,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as two,
    ):

        async def take(limiter: RedisRateLimiter) -> None:
            async with limiter.slot("tok") as slot:
                slot.sent()
                starts.append(loop.time())

        t0 = loop.time()
        await asyncio.gather(*(take(one if i % 2 else two) for i in range(12)))
    # The guarantee is per rolling period: a start a few ms late may shorten the one gap after
    # it (a reservation already made elsewhere cannot move), which the margin absorbs.
    assert_rolling(starts, rate)
    starts.sort()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert statistics.median(gaps) == pytest.approx(rate.interval, abs=0.01)
    # At the full rate: 11 intervals after the first, plus scheduling noise.
    assert starts[-1] - t0 < 11 * rate.interval + 0.5


async def test_fifo_and_one_reservation_per_slot(redis_server: RedisServer, prefix: str) -> None:
    """Waiters of one process are served in arrival order, with one reservation per slot."""
    rate = RateLimit(10, 0.5)
    order: list[int] = []
    async with RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter:
        reservations = 0
        reserve = limiter._script_reserve

        async def counting(key: str, max_wait_us: int, deadline: float | None = None) -> list[int]:
            nonlocal reservations
            reservations += 1
            return await reserve(key, max_wait_us, deadline)

        limiter._script_reserve = counting  # type: ignore[method-assign]

        async def take(index: int) -> None:
            async with limiter.slot("tok"):
                order.append(index)

        tasks = []
        for index in range(8):
            tasks.append(asyncio.create_task(take(index)))
            await asyncio.sleep(0)  # each task queues before the next is created
        await asyncio.gather(*tasks)
    assert order == list(range(8))
    assert reservations == 8


async def test_wait_comes_from_the_redis_clock(
    redis_server: RedisServer, prefix: str, inspector: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait is Redis TIME vs the stored schedule; a client wall clock an hour off is ignored."""
    rate = RateLimit(5, 1.0)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)
    async with RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter:
        next_key, _ = limiter.redis_keys("tok")
        await inspector.set(next_key, await redis_now(inspector) + 400_000, px=5000)
        granted, wait_us, _start = await limiter._script_reserve("tok", -1)
        assert granted == 1
        assert 300_000 <= wait_us <= 400_000
        # The reservation was made: the following one is one interval later still.
        _, wait_after, _ = await limiter._script_reserve("tok", -1)
        assert wait_after - wait_us == pytest.approx(rate.interval * 1e6, abs=50_000)


async def test_keys_expire_once_idle(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """Schedule and pause keys carry a TTL and vanish once they constrain nothing."""
    rate = RateLimit(10, 1.0)
    async with RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter:
        async with limiter.slot("tok"):
            pass
        await limiter.pause("tok", 0.2)
        next_key, pause_key = limiter.redis_keys("tok")
        assert 0 < await inspector.pttl(next_key) <= 1000 * (rate.interval + 1.0) + 50
        assert 0 < await inspector.pttl(pause_key) <= 1000 * (0.2 + 1.0) + 50
        assert next_key.startswith(prefix) and "{tok}" in next_key
        for _ in range(50):  # Redis expires keys on its own schedule: poll it
            if not await inspector.exists(next_key, pause_key):
                break
            await asyncio.sleep(0.1)
        assert await inspector.exists(next_key, pause_key) == 0


async def test_pause_is_shared(redis_server: RedisServer, prefix: str) -> None:
    """A 429 seen through one limiter holds back another's next slot for Retry-After."""
    rate = RateLimit(10, 1.0)
    loop = asyncio.get_running_loop()
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as one,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as two,
    ):
        paused_at = loop.time()
        await one.pause("tok", 0.5)
        assert 0.4 < await two.paused_for("tok") <= 0.5
        async with two.slot("tok"):
            assert loop.time() - paused_at >= 0.5 - EPS


async def test_pause_reaches_a_reservation_already_made(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """A caller sleeping on its reservation re-checks the pause before sending."""
    rate = RateLimit(10, 1.0)
    loop = asyncio.get_running_loop()
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as one,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as two,
    ):
        next_key, _ = one.redis_keys("tok")
        await inspector.set(next_key, await redis_now(inspector) + 200_000, px=5000)

        async def take() -> float:
            async with two.slot("tok"):
                return loop.time()

        waiter = asyncio.create_task(take())
        await asyncio.sleep(0.1)  # it holds a reservation 0.1 s ahead now
        paused_at = loop.time()
        await one.pause("tok", 0.6)
        assert await waiter - paused_at >= 0.6 - EPS


async def test_max_wait_refuses_without_reserving(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """A wait longer than max_wait raises at once and leaves the schedule untouched."""
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(redis_server.url, prefix=prefix) as limiter:
        next_key, _ = limiter.redis_keys("tok")
        value = await redis_now(inspector) + 2_000_000
        await inspector.set(next_key, value, px=5000)
        started = loop.time()
        with pytest.raises(RateLimitTimeout, match="max_wait"):
            async with limiter.slot("tok", deadline=loop.time() + 0.3):
                pytest.fail("must not be granted")
        assert loop.time() - started < 0.25
        assert int(await inspector.get(next_key) or 0) == value


async def test_max_wait_zero_takes_a_free_slot_only(redis_server: RedisServer, prefix: str) -> None:
    """max_wait=0, as locally: a free slot is granted at once, a busy one raises at once."""
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(redis_server.url, prefix=prefix) as limiter:
        async with limiter.slot("tok", deadline=loop.time()):
            pass
        with pytest.raises(RateLimitTimeout):
            async with limiter.slot("tok", deadline=loop.time()):
                pytest.fail("must not be granted")


async def test_max_wait_counts_the_local_queue(redis_server: RedisServer, prefix: str) -> None:
    """Callers queued ahead in this process make a short max_wait fail without a round trip."""
    rate = RateLimit(5, 1.0)
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter:
        release = asyncio.Event()

        async def hold() -> None:
            async with limiter.slot("tok"):
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(4)]
        await asyncio.sleep(0.05)
        with pytest.raises(RateLimitTimeout, match="away"):
            async with limiter.slot("tok", deadline=loop.time() + 0.3):
                pass
        release.set()
        await asyncio.gather(*holders)


async def test_max_wait_while_the_gate_is_held(redis_server: RedisServer, prefix: str) -> None:
    """A slot held unsent keeps the queue closed; a waiter with max_wait times out meanwhile."""
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(redis_server.url, prefix=prefix) as limiter:
        async with limiter.slot("tok"):  # granted, not sent yet
            started = loop.time()
            with pytest.raises(RateLimitTimeout):
                async with limiter.slot("tok", deadline=started + 0.1):
                    pytest.fail("must not be granted")
            assert loop.time() - started < 0.4
        with pytest.raises(RateLimitTimeout):
            async with limiter.slot("tok", deadline=loop.time() - 1):
                pytest.fail("must not be granted")  # the next slot is an interval away


async def test_cancelled_waiter_gives_its_reservation_back(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """Cancelled while sleeping on the last reservation: the next caller gets that same slot."""
    rate = RateLimit(5, 1.0)
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter:
        next_key, _ = limiter.redis_keys("tok")
        planned = await redis_now(inspector) + 300_000
        await inspector.set(next_key, planned, px=5000)

        async def take() -> float:
            async with limiter.slot("tok"):
                return loop.time()

        first = asyncio.create_task(take())
        await asyncio.sleep(0.1)
        assert int(await inspector.get(next_key) or 0) == planned + round(rate.interval * 1e6)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert int(await inspector.get(next_key) or 0) == planned
        started = loop.time()
        granted_at = await take()
        assert granted_at - started < 0.3  # the given-back slot, not one interval later


async def test_late_send_moves_the_schedule(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """A send later than the tolerance pushes every later reservation back by its lateness."""
    rate = RateLimit(5, 1.0)
    loop = asyncio.get_running_loop()
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as one,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as two,
    ):
        async with one.slot("tok") as slot:
            await asyncio.sleep(0.3)  # a slow TLS handshake, say
            slot.sent()
            sent_at = loop.time()
        async with two.slot("tok"):
            assert loop.time() - sent_at >= rate.interval - EPS


# ---------------------------------------------------------------------- failures


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://:s3cret-pw@127.0.0.1:{port}/0"


async def test_unreachable_redis_raises_clearly_and_hides_the_password() -> None:
    """Connection refused: LimiterUnavailableError at once; the password appears nowhere."""
    url = refused_url()
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(url, rate_limit=RateLimit(5, 1.0)) as limiter:
        assert "s3cret" not in repr(limiter) and "***" in repr(limiter)
        started = loop.time()
        with pytest.raises(LimiterUnavailableError) as caught:
            async with limiter.slot("tok"):
                pytest.fail("must not be granted")
        assert loop.time() - started < 1.0
        assert "s3cret" not in str(caught.value)
        assert "nothing was sent" in str(caught.value)
        with pytest.raises(LimiterUnavailableError):
            await limiter.pause("tok", 1.0)
    assert redact_url("redis://user:pw@host:1/0") == "redis://user:***@host:1/0"
    assert redact_url("redis://host:1/0") == "redis://host:1/0"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (in the backlog) and never answers: a hung Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


async def test_unresponsive_redis_fails_every_waiter_promptly(silent_port: int) -> None:
    """A Redis that accepts but never answers: all queued waiters fail within about the timeout."""
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(f"redis://127.0.0.1:{silent_port}/0", timeout=0.3) as limiter:

        async def take() -> None:
            async with limiter.slot("tok"):
                pytest.fail("must not be granted")

        started = loop.time()
        results = await asyncio.gather(*(take() for _ in range(6)), return_exceptions=True)
        elapsed = loop.time() - started
    assert all(isinstance(r, LimiterUnavailableError) for r in results), results
    # One attempt and its retry time out; the queue behind it fails at once.
    assert elapsed < 0.3 * 2 + 0.5 + 0.5, elapsed


async def test_unresponsive_redis_keeps_max_wait(silent_port: int) -> None:
    """A max_wait shorter than the Redis timeout is kept: RateLimitTimeout at the deadline."""
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(f"redis://127.0.0.1:{silent_port}/0", timeout=2.0) as limiter:
        started = loop.time()
        with pytest.raises(RateLimitTimeout):
            async with limiter.slot("tok", deadline=started + 0.2):
                pytest.fail("must not be granted")
        assert loop.time() - started < 0.2 + 0.1 + 0.3


async def test_fallback_limiter_is_used_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """With an explicit fallback, a Redis outage uses it (and says so) instead of failing."""
    fallback = LocalRateLimiter(RateLimit(2, 0.5))
    limiter = RedisRateLimiter(refused_url(), rate_limit=RateLimit(5, 1.0), fallback=fallback)
    loop = asyncio.get_running_loop()
    starts = []
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    async with limiter:
        for _ in range(3):
            async with limiter.slot(f"fallback-{id(limiter)}") as slot:
                slot.sent()
                starts.append(loop.time())
        await limiter.pause(f"fallback-{id(limiter)}", 0.01)
    assert_rolling(starts, fallback.rate_limit)
    assert "fallback limiter" in caplog.text
    assert "s3cret" not in caplog.text


async def test_limiter_belongs_to_one_event_loop(redis_server: RedisServer, prefix: str) -> None:
    """Using one limiter from a second event loop is refused with a clear error."""
    limiter = RedisRateLimiter(redis_server.url, prefix=prefix)
    async with limiter.slot("tok"):
        pass

    def other_loop() -> None:
        async def use() -> None:
            async with limiter.slot("tok"):
                pass

        asyncio.run(use())

    with pytest.raises(RuntimeError, match="event loop"):
        await asyncio.to_thread(other_loop)
    await limiter.aclose()


# ---------------------------------------------------------------------- with the client


async def test_client_on_redis_keeps_a_strict_server_happy(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """The client through Redis: no 429 from a strict server; a 429 pauses through Redis."""
    rate = RateLimit(5, 0.5)
    async with (
        MockAutocalls(rate_limit=(5, 0.5)) as server,
        RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter,
        AsyncAutocalls("tok-client", base_url=server.base_url, limiter=limiter) as client,
    ):
        await asyncio.gather(
            *(
                client.generate_reply(assistant_id=123, customer_identifier=f"c{i}", message="Hi")
                for i in range(8)
            )
        )
        assert server.count(status=429) == 0
        assert_rolling([r.time for r in server.requests], RateLimit(5, 0.5, margin=0))
        server.inject(Fault.rate_limited(retry_after=1))
        await client.generate_reply(assistant_id=123, customer_identifier="c0", message="Again")
        _, pause_key = limiter.redis_keys(client.token_id)
        assert client.stats.rate_limited == 1
        assert await inspector.exists(pause_key) == 1
        assert "tok-client" not in pause_key


async def test_redis_killed_mid_run_fails_promptly_without_a_burst(prefix: str) -> None:
    """Redis killed mid-run: LimiterUnavailableError promptly, no burst; recovers once back."""
    redis = RedisServer(require_redis_server()).start()
    rate = RateLimit(5, 0.5)
    loop = asyncio.get_running_loop()
    try:
        async with (
            MockAutocalls(rate_limit=(5, 0.5)) as server,
            RedisRateLimiter(redis.url, rate_limit=rate, prefix=prefix, timeout=0.5) as limiter,
            AsyncAutocalls("tok-kill", base_url=server.base_url, limiter=limiter) as client,
        ):
            calls = [
                asyncio.create_task(
                    client.generate_reply(
                        assistant_id=123, customer_identifier=f"c{i}", message="x"
                    )
                )
                for i in range(12)
            ]
            for _ in range(2000):  # until three requests have reached the server
                if len(server.requests) >= 3:
                    break
                await asyncio.sleep(0.005)
            redis.kill()
            killed_at, sent_before = loop.time(), len(server.requests)
            results = await asyncio.gather(*calls, return_exceptions=True)
            elapsed = loop.time() - killed_at
            sent_after = len(server.requests) - sent_before
            redis.restart()
            await asyncio.sleep(limiter.timeout)  # the outage window that fails calls at once
            await client.generate_reply(assistant_id=123, customer_identifier="c0", message="back")
    finally:
        redis.stop()
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"\nRedis killed: {len(failed)} calls failed, the last {elapsed:.3f}s after the kill")
    assert failed and all(isinstance(r, LimiterUnavailableError) for r in failed), results
    assert elapsed < 2.5, elapsed  # prompt: no hang
    # At most the one slot already reserved before the kill is still used: no burst.
    assert sent_after <= 1
    assert server.count(status=429) == 0
    assert_rolling([r.time for r in server.requests], RateLimit(5, 0.5, margin=0))


CHILD = """
import asyncio, json, sys
from autocalls_async import AsyncAutocalls, RateLimit
from autocalls_async._redis import RedisRateLimiter

async def main(redis_url, base_url, prefix, name, calls):
    rate = RateLimit(5, 1.0)
    async with RedisRateLimiter(redis_url, rate_limit=rate, prefix=prefix) as limiter:
        async with AsyncAutocalls("shared-token", base_url=base_url, limiter=limiter,
                                  max_retries=0) as client:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

            async def one(i):
                try:
                    await client.generate_reply(
                        assistant_id=123, customer_identifier=f"{name}-{i}", message="Hi")
                    return "ok"
                except Exception as exc:
                    return f"{type(exc).__name__}: {exc}"

            print(json.dumps(await asyncio.gather(*(one(i) for i in range(calls)))), flush=True)

asyncio.run(main(*sys.argv[1:5], int(sys.argv[5])))
"""


@pytest.mark.slow
async def test_three_processes_share_one_token(redis_server: RedisServer, prefix: str) -> None:
    """3 OS processes x 6 calls, one token, 5/s rolling server: no 429, full rate, never 6 in 1 s."""
    processes, calls = 3, 6
    async with MockAutocalls(rate_limit=(5, 1.0)) as server:
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD,
                redis_server.url,
                server.base_url,
                prefix,
                f"p{n}",
                str(calls),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for n in range(processes)
        ]
        try:
            for child in children:
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                assert line.strip() == b"ready", line
            loop = asyncio.get_running_loop()
            go = loop.time()
            for child in children:
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                await child.stdin.drain()
            outputs = await asyncio.wait_for(
                asyncio.gather(*(child.communicate() for child in children)), 60
            )
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode(errors="replace")
        assert json.loads(out) == ["ok"] * calls, out
    arrivals = sorted(record.time - go for record in server.requests)
    assert len(arrivals) == processes * calls
    assert server.count(status=429) == 0
    assert_rolling(arrivals, RateLimit(5, 1.0, margin=0))
    ideal = (processes * calls - 1) * 1.0 / 5
    tightest = min(b - a for a, b in zip(arrivals, arrivals[5:], strict=False))
    print(
        f"\n3x6 on Redis: first {arrivals[0]:.3f}s, last {arrivals[-1]:.3f}s, "
        f"ideal {ideal:.2f}s, tightest 6 arrivals span {tightest:.3f}s"
    )
    assert arrivals[-1] - arrivals[0] <= 1.25 * ideal
    assert arrivals[-1] <= 1.25 * ideal + 1.0  # + the children's first connections


# ---------------------------------------------------------------------- conversations


async def test_conversation_store_is_shared_and_expires(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """A conversation one worker stores is seen by another; entries carry the TTL."""
    async with (
        RedisConversationStore(redis_server.url, prefix=prefix, ttl=0.5) as writer,
        RedisConversationStore(redis_server.url, prefix=prefix) as reader,
    ):
        conversation = Conversation(123, "+14155551234", "c0ffee", False, 1.5)
        assert await reader.get(123, "+14155551234") is None
        await writer.set(conversation)
        assert await reader.get(123, "+14155551234") == conversation
        key = writer.redis_key(123, "+14155551234")
        assert "+1415" not in key and key.startswith(prefix)
        assert 0 < await inspector.pttl(key) <= 500
        await inspector.set(reader.redis_key(1, "x"), b"not json")
        assert await reader.get(1, "x") is None
        await asyncio.sleep(0.6)
        assert await reader.get(123, "+14155551234") is None


async def test_conversation_store_through_clients(redis_server: RedisServer, prefix: str) -> None:
    """Two clients (two workers) on one store: the second sees the first's conversation id."""
    async with (
        MockAutocalls(rate_limit=None) as server,
        RedisConversationStore(redis_server.url, prefix=prefix) as store_a,
        RedisConversationStore(redis_server.url, prefix=prefix) as store_b,
        AsyncAutocalls("tok", base_url=server.base_url, conversation_store=store_a) as client,
    ):
        reply = await client.generate_reply(
            assistant_id=123, customer_identifier="ann", message="Hi"
        )
        seen = await store_b.get(123, "ann")
        assert seen is not None and seen.conversation_id == reply.conversation_id


async def test_conversation_store_outage_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    """Redis down: get() is a logged miss and set() never raises (the reply was processed)."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    async with RedisConversationStore(refused_url(), timeout=0.3) as store:
        assert "s3cret" not in repr(store)
        await store.set(Conversation(123, "bob", "id", False, 0.0))
        assert await store.get(123, "bob") is None
    assert "write failed" in caplog.text and "read failed" in caplog.text


def test_exported_lazily_from_the_package() -> None:
    """Both backends import from autocalls_async once the redis extra is installed."""
    assert autocalls_async.RedisRateLimiter is RedisRateLimiter
    assert autocalls_async.RedisConversationStore is RedisConversationStore


async def test_backends_satisfy_the_core_protocols() -> None:
    """Both plug into the client's protocols (checked by mypy here, and at run time)."""
    limiter: RateLimiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    store: ConversationStore = RedisConversationStore("redis://127.0.0.1:1/0")
    assert isinstance(limiter, RateLimiter) and isinstance(store, ConversationStore)
    assert isinstance(limiter, RedisRateLimiter) and isinstance(store, RedisConversationStore)
    await limiter.aclose()
    await store.aclose()


# ---------------------------------------------------------------------- edges


async def test_construction_checks_and_borrowed_client(
    redis_server: RedisServer, prefix: str
) -> None:
    """Bad arguments fail early; a caller's Redis client is used and never closed."""
    with pytest.raises(TypeError, match="url"):
        RedisRateLimiter(6379)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rate_limit"):
        RedisRateLimiter(redis_server.url, rate_limit="5/60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        RedisRateLimiter(redis_server.url, timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        RedisConversationStore(redis_server.url, ttl=float("inf"))
    assert redact_url("redis://:pw@[::1]/0") == "redis://:***@[::1]/0"
    assert redact_url("redis://:pw@host:99999999/0") == "<redis url>"
    mine = Redis.from_url(redis_server.url)
    async with RedisRateLimiter(mine, prefix=prefix) as limiter:
        assert "127.0.0.1" in repr(limiter)
        async with limiter.slot("tok"):
            pass
    assert await mine.ping()  # still open: borrowed, not ours to close
    await mine.aclose()


async def test_many_tokens_do_not_accumulate(redis_server: RedisServer, prefix: str) -> None:
    """Per-token queues of idle tokens are dropped as new tokens come."""
    async with RedisRateLimiter(redis_server.url, prefix=prefix) as limiter:
        for n in range(80):
            async with limiter.slot(f"tok{n}"):
                pass
        assert len(limiter._keys) <= 66


async def test_bookkeeping_failures_never_block_the_queue(
    redis_server: RedisServer,
    prefix: str,
    inspector: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed late-send report or give-back is logged; the next waiter still gets its turn."""
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    rate = RateLimit(10, 1.0)
    loop = asyncio.get_running_loop()
    async with RedisRateLimiter(redis_server.url, rate_limit=rate, prefix=prefix) as limiter:

        async def broken(*args: object, **kwargs: object) -> None:
            raise RedisConnectionError("gone")

        limiter._late = broken  # type: ignore[assignment]
        limiter._release = broken  # type: ignore[assignment]
        async with limiter.slot("tok") as slot:
            await asyncio.sleep(0.05)
            slot.sent()
        assert "could not be reported" in caplog.text
        limiter._down_until = -1.0  # the breaker would otherwise fail the next call at once
        next_key, _ = limiter.redis_keys("tok")
        await inspector.set(next_key, await redis_now(inspector) + 300_000, px=5000)
        waiter = asyncio.create_task(limiter.slot("tok").__aenter__())
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert "stays reserved" in caplog.text
        limiter._down_until = -1.0
        started = loop.time()
        async with limiter.slot("tok"):
            assert loop.time() - started < 1.0


async def test_conversation_store_ignores_a_hash_collision(
    redis_server: RedisServer, prefix: str, inspector: Redis
) -> None:
    """An entry stored under our key for another customer is never returned."""
    async with RedisConversationStore(redis_server.url, prefix=prefix) as store:
        other = {
            "assistant_id": 123,
            "customer_identifier": "someone-else",
            "conversation_id": "x",
            "ai_disabled": False,
            "last_seen": 0.0,
        }
        await inspector.set(store.redis_key(123, "me"), json.dumps(other))
        assert await store.get(123, "me") is None
