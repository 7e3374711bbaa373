"""11. What a client costs to make: ``AsyncAutocalls(token)`` entered, and a new token's
client from ``AutocallsAccounts.client(token)``.

Each round makes ``COUNT`` clients, every one with its own token shaped as the service issues
them, and keeps them (as a platform keeps its tokens' clients): the time per client is the
round's wall time divided by ``COUNT`` (the fastest round: the others were interrupted by
the machine), the memory per client what ``tracemalloc`` counts in one more round. No request
is sent: a client makes its connection pool's session at its first request.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from autocalls_async import AsyncAutocalls, AutocallsAccounts

from ._common import BenchResult, Config

NAME = "clients"
TITLE = "what a client costs to make (time and memory)"
BASE_URL = "http://127.0.0.1:9/api"  # never called
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _tokens(count: int) -> list[str]:
    return [f"{i}|{''.join(secrets.choice(ALNUM) for _ in range(40))}" for i in range(count)]


async def _plain(tokens: list[str]) -> list[Any]:
    clients = []
    for token in tokens:
        client = AsyncAutocalls(token, base_url=BASE_URL)
        await client.__aenter__()
        clients.append(client)
    return clients


async def _closing(clients: list[Any]) -> None:
    for client in clients:
        await client.close()


async def _measure(count: int, rounds: int) -> dict[str, tuple[float, float]]:
    found: dict[str, tuple[float, float]] = {}
    async with AutocallsAccounts(base_url=BASE_URL) as accounts:
        makers: dict[str, Callable[[list[str]], Any]] = {
            "AsyncAutocalls(token), entered": _plain,
            "AutocallsAccounts.client(new token)": lambda tokens: [
                accounts.client(token) for token in tokens
            ],
        }
        for case, make in makers.items():
            best = float("inf")
            for _ in range(rounds):
                tokens = _tokens(count)
                gc.collect()
                started = time.perf_counter()
                made = make(tokens)
                if asyncio.iscoroutine(made):
                    made = await made
                best = min(best, (time.perf_counter() - started) / count)
                if case.startswith("AsyncAutocalls"):
                    await _closing(made)
                del made
            tokens = _tokens(count)
            gc.collect()
            tracemalloc.start()
            before, _ = tracemalloc.get_traced_memory()
            made = make(tokens)
            if asyncio.iscoroutine(made):
                made = await made
            after, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            if case.startswith("AsyncAutocalls"):
                await _closing(made)
            found[case] = (best, (after - before) / count)
    return found


def run(config: Config) -> BenchResult:
    rounds = config.pick_rounds(full=7, quick=2)
    count = 200 if config.quick else 2_000
    result = BenchResult(NAME, TITLE, params={"clients_per_round": count, "rounds": rounds})
    for case, (seconds, size) in asyncio.run(_measure(count, rounds)).items():
        result.add(case, "time per client", seconds * 1e6, unit="µs", digits=1).expect(
            "≤ 50 µs", lambda v: v <= 50
        )
        result.add(case, "memory per client", size / 1024, unit="KiB", digits=2).expect(
            "≤ 4 KB", lambda v: v * 1024 <= 4000
        )
    return result
