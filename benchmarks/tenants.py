"""10. A platform: thousands of API tokens in one process, at ``ulimit -n 1024``.

A CRM or a helpdesk calls the service for each of its accounts with that account's token.
Each row runs in a child process whose descriptor limit is 1024 (``resource.setrlimit``, as
``ulimit -n 1024``), against the emulator in another process with a strict rolling window per
token (scaled: ``REQUESTS`` per ``PERIOD`` instead of 5 per minute). Every token has one
customer and sends it ``CALLS`` messages one after the other, through
``AutocallsAccounts(...).client(token)``, all tokens at once; ``CALLS`` is more than the
window holds, so each token's last message waits for its window to move.

Raw aiohttp makes the same calls in its own child, against the same emulator: the same
tokens, one session, each token's calls in turn, paced by hand as a careful client would
(no more than ``REQUESTS`` calls per token in any ``PERIOD`` plus the SDK's 2 % margin, counted
from each answer's arrival): what the machine
does without the SDK. Measured in each child, the emulator and Redis being other processes:

* aggregate calls per second, and that ÷ raw aiohttp's in the same run;
* the grant wait per call (what ``ClientStats.limiter_wait`` grew by): p50 and p99; the
  window makes the last call of each token wait up to ``PERIOD``;
* peak descriptors (``/proc/self/fd``, sampled every 20 ms), RSS growth per token, CPU time
  per call (``time.process_time()``);
* 429s received per token (target 0), calls that failed (target 0), WARNING lines logged.

Rows for 1,000 and 10,000 tokens, on the host store (the default) and on Redis
(``AUTOCALLS_REDIS_URL``); ``--quick`` runs 200 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from ._common import (
    ASSISTANT_ID,
    ROOT,
    BenchResult,
    Config,
    emulator_process,
    percentile,
    rss_bytes,
)
from .distributed import available as redis_unavailable
from .distributed import redis_server

NAME = "tenants"
TITLE = "thousands of tokens in one process, ulimit -n 1024"
REQUESTS, PERIOD, CALLS = 2, 1.0, 3
DESCRIPTORS = 1024
FULL, QUICK = (1_000, 10_000), (200,)
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def tokens(count: int) -> list[str]:
    """Tokens shaped as the service issues them (``<id>|<40 characters>``), new each run:
    the host store keeps a token's schedule between runs."""
    return [
        f"{index}|{''.join(secrets.choice(ALNUM) for _ in range(40))}" for index in range(count)
    ]


def _descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return 0


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _sample(peaks: dict[str, int]) -> None:
    while True:
        peaks["fds"] = max(peaks["fds"], _descriptors())
        peaks["rss"] = max(peaks["rss"], rss_bytes())
        await asyncio.sleep(0.02)


async def _raw(
    base_url: str, names: Sequence[str], calls: int, requests: int, period: float
) -> dict[str, Any]:
    """The same calls by hand: one session, each token's calls in turn, each token paced as a
    careful hand-written client would pace it (no more than ``REQUESTS`` starts in any
    ``PERIOD``, plus the SDK's 2 % margin), no retries."""
    import aiohttp

    url = base_url + "/ai/generate-reply"
    failed: list[str] = []
    waits: list[float] = []
    rate_limited = 0
    common = {"Accept": "application/json", "User-Agent": "bench-raw/1.0"}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(headers=common) as session:

        async def tenant(index: int, token: str) -> None:
            nonlocal rate_limited
            headers = {"Authorization": f"Bearer {token}"}
            starts: list[float] = []
            for call in range(calls):
                asked = loop.time()
                if len(starts) >= requests:
                    await asyncio.sleep(starts[-requests] + period * 1.02 - loop.time())
                waits.append(loop.time() - asked)
                payload = {
                    "assistant_id": ASSISTANT_ID,
                    "customer_identifier": f"+1{index:010d}",
                    "message": f"message {call}",
                }
                try:
                    async with session.post(url, json=payload, headers=headers) as response:
                        # It arrived before its answer did: counting from the answer never
                        # starts the next one early (a send delayed by a busy pool would).
                        starts.append(loop.time())
                        data = await response.json()
                        if response.status == 429:
                            rate_limited += 1
                        if response.status != 200 or not data.get("success"):
                            failed.append(str(response.status))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failed.append(type(exc).__name__)

        await asyncio.gather(*(tenant(i, token) for i, token in enumerate(names)))
    return {
        "failed": len(failed),
        "errors": sorted(set(failed)),
        "waits": waits,
        "rate_limited": rate_limited,
    }


