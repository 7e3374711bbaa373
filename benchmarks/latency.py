"""Latency of live replies: how long a call waits for its slot (issue 20).

One token per run at a scaled limit (5 per 2 s; ``--quick``: 5 per 1 s), calls made at Poisson
arrivals at 20 %, 40 % and 60 % of the limit, and in bursts (3 calls at once, at 40 % of the
limit on average). Three clients, each on its own token:

* the SDK with its default, the exact rolling window (``RateLimit(5, P)``);
* the SDK evenly spaced (``RateLimit(5, P, burst=1)``, the previous default);
* aiohttp behind ``AsyncLimiter(5, P)`` (aiolimiter's leaky bucket), no retry.

Each against the emulator in each server shape: a strict rolling window, Laravel's fixed
window (how the service's throttle counts), and nginx's ``limit_req`` without burst. Every run
of one load sees the same arrivals (one seed); the runs of one load go at once, one load after
another: about two and a half minutes of wall time (``--quick``: 20 s). The SDK retries a 429
(its default budget, 2) and waits the ``Retry-After`` (1 s); AsyncLimiter's client does not
retry, and a 429 is a failed call.

Measured per call: the wait from the call being made to its accepted request reaching the server
(p50, p95, p99 over the calls that were answered); the 429s the server sent; and the most
requests that started in any window of the period (the limit is 5). The SDK uses a 10 % margin
(as the no-burst tests do): at a period scaled 30 to 60 times down, the default 2 % leaves the
no-burst server 4 ms between our write and its clock, less than a loaded machine's jitter; at the
real period it leaves 120 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

from autocalls_async import AsyncAutocalls, RateLimit, RateLimitError
from autocalls_async.testing import MockAutocalls

from ._common import ASSISTANT_ID, BenchResult, Config, percentile

NAME = "latency"
TITLE = "Live replies (5 per P, one token): wait for a slot, per client and server shape"
REQUESTS = 5
MARGIN = 0.1
LOADS = {"20%": 0.2, "40%": 0.4, "60%": 0.6, "bursts of 3 (40%)": 0.4}
CLIENTS = {
    "window": "SDK, RateLimit(5, P) (default: the rolling window)",
    "burst=1": "SDK, RateLimit(5, P, burst=1) (evenly spaced)",
    "AsyncLimiter": "aiohttp + AsyncLimiter(5, P), no retry",
}
SHAPES = ("rolling", "fixed", "no-burst")


def arrivals(load: str, calls: int, period: float, seed: int) -> list[float]:
    """When each call is made (seconds from the start): Poisson at ``LOADS[load]`` of the limit,
    or bursts of 3 at the same average rate."""
    rng = random.Random(f"{seed}-{load}")
    rate = LOADS[load] * REQUESTS / period  # calls per second
    group = 3 if load.startswith("bursts") else 1
    times: list[float] = []
    now = 0.0
    while len(times) < calls:
        now += rng.expovariate(rate / group)
        times.extend([now] * min(group, calls - len(times)))
    return times


async def _sdk(
    base_url: str, token: str, limit: RateLimit, made: list[float], out: dict[str, Any]
) -> None:
    async with AsyncAutocalls(token, base_url=base_url, rate_limit=limit) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def one(index: int, at: float) -> None:
            await asyncio.sleep(max(0.0, began + at - loop.time()))
            out[f"c{index}"] = time.monotonic()
            with contextlib.suppress(RateLimitError):  # retries ran out: the server counts it
                await client.generate_reply(
                    assistant_id=ASSISTANT_ID, customer_identifier=f"c{index}", message="hi"
                )

        await asyncio.gather(*(one(index, at) for index, at in enumerate(made)))


async def _aiolimiter(
    base_url: str, token: str, period: float, made: list[float], out: dict[str, Any]
) -> None:
    limiter = AsyncLimiter(REQUESTS, period)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    url = base_url + "/ai/generate-reply"
    async with aiohttp.ClientSession(headers=headers) as session:
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def one(index: int, at: float) -> None:
            await asyncio.sleep(max(0.0, began + at - loop.time()))
            out[f"c{index}"] = time.monotonic()
            body = {"assistant_id": ASSISTANT_ID, "customer_identifier": f"c{index}"}
            async with (
                limiter,
                session.post(url, json=body | {"message": "hi"}) as response,
            ):
                await response.read()

        await asyncio.gather(*(one(index, at) for index, at in enumerate(made)))


def _most_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = start = 0
    for end, now in enumerate(times):
        while times[start] <= now - period:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _runs(period: float, calls: int, seed: int) -> dict[str, Any]:
    """One load at a time (its nine runs at once, each on its own token): the emulators share
    this process's event loop, which dates each request as it handles it."""
    cases: dict[str, Any] = {}
    for load in LOADS:
        schedule = arrivals(load, calls, period, seed)
        async with contextlib.AsyncExitStack() as stack:
            servers = {
                shape: await stack.enter_async_context(
                    MockAutocalls(rate_limit=(REQUESTS, period), window=shape)
                )
                for shape in SHAPES
            }
            made: dict[tuple[str, str, str], dict[str, Any]] = {}
            jobs = []
            for shape, server in servers.items():
                for client in CLIENTS:
                    label = f"{client}-{shape}-{load}".replace(" ", "_").replace("%", "pc")
                    token = f"latency-{label}-{time.time_ns()}".replace("=", "")
                    out = made[(load, client, shape)] = {"token": token}
                    if client == "AsyncLimiter":
                        jobs.append(_aiolimiter(server.base_url, token, period, schedule, out))
                    else:
                        burst = 1 if client == "burst=1" else None
                        limit = RateLimit(REQUESTS, period, margin=MARGIN, burst=burst)
                        jobs.append(_sdk(server.base_url, token, limit, schedule, out))
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            cases.update(_measure(servers, made, period))
    return cases


