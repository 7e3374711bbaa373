"""The docs' figures, drawn from real runs: ``python -m benchmarks.plots [--quick] [--out DIR]``.

``make plots`` runs this alone, ``make bench`` after the benchmarks. Into ``DIR`` (``docs/img``):

1. ``arrivals.png``: the same burst of calls from three clients, each on its own token, through a
   real nginx ``limit_req`` without ``burst`` (``benchmarks/_nginx.py``) in front of the
   emulator: the SDK with its default limiter, and rate.py's hand-written aiohttp client behind
   ``AsyncLimiter(5, period)`` and with no limiter. Every client has the SDK's default retry
   budget (2 retries on 429; nginx sends no ``Retry-After``, so rate.py's hand-written client
   waits its default 1 s). The times and statuses are nginx's own, from its access log.
2. ``bulk-rate.png``: ``BulkRunner`` with its defaults against the emulator enforcing the same
   limit as a strict rolling window: rows done, and arrivals per rolling period, over the run.
3. ``waiters-memory.png``: memory against the number of calls waiting for a slot, 0 to 100,000,
   as ``waiting.py`` queues them (one token, ``RateLimit(5, 60)``, each its own customer), in a
   child process that grows: its RSS, and in a second child the bytes ``tracemalloc`` counts.
4. ``tenants.png``: ``tenants.py``'s run, 1,000 and 10,000 tokens in one process at
   ``ulimit -n 1024`` (200 with ``--quick``): calls per second and CPU per call of the SDK on
   the host store and on Redis, beside raw aiohttp making the same calls.

``--only NAME ...`` redraws those figures alone and keeps the others' numbers in
``figures.json``.

``figures.json`` beside them holds the numbers behind each figure (every arrival, every point)
and a summary, which is also printed, so that the figures and the text can agree.
The limits are scaled so that a run takes seconds: each title says the scale.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime
import gc
import json
import platform
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiolimiter import AsyncLimiter

from autocalls_async import AsyncAutocalls, RateLimit, __version__
from autocalls_async.testing import MockAutocalls

from ._common import ASSISTANT_ID, ROOT, rss_bytes
from ._nginx import NginxLimiter, find_nginx
from .rate import MAX_RETRIES, _hand_written, _max_in_window, _sdk

__all__ = ["DEFAULT_OUT", "FILES", "main", "make_figures"]

DEFAULT_OUT = Path("docs/img")
FILES = {
    "arrivals": "arrivals.png",
    "bulk": "bulk-rate.png",
    "waiters": "waiters-memory.png",
    "tenants": "tenants.png",
}
SUMMARY = "figures.json"
DPI = 100
WIDTH = 9.0  # inches: 900 px at DPI, the width of a README
CLIENTS = ("sdk", "asynclimiter", "none")
COLORS = {"sdk": "tab:blue", "asynclimiter": "tab:orange", "none": "tab:purple"}
ACCEPTED, REJECTED = "tab:green", "tab:red"
MIB = 1024 * 1024


def _scale_text(requests: int, period: float) -> str:
    """How the scaled limit relates to the API's 5 per minute."""
    return f"the API's {requests} per minute run {60 / period:g}× faster"


def _token(name: str) -> str:
    """A token of its own per run: the default limiter shares a token's slots between the
    processes of this host, so a run on ``TOKEN`` would wait for an earlier run's slot."""
    return f"plots-{name}-{time.time_ns()}"


# -- 1. arrivals at a strict server --------------------------------------------------------------


def nginx_rate(requests: int, period: float) -> str:
    """``requests`` per ``period`` in nginx's spelling (per minute, a whole number)."""
    per_minute = requests * 60 / period
    if per_minute != int(per_minute):
        raise ValueError(f"{requests} per {period:g}s is not a whole number per minute for nginx")
    return f"{int(per_minute)}r/m"


def client_label(key: str, requests: int, period: float, margin: float = 0.02) -> str:
    # Behind nginx the SDK is told the server refuses bursts (burst=1): its default, the
    # rolling window the service counts, would send a burst nginx answers with 429s once,
    # before the limiter learns the server's shape.
    tail = ", burst=1" if margin == 0.02 else f", margin={margin:g}, burst=1"
    return {
        "sdk": f"SDK, RateLimit({requests}, {period:g}{tail})",
        "asynclimiter": f"aiohttp + AsyncLimiter({requests}, {period:g})",
        "none": "aiohttp, no limiter",
    }[key]


