"""2. Rate discipline: 50 gathered calls against a strict rolling-window server (5 per second).

Four clients, each with the same retry budget as the SDK's default (2 retries on 429, waiting
the ``Retry-After``), each on its own token so they cannot disturb one another's window:

* **SDK**: ``AsyncAutocalls(rate_limit=RateLimit(5, 1))``;
* **naive AsyncLimiter(5, 1)**: what most people write from the docs' "5 per minute" (scaled):
  a burst of five, then one per interval, i.e. up to nine starts in a rolling period (plus
  the retries of those the server refused);
* **no limiter, retry on 429**: fire everything, let the server push back;
* **AsyncLimiter(1, 0.2)**: the right pacing, but without the SDK's FIFO gate, late-send
  correction, margin and shared 429 pause.

Arrival times come from the emulator's own records (the server runs in this process, on the
same monotonic clock). ``makespan ÷ ideal``: the ideal is the strict window's lower bound, the
first five at once and five more every period. ``sustained rate``: (successes - 1) divided by
the time between the first and the last success, against the limit; ``max in a window``: the
most arrivals (429s included) the server saw in any rolling period.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass

import aiohttp
from aiolimiter import AsyncLimiter

from autocalls_async import AsyncAutocalls, RateLimit
from autocalls_async.testing import MockAutocalls, token_hash

from ._common import ASSISTANT_ID, BenchResult, Config

NAME = "rate"
TITLE = "Rate discipline (strict rolling window)"
MAX_RETRIES = 2  # the SDK's default, given to every contender


@dataclass
class Outcome:
    makespan: float
    rate_429: int
    failures: int
    sustained: float  # (successes - 1) / time from the first success to the last
    max_in_window: int


async def _sdk(base_url: str, token: str, limit: RateLimit, calls: int) -> tuple[int, int]:
    async with AsyncAutocalls(token, base_url=base_url, rate_limit=limit) as client:
        results = await asyncio.gather(
            *(_sdk_call(client, index) for index in range(calls)), return_exceptions=True
        )
        return client.stats.rate_limited, sum(isinstance(r, BaseException) for r in results)


async def _sdk_call(client: AsyncAutocalls, index: int) -> None:
    await client.generate_reply(
        assistant_id=ASSISTANT_ID, customer_identifier=f"+1{index:010d}", message="Hi"
    )


async def _hand_written(
    base_url: str, token: str, calls: int, limiter: AsyncLimiter | None
) -> tuple[int, int]:
    """A typical hand-written client: limiter, POST, on 429 sleep Retry-After and try again."""
    url = base_url + "/ai/generate-reply"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    counts = {"429": 0}

    async def call(index: int) -> None:
        payload = {
            "assistant_id": ASSISTANT_ID,
            "customer_identifier": f"+1{index:010d}",
            "message": "Hi",
        }
        for _attempt in range(MAX_RETRIES + 1):
            if limiter is not None:
                await limiter.acquire()
            async with session.post(url, json=payload) as response:
                await response.read()
                if response.status != 429:
                    response.raise_for_status()
                    return
                counts["429"] += 1
                retry_after = float(response.headers.get("Retry-After", "1"))
            await asyncio.sleep(retry_after)
        raise RuntimeError("still 429 after retries")

    async with aiohttp.ClientSession(headers=headers) as session:
        results = await asyncio.gather(*(call(i) for i in range(calls)), return_exceptions=True)
    return counts["429"], sum(isinstance(r, BaseException) for r in results)


def _max_in_window(times: list[float], period: float) -> int:
    """The most arrivals in any half-open window ``(t - period, t]``."""
    best, start = 0, 0
    for end, now in enumerate(times):
        while times[start] <= now - period:
            start += 1
        best = max(best, end - start + 1)
    return best


def ideal_makespan(calls: int, requests: int, period: float) -> float:
    """The strict window's lower bound: ``requests`` at once, then ``requests`` per period."""
    return (math.ceil(calls / requests) - 1) * period


