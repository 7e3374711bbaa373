"""Run the emulator in its own process for a benchmark: prints its base URL, serves until killed.

``python -m benchmarks._serve --rate-limit none`` (or ``5/1``) ``--window rolling|fixed``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Literal

from autocalls_async import RateLimit
from autocalls_async.testing import MockAutocalls, run_server


def _ready(server: MockAutocalls) -> None:
    print(server.base_url, flush=True)


async def _serve(rate_limit: tuple[int, float] | None, window: Literal["rolling", "fixed"]) -> None:
    task = asyncio.create_task(
        run_server("127.0.0.1", 0, ready=_ready, rate_limit=rate_limit, window=window)
    )
    # SIGTERM from the benchmark ends the server cleanly instead of killing it mid-write.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._serve")
    parser.add_argument("--rate-limit", default="none")
    parser.add_argument("--window", default="rolling", choices=("rolling", "fixed"))
    args = parser.parse_args()
    limit = None
    if args.rate_limit != "none":
        parsed = RateLimit.parse(args.rate_limit)
        limit = (parsed.requests, parsed.period)
    asyncio.run(_serve(limit, "fixed" if args.window == "fixed" else "rolling"))


if __name__ == "__main__":
    main()