async def _sdk(
    base_url: str,
    names: Sequence[str],
    calls: int,
    requests: int,
    period: float,
    margin: float = 0.02,
) -> dict[str, Any]:
    from autocalls_async import AutocallsAccounts, AutocallsError, RateLimit

    waits: list[float] = []
    failed: list[str] = []
    async with AutocallsAccounts(
        base_url=base_url, rate_limit=RateLimit(requests, period, margin=margin)
    ) as accounts:

        async def tenant(index: int, token: str) -> None:
            for call in range(calls):
                client = accounts.client(token)
                waited = client.stats.limiter_wait
                try:
                    await client.generate_reply(
                        assistant_id=ASSISTANT_ID,
                        customer_identifier=f"+1{index:010d}",
                        message=f"message {call}",
                    )
                except AutocallsError as exc:
                    failed.append(type(exc).__name__)
                waits.append(client.stats.limiter_wait - waited)

        await asyncio.gather(*(tenant(i, token) for i, token in enumerate(names)))
        stats = accounts.stats
    return {
        "failed": len(failed),
        "errors": sorted(set(failed)),
        "waits": waits,
        "rate_limited": stats.rate_limited,
    }


async def _child(
    kind: str,
    base_url: str,
    count: int,
    calls: int,
    requests: int,
    period: float,
    margin: float = 0.02,
) -> dict[str, Any]:
    warnings = _Warnings()
    logging.getLogger("autocalls_async").addHandler(warnings)
    names = tokens(count)
    gc.collect()
    peaks = {"fds": _descriptors(), "rss": rss_bytes()}
    fds_before, rss_before = peaks["fds"], peaks["rss"]
    sampler = asyncio.create_task(_sample(peaks))
    cpu, started = time.process_time(), time.perf_counter()
    if kind == "raw":
        outcome = await _raw(base_url, names, calls, requests, period)
    else:
        outcome = await _sdk(base_url, names, calls, requests, period, margin)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    sampler.cancel()
    waits = outcome.pop("waits")
    total = count * calls
    return {
        **outcome,
        "tokens": count,
        "calls": total,
        "seconds": elapsed,
        "calls_per_s": total / elapsed,
        "cpu_per_call_us": cpu / total * 1e6,
        "wait_p50_ms": percentile(waits, 50) * 1e3 if waits else None,
        "wait_p99_ms": percentile(waits, 99) * 1e3 if waits else None,
        "fds_before": fds_before,
        "fds_peak": peaks["fds"],
        "rss_per_token_kib": (peaks["rss"] - rss_before) / count / 1024,
        "warnings": len(warnings.lines),
        "first_warnings": warnings.lines[:3],
    }


