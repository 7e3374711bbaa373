"""Where the schedule lives: one token's ``TokenState``, read and updated atomically.

A store applies a function ``(state, now) -> result`` to one token's state atomically, with its
own clock as ``now``. ``_schedule`` holds the algorithm; a store only keeps it:

* ``MemoryStore``: this process (every event loop and thread in it), under a lock;
* ``FileStore``: every process of this OS user on the host, one small file per token under an
  exclusive ``flock``; no server;
* ``RedisStore`` (in ``_redis``): every host, by compare-and-set on one Redis key.

The memory and host stores read ``time.monotonic()``: one clock for every process of the host,
which never steps. A store answers without waiting when it can (``try_update``), so the common
path costs no task switch; a busy lock or a network store is awaited (``update``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol, TypeVar

from ._errors import LimiterUnavailableError
from ._log import logger
from ._schedule import TokenState

__all__ = ["URGENT", "FileStore", "MemoryStore", "Store", "default_host_directory"]

T = TypeVar("T")
Update = Callable[[TokenState, float], T]

#: True while a grant's report (sent, given back, renewed) is being made: a store that queues
#: its operations serves these first, since each frees the token for every waiter.
URGENT: ContextVar[bool] = ContextVar("autocalls_store_urgent", default=False)

#: Past this many seconds of a busy host lock, a WARNING says so (a stopped process?).
LOCK_TIMEOUT = 2.0
_OPEN_FILES = 64
_MAX_STATE = 1 << 20


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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def default_host_directory() -> Path:
    """Where ``HostRateLimiter`` keeps its files when no ``path`` is given.

    ``$AUTOCALLS_LIMITER_DIR``, else ``$XDG_RUNTIME_DIR/autocalls-async`` (a per-user tmpfs
    on systemd hosts), else ``autocalls-async-<uid>`` in the temporary directory.
    """
    explicit = os.environ.get("AUTOCALLS_LIMITER_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "autocalls-async"
    return Path(tempfile.gettempdir()) / f"autocalls-async-{os.getuid()}"


#: How every message of a store that failed ends: the call failed before anything was sent.
NOTHING_SENT = "; nothing was sent"
#: What the host limiter's directory must be, and how to choose another.
DIRECTORY_HINT = (
    "set AUTOCALLS_LIMITER_DIR (or HostRateLimiter(path=...)) to a directory of your own: "
    "one that exists or can be created, owned by you and not writable by group or others "
    "(it is created with mode 0700), on a local file system that supports flock"
)


class FileStore:
    """Every process of this OS user on the host: one file per token, under ``flock``.

    The directory is created with mode 0700 and must belong to this user and not be writable by
    others (another user could otherwise read or forge the schedule). A file holds one JSON
    object: the boot it was written in, and the state. A state from another boot (a reboot
    reset the monotonic clock) or that cannot be read is started afresh; each process still keeps
    its own last start, so it never starts sooner than that allows.
    """

    kind = "host"

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, clock: Callable[[], float] | None
    ) -> None:
        self.directory = Path(directory) if directory is not None else default_host_directory()
        self.clock = clock or time.monotonic
        self._boot = _boot_id()
        self._lock = threading.Lock()  # flock does not exclude threads sharing one descriptor
        self._files: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self._ready = False

    def __repr__(self) -> str:
        return f"<FileStore {self.directory}>"

    # ------------------------------------------------------------------ files

    def _unavailable(self, what: str, exc: OSError) -> LimiterUnavailableError:
        return LimiterUnavailableError(
            f"the host rate limiter cannot use {self.directory} ({what}: "
            f"{exc.strerror or exc}); {DIRECTORY_HINT}{NOTHING_SENT}"
        )

    def _prepare(self) -> None:
        directory = self.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
        except OSError as exc:
            raise self._unavailable("creating the directory", exc) from exc
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise LimiterUnavailableError(
                f"the host rate limiter's directory {directory} belongs to another user or is "
                f"writable by others; {DIRECTORY_HINT}{NOTHING_SENT}"
            )
        self._ready = True

    def _fd(self, key: str) -> int:
        if os.getpid() != self._pid:
            # A forked child shares its parent's open files, and with them its locks: the two
            # would not exclude each other. Open our own (the parent keeps its copies).
            self._files.clear()
            self._pid = os.getpid()
        fd = self._files.get(key)
        if fd is not None:
            self._files.move_to_end(key)
            return fd
        if not self._ready:
            self._prepare()
        path = self.directory / f"{key}.json"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise self._unavailable(f"opening {path.name}", exc) from exc
        self._files[key] = fd
        while len(self._files) > _OPEN_FILES:
            _, old = self._files.popitem(last=False)
            os.close(old)
        return fd

    # ------------------------------------------------------------------ updates

    def try_update(self, key: str, update: Update[T]) -> tuple[bool, T | None]:
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            fd = self._fd(key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False, None
            except OSError as exc:
                raise self._unavailable("locking", exc) from exc
            try:
                if os.fstat(fd).st_nlink == 0:
                    # Deleted (rm -rf, a tmp cleaner, logind at logout): the others now use a new
                    # file at the same path. Join them, never keep a schedule of our own.
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    self._forget(key)
                    fd = self._fd(key)
                    fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file: held for microseconds
                return True, self._apply(fd, update)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    async def update(self, key: str, update: Update[T]) -> T:
        """Wait for the lock as long as it takes: a process holding it is alive (the kernel
        drops the locks of a dead one), so sending without it would break the limit. Callers
        bound the wait with their ``max_wait``."""
        delay = 0.0002
        warn_at = time.monotonic() + LOCK_TIMEOUT
        while True:
            done, result = self.try_update(key, update)
            if done:
                return result  # type: ignore[return-value]
            if warn_at and time.monotonic() > warn_at:
                warn_at = 0.0
                logger.warning(
                    "the host rate limiter's file for a token in %s has been locked for over "
                    "%gs by another process (stopped, or stalled?); waiting for it",
                    self.directory,
                    LOCK_TIMEOUT,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _forget(self, key: str) -> None:
        fd = self._files.pop(key, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ready = False  # the directory may be gone too

    def _apply(self, fd: int, update: Update[T]) -> T:
        try:
            raw = os.pread(fd, _MAX_STATE, 0)
        except OSError as exc:
            raise self._unavailable("reading", exc) from exc
        now = self.clock()
        state = self._decode(raw, now)
        result = update(state, now)
        if state.holder is None and state.latest() <= now:
            data = b"{}"  # nothing left to remember
        else:
            data = json.dumps(
                {"boot": self._boot, "state": state.to_json()}, separators=(",", ":")
            ).encode()
        if data != raw.rstrip():
            # Padded with spaces (valid JSON) to the old length: one write, no truncation, so
            # a crash can never leave half a state behind.
            padded = data.ljust(len(raw))
            try:
                os.pwrite(fd, padded, 0)
                if len(raw) > 4 * len(data) + 4096:
                    os.ftruncate(fd, len(data))
            except OSError as exc:
                raise self._unavailable("writing", exc) from exc
        return result

    def _decode(self, raw: bytes, now: float) -> TokenState:
        if not raw.strip():
            return TokenState()
        try:
            data = json.loads(raw)
            if not data:
                return TokenState()
            state = TokenState.from_json(data["state"])
        except (ValueError, TypeError, KeyError, IndexError):
            return TokenState()  # unreadable: each process's own last start still holds
        if data.get("boot") != self._boot or state.newest() > now + 2 * 86400:
            return TokenState()  # written before a reboot: its clock readings mean nothing now
        return state

    async def aclose(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                for fd in self._files.values():
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._files.clear()