async def _one(
    server: MockAutocalls, variant: str, token: str, calls: int, requests: int, period: float
) -> Outcome:
    base_url = server.base_url
    started = time.monotonic()
    if variant == "sdk":
        got_429, failures = await _sdk(base_url, token, RateLimit(requests, period), calls)
    else:
        limiter = {
            "naive": AsyncLimiter(requests, period),
            "retry": None,
            "paced": AsyncLimiter(1, period / requests),
        }[variant]
        got_429, failures = await _hand_written(base_url, token, calls, limiter)
    makespan = time.monotonic() - started
    key = token_hash(token)
    mine = [record for record in server.requests if record.token_hash == key]
    arrivals = sorted(record.time for record in mine)
    ok = sorted(record.time for record in mine if record.status == 200)
    sustained = (len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 and ok[-1] > ok[0] else math.nan
    return Outcome(makespan, got_429, failures, sustained, _max_in_window(arrivals, period))


VARIANTS = ("sdk", "naive", "retry", "paced")


def label(variant: str, requests: int, period: float) -> str:
    return {
        "sdk": f"SDK, RateLimit({requests}, {period:g})",
        "naive": f"naive AsyncLimiter({requests}, {period:g})",
        "retry": "no limiter, retry on 429",
        "paced": f"AsyncLimiter(1, {period / requests:g})",
    }[variant]


async def _measure(
    calls: int, requests: int, period: float, rounds: int
) -> dict[str, list[Outcome]]:
    outcomes: dict[str, list[Outcome]] = {variant: [] for variant in VARIANTS}
    async with MockAutocalls(rate_limit=(requests, period), window="rolling") as server:
        for round_ in range(rounds):
            shift = round_ % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                token = f"rate-{round_}-{VARIANTS.index(variant)}-{time.monotonic_ns()}"
                outcome = await _one(server, variant, token, calls, requests, period)
                outcomes[variant].append(outcome)
                # Let the window empty, so no contender starts next to another's tail.
                await asyncio.sleep(min(period, 0.2))
    return outcomes


def run(config: Config) -> BenchResult:
    requests, period = (5, 0.5) if config.quick else (5, 1.0)
    calls = 10 if config.quick else 50
    rounds = config.pick_rounds(full=3, quick=1)
    ideal = ideal_makespan(calls, requests, period)
    result = BenchResult(
        NAME,
        TITLE,
        params={
            "server": f"{requests} per {period:g}s, strict rolling window",
            "calls": calls,
            "rounds": rounds,
            "ideal_makespan_s": ideal,
            "max_retries": MAX_RETRIES,
        },
    )
    outcomes = asyncio.run(_measure(calls, requests, period, rounds))
    limit = requests / period
    for key in VARIANTS:
        series = outcomes[key]
        sdk = key == "sdk"
        variant = label(key, requests, period)
        result.summary(variant, "makespan", [o.makespan for o in series], unit="s")
        result.summary(variant, "makespan ÷ ideal", [o.makespan / ideal for o in series], unit="×")
        row = result.summary(
            variant,
            "sustained rate ÷ limit",
            [o.sustained / limit for o in series],
            unit="×",
            digits=3,
        )
        if sdk:
            row.expect("≥ 0.97×", lambda v: v >= 0.97)
        row = result.summary(variant, "429s received", [o.rate_429 for o in series], digits=0)
        if sdk:
            row.expect("0", lambda v: v == 0)
        failures = statistics.median(o.failures for o in series)
        result.summary(variant, "failed calls", [o.failures for o in series], digits=0)
        if failures:
            result.notes.append(
                f"{variant}: {failures:g} of {calls} calls failed after {MAX_RETRIES} retries, "
                "so its makespan and rate describe only the calls that got through"
            )
        result.summary(
            variant,
            f"max arrivals in {period:g}s",
            [o.max_in_window for o in series],
            digits=0,
        )
    result.notes.append(
        f"ideal makespan {ideal:g}s: {requests} at once, then {requests} every {period:g}s; "
        "the SDK's leaky bucket of capacity 1 gives up that first burst (about "
        f"{(requests - 1) * period / requests:.1f}s once) for zero 429s"
    )
    return result
