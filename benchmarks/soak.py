"""Fault soak: many calls against the emulator injecting 429s, 503s, 500s, dropped connections
and slow replies at random. Checks, call by call, that:

* every call ended in exactly one reply or one typed error, the one its last attempt deserved;
* the requests the server saw for each call match the retry policy exactly: attempts go on
  only after a failure the server cannot have processed (429, 503), at most max_retries + 1;
* no message was processed twice;
* memory stays flat (measured between the middle and the end of the run).

``python -m benchmarks.soak [--calls 20000] [--seed 7]``; tests run it small.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import tracemalloc
from collections import defaultdict
from typing import Any

import attrs

from autocalls_async import (
    APIConnectionError,
    APITimeoutError,
    AsyncAutocalls,
    AutocallsError,
    InternalServerError,
    RateLimit,
    RateLimitError,
    RetryPolicy,
)
from autocalls_async.testing import Fault, MockAutocalls, RequestRecord

FAST_429 = Fault.body(
    429, b'{"message":"Too Many Attempts."}', "application/json", headers={"Retry-After": "0.001"}
)
FAST_503 = Fault.status(503, headers={"Retry-After": "0.001"})
CRASH_500 = Fault.status(500, processed=True)
DROP_BEFORE = Fault.drop(processed=False)
DROP_AFTER = Fault.drop(processed=True)
TIMEOUT = 0.15
SLOW = Fault.slow(2 * TIMEOUT)  # longer than the client's timeout


def rates(slow: Fault = SLOW) -> dict[Fault, float]:
    """Each fault and how often it is drawn; ``slow`` outlasts the client's timeout."""
    return {
        FAST_429: 0.06,
        FAST_503: 0.06,
        CRASH_500: 0.03,
        DROP_BEFORE: 0.02,
        DROP_AFTER: 0.02,
        slow: 0.01,
    }


RATES = rates()
SAFE = {FAST_429, FAST_503}
ANSWERED = "answered"
POLICY = RetryPolicy(max_retries=2, backoff_base=0.001, backoff_max=0.002)


@attrs.define
class SoakReport:
    calls: int
    requests: int
    replies: int
    errors: dict[str, int]
    faults: dict[str, int]
    violations: list[str]
    seconds: float
    memory_growth_kib: float | None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _expected_error(record: RequestRecord) -> type[BaseException]:
    fault = record.fault
    if fault == FAST_429:
        return RateLimitError
    if fault in (FAST_503, CRASH_500):
        return InternalServerError
    if fault is not None and fault.kind == "slow":
        return APITimeoutError
    return APIConnectionError  # a dropped connection


def _name(fault: Fault | None) -> str:
    if fault is None:
        return "none"
    return f"{fault.kind}{'' if fault.code is None else fault.code}" + (
        "+processed" if fault.processed else ""
    )


def check(results: dict[str, object], records: list[RequestRecord]) -> list[str]:
    """Every violation of the contract, call by call (empty when all is well).

    ``results`` maps each message to ANSWERED or to the class of the error its call raised.
    """
    by_message: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        if isinstance(record.body, dict):
            by_message[record.body["message"]].append(record)
    violations: list[str] = []
    for message, result in results.items():
        seen = sorted(by_message.get(message, []), key=lambda r: r.time)
        if not seen:
            violations.append(f"{message}: never reached the server")
            continue
        if len(seen) > POLICY.max_retries + 1:
            violations.append(f"{message}: {len(seen)} requests")
        for record in seen[:-1]:
            if record.fault not in SAFE:
                violations.append(f"{message}: retried after {_name(record.fault)}")
        if sum(record.processed for record in seen) > 1:
            violations.append(f"{message}: processed twice")
        last = seen[-1]
        if last.fault is None:
            if result is not ANSWERED:
                violations.append(f"{message}: answered, but the call raised {result}")
            continue
        if last.fault in SAFE and len(seen) != POLICY.max_retries + 1:
            violations.append(f"{message}: gave up after {len(seen)} safe failures")
        expected = _expected_error(last)
        if result is not expected:
            violations.append(
                f"{message}: last attempt got {_name(last.fault)}, call ended with {result}"
            )
    return violations


def _sdk_memory() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(True, "*/autocalls_async/_*.py"),
            tracemalloc.Filter(False, "*/autocalls_async/testing/*"),
        ]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


async def run_soak(
    calls: int = 20_000,
    *,
    seed: int = 7,
    measure_memory: bool = True,
    client_timeout: float = TIMEOUT,
) -> SoakReport:
    """``client_timeout`` is the client's; the slow fault lasts twice as long. A clean reply
    must come within it, so a test on a loaded machine passes a longer one than this."""
    async with MockAutocalls(rate_limit=None, seed=seed) as server:
        server.set_random_faults(rates(Fault.slow(2 * client_timeout)), seed=seed)
        async with AsyncAutocalls(
            "soak-token",
            base_url=server.base_url,
            rate_limit=RateLimit(100_000, 1.0),
            timeout=client_timeout,
            retry_policy=POLICY,
        ) as client:
            results: dict[str, object] = {}
            window = asyncio.Semaphore(200)
            growth: float | None = None
            middle: int | None = None

            async def one(index: int) -> None:
                message = f"soak-{index}"
                async with window:
                    try:
                        await client.generate_reply(
                            assistant_id=123,
                            customer_identifier=f"customer-{index % 500}",
                            message=message,
                        )
                        results[message] = ANSWERED  # not the Reply: memory must stay flat
                    except AutocallsError as exc:
                        results[message] = type(exc)

            began = time.perf_counter()
            if measure_memory:
                tracemalloc.start()
            half = calls // 2
            await asyncio.gather(*(one(i) for i in range(half)))
            if measure_memory:
                gc.collect()
                middle = _sdk_memory()
            await asyncio.gather(*(one(i) for i in range(half, calls)))
            if measure_memory and middle is not None:
                gc.collect()
                # Only memory allocated by the SDK's own modules: the results dict and the
                # emulator's records grow with the calls by design.
                end = _sdk_memory()
                tracemalloc.stop()
                growth = (end - middle) / 1024
            seconds = time.perf_counter() - began
            requests = client.stats.requests
        records = list(server.requests)
    errors: dict[str, int] = defaultdict(int)
    for result in results.values():
        if result is not ANSWERED:
            errors[getattr(result, "__name__", "?")] += 1
    faults: dict[str, int] = defaultdict(int)
    for record in records:
        faults[_name(record.fault)] += 1
    return SoakReport(
        calls=calls,
        requests=requests,
        replies=sum(r is ANSWERED for r in results.values()),
        errors=dict(errors),
        faults=dict(faults),
        violations=check(results, records),
        seconds=round(seconds, 2),
        memory_growth_kib=None if growth is None else round(growth, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    report = asyncio.run(run_soak(args.calls, seed=args.seed))
    print(json.dumps(report.as_dict(), indent=2))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