async def _arrivals_run(
    binary: str, requests: int, period: float, calls: int, margin: float = 0.02
) -> dict[str, Any]:
    clients: dict[str, Any] = {}
    async with MockAutocalls(rate_limit=None) as server:
        proxy = NginxLimiter(
            binary, upstream_port=server.port, rate=nginx_rate(requests, period), access_log=True
        ).start()
        try:
            for key in CLIENTS:
                seen = len(proxy.arrivals())
                token = _token(key)
                if key == "sdk":
                    limit = RateLimit(requests, period, margin=margin, burst=1)
                    _, failed = await _sdk(proxy.base_url, token, limit, calls)
                else:
                    limiter = AsyncLimiter(requests, period) if key == "asynclimiter" else None
                    _, failed = await _hand_written(proxy.base_url, token, calls, limiter)
                # nginx logs a request after answering it: give the last lines time to land.
                # (Each client has its own token, so its own bucket at nginx.)
                await asyncio.sleep(0.3)
                logged = sorted(proxy.arrivals()[seen:])
                accepted = sum(status == 200 for _, status in logged)
                if accepted != calls - failed:
                    raise RuntimeError(
                        f"{key}: nginx let {accepted} through but {calls - failed} calls succeeded"
                    )
                first = logged[0][0]
                times = [round(at - first, 4) for at, _ in logged]
                clients[key] = {
                    "label": client_label(key, requests, period, margin),
                    "calls": calls,
                    "requests": len(logged),
                    "accepted": accepted,
                    "rejected": sum(status == 429 for _, status in logged),
                    "failed_calls": failed,
                    "max_in_window": _max_in_window(times, period),
                    "last_accepted_s": max(
                        t for t, (_, s) in zip(times, logged, strict=True) if s == 200
                    ),
                    "arrivals": [[t, status] for t, (_, status) in zip(times, logged, strict=True)],
                }
        finally:
            proxy.stop()
    return {
        "server": f"nginx limit_req {nginx_rate(requests, period)}, no burst",
        "requests": requests,
        "period": period,
        "calls": calls,
        "max_retries": MAX_RETRIES,
        "sdk_margin": margin,
        "clients": clients,
    }


def _stacked(times: Sequence[float], gap: float, row: float) -> list[float]:
    """y of each dot: requests closer than ``gap`` to the first of their burst stand in a column."""
    ys: list[float] = []
    start = 0
    for index in range(len(times) + 1):
        if index == len(times) or times[index] - times[start] > gap:
            size = index - start
            step = 0.8 / max(size - 1, 1) if size > 1 else 0.0
            ys.extend(row - 0.4 + step * k if size > 1 else row for k in range(size))
            start = index
    return ys


def _rolling(times: Sequence[float], period: float, grid: Sequence[float]) -> list[int]:
    """Arrivals in ``(t - period, t]`` for each t of ``grid`` (``times`` sorted)."""
    return [bisect.bisect_right(times, t) - bisect.bisect_right(times, t - period) for t in grid]