def run_child(
    kind: str,
    base_url: str,
    count: int,
    calls: int,
    *,
    redis_url: str | None = None,
    requests: int = REQUESTS,
    period: float = PERIOD,
    margin: float = 0.02,
) -> dict[str, Any]:
    """One measurement in a child process at ``ulimit -n 1024``, with a host store of its own
    (or Redis), each token limited to ``requests`` per ``period`` as the emulator at
    ``base_url`` is (the SDK with ``margin``); its result."""
    with tempfile.TemporaryDirectory(prefix="autocalls-tenants-") as directory:
        env = {**os.environ, "AUTOCALLS_LIMITER_DIR": directory}
        env.pop("AUTOCALLS_REDIS_URL", None)
        if redis_url is not None:
            env["AUTOCALLS_REDIS_URL"] = redis_url
        command = [sys.executable, "-m", "benchmarks.tenants", kind, base_url, str(count)]
        done = subprocess.run(
            [*command, str(calls), f"{requests}/{period:g}", "--margin", str(margin)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"tenants child {kind} failed ({done.returncode}): {done.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(config: Config) -> BenchResult:
    sizes = QUICK if config.quick else FULL
    why_not_redis = redis_unavailable()
    stores = ("host store", "Redis") if why_not_redis is None else ("host store",)
    result = BenchResult(
        NAME,
        TITLE,
        params={
            "tokens": list(sizes),
            "calls_per_token": CALLS,
            "rate_limit": f"{REQUESTS}/{PERIOD:g}s per token, strict rolling window",
            "ulimit_n": DESCRIPTORS,
        },
    )
    if why_not_redis is not None:
        result.notes.append(f"Redis rows not run: {why_not_redis}")
    measured: dict[str, dict[str, Any]] = {}
    with (
        emulator_process(f"{REQUESTS}/{PERIOD:g}", "rolling") as limited,
        redis_server() if why_not_redis is None else contextlib.nullcontext() as redis_url,
    ):
        for count in sizes:
            raw = run_child("raw", limited, count, CALLS)
            measured[f"raw aiohttp, {count:,}"] = raw
            for store in stores:
                url = redis_url if store == "Redis" else None
                sdk = run_child("sdk", limited, count, CALLS, redis_url=url)
                measured[f"{store}, {count:,}"] = sdk
                _rows(result, f"{count:,} tokens, {store}", sdk, raw)
    result.params["measured"] = measured
    return result


def _rows(result: BenchResult, case: str, sdk: dict[str, Any], raw: dict[str, Any]) -> None:
    result.add(case, "aggregate calls/s", sdk["calls_per_s"], unit="calls/s", digits=0)
    result.add(case, "÷ raw aiohttp, same calls", sdk["calls_per_s"] / raw["calls_per_s"], unit="×")
    result.add(case, "grant wait p50", sdk["wait_p50_ms"], unit="ms", digits=1)
    result.add(case, "grant wait p99", sdk["wait_p99_ms"], unit="ms", digits=0)
    result.add(case, "peak descriptors", float(sdk["fds_peak"]), digits=0).expect(
        f"< {DESCRIPTORS}", lambda v: v < DESCRIPTORS
    )
    result.add(case, "RSS per token", sdk["rss_per_token_kib"], unit="KiB", digits=1)
    result.add(case, "CPU per call", sdk["cpu_per_call_us"], unit="µs", digits=0)
    result.add(
        case,
        "CPU per call ÷ raw aiohttp",
        sdk["cpu_per_call_us"] / raw["cpu_per_call_us"],
        unit="×",
    )
    result.add(case, "429s per token", sdk["rate_limited"] / sdk["tokens"], digits=3).expect(
        "0", lambda v: v == 0
    )
    result.add(case, "failed calls", float(sdk["failed"]), digits=0).expect("0", lambda v: v == 0)
    result.add(case, "WARNING lines", float(sdk["warnings"]), digits=0).expect(
        "0", lambda v: v == 0
    )
    if sdk["errors"] or sdk["first_warnings"]:
        result.notes.append(f"{case}: errors {sdk['errors']}, warnings {sdk['first_warnings']}")
    if raw["rate_limited"] or raw["failed"]:
        result.notes.append(
            f"{case}: raw aiohttp got {raw['rate_limited']} × 429 and {raw['failed']} failed calls"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenants")
    parser.add_argument("kind", choices=("sdk", "raw"))
    parser.add_argument("base_url")
    parser.add_argument("tokens", type=int)
    parser.add_argument("calls", type=int)
    parser.add_argument("rate", help="REQUESTS/PERIOD per token, e.g. 2/1")
    parser.add_argument("--margin", type=float, default=0.02, help="the SDK's RateLimit margin")
    args = parser.parse_args(argv)
    requests, period = args.rate.split("/")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = DESCRIPTORS if hard == resource.RLIM_INFINITY else min(DESCRIPTORS, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    child = _child(
        args.kind,
        args.base_url,
        args.tokens,
        args.calls,
        int(requests),
        float(period),
        args.margin,
    )
    print(json.dumps(asyncio.run(child)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
