"""3. Waiting at scale: 100,000 gathered calls queued on one token.

A real ``AsyncAutocalls`` with its default limiter on ``RateLimit(5, 60)``: the first call is
served, every other one waits for a slot (each for its own customer, as in a bulk job, so they
wait in the limiter rather than behind one conversation). Measured:

* memory per waiting call, all-in (the caller's task and coroutine included): the RSS growth
  divided by the calls, and, in a second pass under ``tracemalloc``, the bytes Python allocated
  per call with the allocation sites that dominate (in the notes);
* CPU per second of wall time while they wait (``time.process_time()``);
* the time to cancel them all (``gather(...).cancel()`` until it has finished), and for both
  queueing and cancelling, the part spent in CPython's cyclic garbage collector;
* that the next call is not held back by them: it reaches the server (whose records share
  the event loop's clock) as soon as its slot opens, one interval after the first call.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import linecache
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

from autocalls_async import AsyncAutocalls, RateLimit
from autocalls_async.testing import MockAutocalls

from ._common import ASSISTANT_ID, TOKEN, BenchResult, Config, rss_bytes

NAME = "waiting"
TITLE = "Waiting at scale (one token, default limiter)"


@dataclass
class Waiting:
    calls: int
    enqueue_s: float  # until every call is waiting
    rss_per_call: float  # bytes
    cpu_share: float  # CPU seconds per wall second while waiting
    cancel_s: float
    next_late_s: float  # how long after its slot opened the next call arrived
    enqueue_gc_s: float  # of enqueue_s, in the cyclic garbage collector
    cancel_gc_s: float


def _customer(index: int) -> str:
    return f"+1{index:010d}"


async def _queue(client: AsyncAutocalls, calls: int, *, served: int) -> asyncio.Future[list[Any]]:
    """Start ``calls`` gathered calls; return once ``served`` replies came and the rest wait
    (or were served too: on a loaded machine queueing them can take longer than a slot)."""
    before = client.stats.replies
    gathered = asyncio.gather(
        *(
            client.generate_reply(
                assistant_id=ASSISTANT_ID, customer_identifier=_customer(index), message="Hi"
            )
            for index in range(calls)
        ),
        return_exceptions=True,
    )
    # The client has no "all queued" event to wait on: its counters are polled instead.
    while (replied := client.stats.replies - before) < served or (
        client.stats.waiting + replied < calls
    ):
        if gathered.done():  # something went wrong: surface it
            raise RuntimeError(f"the calls finished early: {gathered.result()[:3]!r}")
        await asyncio.sleep(0.02)
    return gathered


async def _cancel(gathered: asyncio.Future[list[Any]]) -> float:
    started = time.perf_counter()
    gathered.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gathered
    return time.perf_counter() - started


class GcTimer:
    """Seconds spent in CPython's cyclic garbage collector, from ``gc.callbacks``.

    With 100,000 live tasks every full collection walks them all: this tells how much of the
    queueing and cancelling time is the interpreter's rather than the SDK's.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self)


async def _measure(calls: int, rate_limit: RateLimit, idle_s: float) -> Waiting:
    async with (
        MockAutocalls(rate_limit=None) as server,
        AsyncAutocalls(TOKEN, base_url=server.base_url, rate_limit=rate_limit) as client,
    ):
        gc.collect()
        rss_before, started = rss_bytes(), time.perf_counter()
        with GcTimer() as enqueue_gc:
            gathered = await _queue(client, calls, served=1)
        enqueue_s = time.perf_counter() - started
        gc.collect()
        rss_per_call = (rss_bytes() - rss_before) / (calls - 1)

        cpu_started, wall_started = time.process_time(), time.perf_counter()
        await asyncio.sleep(idle_s)
        cpu_share = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)

        with GcTimer() as cancel_gc:
            cancel_s = await _cancel(gathered)
        if client.stats.waiting:
            raise RuntimeError(f"{client.stats.waiting} calls still waiting after cancel")

        # The slot the cancelled calls were waiting for opens one interval after the first
        # call reached the server: the next call must take it, on time, not after them.
        await client.generate_reply(
            assistant_id=ASSISTANT_ID, customer_identifier="+19999999999", message="Next"
        )
        first, following = server.requests[0].time, server.requests[-1].time
        next_late_s = max(0.0, following - (first + rate_limit.interval))
        if server.replies_served < 2:
            raise RuntimeError(f"expected 2 replies, the server served {server.replies_served}")
    return Waiting(
        calls,
        enqueue_s,
        rss_per_call,
        cpu_share,
        cancel_s,
        next_late_s,
        enqueue_gc.seconds,
        cancel_gc.seconds,
    )