def draw_arrivals(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    requests, period, calls = data["requests"], data["period"], data["calls"]
    clients = data["clients"]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(WIDTH, 6.6), sharex=True, gridspec_kw={"height_ratios": [1, 1.15]}
    )
    end = max(c["arrivals"][-1][0] for c in clients.values()) + period
    # (a) one dot per request as nginx saw it; a burst stands as a column.
    ticks, names = [], []
    for row, key in enumerate(reversed(CLIENTS)):
        client = clients[key]
        times = [t for t, _ in client["arrivals"]]
        ys = _stacked(times, period / 40, row)
        for status, color, marker, size in ((200, ACCEPTED, "o", 22), (429, REJECTED, "x", 26)):
            chosen = [
                (t, y) for (t, s), y in zip(client["arrivals"], ys, strict=True) if s == status
            ]
            top.scatter(
                [t for t, _ in chosen],
                [y for _, y in chosen],
                c=color,
                marker=marker,
                s=size,
                linewidths=1.4,
                label={200: "accepted (200)", 429: "rejected (429)"}[status] if row == 0 else None,
                zorder=3,
            )
        ticks.append(row)
        names.append(f"{client['label']}\n{client['accepted']} ok, {client['rejected']} × 429")
    top.set_yticks(ticks, names, fontsize=8.5)
    top.set_ylim(-0.6, len(CLIENTS) - 0.4)
    top.grid(axis="x", alpha=0.3)
    top.legend(loc="upper right", fontsize=8.5, framealpha=0.9)
    top.set_title(
        f"(a) every request as nginx saw it ({calls} calls each, "
        f"up to {MAX_RETRIES} retries on 429)",
        fontsize=10,
        loc="left",
    )
    # (b) what a strict limit counts: requests in any rolling period.
    grid = [i * period / 200 for i in range(-10, int(end / period * 200) + 1)]
    ceiling = 3 * requests
    for key in CLIENTS:
        client = clients[key]
        times = [t for t, _ in client["arrivals"]]
        counts = _rolling(times, period, grid)
        peak = client["max_in_window"]
        label = f"{client['label']} (max {peak})"
        bottom.step(
            grid,
            counts,
            where="post",
            color=COLORS[key],
            lw=2.2 if key == "sdk" else 1.6,
            zorder=4 if key == "sdk" else 2,  # on top: the line that must stay at or under
            label=label,
        )
        if peak > ceiling:  # off the scale: say so where it leaves the plot
            at = grid[max(range(len(counts)), key=counts.__getitem__)]
            bottom.annotate(
                f"{client['label']}: up to {peak}, off the scale ↑",
                (at, ceiling),
                xytext=(4, -14),
                textcoords="offset points",
                color=COLORS[key],
                fontsize=8.5,
            )
    bottom.axhline(requests, color="black", ls="--", lw=1.2, label=f"limit: {requests}")
    bottom.set_ylim(0, min(ceiling, max(c["max_in_window"] for c in clients.values())) + 1.5)
    bottom.set_xlim(grid[0], end)
    bottom.set_ylabel(f"requests in the last {period:g} s")
    bottom.set_xlabel("seconds since the client's first request")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8.5, framealpha=0.9)
    bottom.set_title(
        f"(b) requests in every rolling {period:g} s window (rejected ones count too)",
        fontsize=10,
        loc="left",
    )
    fig.suptitle(
        f"Same burst, strict server: nginx limit_req {requests} per {period:g} s, no burst\n"
        f"({_scale_text(requests, period)})",
        fontsize=11.5,
    )
    _save(fig, path)


# -- 2. the bulk runner's rate -------------------------------------------------------------------


async def _bulk_run(requests: int, period: float, rows: int) -> dict[str, Any]:
    from autocalls_async.bulk import BulkRunner, generated_requests

    limit = RateLimit(requests, period)
    async with (
        MockAutocalls(rate_limit=(requests, period), window="rolling") as server,
        AsyncAutocalls(_token("bulk"), base_url=server.base_url, rate_limit=limit) as client,
    ):
        done: list[float] = []
        failed = 0
        async with BulkRunner(client, generated_requests(rows, customers=rows)) as run:
            async for result in run:
                done.append(time.monotonic())
                failed += not result.ok
        records = [(record.time, record.status) for record in server.requests]
    first = min(at for at, _ in records)
    arrivals = sorted(round(at - first, 4) for at, _ in records)
    ok = sorted(round(at - first, 4) for at, status in records if status == 200)
    sustained = (len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 and ok[-1] > ok[0] else 0.0
    return {
        "server": f"emulator, strict rolling window of {requests} per {period:g}s",
        "requests": requests,
        "period": period,
        "rows": rows,
        "ok": rows - failed,
        "failed": failed,
        "rejected": sum(status == 429 for _, status in records),
        "max_in_window": _max_in_window(arrivals, period),
        "sustained_over_limit": round(sustained / (requests / period), 4),
        "seconds": round(max(done) - first, 3),
        "arrivals": arrivals,
        "completions": sorted(round(at - first, 4) for at in done),
    }


def draw_bulk(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    requests, period, rows = data["requests"], data["period"], data["rows"]
    done, arrivals = data["completions"], data["arrivals"]
    end = max(done) + period
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(WIDTH, 5.6), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]}
    )
    top.step(done, range(1, len(done) + 1), where="post", color="tab:blue", lw=1.8)
    top.plot(
        [0, rows * period / requests],
        [0, rows],
        color="black",
        ls="--",
        lw=1,
        label=f"the limit, {requests} per {period:g} s",
    )
    top.step([], [], color="tab:blue", lw=1.8, label=f"rows done ({data['ok']} ok)")
    top.set_ylabel("rows done")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8.5)
    top.set_title("(a) rows done over the run", fontsize=10, loc="left")
    grid = [i * period / 100 for i in range(-5, int(end / period * 100) + 1)]
    bottom.step(
        grid,
        _rolling(done, period, grid),
        where="post",
        color="tab:blue",
        lw=1.2,
        label="rows done",
    )
    bottom.step(
        grid,
        _rolling(arrivals, period, grid),
        where="post",
        color="tab:gray",
        lw=1,
        alpha=0.8,
        label=f"requests at the server (max {data['max_in_window']}, {data['rejected']} × 429)",
    )
    bottom.axhline(requests, color="black", ls="--", lw=1.2, label=f"limit: {requests}")
    bottom.set_ylim(0, requests * 1.3)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_xlim(grid[0], end)
    bottom.set_ylabel(f"in the last {period:g} s")
    bottom.set_xlabel("seconds since the first request")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8.5, ncols=3)
    bottom.set_title(
        f"(b) per rolling {period:g} s window: ramp, steady state "
        f"({data['sustained_over_limit']:.3f}× the limit), end",
        fontsize=10,
        loc="left",
    )
    fig.suptitle(
        f"BulkRunner, {rows} rows, against a strict {requests} per {period:g} s server\n"
        f"(a limit of {requests} per minute run {60 / period:g}× faster; defaults otherwise)",
        fontsize=11.5,
    )
    _save(fig, path)


