"""5. Distributed: N = 1, 2, 4 processes sharing one token through ``RedisRateLimiter``.

A real ``redis-server`` (started here, on a free loopback port, in a temp dir, no persistence),
the emulator in this process as a strict rolling-window server (its records give every arrival
on one clock), and N child processes (``python -m benchmarks.distributed --child ...``), each
with its own ``AsyncAutocalls(limiter=RedisRateLimiter(...))``, splitting the same number of
calls. The children wait for a common start time so that they really compete. Measured from the
server's side: the combined rate of successes against the limit, 429s, and the most arrivals
in any rolling period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from autocalls_async.testing import MockAutocalls, token_hash

from ._common import ROOT, BenchResult, Config, burst_report, rate_rows
from .rate import _max_in_window

NAME = "distributed"
TITLE = "Distributed limit (N processes, one token, RedisRateLimiter)"
PROCESSES = (1, 2, 4)


def available() -> str | None:
    """None when a Redis benchmark can run, else why not."""
    try:
        importlib.import_module("autocalls_async._redis")
    except Exception as exc:
        return f"autocalls_async._redis does not import: {type(exc).__name__}: {exc}"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server``; yields its URL."""
    binary = shutil.which("redis-server")
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="autocalls-bench-redis-") as directory:
        port = _free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while not _ping(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _child(
    redis_url: str,
    base_url: str,
    token: str,
    first: int,
    calls: int,
    start_at: float,
    requests: int,
    period: float,
) -> dict[str, Any]:
    from autocalls_async import AsyncAutocalls, RateLimit
    from autocalls_async._redis import RedisRateLimiter

    limit = RateLimit(requests, period)
    async with (
        RedisRateLimiter(redis_url, rate_limit=limit) as limiter,
        AsyncAutocalls(token, base_url=base_url, limiter=limiter) as client,
    ):
        return await burst_report(client, first, calls, start_at)


async def _one_run(
    server: MockAutocalls,
    redis_url: str,
    processes: int,
    calls: int,
    requests: int,
    period: float,
    tag: str,
) -> dict[str, Any]:
    token = f"bench-distributed-{tag}-{time.monotonic_ns()}"
    start_at = time.time() + 1.0 + 0.25 * processes  # every child imported and connected
    shares = [calls // processes + (i < calls % processes) for i in range(processes)]
    children = []
    first = 0
    for share in shares:
        command = [
            sys.executable,
            "-m",
            "benchmarks.distributed",
            "--child",
            redis_url,
            server.base_url,
            token,
            str(first),
            str(share),
            repr(start_at),
            str(requests),
            repr(period),
        ]
        first += share
        children.append(
            await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
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
    arrivals = sorted(record.time for record in mine)
    ok = sorted(record.time for record in mine if record.status == 200)
    sustained = (len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 and ok[-1] > ok[0] else math.nan
    return {
        "sustained": sustained,
        "rate_429": sum(1 for record in mine if record.status == 429),
        "failed": sum(report["failed"] for report in reports),
        "errors": sorted({e for report in reports for e in report["errors"]}),
        "max_in_window": _max_in_window(arrivals, period),
    }


async def _measure(
    redis_url: str, calls: int, requests: int, period: float, rounds: int
) -> dict[int, list[dict[str, Any]]]:
    measured: dict[int, list[dict[str, Any]]] = {n: [] for n in PROCESSES}
    async with MockAutocalls(rate_limit=(requests, period), window="rolling") as server:
        for round_ in range(rounds):
            shift = round_ % len(PROCESSES)
            for processes in PROCESSES[shift:] + PROCESSES[:shift]:
                run = await _one_run(
                    server, redis_url, processes, calls, requests, period, f"{round_}-{processes}"
                )
                measured[processes].append(run)
    return measured


def run(config: Config) -> BenchResult:
    requests, period = (10, 1.0)
    calls = 12 if config.quick else 50
    rounds = config.pick_rounds(full=2, quick=1)
    result = BenchResult(
        NAME,
        TITLE,
        params={
            "processes": list(PROCESSES),
            "server": f"{requests} per {period:g}s, strict rolling window",
            "calls_per_run": calls,
            "rounds": rounds,
        },
    )
    missing = available()
    if missing is not None:
        result.available = False
        result.notes.append(f"not available: {missing}")
        return result
    with redis_server() as redis_url:
        measured = asyncio.run(_measure(redis_url, calls, requests, period, rounds))
    limit = requests / period
    for processes in PROCESSES:
        runs = measured[processes]
        case = f"{processes} process{'es' if processes > 1 else ''}"
        rate_rows(result, case, runs, limit=limit, period=period, failed_row=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed")
    parser.add_argument("--child", nargs=8, metavar="ARG")
    args = parser.parse_args()
    if args.child is None:
        parser.error("run the benchmark with `python -m benchmarks distributed`")
    redis_url, base_url, token, first, calls, start_at, requests, period = args.child
    report = asyncio.run(
        _child(
            redis_url,
            base_url,
            token,
            int(first),
            int(calls),
            float(start_at),
            int(requests),
            float(period),
        )
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
