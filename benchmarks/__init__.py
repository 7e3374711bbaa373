"""Benchmarks for autocalls-async: ``make bench`` (``python -m benchmarks``).

Each benchmark is a module with ``run(config) -> BenchResult``; ``python -m benchmarks`` runs
them (all, or those named), prints one table and writes ``bench-results/results.json``.
Every comparison runs side by side in one run, interleaved over several rounds; the table gives
medians and min-max spreads, and the ratios are the headline because the machine is noisy.
The docs' figures come from ``python -m benchmarks.plots`` (``make plots``, also run by
``make bench``).
"""

from __future__ import annotations

import importlib
import time

from ._common import BenchResult, Config, Row

__all__ = ["BENCHMARKS", "BenchResult", "Config", "Row", "run_benchmark"]

#: name -> (module, what it answers); in the order they run and print.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "overhead": ("benchmarks.overhead", "per-call cost against raw aiohttp and httpx"),
    "rate": ("benchmarks.rate", "full rate without 429s against a strict server"),
    "waiting": ("benchmarks.waiting", "100,000 calls waiting on one token"),
    "bulk": ("benchmarks.bulk", "the bulk runner over 10,000 and 100,000 rows"),
    "distributed": ("benchmarks.distributed", "N processes sharing RedisRateLimiter"),
    "deployments": (
        "benchmarks.deployments",
        "3 processes: host store and Redis, strict and no-burst",
    ),
    "lanes": ("benchmarks.lanes", "a web app and a bulk job on one token, lanes on and off"),
    "hoststore": ("benchmarks.hoststore", "the host store: SQLite against hardened files"),
    "redaction": ("benchmarks.redaction", "what masking the token costs per response"),
    "latency": (
        "benchmarks.latency",
        "live replies: the wait for a slot, window against even spacing and AsyncLimiter",
    ),
    "tenants": ("benchmarks.tenants", "1,000 and 10,000 tokens in one process, ulimit -n 1024"),
    "clients": ("benchmarks.clients", "what making a client costs, in time and memory"),
}


def run_benchmark(name: str, config: Config) -> BenchResult:
    """Run one benchmark by name; the result records how long it took."""
    module = importlib.import_module(BENCHMARKS[name][0])
    started = time.perf_counter()
    result: BenchResult = module.run(config)
    result.seconds = time.perf_counter() - started
    return result
