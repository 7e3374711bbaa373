"""1. Per-call overhead: the SDK against the same request hand-built with aiohttp and httpx.

The emulator runs in its own process on loopback with no rate limit, so the client's limiter is
off too (``rate_limit=None``). In each round every contender runs right next to a batch of raw
aiohttp, the two in alternating order (SDK then raw, raw then SDK, ...), and the contenders in a
rotating order; each batch makes the same number of calls at the same concurrency, after a
garbage collection, and every concurrent worker talks for its own customer, so the SDK's
per-conversation ordering never serialises them. A contender's ratios are paired with the raw
batch next to it (the same seconds of a shared, noisy machine), then the median over rounds is
taken: the ratios are the headline, the absolute figures context.

"SDK, https-URL settings" is the SDK as it runs against ``https://app.autocalls.ai``: for a
non-loopback host it honours proxy settings from the environment (aiohttp's ``trust_env``),
which it skips for a loopback base URL. The emulator only speaks http on loopback, so that row
switches the setting on explicitly.

``client CPU/call`` is ``time.process_time()`` of this process divided by the calls: the server
runs elsewhere, so this is what the client itself costs, undiluted by the server's time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from autocalls_async import AsyncAutocalls

from ._common import (
    ASSISTANT_ID,
    TOKEN,
    VARIABLES,
    BenchResult,
    Config,
    emulator_process,
    median_ratio,
    percentile,
)

NAME = "overhead"
TITLE = "Per-call overhead (emulator on loopback, limiter off)"

LABELS = ("raw aiohttp", "SDK", "raw httpx", "SDK, https-URL settings")

HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Accept": "application/json",
    "User-Agent": "bench-raw/1.0",
}


class Client:
    """One contender: ``call(customer, message)`` sends one request and reads the reply."""

    label = ""

    async def call(self, customer: str, message: str) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class SdkClient(Client):
    label = "SDK"

    def __init__(self, base_url: str) -> None:
        self.client = AsyncAutocalls(TOKEN, base_url=base_url, rate_limit=None)

    async def call(self, customer: str, message: str) -> None:
        reply = await self.client.generate_reply(
            assistant_id=ASSISTANT_ID,
            customer_identifier=customer,
            message=message,
            variables=VARIABLES,
        )
        assert reply.reply

    async def aclose(self) -> None:
        await self.client.close()


class SdkHttpsClient(SdkClient):
    """The SDK as configured for a remote ``https://`` base URL, still on loopback here.

    For a non-loopback host the SDK honours proxy settings from the environment
    (``trust_env``), which aiohttp resolves in a worker thread on every request; for a loopback
    base URL it does not. This row shows what a production URL costs per call.
    """

    label = "SDK, https-URL settings"

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        transport = self.client._transport
        if not hasattr(transport, "_trust_env"):
            raise RuntimeError("the SDK's transport no longer has _trust_env: update this row")
        transport._trust_env = True


def _check(status: int, data: Any) -> None:
    # A competent hand-written client still checks what it got.
    if status != 200 or not isinstance(data, dict) or not data.get("success"):
        raise RuntimeError(f"unexpected answer {status}: {data!r}")


class AiohttpClient(Client):
    """What a careful user writes by hand: one shared session, JSON in, JSON out, checked."""

    label = "raw aiohttp"

    def __init__(self, base_url: str) -> None:
        self.url = base_url + "/ai/generate-reply"
        self.session = aiohttp.ClientSession(headers=HEADERS)

    async def call(self, customer: str, message: str) -> None:
        payload = {
            "assistant_id": ASSISTANT_ID,
            "customer_identifier": customer,
            "message": message,
            "variables": VARIABLES,
        }
        async with self.session.post(self.url, json=payload) as response:
            data = await response.json()
            _check(response.status, data)

    async def aclose(self) -> None:
        await self.session.close()


class HttpxClient(Client):
    """The same, with httpx: what users of httpx-based SDKs would recognise."""

    label = "raw httpx"

    def __init__(self, base_url: str) -> None:
        self.url = base_url + "/ai/generate-reply"
        self.client = httpx.AsyncClient(headers=HEADERS, timeout=60.0)

    async def call(self, customer: str, message: str) -> None:
        payload = {
            "assistant_id": ASSISTANT_ID,
            "customer_identifier": customer,
            "message": message,
            "variables": VARIABLES,
        }
        response = await self.client.post(
            self.url,
            content=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        _check(response.status_code, response.json())

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class Sample:
    """One client's run of ``calls`` calls at one concurrency."""

    throughput: float  # calls per second
    p50: float  # seconds
    p99: float
    cpu_per_call: float  # seconds of this process's CPU


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def values(self, name: str) -> list[float]:
        return [float(getattr(sample, name)) for sample in self.samples]


