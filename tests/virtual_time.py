"""An event loop whose clock is virtual: when nothing is ready, time jumps to the next timer.

Limiter tests then run hours of "waiting" in milliseconds, deterministically. Only for code that
does no real I/O.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
QUANTUM = 1e-9


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def stall(seconds: float) -> None:
    """Block the running virtual loop for ``seconds``: time passes, no task runs."""
    asyncio.get_running_loop().virtual_clock.now += seconds  # type: ignore[attr-defined]


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if timeout is None and not ready:
            raise RuntimeError("virtual-time loop would block forever: a task waits on nothing")
        # Like a real clock, time moves a little on every turn of the loop: code that schedules
        # a timer a rounding error ahead (aiolimiter does) would otherwise spin forever.
        self._clock.now += max(timeout or 0.0, QUANTUM)
        return ready


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    clock = _Clock()
    loop = asyncio.SelectorEventLoop(_JumpingSelector(clock))
    loop.time = lambda: clock.now  # type: ignore[method-assign]
    loop.virtual_clock = clock  # type: ignore[attr-defined]  # tests may jump it: a stall
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
