"""One saturating worker process for ``test_redis_network``: ``python redis_network_child.py
REDIS_URL BASE_URL PREFIX INDEX SECONDS``. Prints ``ready`` once set up, then reads the
wall-clock ``START_AT`` from stdin; from then for ``SECONDS``, three tasks call the emulator back
to back through a ``RedisRateLimiter`` at 10 per second; then prints one JSON line: calls
answered, errors by type."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter

from autocalls_async import AsyncAutocalls, RateLimit, RedisRateLimiter

RATE = RateLimit(10, 1.0)


async def main(redis_url: str, base_url: str, prefix: str, index: int, seconds: float) -> None:
    answered = 0
    errors: Counter[str] = Counter()
    async with (
        RedisRateLimiter(redis_url, rate_limit=RATE, prefix=prefix, timeout=2.0) as limiter,
        AsyncAutocalls(
            "tok-network", base_url=base_url, limiter=limiter, rate_limit=RATE
        ) as client,
    ):
        print("ready", flush=True)
        start_at = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = start_at + seconds

        async def worker(task: int) -> None:
            nonlocal answered
            call = 0
            while time.time() < end:
                call += 1
                try:
                    await client.generate_reply(
                        assistant_id=123, customer_identifier=f"p{index}-{task}-{call}", message="x"
                    )
                    answered += 1
                except Exception as exc:  # counted, reported: the test judges
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(worker(n)) for n in range(3)]
        await asyncio.sleep(max(0.0, end - time.time()))
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        counts = getattr(limiter.redis_store, "counts", {})
    report = {"index": index, "answered": answered, "errors": dict(errors), "redis": counts}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    url, base, prefix, index, seconds = sys.argv[1:6]
    asyncio.run(main(url, base, prefix, int(index), float(seconds)))
