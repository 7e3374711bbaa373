"""Priority lanes (issue 11) on the stores that need real time: Redis and real processes.

The virtual-time matrix (``test_schedule_matrix.py``) checks the memory and host stores. Redis
keeps its own clock (``TIME``), so here the same promises are checked on a real ``redis-server``
in real time, at a scaled rate and small sizes: random arrivals in both lanes over three
limiters (three connections, as three processes have), cancellations and a 429 pause. Then the
deployment the lanes exist for, with real processes: a bulk job saturating the token in one
process, a web client making an interactive call every 0.7 s in another, on the host store
(the bulk job is the real ``autocalls-async bulk`` command) and via Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocalls_async import AsyncAutocalls, Priority, RateLimit
from autocalls_async._ratelimit import Limiter
from autocalls_async._redis import RedisRateLimiter
from autocalls_async._stores import HostStore, MemoryStore
from autocalls_async.testing import MockAutocalls

from .redis_server import RedisServer, require_redis_server
from .virtual_time import run_virtual

RATE = RateLimit(5, 1.0)
EVEN = RateLimit(5, 1.0, burst=1)  # evenly spaced: calls queue as soon as two arrive together
SPACING = RATE.period / RATE.requests
JITTER = 0.003  # timer noise on top of the margin, per gap (the starts are this loop's clock)
#: How long a waiter may take to be known to the store (a Redis round trip, a dispatcher's poll
#: on a busy 2-core machine): order is only checked between calls further apart than this.
SEEN = 0.06
KEY = "lanes"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


# ---------------------------------------------------------------------- a waiter who gives up


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_an_interactive_call_that_gives_up_does_not_hold_the_others_back(
    kind: str, tmp_path: Path
) -> None:
    """A web call that times out while queued withdraws its report from the store at once.

    Before, the store kept counting it as the oldest interactive waiter until its report
    expired (a second at least, a whole interval plus the lease after a grant), and every
    other process, bulk or web, waited behind a caller who was gone.
    """

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        store = MemoryStore(loop.time) if kind == "memory" else HostStore(tmp_path, clock=loop.time)
        web, bulk = Limiter(store, EVEN), Limiter(store, EVEN)
        starts: list[float] = []

        async def background() -> None:
            async with bulk.slot(KEY, priority=Priority.BACKGROUND) as slot:
                starts.append(loop.time())
                slot.sent()

        tasks = [asyncio.create_task(background()) for _ in range(6)]
        await asyncio.sleep(0.3)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), web.slot(KEY):
                pytest.fail("the web call must still be queued")
        await asyncio.gather(*tasks)
        return starts

    starts = run_virtual(scenario)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) == pytest.approx(EVEN.interval, abs=1e-3), gaps


# ---------------------------------------------------------------------- Redis, real time

call = st.fixed_dictionaries(
    {
        "process": st.integers(0, 2),
        "at": st.floats(0, 1.2, allow_nan=False),
        "lane": st.sampled_from([Priority.INTERACTIVE, Priority.BACKGROUND]),
        "cancel_after": st.none() | st.none() | st.floats(0, 0.8, allow_nan=False),
    }
)


@pytest.mark.timing
@pytest.mark.slow
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    calls=st.lists(call, min_size=2, max_size=10),
    share=st.sampled_from([0, 3]),
    pause=st.none() | st.tuples(st.floats(0, 1.0), st.floats(0.2, 0.6)),
    burst=st.sampled_from([None, 1]),
)
def test_redis_lanes_keep_every_promise(
    redis_server: RedisServer,
    calls: list[dict[str, Any]],
    share: int,
    pause: tuple[float, float] | None,
    burst: int | None,
) -> None:
    """Three limiters on one Redis: window, gaps, pauses, FIFO per lane, lane order, share."""
    rate = RateLimit(5, 1.0, burst=burst)
    prefix = f"lanes{uuid.uuid4().hex[:8]}:"

    async def scenario() -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
        loop = asyncio.get_running_loop()
        limiters = [
            RedisRateLimiter(
                redis_server.url, rate_limit=rate, prefix=prefix, background_share=share
            )
            for _ in range(3)
        ]
        arrived: dict[int, float] = {}
        granted: dict[int, float] = {}
        gone: dict[int, float] = {}
        pauses: list[tuple[float, float]] = []

        async def one(index: int, spec: dict[str, Any]) -> None:
            await asyncio.sleep(spec["at"])
            arrived[index] = loop.time()
            try:
                async with limiters[spec["process"]].slot(KEY, priority=spec["lane"]) as slot:
                    granted[index] = loop.time()
                    slot.sent()
            except asyncio.CancelledError:
                gone[index] = loop.time()
                raise

        async def pausing(at: float, length: float) -> None:
            await asyncio.sleep(at)
            pauses.append((loop.time(), loop.time() + length))
            await limiters[0].pause(KEY, length)

        tasks = []
        for index, spec in enumerate(calls):
            task = asyncio.create_task(one(index, spec))
            tasks.append(task)
            if spec["cancel_after"] is not None:
                loop.call_later(spec["at"] + spec["cancel_after"], task.cancel)
        if pause is not None:
            tasks.append(asyncio.create_task(pausing(*pause)))
        try:
            async with asyncio.timeout(30):
                results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for limiter in limiters:
                await limiter.aclose()
        for result in results:
            assert result is None or isinstance(result, asyncio.CancelledError), result
        for begun, until in pauses:
            for index, when in granted.items():
                if arrived[index] > begun:  # granted before the pause: may still be used
                    assert not begun + SEEN < when < until - JITTER, (index, when, begun)
        return arrived, granted, gone

    arrived, granted, gone = asyncio.run(scenario())
    # Liveness: every call that was not cancelled was granted.
    assert set(arrived) - set(gone) <= set(granted)
    # The rolling window, and evenly spaced the no-burst gap (the starts are the grants: sent
    # at once); background grants are evenly spaced whatever the burst.
    times = sorted(granted.values())
    for first, last in zip(times, times[RATE.requests :], strict=False):
        assert last - first >= RATE.period - JITTER, (first, last)
    spaced = (
        times
        if burst == 1
        else [
            granted[i]
            for i in sorted(granted, key=granted.get)
            if calls[i]["lane"] == Priority.BACKGROUND
        ]
    )
    for a, b in itertools.pairwise(sorted(spaced)):
        assert b - a >= SPACING - JITTER, (a, b)
    # FIFO within a lane of one process.
    for i, j in itertools.permutations(granted, 2):
        one, two = calls[i], calls[j]
        if (one["process"], one["lane"]) == (two["process"], two["lane"]) and arrived[i] < arrived[
            j
        ]:
            assert granted[i] < granted[j], (i, j)

    def waited(index: int, when: float) -> bool:
        """Call ``index`` was waiting, and known to be, around ``when``."""
        served = granted.get(index, gone.get(index, float("inf")))
        return index in arrived and arrived[index] + SEEN < when < served - SEEN

    order = sorted(granted, key=granted.__getitem__)
    lanes = {index: calls[index]["lane"] for index in order}
    if share == 0:  # lane order: no background grant while an interactive call waited
        for index in order:
            if lanes[index] == Priority.BACKGROUND:
                for other, spec in enumerate(calls):
                    if spec["lane"] == Priority.INTERACTIVE:
                        assert not waited(other, granted[index]), (index, other)
    else:  # the minimum share: at most share - 1 interactive grants in a row while one waits
        for index, spec in enumerate(calls):
            if spec["lane"] != Priority.BACKGROUND:
                continue
            run = 0
            for other in order:
                if lanes[other] == Priority.BACKGROUND or not waited(index, granted[other]):
                    run = 0
                    continue
                run += 1
                assert run <= share - 1, (index, order)


async def test_the_first_caller_stays_first_while_redis_answers(redis_server: RedisServer) -> None:
    """A caller who asks the store directly (nobody waited) and must wait stays ahead of the
    callers who queued while Redis answered: FIFO holds when the store's answer is awaited."""
    order: list[int] = []
    prefix = f"fifo{uuid.uuid4().hex[:8]}:"
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=RATE, prefix=prefix) as limiter,
        RedisRateLimiter(redis_server.url, rate_limit=RATE, prefix=prefix) as other,
    ):
        async with other.slot(KEY) as slot:
            slot.sent()  # another process started: the next slot is an interval away

        async def one(n: int) -> None:
            async with limiter.slot(KEY, priority=Priority.BACKGROUND) as slot:
                order.append(n)
                slot.sent()

        await asyncio.gather(*(one(n) for n in range(4)))
    assert order == [0, 1, 2, 3]


