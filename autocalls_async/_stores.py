"""Where the schedule lives: one token's ``TokenState``, read and updated atomically.

A store applies a function ``(state, now) -> result`` to one token's state atomically, with its
own clock as ``now``. ``_schedule`` holds the algorithm; a store only keeps it:

* ``MemoryStore``: this process (every event loop and thread in it), under a lock;
* ``HostStore`` (in ``_hoststore``): every process of this OS user on the host, one SQLite
  database for every token; no server;
* ``RedisStore`` (in ``_redis``): every host, by compare-and-set on one Redis key.

The memory and host stores read the host's monotonic clock: one clock for every process of the
host, which never steps. A store answers without waiting when it can (``try_update``), so the common
path costs no task switch; a busy lock or a network store is awaited (``update``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol, TypeVar

from ._hoststore import DIRECTORY_HINT, NOTHING_SENT, HostStore, default_host_directory
from ._schedule import TokenState

__all__ = [
    "DIRECTORY_HINT",
    "NOTHING_SENT",
    "URGENT",
    "HostStore",
    "MemoryStore",
    "Store",
    "default_host_directory",
]

T = TypeVar("T")
Update = Callable[[TokenState, float], T]

#: True while a grant's report (sent, given back, renewed) is being made: a store that queues
#: its operations serves these first, since each frees the token for every waiter.
URGENT: ContextVar[bool] = ContextVar("autocalls_store_urgent", default=False)


class Store(Protocol):
    """What a limiter needs of a store."""

    kind: str  #: "process", "host" or "redis": for logs and metrics

    def try_update(self, key: str, update: Update[T]) -> tuple[bool, T | None]:
        """Apply ``update`` now if that needs no waiting: (True, result), else (False, None)."""
        ...

    async def update(self, key: str, update: Update[T]) -> T:
        """Apply ``update`` atomically, waiting for the store if needed."""
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """One process's store: every event loop and thread of the process shares it."""

    kind = "process"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, TokenState] = {}

    def try_update(self, key: str, update: Update[T]) -> tuple[bool, T | None]:
        return True, self._apply(key, update)

    async def update(self, key: str, update: Update[T]) -> T:
        return self._apply(key, update)

    def _apply(self, key: str, update: Update[T]) -> T:
        with self._lock:  # held for microseconds: never worth a task switch
            state = self._states.get(key)
            if state is None:
                state = TokenState()
            now = self.clock()
            result = update(state, now)
            if state.holder is None and state.latest() <= now:
                self._states.pop(key, None)  # nothing left to remember
            else:
                self._states[key] = state
            return result

    def __len__(self) -> int:
        return len(self._states)

    async def aclose(self) -> None:
        pass


#: The process-wide store of ``LocalRateLimiter``.
PROCESS_STORE = MemoryStore()
