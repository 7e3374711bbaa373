"""6. Deployments: 3 processes on one token, host store (the default) and Redis, against a strict
rolling-window server and a strict no-burst leaky bucket (a real nginx ``limit_req``).

Each case starts 3 child processes (``python -m benchmarks.deployments --child ...``), each with
its own ``AsyncAutocalls`` at ``RateLimit(5, 1)``: the default limiter (the host store, one
fresh directory per run) or ``RedisRateLimiter``. ``max_retries=0``, so a 429 is never hidden by
a retry. The emulator in this process records every request that reached it, on one clock;
behind nginx it sees only what nginx let through, and the children count the 429s nginx
answered. Measured: the combined rate of successes against the limit, and 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from autocalls_async.testing import MockAutocalls, token_hash

from ._common import ROOT, BenchResult, Config, burst_report, rate_rows
from ._nginx import NginxLimiter, find_nginx
from .distributed import available as redis_missing
from .distributed import redis_server
from .rate import _max_in_window

NAME = "deployments"
TITLE = "Deployments (3 processes, one token, 5/s): host store and Redis, strict and no-burst"
PROCESSES = 3
REQUESTS, PERIOD = 5, 1.0


async def _child(
    store: str, base_url: str, token: str, first: int, calls: int, start_at: float
) -> dict[str, Any]:
    from autocalls_async import AsyncAutocalls, RateLimit

    limit = RateLimit(REQUESTS, PERIOD)
    async with contextlib.AsyncExitStack() as stack:
        limiter = None
        if store.startswith("redis://"):
            from autocalls_async import RedisRateLimiter

            limiter = await stack.enter_async_context(
                RedisRateLimiter(store, rate_limit=limit, prefix="bench-deploy:")
            )
        client = await stack.enter_async_context(
            AsyncAutocalls(
                token, base_url=base_url, rate_limit=limit, limiter=limiter, max_retries=0
            )
        )
        return await burst_report(client, first, calls, start_at)


async def _one_run(base_url: str, server: MockAutocalls, store: str, calls: int) -> dict[str, Any]:
    token = f"bench-deploy-{time.monotonic_ns()}"
    start_at = time.time() + 1.5
    shares = [calls // PROCESSES + (i < calls % PROCESSES) for i in range(PROCESSES)]
    with tempfile.TemporaryDirectory(prefix="autocalls-bench-host-") as directory:
        env = {**os.environ, "AUTOCALLS_LIMITER_DIR": directory}
        children = []
        first = 0
        for share in shares:
            command = [sys.executable, "-m", "benchmarks.deployments", "--child", store, base_url]
            command += [token, str(first), str(share), repr(start_at)]
            first += share
            children.append(
                await asyncio.create_subprocess_exec(
                    *command,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                    env=env,
                )
            )
        reports = []
        for child in children:
            out, err = await child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"a child failed: {err.decode(errors='replace')[-2000:]}")
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    key = token_hash(token)
    mine = [record for record in server.requests if record.token_hash == key]
    ok = sorted(record.time for record in mine if record.status == 200)
    sustained = (len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 and ok[-1] > ok[0] else math.nan
    return {
        "sustained": sustained,
        "rate_429": sum(r["rate_limited"] for r in reports),
        "failed": sum(r["failed"] for r in reports),
        "errors": sorted({e for r in reports for e in r["errors"]}),
        "max_in_window": _max_in_window(sorted(r.time for r in mine), PERIOD),
    }


@contextlib.asynccontextmanager
async def _servers(nginx: str | None) -> AsyncIterator[dict[str, tuple[str, MockAutocalls]]]:
    """name -> (base URL, the emulator whose records count)."""
    async with (
        MockAutocalls(rate_limit=(REQUESTS, PERIOD), window="rolling") as strict,
        MockAutocalls(rate_limit=None) as behind,
    ):
        servers = {"strict rolling window": (strict.base_url, strict)}
        proxy = None
        if nginx is not None:
            proxy = NginxLimiter(nginx, upstream_port=behind.port, rate=REQUESTS).start()
            servers["nginx limit_req, no burst"] = (proxy.base_url, behind)
        try:
            yield servers
        finally:
            if proxy is not None:
                proxy.stop()


async def _measure(stores: dict[str, str], calls: int, rounds: int) -> dict[str, list[Any]]:
    measured: dict[str, list[Any]] = {}
    async with _servers(find_nginx()) as servers:
        for _ in range(rounds):
            for server_name, (base_url, server) in servers.items():
                for store_name, store in stores.items():
                    run = await _one_run(base_url, server, store, calls)
                    measured.setdefault(f"{store_name}, {server_name}", []).append(run)
    return measured


def run(config: Config) -> BenchResult:
    calls = 9 if config.quick else 36
    rounds = config.pick_rounds(full=2, quick=1)
    result = BenchResult(
        NAME,
        TITLE,
        params={"processes": PROCESSES, "limit": f"{REQUESTS}/{PERIOD:g}s", "calls": calls},
    )
    if find_nginx() is None:
        result.notes.append("nginx is not installed: the no-burst rows are missing")
    with contextlib.ExitStack() as stack:
        stores = {"host store (default)": "host"}
        missing = redis_missing()
        if missing is None:
            stores["Redis"] = stack.enter_context(redis_server())
        else:
            result.notes.append(f"Redis rows missing: {missing}")
        measured = asyncio.run(_measure(stores, calls, rounds))
    limit = REQUESTS / PERIOD
    for case, runs in measured.items():
        rate_rows(result, case, runs, limit=limit, period=PERIOD)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployments")
    parser.add_argument("--child", nargs=6, metavar="ARG")
    args = parser.parse_args()
    if args.child is None:
        parser.error("run the benchmark with `python -m benchmarks deployments`")
    store, base_url, token, first, calls, start_at = args.child
    report = asyncio.run(_child(store, base_url, token, int(first), int(calls), float(start_at)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
