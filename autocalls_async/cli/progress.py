"""A bulk run's progress: when its requests start (``StartClock``), its counts and figures
(``Meter``: rate, ETA, the share of the token's slots it got), and how they are shown on
stderr: a rich bar on a terminal, plain lines in a log, or nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import IO, Any, Final, Protocol

import attrs

from .._client import ClientStats
from .._errors import InvalidRequestError
from .._models import Priority, RateLimit
from .._ratelimit import Limiter, RateLimiter, Slot
from ..bulk import BulkResult
from .output import PROG, duration, plural, rich_available

__all__ = [
    "NoProgress",
    "PlainProgress",
    "Progress",
    "RichProgress",
    "StartClock",
    "Meter",
    "make_progress",
    "send_time",
]

PLAIN_PROGRESS_EVERY: Final = 5.0  # seconds between plain progress lines
#: The ETA is measured over this run's last starts once it has this many (before: the limit's
#: pace); over the last ``PACE_WINDOW`` of them, so that it follows a change of traffic.
PACE_MIN_STARTS: Final = 5
PACE_WINDOW: Final = 32
#: Below this fraction of the token's slots, the progress says other traffic took the rest.
SHARE_SHOWN_BELOW: Final = 0.9
#: A call granted its slot later than this after it could have been is "late" by whole slots
#: (scheduling and the limiter's own margin are not other traffic).
LATE_MARGIN: Final = 0.05


class StartClock:
    """A rate limiter that notes when requests start, around the real one.

    The achieved rate is then (starts - 1) / (last start - first start): n requests at the full
    rate span n - 1 intervals, so dividing by the run's elapsed time would misreport it.
    """

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.rate_limit = inner.rate_limit
        self.count = 0
        self.first = self.last = 0.0
        self.recent: deque[float] = deque(maxlen=PACE_WINDOW)  #: the last starts' times
        #: Slots this run waited through while one of its calls was ready: other traffic on
        #: the token took them (a web app, another run). Without any, a slow pace is this
        #: run's own (reply latency, concurrency), never "other traffic".
        self.lost_slots = 0
        self.recent_lost: deque[int] = deque(maxlen=PACE_WINDOW)  #: per start, the last ones

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: str,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[Slot]:
        entered = time.monotonic()
        async with self.inner.slot(key, deadline=deadline, priority=priority) as slot:
            now = time.monotonic()
            lost = 0
            if self.count and self.rate_limit is not None:
                interval = self.rate_limit.interval
                late = now - max(entered, self.last + interval) - LATE_MARGIN
                if late >= interval:  # a whole slot went by while this call was ready
                    lost = int(late / interval)
            self.lost_slots += lost
            self.recent_lost.append(lost)
            self.last = now
            if not self.count:
                self.first = self.last
            self.count += 1
            self.recent.append(self.last)
            yield slot

    async def pause(self, key: str, seconds: float) -> None:
        await self.inner.pause(key, seconds)

    async def aclose(self) -> None:
        if isinstance(self.inner, Limiter):
            await self.inner.aclose()

    def rate(self) -> float | None:
        """Starts per second, or None before two starts."""
        span = self.last - self.first
        return (self.count - 1) / span if self.count > 1 and span > 0 else None

    def pace(self) -> float | None:
        """Seconds between this run's starts, over its last ``PACE_WINDOW`` starts; None
        before ``PACE_MIN_STARTS``. Slots that other traffic on the token took (a web app's
        interactive calls, another run) lengthen it; so do 429 pauses."""
        recent = self.recent
        if len(recent) < PACE_MIN_STARTS:
            return None
        return (recent[-1] - recent[0]) / (len(recent) - 1)


def send_time(requests: int, interval: float, *, first_at_once: bool = True) -> float:
    """Seconds until the last of ``requests`` starts, one every ``interval``: the first starts
    at once when nothing else uses the token (``first_at_once``), so n requests span n - 1
    intervals; once a run has started, each request left waits an interval. Both the dry
    run's estimate and the run's first line (and its ETA) come from here."""
    if requests <= 0:
        return 0.0
    return (requests - 1 if first_at_once else requests) * interval


@attrs.define
class Meter:
    """Counts of a bulk run, and the figures its progress and summary show."""

    todo: int  #: rows this run will send
    rate_limit: RateLimit | None
    stats: ClientStats
    started: float = attrs.Factory(time.monotonic)
    answered: int = 0
    failed: int = 0
    not_sent: int = 0
    ended: float | None = None
    starts: StartClock | None = None
    #: This run's failures by kind (invalid, failed, uncertain) and the first rows of each.
    counts: dict[str, int] = attrs.Factory(dict)
    examples: dict[str, list[str]] = attrs.Factory(dict)

    def note_failure(self, result: BulkResult) -> None:
        from .._bulkio import EXAMPLES_SHOWN, row_name

        if isinstance(result.error, InvalidRequestError):
            kind = "invalid"
        else:
            kind = "uncertain" if result.maybe_processed else "failed"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_SHOWN:
            shown.append(row_name(result.request))

    @property
    def done(self) -> int:
        return self.answered + self.failed

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def rate(self) -> float | None:
        """Requests started per second so far; None until there are enough of them
        (``PACE_MIN_STARTS``) for a rate to mean something: one request in 0.05 s is not
        "1,200 per minute"."""
        if self.starts is not None:
            return self.starts.rate() if self.starts.count >= PACE_MIN_STARTS else None
        elapsed = self.elapsed
        if self.stats.requests < PACE_MIN_STARTS or elapsed <= 0:
            return None
        return self.stats.requests / elapsed

    def eta(self) -> float | None:
        """Seconds left: the rows left at the pace this run measured over its last starts
        (never faster than the limit), which counts the slots other traffic on the token
        took; before a few starts, at the limit's pace (or the pace seen, if no limit)."""
        left = max(self.todo - self.done - self.not_sent, 0)
        if not left:
            return 0.0
        if self.rate_limit is not None:
            pace = self.starts.pace() if self.starts is not None else None
            started = self.starts.count if self.starts is not None else self.stats.requests
            interval = max(pace or 0.0, self.rate_limit.interval)
            return send_time(left, interval, first_at_once=not started)
        if self.done:
            return left * self.elapsed / self.done
        return None

    def share(self) -> float | None:
        """The fraction of the token's slots this run got over its last starts (1.0: all of
        them); None before a few starts or without a limit."""
        pace = self.starts.pace() if self.starts is not None else None
        if pace is None or self.rate_limit is None or pace <= 0:
            return None
        return min(1.0, self.rate_limit.interval / pace)

    def figures(self, *, finished: bool = False) -> str:
        """Rate, the slots other traffic took (when it took some), and the ETA (none once
        ``finished``)."""
        others = ""
        lost = sum(self.starts.recent_lost) if self.starts is not None else 0
        if lost and self.starts is not None:
            taken = lost / (lost + len(self.starts.recent_lost))
            if taken > 1 - SHARE_SHOWN_BELOW:
                others = f" ({taken:.0%} of slots to other traffic)"
        measured = (self.rate_text() if self.rate() is not None else "") + others
        parts = [measured.strip()] if measured else []
        if not finished:
            parts.append(f"ETA {duration(self.eta())}")
        return ", ".join(parts)

    def rate_text(self) -> str:
        """``12.0 req/min`` (per second for limits under a minute); ``rate not measured``
        before ``PACE_MIN_STARTS`` requests."""
        rate = self.rate()
        if rate is None:
            return "rate not measured"
        per_minute = self.rate_limit is not None and self.rate_limit.period >= 60
        rate *= 60 if per_minute else 1
        return f"{rate:.1f} req/{'min' if per_minute else 's'}"


