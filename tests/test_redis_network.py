"""Three saturating processes share one token through Redis behind a latency proxy (a network
between the workers and Redis): the emulator's strict rolling window judges every start.

The limit is scaled (10 per second) so that a round trip is a real fraction of the interval
between starts (100 ms), as 1.2 s would be at 5 per minute... and more. Assertions are tolerant:
the machine may be small and loaded.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import RateLimit
from autocalls_async.testing import MockAutocalls

from ._env import child_env
from .latency_proxy import LatencyProxy
from .redis_server import RedisServer, require_redis_server

#: Throughput floors and the strict window, measured in real time.
pytestmark = pytest.mark.timing
CHILD = Path(__file__).with_name("redis_network_child.py")
PROCESSES = 3


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


async def run(redis_server: RedisServer, round_trip: float, seconds: float) -> dict[str, Any]:
    """The run: each process's calls answered as the emulator saw them, the rate, the 429s."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    async with (
        MockAutocalls(rate_limit=(10, 1.0), clock=time.time) as server,
        LatencyProxy(redis_server.port, delay=round_trip / 2) as proxy,
    ):
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(CHILD),
                proxy.url,
                server.base_url,
                prefix,
                str(index),
                str(seconds),
                env=child_env(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for index in range(PROCESSES)
        ]
        try:
            for child in children:  # started and set up: then one start time for all
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                assert line.strip() == b"ready", line
            start_at = time.time() + 1.0  # each reads it and sleeps until then
            for child in children:
                assert child.stdin is not None
                child.stdin.write(f"{start_at!r}\n".encode())
                await child.stdin.drain()
            outputs = [await asyncio.wait_for(child.communicate(), 60) for child in children]
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        for child, (out, err) in zip(children, outputs, strict=True):
            assert child.returncode == 0, err.decode()[-3000:]
        reports = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
        records = [r for r in server.requests if start_at <= r.time <= start_at + seconds]
        per_process = [0] * PROCESSES
        first_seen: list[float | None] = [None] * PROCESSES
        for record in records:
            index = int(record.body["customer_identifier"].split("-")[0][1:])
            per_process[index] += 1
            if first_seen[index] is None:
                first_seen[index] = record.time - start_at
        rate = len([r for r in records if r.status == 200]) / seconds
        result = {
            "round_trip": round_trip,
            "rate": rate,
            "of_limit": rate / 10.0,
            "per_process": per_process,
            "first_start": first_seen,
            "429": server.count(status=429),
            "errors": [report["errors"] for report in reports],
            "redis": [report["redis"] for report in reports],
            "starts": sorted(r.time for r in server.requests if r.status is not None),
        }
    print(
        f"\n{PROCESSES} processes, {round_trip * 1000:.0f} ms round trip to Redis: "
        f"{rate:.2f}/s = {result['of_limit']:.2f}x the limit; per process {per_process}; "
        f"first start per process {first_seen}; 429s {result['429']}; errors {result['errors']}; "
        f"Redis operations {result['redis']}"
    )
    return result


def assert_rolling(starts: list[float], rate: RateLimit) -> None:
    for first, last in zip(starts, starts[rate.requests :], strict=False):
        assert last - first >= rate.period - 0.002, (first, last)


#: The lowest share of the limit each round trip must reach: about half of what a loaded
#: 2-core machine measured (0.94, 0.72, 0.44 and 0.11; a CI run with three other suites on
#: the machine saw 0.78 and 0.51), so that the test judges starvation, not speed: the figures
#: belong to the benchmark. One slot costs the interval (102 ms) plus about two
#: round trips: the grant is a read and a compare-and-set, and the start is dated no earlier
#: than the real write (rule 3 of ``_schedule``), which the store can only bound from above
#: by the time since the holder asked. So 0.9x at 50 ms is out of reach of this algorithm.
FLOORS = {0.0: 0.45, 0.01: 0.3, 0.05: 0.15, 0.2: 0.03}


@pytest.mark.slow
@pytest.mark.parametrize("round_trip", sorted(FLOORS))
async def test_three_processes_through_a_slow_network(
    redis_server: RedisServer, round_trip: float
) -> None:
    """Three processes, three callers each always waiting, one token: no 429 and no burst (the
    emulator's strict window), no error (was: "too contended: 50 attempts"), every process
    served (was: one got nothing in 30 s at 200 ms), and the throughput floor above."""
    # 6 s is 60 slots, enough to judge starvation and a floor; at 200 ms a slot costs about
    # four round trips more, so that run keeps 10 s.
    result = await run(redis_server, round_trip, seconds=10.0 if round_trip >= 0.2 else 6.0)
    assert result["429"] == 0
    assert_rolling(result["starts"], RateLimit(10, 1.0, margin=0))
    assert all(not errors for errors in result["errors"]), result["errors"]
    assert all(count > 0 for count in result["per_process"]), result["per_process"]
    assert result["of_limit"] >= FLOORS[round_trip]
    # Polls do not write, and queue reports never make a compare-and-set lose.
    for counts in result["redis"]:
        assert counts["lost"] <= max(10, counts["writes"] // 4), result["redis"]
