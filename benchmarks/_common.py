"""What every benchmark shares: the result rows, the statistics, and the emulator process.

Rows carry a median and a spread (min-max over rounds) rather than one number: the machine a
benchmark runs on is usually shared and noisy, so ratios measured side by side in the same run
are the headline, and absolute times are context.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BenchResult",
    "Config",
    "Row",
    "emulator_process",
    "percentile",
    "rate_rows",
    "rss_bytes",
    "spread",
]

#: The directory holding the ``benchmarks`` package: child processes run ``-m benchmarks...``
#: from there, wherever the suite was started from.
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
ASSISTANT_ID = 123
VARIABLES = {"customer_name": "John"}


@dataclass(frozen=True)
class Config:
    """How big to run: ``quick`` is for the test suite (seconds), the default for the README."""

    quick: bool = False
    rounds: int | None = None  # overrides each benchmark's default number of rounds

    def pick_rounds(self, full: int, quick: int) -> int:
        if self.rounds is not None:
            return self.rounds
        return quick if self.quick else full


@dataclass
class Row:
    """One figure: the median over rounds, the min-max spread, and the target it answers."""

    case: str
    metric: str
    value: float | None
    unit: str = ""
    spread: tuple[float, float] | None = None
    target: str | None = None
    met: bool | None = None
    digits: int = 2

    def expect(self, target: str, check: Callable[[float], bool]) -> Row:
        """Attach a target, e.g. ``expect("≥ 0.90×", lambda v: v >= 0.90)``."""
        self.target = target
        self.met = None if self.value is None else check(self.value)
        return self

    def formatted(self) -> tuple[str, str, str]:
        """(median, spread, target) as the table prints them."""
        value = "n/a" if self.value is None else _number(self.value, self.digits, self.unit)
        low_high = ""
        if self.spread is not None:
            low, high = self.spread
            low_high = f"{_number(low, self.digits, '')}–{_number(high, self.digits, self.unit)}"
        target = ""
        if self.target is not None:
            verdict = {True: "met", False: "MISSED", None: "-"}[self.met]
            target = f"{self.target} ({verdict})"
        return value, low_high, target


def _number(value: float, digits: int, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    text = f"{value:,.{digits}f}"
    if unit in ("×", "%"):
        return text + unit
    return f"{text} {unit}".rstrip()


@dataclass
class BenchResult:
    """What one benchmark returns: rows for the table, plus its parameters and notes."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    available: bool = True
    failed: str | None = None  # the exception, when the benchmark itself broke
    seconds: float = 0.0

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def summary(self, case: str, metric: str, values: Sequence[float], **kwargs: Any) -> Row:
        """Add a row for the median of ``values`` (one per round) with its min-max spread."""
        finite = [value for value in values if not math.isnan(value)]
        if not finite:
            return self.add(case, metric, None, **kwargs)
        return self.add(case, metric, statistics.median(finite), spread=spread(finite), **kwargs)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["rows"]:
            row.pop("digits")
            if row["value"] is not None and math.isnan(row["value"]):
                row["value"] = None
        return data


def spread(values: Sequence[float]) -> tuple[float, float]:
    return (min(values), max(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Ratios of values measured side by side in the same round (paired, not medians' ratio)."""
    return [a / b if b else math.nan for a, b in zip(numerators, denominators, strict=True)]


def rss_bytes() -> int:
    """The resident set size of this process now (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()  # not Linux: the peak is the best we have


def peak_rss_bytes() -> int:
    """The peak resident set size of this process.

    Linux: ``VmHWM`` from ``/proc``, because ``ru_maxrss`` survives ``fork`` and ``exec``: a
    child started by a big parent would report the parent's peak. Elsewhere: ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextlib.contextmanager
def emulator_process(rate_limit: str = "none", window: str = "rolling") -> Iterator[str]:
    """Run the emulator in its own process and yield its base URL.

    A separate process keeps the server's CPU out of the client's event loop and out of
    ``time.process_time()``, so what is measured in this process is the client alone.
    """
    command = [sys.executable, "-m", "benchmarks._serve", "--rate-limit", rate_limit]
    command += ["--window", window]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the emulator did not start (exit code {process.poll()})")
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def rate_rows(
    result: BenchResult,
    case: str,
    runs: Sequence[dict[str, Any]],
    *,
    limit: float,
    period: float,
    failed_row: bool = False,
) -> None:
    """The rows of one multi-process case: combined rate against the limit (target 0.97x),
    429s (target 0), optionally failed calls, the most arrivals in one period, and a note
    naming the errors of failed calls."""
    result.summary(
        case, "combined rate ÷ limit", [r["sustained"] / limit for r in runs], digits=3, unit="×"
    ).expect("≥ 0.97×", lambda v: v >= 0.97)
    result.summary(case, "429s received", [r["rate_429"] for r in runs], digits=0).expect(
        "0", lambda v: v == 0
    )
    if failed_row:
        result.summary(case, "failed calls", [r["failed"] for r in runs], digits=0)
    result.summary(
        case, f"max arrivals in {period:g}s", [r["max_in_window"] for r in runs], digits=0
    )
    errors = sorted({e for r in runs for e in r["errors"]})
    if errors:
        result.notes.append(f"{case}: failures were {', '.join(errors)}")


async def burst_report(client: Any, first: int, calls: int, start_at: float) -> dict[str, Any]:
    """A child process's share of a multi-process run: at the wall-clock ``start_at`` (every
    child the same), ``calls`` concurrent calls, one customer each, numbered from ``first``;
    what failed and the 429s the client saw."""
    import asyncio
    import time

    await asyncio.sleep(max(0.0, start_at - time.time()))
    results = await asyncio.gather(
        *(
            client.generate_reply(
                assistant_id=123, customer_identifier=f"+1{index:010d}", message="Hi"
            )
            for index in range(first, first + calls)
        ),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    return {
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "errors": sorted({type(e).__name__ for e in failed}),
        "rate_limited": client.stats.rate_limited,
    }