# -- 3. memory of waiting calls ------------------------------------------------------------------


async def _waiters_child(total: int, step: int, traced: bool) -> list[list[float]]:
    """Queue calls ``step`` at a time as waiting.py does; memory above the start at each step."""
    limit = RateLimit(5, 60.0)  # one slot every 12 s: the calls wait
    async with (
        MockAutocalls(rate_limit=None) as server,
        AsyncAutocalls(_token("waiters"), base_url=server.base_url, rate_limit=limit) as client,
    ):
        await client.generate_reply(  # connect and warm up; it takes the slot
            assistant_id=ASSISTANT_ID, customer_identifier="+19999999999", message="Warm"
        )
        gc.collect()
        if traced:
            tracemalloc.start()

        def memory() -> int:
            return tracemalloc.get_traced_memory()[0] if traced else rss_bytes()

        baseline = memory()
        points = [[0, 0.0]]
        tasks: list[asyncio.Future[Any]] = []
        while len(tasks) < total:
            for index in range(len(tasks), min(total, len(tasks) + step)):
                tasks.append(
                    asyncio.ensure_future(
                        client.generate_reply(
                            assistant_id=ASSISTANT_ID,
                            customer_identifier=f"+1{index:010d}",
                            message="Hi",
                        )
                    )
                )
            # Waiting, or served since (a slot opens every 12 s): all of them queued.
            # The client has no "all queued" event to wait on: its counters are polled instead.
            while client.stats.waiting + client.stats.replies - 1 < len(tasks):
                failed = [t for t in tasks[-step:] if t.done() and t.exception() is not None]
                if failed:  # something went wrong: surface it
                    raise RuntimeError(f"a call failed while queueing: {failed[0].exception()!r}")
                await asyncio.sleep(0.01)
            gc.collect()
            points.append([len(tasks), memory() - baseline])
        if traced:
            tracemalloc.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return points