async def _traced(calls: int, rate_limit: RateLimit) -> tuple[float, tuple[str, ...]]:
    """Bytes allocated per waiting call, and where they go (a second, traced pass)."""
    async with (
        MockAutocalls(rate_limit=None) as server,
        AsyncAutocalls(TOKEN, base_url=server.base_url, rate_limit=rate_limit) as client,
    ):
        await client.generate_reply(  # import, connect and warm up outside the trace
            assistant_id=ASSISTANT_ID, customer_identifier="+19999999999", message="Warm"
        )
        gc.collect()
        tracemalloc.start(8)
        try:
            before = tracemalloc.take_snapshot()
            gathered = await _queue(client, calls, served=1)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        await _cancel(gathered)
    stats = after.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in stats)
    sites = []
    for stat in sorted(stats, key=lambda s: -s.size_diff)[:6]:
        frame = stat.traceback[0]
        where = f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
        code = linecache.getline(frame.filename, frame.lineno).strip()[:60]
        sites.append(f"{stat.size_diff / calls:,.0f} B/call at {where} `{code}`")
    return total / calls, tuple(sites)


def run(config: Config) -> BenchResult:
    calls = 2_000 if config.quick else 100_000
    traced_calls = 1_000 if config.quick else 20_000
    # One slot every 12 s at full size: nobody but the first call is served while measuring.
    rate_limit = RateLimit(5, 5.0) if config.quick else RateLimit(5, 60.0)
    idle_s = 0.3 if config.quick else 3.0
    result = BenchResult(
        NAME,
        TITLE,
        params={
            "calls": calls,
            "rate_limit": str(rate_limit),
            "idle_seconds": idle_s,
            "traced_calls": traced_calls,
        },
    )
    measured = asyncio.run(_measure(calls, rate_limit, idle_s))
    traced, sites = asyncio.run(_traced(traced_calls, rate_limit))
    case = f"{calls:,} waiting calls"
    result.add(case, "time to queue them all", measured.enqueue_s, unit="s")
    result.add(case, "  of which garbage collection", measured.enqueue_gc_s, unit="s")
    result.add(
        case, "queueing cost per call", measured.enqueue_s / calls * 1e6, unit="µs", digits=0
    )
    result.add(case, "memory per waiting call (RSS)", measured.rss_per_call / 1024, unit="KiB")
    result.add(
        f"{traced_calls:,} waiting calls",
        "memory per waiting call (tracemalloc)",
        traced / 1024,
        unit="KiB",
    ).expect("≤ 4 KiB", lambda v: v <= 4.0)
    result.add(case, "CPU while waiting", measured.cpu_share * 100, unit="%", digits=2).expect(
        "< 5% of a core", lambda v: v < 5.0
    )
    result.add(case, "time to cancel them all", measured.cancel_s, unit="s")
    result.add(case, "  of which garbage collection", measured.cancel_gc_s, unit="s")
    result.add(
        "next call after the cancel",
        "arrival after its slot opened",
        measured.next_late_s * 1e3,
        unit="ms",
    )
    result.notes.append("largest allocation sites per waiting call: " + "; ".join(sites))
    return result
