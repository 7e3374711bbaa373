"""8. The host store: SQLite (what ships) against hardened per-token files (the alternative).

Issue 18 asked for a choice between an embedded database and hardened files, measured on:

* **grant latency**: one slot's two store operations (grant, then the start reported), in one
  process, on the default store's file system (``/dev/shm``);
* **bulk rows per second** at an unbounded rate: ``BulkRunner`` against the emulator in
  another process, the store's cost per row beside no limiter at all (the ratio is the point);
* **descriptors at 10,000 tokens**, and files left behind;
* **a full disk**: a 1 MiB tmpfs in a private mount namespace, filled; then new tokens until
  a write fails; whether the schedule written before is intact.

"Hardened files" is the old store with what a review asked of it: a file per token opened with
``O_NOFOLLOW``, locked with ``flock``, and replaced whole (write a temporary file, ``rename``)
so that a short write can never leave half a state. It lives here, not in the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ._common import ROOT, BenchResult, Config, emulator_process

NAME = "hoststore"
TITLE = "Host store: SQLite against hardened per-token files"
T = TypeVar("T")


class HardenedFileStore:
    """A file per token, ``O_NOFOLLOW``, ``flock``, replaced whole by ``rename``."""

    kind = "host"

    def __init__(self, directory: Path) -> None:
        from autocalls_async._schedule import TokenState

        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._state = TokenState
        self.clock = time.monotonic

    def try_update(self, key: str, update: Callable[[Any, float], T]) -> tuple[bool, T | None]:
        path = self.directory / f"{key[-32:]}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 1 << 20, 0)
            state = self._state.from_json(json.loads(raw)) if raw else self._state()
            now = self.clock()
            result = update(state, now)
            temp = self.directory / f".{key[-32:]}.{os.getpid()}"
            data = json.dumps(state.to_json()).encode()
            tfd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                if os.write(tfd, data) != len(data):
                    raise OSError("short write")
            finally:
                os.close(tfd)
            # Replaced whole: readers see the old state or the new one. (Waiters holding the
            # old file's lock would now need to notice the new inode: one more check per op.)
            os.rename(temp, path)
            return True, result
        finally:
            os.close(fd)

    async def update(self, key: str, update: Callable[[Any, float], T]) -> T:
        return self.try_update(key, update)[1]  # type: ignore[return-value]

    async def aclose(self) -> None:
        pass


def _stores(directory: Path) -> dict[str, Any]:
    from autocalls_async._stores import HostStore, MemoryStore

    return {
        "SQLite (HostStore)": HostStore(directory / "sqlite"),
        "hardened files": HardenedFileStore(directory / "files"),
        "memory (one process)": MemoryStore(),
    }


def _grant_cycle(store: Any, key: str, rules: Any, n: int) -> None:
    from autocalls_async import _schedule as schedule

    lanes = (schedule.Lane(1, 0.0, 0.0, 0.0), None)
    for i in range(n):
        ticket = f"t{i}"
        store.try_update(
            key,
            lambda state, now, t=ticket: schedule.grant(
                state, now, rules, who="bench", where="here", ticket=t, lanes=lanes
            ),
        )
        store.try_update(
            key, lambda state, now, t=ticket: schedule.sent(state, now, rules, ticket=t)
        )


def _latency(rounds: int, ops: int) -> dict[str, list[float]]:
    from autocalls_async import RateLimit
    from autocalls_async._schedule import Rules

    rules = Rules.of(RateLimit(10**9, 1.0, margin=0.0), lease=10.0)  # always due: cost alone
    times: dict[str, list[float]] = {}
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        stores = _stores(Path(tmp))
        for _ in range(rounds):
            for name, store in stores.items():
                _grant_cycle(store, "k" * 64, rules, 50)  # warm up, open
                started = time.perf_counter()
                _grant_cycle(store, "k" * 64, rules, ops)
                times.setdefault(name, []).append((time.perf_counter() - started) / ops * 1e6)
        for store in stores.values():
            asyncio.run(store.aclose())
    return times


def _descriptors(tokens: int) -> dict[str, tuple[int, int]]:
    """Descriptors open after touching ``tokens`` tokens, and files left in the directory."""
    from autocalls_async import RateLimit
    from autocalls_async._schedule import Rules

    rules = Rules.of(RateLimit(5, 60.0), lease=10.0)
    out: dict[str, tuple[int, int]] = {}
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        for name, store in _stores(Path(tmp)).items():
            if name.startswith("memory"):
                continue
            before = len(os.listdir("/proc/self/fd"))
            for n in range(tokens):
                _grant_cycle(store, f"{n:064x}", rules, 1)
            fds = len(os.listdir("/proc/self/fd")) - before
            directory = Path(tmp) / ("sqlite" if name.startswith("SQLite") else "files")
            out[name] = (fds, len(os.listdir(directory)))
            asyncio.run(store.aclose())
    return out


FULL_DISK = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from benchmarks.hoststore import HardenedFileStore
from autocalls_async._stores import HostStore
mount, kind = Path(sys.argv[1]), sys.argv[2]
store = HostStore(mount / "store") if kind == "sqlite" else HardenedFileStore(mount / "store")
store.try_update("k" * 64, lambda s, now: setattr(s, "due", now + 1000.0))
before = store.try_update("k" * 64, lambda s, now: s.due)[1]
filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
try:
    while True:
        os.write(filler, b"x" * 512)
except OSError:
    pass
written, error = 0, None
for n in range(100000):
    try:
        store.try_update(f"{n:064d}", lambda s, now: setattr(s, "due", now + 1000.0))
        written += 1
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc)[:100]}"
        break
try:
    after = store.try_update("k" * 64, lambda s, now: s.due)[1]
except Exception:
    after = None  # cannot even be read: every operation rewrites its file
print(json.dumps({"written_after_full": written, "error": error, "intact": before == after}))
"""