def _run_waiters_child(total: int, step: int, traced: bool) -> list[list[float]]:
    command = [sys.executable, "-m", "benchmarks.plots", "--waiters-child", str(total), str(step)]
    if traced:
        command.append("--traced")
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"waiters child failed ({done.returncode}): {done.stderr[-2000:]}")
    points: list[list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return points


def _slope(points: Sequence[Sequence[float]]) -> float:
    """Least-squares bytes per waiting call."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def waiters_data(total: int, step: int) -> dict[str, Any]:
    rss = _run_waiters_child(total, step, traced=False)
    traced = _run_waiters_child(total, step, traced=True)
    return {
        "rate_limit": "RateLimit(5, 60)",
        "total": total,
        "step": step,
        "rss": rss,
        "tracemalloc": traced,
        "rss_per_call_bytes": round(_slope(rss)),
        "tracemalloc_per_call_bytes": round(_slope(traced)),
        "rss_at_total_mib": round(rss[-1][1] / MIB, 2),
        "tracemalloc_at_total_mib": round(traced[-1][1] / MIB, 2),
    }


def draw_waiters(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(WIDTH, 4.4))
    for key, color, name in (
        ("rss", "tab:blue", "RSS growth (what the OS gives the process)"),
        ("tracemalloc", "tab:orange", "allocated by Python (tracemalloc)"),
    ):
        points = data[key]
        per_call = data[f"{key}_per_call_bytes"] / 1024
        axes.plot(
            [p[0] for p in points],
            [p[1] / MIB for p in points],
            marker="o",
            ms=4,
            color=color,
            lw=1.8,
            label=f"{name}: {per_call:.1f} KiB per waiting call",
        )
    axes.set_xlabel("calls waiting for a rate-limit slot")
    axes.set_ylabel("memory above the start (MiB)")
    axes.xaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    axes.set_xlim(0, data["total"] * 1.02)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=9)
    axes.set_title(
        f"Memory of {data['total']:,} calls waiting on one token ({data['rate_limit']}, "
        "default limiter)\nevery call a task and its coroutine, each for its own customer",
        fontsize=11.5,
    )
    _save(fig, path)


# -- 4. many tokens in one process ---------------------------------------------------------------


def tenants_data(quick: bool) -> dict[str, Any]:
    from . import tenants
    from ._common import Config

    result = tenants.run(Config(quick=quick))
    return {
        "params": {key: value for key, value in result.params.items() if key != "measured"},
        "measured": result.params["measured"],
        "notes": result.notes,
    }


def draw_tenants(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    measured = data["measured"]
    sizes = data["params"]["tokens"]
    series = [
        ("raw aiohttp", "raw aiohttp, paced by hand", "tab:gray"),
        ("host store", "SDK, host store (default)", "tab:blue"),
        ("Redis", "SDK, Redis", "tab:red"),
    ]
    series = [s for s in series if f"{s[0]}, {sizes[0]:,}" in measured]
    fig, (rate, cpu) = plt.subplots(1, 2, figsize=(WIDTH, 4.4))
    width = 0.8 / len(series)
    for offset, (key, label, color) in enumerate(series):
        runs = [measured[f"{key}, {size:,}"] for size in sizes]
        xs = [index + (offset - (len(series) - 1) / 2) * width for index in range(len(sizes))]
        rate.bar(xs, [r["calls_per_s"] for r in runs], width, color=color, label=label)
        bars = cpu.bar(xs, [r["cpu_per_call_us"] / 1000 for r in runs], width, color=color)
        if key != "raw aiohttp":
            for bar, r in zip(bars, runs, strict=True):
                cpu.annotate(
                    f"{r['fds_peak']} fds\n{r['rss_per_token_kib']:.0f} KiB/token",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7.5,
                )
    for axes, ylabel in ((rate, "calls per second, all tokens"), (cpu, "client CPU per call (ms)")):
        axes.set_xticks(range(len(sizes)), [f"{size:,} tokens" for size in sizes])
        axes.set_ylabel(ylabel)
        axes.grid(axis="y", alpha=0.3)
        axes.set_ylim(bottom=0, top=axes.get_ylim()[1] * 1.15)
    rate.legend(loc="upper right", fontsize=8.5)
    params = data["params"]
    sdk = [run for case, run in measured.items() if not case.startswith("raw")]
    failed = sum(run["failed"] for run in sdk)
    refused = sum(run["rate_limited"] for run in sdk)
    warned = sum(run["warnings"] for run in sdk)
    outcome = (
        "the SDK: every call answered" if not failed else f"the SDK: {failed} calls failed"
    ) + f", {refused} × 429, {warned} WARNING lines"
    fig.suptitle(
        f"Many tokens in one process at ulimit -n {params['ulimit_n']}: each token "
        f"{params['calls_per_token']} calls, {params['rate_limit']}\n{outcome} (the emulator "
        "and Redis in other processes)",
        fontsize=11.5,
    )
    _save(fig, path)


# -- running -------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    _pyplot().close(fig)


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The numbers each figure shows, one line each."""
    lines = []
    arrivals = document.get("arrivals")
    if arrivals is not None:
        for client in arrivals["clients"].values():
            lines.append(
                f"arrivals: {client['label']}: {client['requests']} requests for "
                f"{client['calls']} calls, {client['accepted']} accepted, "
                f"{client['rejected']} rejected, {client['failed_calls']} calls failed, max "
                f"{client['max_in_window']} in {arrivals['period']:g}s (limit "
                f"{arrivals['requests']}), last accepted at {client['last_accepted_s']:.2f}s"
            )
    bulk = document.get("bulk")
    if bulk is not None:
        lines.append(
            f"bulk: {bulk['rows']} rows in {bulk['seconds']:.1f}s, {bulk['ok']} ok, "
            f"{bulk['rejected']} × 429, max {bulk['max_in_window']} in {bulk['period']:g}s "
            f"(limit {bulk['requests']}), sustained {bulk['sustained_over_limit']:.3f}× the limit"
        )
    tenants = document.get("tenants")
    if tenants is not None:
        for case, run in tenants["measured"].items():
            lines.append(
                f"tenants: {case} tokens: {run['calls_per_s']:.0f} calls/s, "
                f"{run['cpu_per_call_us']:.0f} µs CPU/call, grant wait p50 "
                f"{run['wait_p50_ms'] or 0:.1f} ms p99 {run['wait_p99_ms'] or 0:.0f} ms, "
                f"{run['fds_peak']} fds, {run['rss_per_token_kib']:.1f} KiB/token, "
                f"{run['rate_limited']} × 429, {run['failed']} failed, {run['warnings']} warnings"
            )
    waiters = document.get("waiters")
    if waiters is not None:
        lines.append(
            f"waiters: {waiters['total']:,} waiting calls: RSS "
            f"+{waiters['rss_at_total_mib']:.1f} MiB "
            f"({waiters['rss_per_call_bytes'] / 1024:.2f} KiB per call), tracemalloc "
            f"+{waiters['tracemalloc_at_total_mib']:.1f} MiB "
            f"({waiters['tracemalloc_per_call_bytes'] / 1024:.2f} KiB per call)"
        )
    return lines


def make_figures(out: Path, *, quick: bool, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the set-ups, draw the figures into ``out``, write ``figures.json``; with ``only``,
    just those figures, the others' numbers kept from the ``figures.json`` there."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wanted = set(FILES) if not only else set(only)
    document: dict[str, Any] = {}
    if only and (out / SUMMARY).exists():
        document = json.loads((out / SUMMARY).read_text())
    command = "python -m benchmarks.plots" + (" --quick" if quick else "")
    if only:
        command += " --only " + " ".join(only)
    document["environment"] = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "autocalls_async": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if "arrivals" in wanted:
        binary = find_nginx()
        if binary is None:
            print("arrivals: skipped, nginx is not installed (apt-get install nginx-light)")
            document["arrivals"] = None
        else:
            # The SDK's margin leaves margin / 2 of the interval for jitter between its write
            # and nginx's clock: 120 ms at the real 5 per minute, 4 ms at 5 per 2 s, 2 ms at 5
            # per 1 s, which a busy machine's scheduler can take (nginx dates a request when it
            # wakes). The quick run, a test on a shared machine, asks for a 10 ms allowance
            # and says so.
            requests, period, calls, margin = (5, 1.0, 8, 0.1) if quick else (5, 2.0, 20, 0.02)
            document["arrivals"] = asyncio.run(
                _arrivals_run(binary, requests, period, calls, margin)
            )
            draw_arrivals(document["arrivals"], out / FILES["arrivals"])
    if "bulk" in wanted:
        requests, period, rows = (10, 0.5, 30) if quick else (10, 1.0, 240)
        document["bulk"] = asyncio.run(_bulk_run(requests, period, rows))
        draw_bulk(document["bulk"], out / FILES["bulk"])
    if "waiters" in wanted:
        total, step = (2_000, 500) if quick else (100_000, 10_000)
        document["waiters"] = waiters_data(total, step)
        draw_waiters(document["waiters"], out / FILES["waiters"])
    if "tenants" in wanted:
        document["tenants"] = tenants_data(quick)
        draw_tenants(document["tenants"], out / FILES["tenants"])
    document["summary"] = summary_lines(document)
    document["seconds"] = round(time.perf_counter() - started, 1)
    (out / SUMMARY).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plots",
        description="Draw the docs' figures from real runs (arrivals at a strict server, the "
        "bulk runner's rate, memory of waiting calls, many tokens in one process) and write "
        "figures.json beside them.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory ({DEFAULT_OUT})")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(FILES), help="draw these figures alone (all)"
    )
    parser.add_argument("--waiters-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.waiters_child is not None:
        total, step = args.waiters_child
        print(json.dumps(asyncio.run(_waiters_child(total, step, args.traced))))
        return 0
    document = make_figures(args.out, quick=args.quick, only=args.only)
    for line in document["summary"]:
        print(line)
    print(f"wrote {args.out} in {document['seconds']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
