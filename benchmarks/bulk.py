"""4. Bulk: ``BulkRunner`` over 10,000 and 100,000 rows at a high limit.

Each size runs in a fresh child process (``python -m benchmarks.bulk --child ...``) against an
emulator in another process, so the child's peak RSS (``ru_maxrss``) is the runner's alone:
not the server's records, not an earlier benchmark's garbage. "Flat" means the peak does not
grow with the number of rows: the runner pulls a row only when one of its tasks is free.

Every row is a new customer (a campaign), the case that could grow: the client remembers each
conversation in its LRU cache. Two clients: one with the defaults (``conversation_cache_size``
100,000, so the cache grows with the rows up to that bound) and one configured as the
``autocalls-async bulk`` command configures it (a cache of 1,024 conversations).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from ._common import ROOT, TOKEN, BenchResult, Config, emulator_process, peak_rss_bytes, rss_bytes

NAME = "bulk"
TITLE = "Bulk runner (high limit, emulator in another process)"
MIB = 1024 * 1024
LIMIT = "100000/1"  # far above what one event loop can send: the runner is the bottleneck


def available() -> str | None:
    """None when the bulk runner can be imported, else why not."""
    if importlib.util.find_spec("autocalls_async.bulk") is None:
        return "autocalls_async.bulk is not there"
    try:
        importlib.import_module("autocalls_async.bulk")
    except Exception as exc:
        return f"autocalls_async.bulk does not import: {type(exc).__name__}: {exc}"
    return None


async def _child(base_url: str, rows: int, cache: int) -> dict[str, Any]:
    from autocalls_async import AsyncAutocalls, RateLimit
    from autocalls_async.bulk import BulkRunner, generated_requests

    limit = RateLimit.parse(LIMIT)
    client = (
        AsyncAutocalls(TOKEN, base_url=base_url, rate_limit=limit, conversation_cache_size=cache)
        if cache
        else AsyncAutocalls(TOKEN, base_url=base_url, rate_limit=limit)  # every default kept
    )
    async with client:
        await client.generate_reply(  # connect and warm up before the baseline
            assistant_id=123, customer_identifier="+10000000000", message="Warm up"
        )
        gc.collect()
        baseline = rss_bytes()
        ok = failed = 0
        started = time.perf_counter()
        async with BulkRunner(client, generated_requests(rows, customers=rows)) as run:
            async for result in run:
                if result.ok:
                    ok += 1
                else:
                    failed += 1
        elapsed = time.perf_counter() - started
    return {
        "rows": rows,
        "ok": ok,
        "failed": failed,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
    }


def _run_child(base_url: str, rows: int, cache: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bulk", "--child", base_url, str(rows)]
    command.append(str(cache))
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bulk child failed ({done.returncode}): {done.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def run(config: Config) -> BenchResult:
    sizes = (500, 5_000) if config.quick else (10_000, 100_000)
    rounds = config.pick_rounds(full=1, quick=1)
    # conversation_cache_size per client; 0: the default
    shapes = {"default client": 0, "cache of 1,024 (as the bulk command)": 1_024}
    result = BenchResult(
        NAME,
        TITLE,
        params={"sizes": list(sizes), "client_rate_limit": LIMIT, "rounds": rounds},
    )
    missing = available()
    if missing is not None:
        result.available = False
        result.notes.append(f"not available: {missing}")
        return result
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for shape, cache in shapes.items():
            for size in sizes:
                # A fresh emulator per run: its records of earlier runs would slow it down.
                with emulator_process("none") as base_url:
                    data = _run_child(base_url, size, cache)
                measured.setdefault((shape, size), []).append(data)
    for shape in shapes:
        for size in sizes:
            runs = measured[(shape, size)]
            case = f"{size:,} rows, {shape}"
            result.summary(
                case, "rows per second", [r["rows_per_s"] for r in runs], digits=0, unit="rows/s"
            )
            result.summary(
                case, "peak RSS", [r["peak_rss"] / MIB for r in runs], unit="MiB", digits=1
            )
            result.summary(
                case,
                "peak RSS above start",
                [(r["peak_rss"] - r["baseline_rss"]) / MIB for r in runs],
                unit="MiB",
                digits=1,
            )
            failed = sum(r["failed"] for r in runs)
            if failed:
                result.notes.append(f"{case}: {failed} rows failed")
        small, large = (
            statistics.median(r["peak_rss"] for r in measured[(shape, s)]) for s in sizes
        )
        result.add(
            f"{sizes[1]:,} ÷ {sizes[0]:,} rows, {shape}",
            "peak RSS ratio",
            large / small,
            unit="×",
        ).expect("≤ 1.10× (flat)", lambda v: v <= 1.10)
    result.notes.append(
        "default client: the growth is the client's LRU of conversations "
        "(conversation_cache_size=100,000 by default, about 0.45 KiB each), bounded by its "
        "size; with a cache of 1,024 the runner's memory does not grow with the rows"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk")
    parser.add_argument("--child", nargs=3, metavar=("BASE_URL", "ROWS", "CACHE_SIZE"))
    args = parser.parse_args()
    if args.child is None:
        parser.error("run the benchmark with `python -m benchmarks bulk`")
    base_url, rows, cache = args.child
    print(json.dumps(asyncio.run(_child(base_url, int(rows), int(cache)))))


if __name__ == "__main__":
    main()