# ---------------------------------------------------------------------- real processes

WEB_CALLS = 7
WEB_EVERY = 0.7
BULK_ROWS = 40

BULK_CHILD = """
import asyncio, json, sys
from autocalls_async import AsyncAutocalls, RateLimit, RedisRateLimiter
from autocalls_async.bulk import BulkRunner, generated_requests

async def main(base_url, token, redis_url, rows):
    rate = RateLimit(5, 1.0)
    async with RedisRateLimiter(redis_url, rate_limit=rate, prefix="lanes-proc:") as limiter:
        async with AsyncAutocalls(token, base_url=base_url, limiter=limiter) as client:
            async with BulkRunner(client, generated_requests(rows)) as run:  # BACKGROUND
                results = [result async for result in run]
    print(json.dumps({"ok": sum(r.ok for r in results), "429": client.stats.rate_limited}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def web_calls(server: MockAutocalls, client: AsyncAutocalls) -> list[float]:
    """Once the bulk job saturates the token: an interactive call every 0.7 s; each one's
    delay from being made to reaching the server, in intervals."""
    loop = asyncio.get_running_loop()
    for _ in range(600):
        if len(server.requests) >= 3:
            break
        await asyncio.sleep(0.05)
    made: dict[str, float] = {}

    async def one(n: int) -> None:
        made[f"web-{n}"] = loop.time()
        await client.generate_reply(assistant_id=123, customer_identifier=f"web-{n}", message="x")

    tasks = []
    for n in range(WEB_CALLS):
        tasks.append(asyncio.create_task(one(n)))
        await asyncio.sleep(WEB_EVERY)
    await asyncio.gather(*tasks)
    arrivals = {
        r.body["customer_identifier"]: r.time
        for r in server.requests
        if isinstance(r.body, dict) and str(r.body.get("customer_identifier")).startswith("web-")
    }
    return [(arrivals[name] - made[name]) / RATE.interval for name in made]


def check_run(server: MockAutocalls, delays: list[float]) -> None:
    assert server.count(status=429) == 0
    times = sorted(r.time for r in server.requests)
    for first, last in zip(times, times[RATE.requests :], strict=False):
        assert last - first >= RATE.period - JITTER, (first, last)
    # The target (the benchmark's) is max 2 and median 1 interval; a shared machine adds noise.
    assert max(delays) < 3.0, delays
    assert statistics.median(delays) < 1.5, delays


@pytest.mark.timing
@pytest.mark.slow
async def test_a_bulk_command_never_delays_a_web_process_on_the_host_store(
    tmp_path: Path,
) -> None:
    """`autocalls-async bulk` (BACKGROUND by default) saturating 5/s in one process, a web
    client in this one: each interactive call starts within 2 intervals."""
    source = tmp_path / "rows.csv"
    source.write_text(
        "assistant_id,customer_identifier,message\n"
        + "".join(f"123,bulk-{n},Hello {n}\n" for n in range(BULK_ROWS))
    )
    out = tmp_path / "out.jsonl"
    token = f"lanes-{uuid.uuid4().hex}"
    async with MockAutocalls(rate_limit=(5, 1.0)) as server:
        bulk = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "autocalls_async",
            "bulk",
            str(source),
            "--out",
            str(out),
            "--rate-limit",
            "5/1",
            "--progress",
            "off",
            env={
                **__import__("os").environ,
                "AUTOCALLS_API_TOKEN": token,
                "AUTOCALLS_BASE_URL": server.base_url,
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with AsyncAutocalls(token, base_url=server.base_url, rate_limit=RATE) as web:
                delays = await web_calls(server, web)
            _, err = await asyncio.wait_for(bulk.communicate(), 60)
        finally:
            if bulk.returncode is None:
                bulk.kill()
                await bulk.wait()
        assert bulk.returncode == 0, err.decode(errors="replace")
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sum(1 for line in lines if line.get("ok")) == BULK_ROWS
        check_run(server, delays)


@pytest.mark.timing
@pytest.mark.slow
async def test_a_bulk_process_never_delays_a_web_process_via_redis(
    redis_server: RedisServer,
) -> None:
    """A BulkRunner process and a web process sharing the token through Redis."""
    token = f"lanes-{uuid.uuid4().hex}"
    async with MockAutocalls(rate_limit=(5, 1.0)) as server:
        bulk = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            BULK_CHILD,
            server.base_url,
            token,
            redis_server.url,
            str(BULK_ROWS),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with (
                RedisRateLimiter(redis_server.url, rate_limit=RATE, prefix="lanes-proc:") as shared,
                AsyncAutocalls(token, base_url=server.base_url, limiter=shared) as web,
            ):
                delays = await web_calls(server, web)
            out, err = await asyncio.wait_for(bulk.communicate(), 60)
        finally:
            if bulk.returncode is None:
                bulk.kill()
                await bulk.wait()
        assert bulk.returncode == 0, err.decode(errors="replace")
        assert json.loads(out) == {"ok": BULK_ROWS, "429": 0}
        check_run(server, delays)