class Progress(Protocol):
    def update(self) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def update(self) -> None:
        pass

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class PlainProgress:
    """A line on stderr at most every few seconds: for logs, pipes and CI."""

    def __init__(self, meter: Meter, stream: IO[str], every: float = PLAIN_PROGRESS_EVERY):
        self.meter, self.stream, self.every = meter, stream, every
        self._last = time.monotonic()

    def update(self) -> None:
        now = time.monotonic()
        finished = self.meter.done >= self.meter.todo
        if now - self._last >= self.every or finished:
            self._last = now
            meter = self.meter
            figures = meter.figures(finished=finished)
            print(
                f"{meter.done}/{plural(meter.todo, 'row')} ({meter.answered} answered, "
                f"{meter.failed} failed)" + (f", {figures}" if figures else ""),
                file=self.stream,
                flush=True,
            )

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """rich's progress bar on stderr: rows done, rate, and an ETA from the rate limit.

    Once closed it shows the outcome instead of a spinner ("done", or "stopped" before the
    last row) and no ETA; the figures never wrap, they are cut with an ellipsis.
    """

    def __init__(self, meter: Meter, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
        )
        from rich.progress import Progress as RichBar
        from rich.text import Text

        progress = self

        class State(SpinnerColumn):
            def render(self, task: Any) -> Any:
                if progress.closed:
                    done = meter.done >= meter.todo
                    return Text("done" if done else "stopped", style="green" if done else "red")
                return super().render(task)

        class Figures(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(
                    f"{meter.failed} failed"
                    + "".join(f" · {f}" for f in [meter.figures(finished=progress.closed)] if f),
                    style="progress.remaining",
                    no_wrap=True,
                    overflow="ellipsis",
                )

        self.meter = meter
        self.closed = False
        self.console = Console(stderr=True)
        self.bar = RichBar(
            State(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            Figures(),
            console=self.console,
        )
        self.task = self.bar.add_task(description, total=meter.todo)
        self.bar.start()

    def update(self) -> None:
        self.bar.update(self.task, completed=self.meter.done)

    def note(self, text: str) -> None:
        self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.closed = True
        self.update()
        self.bar.stop()  # draws the bar a last time, in its closed state


def make_progress(mode: str, meter: Meter, description: str) -> Progress:
    if mode == "off":
        return NoProgress()
    terminal = sys.stderr.isatty()
    if mode == "bar" or (mode == "auto" and terminal):
        if rich_available():
            return RichProgress(meter, description)
        if mode == "bar":
            print(
                f"{PROG}: no progress bar without rich: pip install 'autocalls-async[cli]'",
                file=sys.stderr,
            )
    return PlainProgress(meter, sys.stderr)