async def run_batch(client: Client, calls: int, concurrency: int) -> Sample:
    """``calls`` calls spread over ``concurrency`` workers, each for its own customer."""
    latencies: list[float] = []
    per_worker = max(1, calls // concurrency)
    clock = time.perf_counter

    async def worker(index: int) -> None:
        customer = f"+1415555{index:04d}"
        for _ in range(per_worker):
            started = clock()
            await client.call(customer, "Hello there")
            latencies.append(clock() - started)

    cpu_started, started = time.process_time(), clock()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed, cpu = clock() - started, time.process_time() - cpu_started
    return Sample(
        throughput=len(latencies) / elapsed,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        cpu_per_call=cpu / len(latencies),
    )


async def _batch(client: Client, calls: int, concurrency: int) -> Sample:
    gc.collect()  # no collection of the previous batch's garbage is billed to this one
    return await run_batch(client, calls, concurrency)


#: The raw aiohttp batches run next to each contender: ``PAIRED + label``.
PAIRED = "raw aiohttp next to "


async def _measure(
    base_url: str, concurrencies: tuple[int, ...], calls: dict[int, int], rounds: int
) -> dict[int, dict[str, Series]]:
    """Each contender's samples, and under ``PAIRED + label`` the raw aiohttp batch run next
    to each of them; ``raw aiohttp`` is the one next to the SDK."""
    factories: list[Callable[[str], Client]] = [SdkClient, HttpxClient, SdkHttpsClient]
    raw = AiohttpClient(base_url)
    contenders = [factory(base_url) for factory in factories]
    labels = [client.label for client in contenders]
    results = {
        c: {label: Series() for label in [raw.label, *labels, *(PAIRED + x for x in labels)]}
        for c in concurrencies
    }
    try:
        for concurrency in concurrencies:
            n = calls[concurrency]
            for client in [raw, *contenders]:  # warm up: connections, caches, first imports
                await run_batch(client, max(20, 2 * concurrency), concurrency)
            series = results[concurrency]
            for round_ in range(rounds):
                shift = round_ % len(contenders)
                for client in contenders[shift:] + contenders[:shift]:
                    if round_ % 2 == 0:
                        sample = await _batch(client, n, concurrency)
                        paired = await _batch(raw, n, concurrency)
                    else:
                        paired = await _batch(raw, n, concurrency)
                        sample = await _batch(client, n, concurrency)
                    series[client.label].samples.append(sample)
                    series[PAIRED + client.label].samples.append(paired)
            series[raw.label].samples.extend(series[PAIRED + SdkClient.label].samples)
    finally:
        for client in [raw, *contenders]:
            await client.aclose()
    return results


def run(config: Config) -> BenchResult:
    # Many short rounds rather than a few long ones: on a shared machine a pair of batches
    # half a second apart sees the same load more often than one of seconds.
    rounds = config.pick_rounds(full=21, quick=2)
    concurrencies = (1, 20)
    calls = {1: 20, 20: 60} if config.quick else {1: 150, 20: 400}
    result = BenchResult(
        NAME,
        TITLE,
        params={"rounds": rounds, "concurrency": list(concurrencies), "calls_per_round": calls},
    )
    with emulator_process("none") as base_url:
        measured = asyncio.run(_measure(base_url, concurrencies, calls, rounds))
    for concurrency in concurrencies:
        series = measured[concurrency]
        where = f"c={concurrency}"
        for label in LABELS:
            s = series[label]
            case = f"{label}, {where}"
            result.summary(case, "throughput", s.values("throughput"), unit="calls/s", digits=0)
            result.summary(case, "p50 latency", [v * 1e3 for v in s.values("p50")], unit="ms")
            result.summary(case, "p99 latency", [v * 1e3 for v in s.values("p99")], unit="ms")
            result.summary(
                case,
                "client CPU/call",
                [v * 1e6 for v in s.values("cpu_per_call")],
                unit="µs",
                digits=0,
            )
        for label in LABELS[1:]:
            s, raw = series[label], series[PAIRED + label]
            case = f"{label} ÷ raw aiohttp, {where}"
            sdk = label == "SDK" and concurrency == 20
            throughput = median_ratio(s.values("throughput"), raw.values("throughput"))
            row = result.summary(case, "throughput ratio", throughput, unit="×")
            if sdk:
                row.expect("≥ 0.90×", lambda v: v >= 0.90)
            p50 = median_ratio(s.values("p50"), raw.values("p50"))
            row = result.summary(case, "p50 latency ratio", p50, unit="×")
            if sdk:
                row.expect("≤ 1.10×", lambda v: v <= 1.10)
            p99 = median_ratio(s.values("p99"), raw.values("p99"))
            result.summary(case, "p99 latency ratio", p99, unit="×")
            cpu = median_ratio(s.values("cpu_per_call"), raw.values("cpu_per_call"))
            row = result.summary(case, "client CPU/call ratio", cpu, unit="×")
            if sdk:
                row.expect("≤ 1.15×", lambda v: v <= 1.15)
    result.notes.append(
        "ratios: each contender's batch paired with a raw aiohttp batch run right before or "
        "after it in the same round (alternating), then the median over rounds"
    )
    result.notes.append(
        "SDK, https-URL settings: the SDK configured as for https://app.autocalls.ai (proxy "
        "settings read from the environment, which aiohttp does in a worker thread on every "
        "request), against the same loopback emulator"
    )
    return result
