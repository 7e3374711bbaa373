"""7. Lanes: a web app and a bulk job on one token (issue 11).

A bulk job (``BulkRunner``, BACKGROUND, 40 rows, concurrency 32) saturates ``RateLimit(5, 1)``
while a web client makes one INTERACTIVE call every 0.7 s for as long as the job runs. Three
deployments: one process (both clients on one ``LocalRateLimiter``), two processes on the host
store (the bulk job in a child process, ``HostRateLimiter`` on one directory) and two processes
via Redis (``RedisRateLimiter``). Each runs with the lanes (bulk BACKGROUND), with the lanes
and ``background_headroom=1`` (one start of each window kept for interactive calls: issue 20),
and without priorities (everything INTERACTIVE: first come, first served), interleaved.

The emulator in this process is a strict rolling-window server (5 per rolling second) and
records every request on the host's monotonic clock, which the child shares. Measured: each
interactive call's delay from being made to reaching the server, in intervals (1.02 × 0.2 s);
429s; the combined rate from the job's first to its last request against the limit; and
whether the job finished (every row answered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from typing import Any

from autocalls_async.testing import MockAutocalls, token_hash

from ._common import ROOT, BenchResult, Config
from .distributed import available as redis_missing
from .distributed import redis_server

NAME = "lanes"
TITLE = "Lanes (5/s, one token): a 40-row BACKGROUND bulk job beside an INTERACTIVE call / 0.7 s"
REQUESTS, PERIOD = 5, 1.0
WEB_EVERY = 0.7
#: mode -> the bulk job's lane, "+k" for ``background_headroom=k``
MODES = {
    "lanes": "BACKGROUND",
    "lanes, headroom 1": "BACKGROUND+1",
    "no priorities": "INTERACTIVE",
}


def _limiter(store: str, prefix: str, headroom: int = 0) -> Any:
    from autocalls_async import HostRateLimiter, LocalRateLimiter, RateLimit, RedisRateLimiter

    limit = RateLimit(REQUESTS, PERIOD)
    if store == "process":
        return LocalRateLimiter(limit, background_headroom=headroom)
    if store.startswith("redis://"):
        return RedisRateLimiter(
            store, rate_limit=limit, prefix=prefix, background_headroom=headroom
        )
    return HostRateLimiter(
        store.removeprefix("host:"), rate_limit=limit, background_headroom=headroom
    )


def _lane(mode: str) -> tuple[str, int]:
    lane, _, headroom = mode.partition("+")
    return lane, int(headroom or 0)


async def _bulk(client: Any, rows: int, lane: str) -> dict[str, Any]:
    from autocalls_async import Priority
    from autocalls_async.bulk import BulkRunner, generated_requests

    async with BulkRunner(
        client, generated_requests(rows), priority=Priority[_lane(lane)[0]]
    ) as run:
        results = [result async for result in run]
    return {"ok": sum(result.ok for result in results), "429": client.stats.rate_limited}


async def _child(store: str, base_url: str, token: str, rows: int, lane: str) -> dict[str, Any]:
    from autocalls_async import AsyncAutocalls

    async with (
        _limiter(store, f"bench-lanes-{token}:", _lane(lane)[1]) as limiter,
        AsyncAutocalls(token, base_url=base_url, limiter=limiter, max_retries=0) as client,
    ):
        return await _bulk(client, rows, lane)


async def _web(
    client: Any, server: MockAutocalls, key: str, running: asyncio.Future[Any]
) -> dict[str, float]:
    """Once the job has started: one interactive call every 0.7 s while it runs."""
    loop = asyncio.get_running_loop()
    for _ in range(3000):  # until the job's first request (30 s at most: a child starting)
        if any(r.token_hash == key for r in server.requests) or running.done():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # the job's queue is full: it saturates the token
    made: dict[str, float] = {}
    calls = []
    n = 0
    while not running.done():
        name = f"web-{n}"
        made[name] = loop.time()
        calls.append(
            asyncio.create_task(
                client.generate_reply(assistant_id=123, customer_identifier=name, message="Hi")
            )
        )
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(running), WEB_EVERY)
    await asyncio.gather(*calls, return_exceptions=True)  # a 429 is counted, not fatal
    return made


async def _one_run(server: MockAutocalls, store: str, rows: int, lane: str) -> dict[str, Any]:
    from autocalls_async import AsyncAutocalls

    token = f"bench-lanes-{time.monotonic_ns()}"
    key = token_hash(token)
    async with contextlib.AsyncExitStack() as stack:
        limiter = await stack.enter_async_context(
            _limiter(store, f"bench-lanes-{token}:", _lane(lane)[1])
        )
        web = await stack.enter_async_context(
            AsyncAutocalls(token, base_url=server.base_url, limiter=limiter, max_retries=0)
        )
        if store == "process":
            bulk_client = await stack.enter_async_context(
                AsyncAutocalls(token, base_url=server.base_url, limiter=limiter, max_retries=0)
            )
            running: asyncio.Future[Any] = asyncio.ensure_future(_bulk(bulk_client, rows, lane))
        else:
            child = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "benchmarks.lanes", "--child", store, server.base_url),
                *(token, str(rows), lane),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            running = asyncio.ensure_future(child.communicate())
        made = await _web(web, server, key, running)
        if store == "process":
            report = running.result()
        else:
            out, err = running.result()
            if child.returncode != 0:
                raise RuntimeError(f"the bulk child failed: {err.decode(errors='replace')[-2000:]}")
            report = json.loads(out.decode().strip().splitlines()[-1])
    mine = [r for r in server.requests if r.token_hash == key]
    arrived = {r.body["customer_identifier"]: r.time for r in mine if isinstance(r.body, dict)}
    interval = PERIOD / REQUESTS * 1.02
    delays = [(arrived[name] - at) / interval for name, at in made.items() if name in arrived]
    bulk_times = sorted(t for name, t in arrived.items() if not name.startswith("web-"))
    first, last = bulk_times[0], bulk_times[-1]
    inside = [r for r in mine if first <= r.time <= last and r.status == 200]
    combined = (len(inside) - 1) / (last - first) if last > first else math.nan
    return {
        "delays": delays,
        "rate_429": sum(1 for r in mine if r.status == 429),
        "combined": combined,
        "answered": report["ok"],
    }


async def _measure(stores: dict[str, str], rows: int, rounds: int) -> dict[str, list[Any]]:
    measured: dict[str, list[Any]] = {}
    async with MockAutocalls(rate_limit=(REQUESTS, PERIOD), window="rolling") as server:
        for _ in range(rounds):
            for store_name, store in stores.items():
                for mode, lane in MODES.items():
                    with tempfile.TemporaryDirectory(prefix="autocalls-bench-lanes-") as tmp:
                        where = f"host:{tmp}" if store == "host" else store
                        run = await _one_run(server, where, rows, lane)
                    measured.setdefault(f"{store_name}, {mode}", []).append(run)
    return measured


def run(config: Config) -> BenchResult:
    rows = 12 if config.quick else 40
    rounds = config.pick_rounds(full=2, quick=1)
    result = BenchResult(
        NAME,
        TITLE,
        params={
            "limit": f"{REQUESTS}/{PERIOD:g}s",
            "bulk rows": rows,
            "interactive every": f"{WEB_EVERY}s",
            "rounds": rounds,
        },
    )
    with contextlib.ExitStack() as stack:
        stores = {"one process": "process", "2 processes, host store": "host"}
        missing = redis_missing()
        if missing is None:
            stores["2 processes, Redis"] = stack.enter_context(redis_server())
        else:
            result.notes.append(f"Redis rows missing: {missing}")
        measured = asyncio.run(_measure(stores, rows, rounds))
    for case, runs in measured.items():
        lanes = "lanes" in case
        delays = [d for r in runs for d in r["delays"]]
        median = result.add(case, "interactive delay, median", statistics.median(delays), unit="i")
        worst = result.add(case, "interactive delay, max", max(delays), unit="i")
        if lanes:
            median.expect("≤ 1 interval", lambda v: v <= 1.0)
            worst.expect("≤ 2 intervals", lambda v: v <= 2.0)
        result.summary(case, "429s received", [r["rate_429"] for r in runs], digits=0).expect(
            "0", lambda v: v == 0
        )
        result.summary(
            case,
            "combined rate ÷ limit",
            [r["combined"] / (REQUESTS / PERIOD) for r in runs],
            digits=3,
            unit="×",
        ).expect("≥ 0.95×", lambda v: v >= 0.95)
        result.summary(case, "bulk rows answered", [r["answered"] for r in runs], digits=0).expect(
            f"{rows}", lambda v: v == rows
        )
    result.notes.append(
        "delays are in intervals (i = 1.02 × 0.2 s) from the call being made to the request "
        "reaching the server; 'no priorities' runs the bulk job INTERACTIVE too; 'headroom 1' "
        "keeps one start of each window for interactive calls (background_headroom=1)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes")
    parser.add_argument("--child", nargs=5, metavar="ARG")
    args = parser.parse_args()
    if args.child is None:
        parser.error("run the benchmark with `python -m benchmarks lanes`")
    store, base_url, token, rows, lane = args.child
    print(json.dumps(asyncio.run(_child(store, base_url, token, int(rows), lane))))


if __name__ == "__main__":
    main()