def _measure(
    servers: dict[str, MockAutocalls],
    made: dict[tuple[str, str, str], dict[str, Any]],
    period: float,
) -> dict[str, Any]:
    from autocalls_async.testing import token_hash

    cases: dict[str, Any] = {}
    for (load, client, shape), out in made.items():
        key = token_hash(out.pop("token"))
        mine = [record for record in servers[shape].requests if record.token_hash == key]
        accepted = {
            record.body["customer_identifier"]: record.time
            for record in mine
            if record.status == 200 and isinstance(record.body, dict)
        }
        waits = sorted(
            max(0.0, accepted[name] - at) for name, at in out.items() if name in accepted
        )
        cases[f"{load}|{client}|{shape}"] = {
            "load": load,
            "client": client,
            "shape": shape,
            "calls": len(out),
            "answered": len(accepted),
            "waits": [round(wait, 4) for wait in waits],
            "p50": percentile(waits, 50) if waits else None,
            "p95": percentile(waits, 95) if waits else None,
            "p99": percentile(waits, 99) if waits else None,
            "429s": sum(record.status == 429 for record in mine),
            "most_in_window": _most_in_window([record.time for record in mine], period),
        }
    return cases


def latency_data(quick: bool, seed: int = 7) -> dict[str, Any]:
    """Every run at once; the numbers behind the table and the docs' figure."""
    period = 1.0 if quick else 2.0
    calls = 6 if quick else 30
    cases = asyncio.run(_runs(period, calls, seed))
    return {"period": period, "calls": calls, "margin": MARGIN, "cases": cases}


def run(config: Config) -> BenchResult:
    data = latency_data(config.quick)
    period = data["period"]
    result = BenchResult(NAME, TITLE.replace("P", f"{period:g} s"))
    result.params = {
        "requests": REQUESTS,
        "period": period,
        "calls per run": data["calls"],
        "margin": MARGIN,
        "clients": CLIENTS,
        "shapes": SHAPES,
        "loads": list(LOADS),
    }
    for case in data["cases"].values():
        name = f"{case['load']}, {case['client']} vs {case['shape']}"
        for metric in ("p50", "p95", "p99"):
            value = case[metric]
            result.add(name, f"wait {metric}", value, "s", digits=2)
        result.add(name, "429s", case["429s"], digits=0)
        result.add(name, "most starts in a period", case["most_in_window"], digits=0).expect(
            f"≤ {REQUESTS}", lambda v: v <= REQUESTS
        )
    result.notes.append(
        "wait: from the call being made to its accepted request reaching the server; the SDK "
        "retries a 429 (2 retries), AsyncLimiter's client does not (a 429 is a failed call)"
    )
    return result


# -- the figure on the limiter page -------------------------------------------------------------

COLORS = {"window": "tab:blue", "burst=1": "tab:orange", "AsyncLimiter": "tab:purple"}


def draw(data: dict[str, Any], path: Path) -> None:
    """The wait distribution: for each load, the fraction of calls that waited at most x
    seconds, per client, against Laravel's fixed window (how the service's throttle counts)."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    loads = list(LOADS)
    fig, axes = plt.subplots(1, len(loads), figsize=(11.0, 3.4), sharey=True)
    period = data["period"]
    for ax, load in zip(axes, loads, strict=True):
        for client, color in COLORS.items():
            case = data["cases"][f"{load}|{client}|fixed"]
            waits = sorted(case["waits"])
            if not waits:
                continue
            xs = [0.0, *waits]
            ys = [0.0, *((n + 1) / case["calls"] for n in range(len(waits)))]
            label = f"{client} ({case['429s']} × 429)"
            ax.step(xs, ys, where="post", color=color, label=label)
        ax.set_title(f"{load} of the limit", fontsize=10)
        ax.set_xlabel(f"wait for a slot (s; period {period:g} s)")
        ax.set_xlim(0, period * 1.2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("calls answered within")
    fig.suptitle(
        f"One token, {REQUESTS} per {period:g} s, Poisson arrivals, Laravel's fixed window "
        f"(python -m benchmarks.latency --figure)",
        fontsize=10,
    )
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency")
    parser.add_argument("--figure", type=Path, default=Path("docs/img/wait-latency.png"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    data = latency_data(args.quick)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    draw(data, args.figure)
    summary = {
        key: {k: case[k] for k in ("p50", "p95", "p99", "429s", "most_in_window", "answered")}
        for key, case in data["cases"].items()
    }
    args.figure.with_suffix(".json").write_text(
        json.dumps({"period": data["period"], "calls": data["calls"], "cases": summary}, indent=1)
        + "\n"
    )
    print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