def _full_disk() -> dict[str, Any] | str:
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare is not installed"
    out: dict[str, Any] = {}
    for name, kind in (("SQLite (HostStore)", "sqlite"), ("hardened files", "files")):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [unshare, "--mount", "--fork", "sh", "-c",
                 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"', "sh", tmp,
                 sys.executable, "-c", FULL_DISK, tmp, kind, str(ROOT)],
                capture_output=True, text=True, check=False, timeout=300, cwd=ROOT,
            )  # fmt: skip
        if done.returncode != 0:
            return f"needs a private mount namespace (root): {done.stderr.strip()[-300:]}"
        out[name] = json.loads(done.stdout)
    return out


async def _bulk(base_url: str, rows: int, limiter: str) -> float:
    from autocalls_async import AsyncAutocalls, LocalRateLimiter, RateLimit
    from autocalls_async.bulk import BulkRunner, generated_requests

    limit = RateLimit(100_000, 1.0)
    options: dict[str, Any] = {"rate_limit": limit, "conversation_cache_size": 1024}
    if limiter == "none":
        options["rate_limit"] = None
    elif limiter == "local":
        options["limiter"] = LocalRateLimiter(limit)
    async with AsyncAutocalls(f"bench-{limiter}-{time.time()}", base_url=base_url, **options) as c:
        await c.generate_reply(assistant_id=123, customer_identifier="+10000000000", message="W")
        started = time.perf_counter()
        async with BulkRunner(c, generated_requests(rows, customers=rows)) as run:
            async for _ in run:
                pass
        elapsed = time.perf_counter() - started
        if "limiter" in options:
            await options["limiter"].aclose()
    return rows / elapsed


def run(config: Config) -> BenchResult:
    rounds = config.pick_rounds(full=5, quick=1)
    ops = 300 if config.quick else 5_000
    tokens = 1_000 if config.quick else 10_000
    rows = 500 if config.quick else 5_000
    result = BenchResult(
        NAME, TITLE, params={"rounds": rounds, "ops": ops, "tokens": tokens, "bulk_rows": rows}
    )
    with contextlib.ExitStack() as stack:
        saved = os.environ.get("AUTOCALLS_LIMITER_DIR")
        if not saved:
            # The default client's store, in a directory of this run's own.
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            os.environ["AUTOCALLS_LIMITER_DIR"] = tmp
            stack.callback(os.environ.pop, "AUTOCALLS_LIMITER_DIR", None)
        for name, values in _latency(rounds, ops).items():
            result.summary("grant + start reported", name, values, unit="µs", digits=1)
        for name, (fds, files) in _descriptors(tokens).items():
            result.add(f"{tokens:,} tokens", f"{name}: descriptors held", fds, digits=0)
            result.add(f"{tokens:,} tokens", f"{name}: files left", files, digits=0)
        speeds: dict[str, list[float]] = {}
        for _ in range(rounds):
            with emulator_process("none") as base_url:
                for limiter in ("none", "host", "local"):
                    speeds.setdefault(limiter, []).append(
                        asyncio.run(_bulk(base_url, rows, limiter))
                    )
        labels = {"none": "no limiter", "host": "SQLite (default)", "local": "LocalRateLimiter"}
        for limiter, values in speeds.items():
            case = f"bulk, {rows:,} rows, unbounded rate"
            result.summary(case, f"{labels[limiter]}: rows/s", values, unit="rows/s", digits=0)
        ratios = [h / n for h, n in zip(speeds["host"], speeds["none"], strict=True)]
        result.summary(
            f"bulk, {rows:,} rows, unbounded rate", "SQLite ÷ no limiter", ratios, unit="×"
        )
        full = _full_disk()
        if isinstance(full, str):
            result.notes.append(f"full disk not measured: {full}")
        else:
            for name, data in full.items():
                result.add(
                    "1 MiB tmpfs filled", f"{name}: schedule intact", float(data["intact"]),
                    digits=0,
                )  # fmt: skip
                result.notes.append(
                    f"full disk, {name}: {data['written_after_full']} new tokens written after "
                    f"the disk filled, then {data['error']}"
                )
    result.notes.append(
        "latency is per slot (grant, then the start reported), one process, median of rounds; "
        f"bulk median of {rounds} rounds, "
        f"SQLite ÷ no limiter {statistics.median(ratios):.2f}×"
    )
    return result
