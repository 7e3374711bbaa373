"""The host store (issue 18): one schedule per user whatever the environment, disk, kernel or
neighbours. Each test is a shape that split or reset the schedule of the old per-token JSON
files, with real processes, namespaces, users and a full file system, judged by the server's
own timestamps (the emulator's strict rolling window) where the shape is about sending.

Rates are scaled (5 per second) so that each runs in seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import (
    AsyncAutocalls,
    HostRateLimiter,
    InvalidRequestError,
    LimiterUnavailableError,
    LocalRateLimiter,
    RateLimit,
)
from autocalls_async import _hoststore as hoststore
from autocalls_async._identity import limiter_key
from autocalls_async._schedule import MAX_PAUSE, TokenState
from autocalls_async._stores import HostStore
from autocalls_async.testing import MockAutocalls

from ._env import child_env
from .hosts import require_namespaces, require_users

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
RATE = RateLimit(5, 1.0)
JITTER = 0.003  # the rolling window, as the server dates requests
#: Two schedules would put starts ~0 s apart; one keeps them 0.2 s apart, dated at our write.
#: The server dates them later by a loaded machine's scheduling noise (2-core CI, helpers).
GAP_JITTER = 0.03
KEY = "k" * 64


@pytest.fixture
async def strict() -> AsyncIterator[MockAutocalls]:
    async with MockAutocalls(rate_limit=(5, 1.0), assistants=(123,)) as server:
        yield server


def check_arrivals(times: list[float], rate: RateLimit = RATE) -> None:
    times = sorted(times)
    for first, last in zip(times, times[rate.requests :], strict=False):
        assert last - first >= rate.period - JITTER, (first, last)
    if rate.bursts > 1:
        return  # the window is the schedule; two schedules would show as 6+ in one
    spacing = rate.period / rate.requests
    for a, b in itertools.pairwise(times):
        assert b - a >= spacing - GAP_JITTER, (a, b)


def default_env(**extra: str) -> dict[str, str]:
    """A child's environment without AUTOCALLS_LIMITER_DIR: the real default location."""
    env = child_env(**extra)
    env.pop("AUTOCALLS_LIMITER_DIR")
    return env


# A process of a deployment: N concurrent calls on one token once told to go. It drops to
# another OS user (after its imports: the interpreter lives in a directory only root may read)
# when asked, as a service that starts as root and drops its privileges does.
CHILD = r"""
import asyncio, json, logging, os, sys
import aiohttp, sqlite3
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from autocalls_async import AsyncAutocalls, HostRateLimiter, RateLimit, LocalRateLimiter
import autocalls_async._hoststore, autocalls_async._identity, autocalls_async._redis

spec = json.loads(sys.argv[1])

async def main():
    # A 10 % margin: at 5 per second the default 2 % leaves 2 ms between our write and the
    # server dating it, less than a loaded 2-core machine may take (as in test_deployments).
    rate = RateLimit(*spec.get("rate", [5, 1.0]), margin=0.1)
    limiter = None
    if spec.get("path"):
        limiter = HostRateLimiter(spec["path"], rate_limit=rate, group=spec.get("group"))
    elif spec.get("local"):
        limiter = LocalRateLimiter(rate)
    async with AsyncAutocalls(spec["token"], base_url=spec["base_url"], rate_limit=rate,
                              limiter=limiter, max_retries=0) as client:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def one(i):
            try:
                await client.generate_reply(
                    assistant_id=123, customer_identifier=f"{spec['name']}-{i}", message="Hi")
                return "ok"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        results = await asyncio.gather(*(one(i) for i in range(spec["calls"])))
        if spec.get("again_after"):
            await asyncio.sleep(spec["again_after"])
            results.append(await one(spec["calls"]))
        where = getattr(client._limiter, "path", None)
        print(json.dumps({"results": results, "path": where, "pid": os.getpid(),
                          "uid": os.getuid()}), flush=True)
        if spec.get("hold"):
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if limiter is not None:
        await limiter.aclose()

if "uid" in spec:
    os.setgroups(spec.get("groups", []))
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
asyncio.run(main())
"""


class Child:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.result: dict[str, Any] | None = None

    async def ready(self) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if line.strip() != b"ready":
            err = b""
            if self.process.stderr is not None:
                err = await asyncio.wait_for(self.process.stderr.read(), 30)
            raise AssertionError((line, err.decode(errors="replace")))

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")

    async def answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 90)
        if not line:
            err = await self.stderr()
            raise AssertionError(err)
        self.result = json.loads(line)
        return self.result

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await asyncio.wait_for(self.process.stderr.read(), 30)).decode(errors="replace")

    async def finish(self) -> str:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.write(b"done\n")
            self.process.stdin.close()
        out, err = await asyncio.wait_for(self.process.communicate(), 60)
        assert self.process.returncode == 0, err.decode(errors="replace")
        return err.decode(errors="replace")


async def spawn(
    spec: dict[str, Any], env: dict[str, str], wrapper: list[str] | None = None
) -> Child:
    argv = [*(wrapper or []), sys.executable, "-c", CHILD, json.dumps(spec)]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    return Child(process)


async def run_together(
    specs: list[tuple[dict[str, Any], dict[str, str], list[str] | None]],
) -> list[dict[str, Any]]:
    children = [await spawn(spec, env, wrapper) for spec, env, wrapper in specs]
    try:
        for child in children:
            await child.ready()
        for child in children:
            child.go()
        answers = [await child.answer() for child in children]
        for child, answer in zip(children, answers, strict=True):
            answer["stderr"] = await child.finish()
    finally:
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
    return answers


def new_token() -> str:
    return f"host-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------- one place per user


@pytest.mark.timing
async def test_processes_of_one_user_share_whatever_their_environment(
    strict: MockAutocalls, tmp_path: Path
) -> None:
    """Four processes of one user with the default limiter and different environments: a login
    shell (XDG_RUNTIME_DIR, HOME), a cron job (neither), TMPDIR=/var/tmp, and a systemd unit
    with PrivateTmp= (a private /tmp in its own mount namespace). One schedule: 0 x 429."""
    unshare = require_namespaces("--mount")
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    token = new_token()
    base = {"token": token, "base_url": strict.base_url, "calls": 5}
    # A private /tmp hides what lives there: the checkout too, when it was cloned under /tmp
    # (its interpreter, its coverage file). Those are bound back into the new /tmp.
    keep = str(ROOT) if str(ROOT).startswith("/tmp/") else ""
    private_tmp = [
        unshare, "--mount", "--fork", "sh", "-c",
        'mount --bind /tmp /mnt && mount -t tmpfs tmpfs /tmp && '
        'if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && mount --bind "/mnt${KEEP#/tmp}" "$KEEP"; '
        'fi && exec "$@"',
        "sh",
    ]  # fmt: skip
    answers = await run_together(
        [
            (
                {**base, "name": "shell"},
                default_env(XDG_RUNTIME_DIR=str(runtime), HOME="/root"),
                None,
            ),
            (
                {**base, "name": "cron"},
                {k: v for k, v in default_env().items() if k not in ("XDG_RUNTIME_DIR", "HOME")},
                None,
            ),
            ({**base, "name": "tmpdir"}, default_env(TMPDIR="/var/tmp", HOME="/nonexistent"), None),
            ({**base, "name": "private"}, default_env(KEEP=keep), private_tmp),
        ]
    )
    arrivals = [round(record.time, 4) for record in strict.requests]
    for answer in answers:
        assert answer["results"] == ["ok"] * 5, (answer, answers, arrivals)
    assert len({answer["path"] for answer in answers}) == 1, answers
    assert answers[0]["path"].startswith(str(hoststore._shared_base())), answers
    assert strict.count(status=429) == 0
    check_arrivals([record.time for record in strict.requests])


def test_the_default_place_depends_only_on_the_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOCALLS_LIMITER_DIR")
    expected = hoststore._shared_base() / f"autocalls-async-{os.getuid()}"
    for name, value in (("XDG_RUNTIME_DIR", "/run/user/0"), ("TMPDIR", "/var/tmp"), ("HOME", "/x")):
        monkeypatch.setenv(name, value)
        assert hoststore.default_host_directory() == expected
    monkeypatch.setenv("AUTOCALLS_LIMITER_DIR", "/some/where")
    assert hoststore.default_host_directory() == Path("/some/where")


# ---------------------------------------------------------------------- safe from other users


def test_a_name_another_user_took_is_passed_over_the_same_way_by_every_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another user created the user's directory first, or a link there: the next free name is
    used, by every process alike (a later removal of the squatter's changes nothing), and the
    link's target is never touched."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    (users, _), uid = require_users(), os.getuid()
    other = users[0]
    base = tmp_path / "shm"
    base.mkdir()
    base.chmod(0o1777)
    squatted = base / f"autocalls-async-{uid}"
    squatted.mkdir()
    os.chown(squatted, other.uid, other.gid)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (base / f"autocalls-async-{uid}.1").symlink_to(victim)
    path, fd = hoststore._claim_default(base)
    os.close(fd)
    assert path == base / f"autocalls-async-{uid}.2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert "belongs to another user" in caplog.text
    squatted.rmdir()  # the squatter leaves: processes started later still meet the others
    again, fd = hoststore._claim_default(base)
    os.close(fd)
    assert again == path
    assert victim.read_text() == "precious"


def test_every_name_taken_is_a_clear_error(tmp_path: Path) -> None:
    (users, _), uid = require_users(), os.getuid()
    base = tmp_path / "shm"
    base.mkdir()
    base.chmod(0o1777)
    for n in range(hoststore._CANDIDATES):
        name = f"autocalls-async-{uid}" + (f".{n}" if n else "")
        (base / name).mkdir()
        os.chown(base / name, users[0].uid, users[0].gid)
    with pytest.raises(hoststore._Refused, match="taken by another user"):
        hoststore._claim_default(base)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)  # writable by all and not sticky: others could replace ours
    with pytest.raises(hoststore._Refused, match="not sticky"):
        hoststore._claim_default(loose)


async def test_links_and_foreign_files_are_never_followed_or_written(tmp_path: Path) -> None:
    """A link in place of the directory or of the database, a database another user owns, or
    one open to others: refused before anything is written; the link's target is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    store = HostStore(linked_dir)
    with pytest.raises(LimiterUnavailableError, match="link or not a directory"):
        store.try_update(KEY, lambda state, now: None)
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (planted / hoststore.DB_NAME).symlink_to(victim)
    with pytest.raises(LimiterUnavailableError, match="cannot open"):
        HostStore(planted).try_update(KEY, lambda state, now: None)
    assert victim.read_text() == "precious"
    open_db = tmp_path / "open"
    open_db.mkdir(mode=0o700)
    (open_db / hoststore.DB_NAME).write_bytes(b"x")
    (open_db / hoststore.DB_NAME).chmod(0o644)
    with pytest.raises(LimiterUnavailableError, match="open to group or others"):
        HostStore(open_db).try_update(KEY, lambda state, now: None)
    hard = tmp_path / "hard"
    hard.mkdir(mode=0o700)
    os.link(victim, hard / hoststore.DB_NAME)
    victim.chmod(0o600)
    with pytest.raises(LimiterUnavailableError, match="one link"):
        HostStore(hard).try_update(KEY, lambda state, now: None)
    assert victim.read_text() == "precious"


async def test_the_database_is_private_and_names_are_keyed(tmp_path: Path) -> None:
    """Mode 0700 and 0600 whatever the umask; tokens are stored under an HMAC whose random
    key is in the database: nothing stored lets anyone check a guess of the token."""
    token = "secret-token-value-for-a-test-1234567890"
    old = os.umask(0o000)
    try:
        async with (
            HostRateLimiter(tmp_path / "store", rate_limit=RATE) as limiter,
            limiter.slot(limiter_key(token)) as slot,
        ):
            slot.sent()
    finally:
        os.umask(old)
    directory = tmp_path / "store"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / hoststore.DB_NAME).stat().st_mode) == 0o600
    with sqlite3.connect(directory / hoststore.DB_NAME) as connection:
        names = [row[0] for row in connection.execute("SELECT name FROM tokens")]
        key = connection.execute("SELECT value FROM meta WHERE name='key'").fetchone()[0]
    connection.close()
    plain = hashlib.sha256(token.encode()).hexdigest()
    assert names and all(plain[:16] not in name and limiter_key(token) != name for name in names)
    assert len(bytes.fromhex(key)) == 32


def test_token_ids_are_keyed_and_the_same_in_every_process(tmp_path: Path) -> None:
    """token_id in logs and repr: not the token's plain SHA-256; equal across processes of the
    user (one key in the user's one place), whatever AUTOCALLS_LIMITER_DIR says, so that their
    warnings can be matched."""
    token = "a-token-for-ids-0123456789"
    client = AsyncAutocalls(token, base_url="http://127.0.0.1:9/api")
    here = client.token_id
    asyncio.run(client.close())
    assert here not in hashlib.sha256(token.encode()).hexdigest()
    program = (
        "import sys; from autocalls_async import AsyncAutocalls as A; "
        "print(A(sys.argv[1], base_url='http://127.0.0.1:9/api').token_id)"
    )

    def shown(env: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", program, token],
            capture_output=True, text=True, env=env, check=True, timeout=60,
        )  # fmt: skip
        return done.stdout.strip()

    assert shown(child_env()) == here
    assert shown(child_env(AUTOCALLS_LIMITER_DIR=str(tmp_path))) == here


# ---------------------------------------------------------------------- never a silent second schedule


def test_an_unreadable_state_costs_one_period_of_caution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, a wrong shape, non-finite times: a WARNING and one period before the token's
    next start, never a fresh schedule."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    clock = [100.0]
    store = HostStore(tmp_path, clock=lambda: clock[0])
    rules = __import__("autocalls_async._schedule", fromlist=["Rules"]).Rules.of(RATE, lease=1.0)
    from autocalls_async import _schedule as schedule

    def due() -> float:
        def read(state: TokenState, now: float) -> float:
            schedule.pause(state, now, rules, seconds=0.0)  # settles: applies the caution
            return state.due

        done, value = store.try_update(KEY, read)
        assert done
        return value  # type: ignore[return-value]

    store.try_update(KEY, lambda state, now: setattr(state, "due", 100.5))
    assert due() == 100.5
    database = tmp_path / hoststore.DB_NAME
    for garbage in (
        "{not json",
        '{"due": "x"}',
        "[]",
        '{"due": Infinity}',
        '{"users": {"a": [1]}}',
        '{"queued": {"a": [[1, 2], null, 3]}}',
        "1" * 2_000_000,
    ):
        with sqlite3.connect(database, isolation_level=None) as connection:
            connection.execute("UPDATE tokens SET state = ?", (garbage,))
        connection.close()
        clock[0] += 0.01
        assert due() == pytest.approx(clock[0] + RATE.period * (1 + RATE.margin)), garbage
        store.try_update(KEY, lambda state, now: setattr(state, "due", now + 0.5))
    warnings = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warnings) == 1
    asyncio.run(store.aclose())


def test_forged_times_cannot_stall_a_token_for_good(tmp_path: Path) -> None:
    """A state someone wrote with times far ahead (pause, due, a queue report, a user with
    another rate): each is bounded by what this schedule could have written."""
    from autocalls_async import _schedule as schedule

    clock = [1000.0]
    store = HostStore(tmp_path, clock=lambda: clock[0])
    rules = schedule.Rules.of(RATE, lease=1.0)
    far = 1e12
    forged = {
        "due": far,
        "pause": far,
        "last": far,
        "holder": "x",
        "lease": far,
        "records": [[far, 5]],
        "clear": far,
        "users": {"ghost:1:2:3:4": [1, 9.0, 0.02, 1, "nowhere", far]},
        "queued": {"ghost:1:2:3:4": [[100, 0.0, 0.0, 0.0], None, far]},
    }
    store.try_update(KEY, lambda state, now: setattr(state, "due", now + 1))
    with sqlite3.connect(tmp_path / hoststore.DB_NAME, isolation_level=None) as connection:
        connection.execute("UPDATE tokens SET state = ?", (json.dumps(forged),))
    connection.close()

    def ask(state: TokenState, now: float) -> schedule.Grant:
        return schedule.grant(
            state,
            now,
            rules,
            who="me",
            where="here",
            ticket="t",
            lanes=(schedule.Lane(1, now, now, now), None),
        )

    with pytest.raises(schedule.RateConflict):
        store.try_update(KEY, ask)  # the forged user stands until its bounded expiry...
    horizon = MAX_PAUSE + 2 * schedule.MAX_LEASE + 2 * RATE.period * 1.02 + 3 * 60 + 10
    clock[0] += horizon
    done, answer = store.try_update(KEY, ask)
    assert done and answer is not None and answer.granted, answer  # ...and then it is gone
    asyncio.run(store.aclose())


def test_a_store_written_by_another_running_kernel_is_refused(tmp_path: Path) -> None:
    """A volume two machines share: a row or a boot record from another boot id written since
    this kernel booted is refused, naming Redis; one from before this boot (a reboot) is not."""
    store = HostStore(tmp_path)
    store.try_update(KEY, lambda state, now: setattr(state, "due", now + 30))
    database = tmp_path / hoststore.DB_NAME
    with sqlite3.connect(database, isolation_level=None) as connection:
        connection.execute("UPDATE tokens SET boot = 'before-a-reboot', written = 0")
    connection.close()
    done, due = store.try_update(KEY, lambda state, now: state.due)
    assert done and due == -float("inf")  # a reboot: its monotonic times mean nothing now
    store.try_update(KEY, lambda state, now: setattr(state, "due", now + 30))
    with sqlite3.connect(database, isolation_level=None) as connection:
        connection.execute(
            "UPDATE tokens SET boot = 'another-machine', written = ?", (__import__("time").time(),)
        )
    connection.close()
    with pytest.raises(LimiterUnavailableError, match="another running kernel"):
        store.try_update(KEY, lambda state, now: None)
    asyncio.run(store.aclose())


def test_a_second_kernel_on_one_volume_is_refused(tmp_path: Path) -> None:
    """A process that sees another boot id (its own /proc/sys/kernel/random/boot_id, bound in
    a mount namespace, as a second machine or VM would have) opens a store this kernel uses:
    refused, with the fix."""
    unshare = require_namespaces("--mount")
    directory = tmp_path / "volume"
    store = HostStore(directory)
    store.try_update(KEY, lambda state, now: setattr(state, "due", now + 30))
    fake = tmp_path / "boot_id"
    fake.write_text(str(uuid.uuid4()) + "\n")
    program = (
        "import sys; from autocalls_async._stores import HostStore\n"
        "from autocalls_async import LimiterUnavailableError\n"
        "try:\n    HostStore(sys.argv[1]).try_update('k' * 64, lambda s, n: None)\n"
        "except LimiterUnavailableError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [
            unshare,
            "--mount",
            "--fork",
            "sh",
            "-c",
            'mount --bind "$1" /proc/sys/kernel/random/boot_id && exec "$2" -c "$3" "$4"',
            "sh",
            str(fake),
            sys.executable,
            program,
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "another running kernel" in result.stdout and "RedisRateLimiter" in result.stdout
    asyncio.run(store.aclose())


def test_shared_file_systems_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system is read from /proc/self/mountinfo by device number. No NFS server can
    run here: the real mount's type is checked, and the refusal through the list of types."""
    info = os.stat(tmp_path)
    fs_type = hoststore._file_system(info.st_dev)
    assert fs_type is not None and not hoststore._shared(fs_type)
    for kind in ("nfs4", "cifs", "9p", "virtiofs", "fuse.sshfs", "fuse"):
        assert hoststore._shared(kind)
    monkeypatch.setattr(hoststore, "SHARED_FILE_SYSTEMS", frozenset({fs_type}))
    with pytest.raises(LimiterUnavailableError, match=f"on a {fs_type} file system.*Redis"):
        HostStore(tmp_path / "nfs").try_update(KEY, lambda state, now: None)


async def test_a_deleted_database_is_noticed_and_joined_again(tmp_path: Path) -> None:
    """logind's RemoveIPC or a tmp cleaner removes the directory under a running process:
    it opens the new database the next process creates, instead of keeping the old one."""
    import shutil

    directory = tmp_path / "store"
    veteran = HostStore(directory)
    veteran.try_update(KEY, lambda state, now: setattr(state, "due", now + 30))
    shutil.rmtree(directory)
    newcomer = HostStore(directory)
    newcomer.try_update(KEY, lambda state, now: setattr(state, "due", now + 60))
    done, due = veteran.try_update(KEY, lambda state, now: state.due)
    done2, due2 = newcomer.try_update(KEY, lambda state, now: state.due)
    assert done and done2 and due == due2
    await veteran.aclose()
    await newcomer.aclose()


@pytest.mark.serial
async def test_two_schedules_for_one_token_are_said(
    strict: MockAutocalls, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The default client and a LocalRateLimiter on one token, in one process and across
    processes: a WARNING naming both places, in each process."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    token = new_token()
    async with (
        AsyncAutocalls(token, base_url=strict.base_url, rate_limit=RATE) as default,
        AsyncAutocalls(token, base_url=strict.base_url, limiter=LocalRateLimiter(RATE)) as local,
    ):
        await default.generate_reply(assistant_id=123, customer_identifier="a", message="x")
        await local.generate_reply(assistant_id=123, customer_identifier="b", message="x")
    said = [r.getMessage() for r in caplog.records if "two rate-limit schedules" in r.getMessage()]
    assert len(said) == 1, said
    assert "LocalRateLimiter" in said[0] or "process" in said[0]
    assert "host store" in said[0] and default.token_id in said[0]
    caplog.clear()
    # Across processes: a LocalRateLimiter in a child, the default client here.
    token = new_token()
    child = await spawn(
        {
            "token": token,
            "base_url": strict.base_url,
            "calls": 1,
            "name": "c",
            "local": True,
            "hold": True,
        },
        child_env(AUTOCALLS_LOG="WARNING"),
    )
    await child.ready()
    child.go()
    await child.answer()
    async with AsyncAutocalls(token, base_url=strict.base_url, rate_limit=RATE) as client:
        await client.generate_reply(assistant_id=123, customer_identifier="p", message="x")
    await child.finish()
    said = [r.getMessage() for r in caplog.records if "two rate-limit schedules" in r.getMessage()]
    assert len(said) == 1 and f"pid {child.process.pid}" in said[0], said


async def test_autocalls_redis_url_makes_the_default_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autocalls_async._ratelimit import default_limiter

    monkeypatch.setenv("AUTOCALLS_REDIS_URL", "redis://127.0.0.1:1/0")
    limiter = default_limiter(RATE)
    assert limiter.kind == "redis"
    await limiter.aclose()
    client = AsyncAutocalls("t", base_url="http://127.0.0.1:9/api", rate_limit=RATE)
    assert client._limiter is not None and client._limiter.kind == "redis"  # type: ignore[attr-defined]
    await client.close()


# ---------------------------------------------------------------------- kernels' namespaces


@pytest.mark.timing
async def test_a_process_in_a_time_namespace_keeps_one_schedule(
    strict: MockAutocalls, tmp_path: Path
) -> None:
    """A process whose monotonic clock is offset (a time namespace, as after a CRIU restore)
    shares the schedule with one that is not: the store reads the host's clock in both."""
    unshare = require_namespaces("--time")
    token = new_token()
    base = {"token": token, "base_url": strict.base_url, "calls": 6}
    answers = await run_together(
        [
            ({**base, "name": "plain"}, child_env(), None),
            (
                {**base, "name": "restored"},
                child_env(),
                [unshare, "--time", "--monotonic", "100000", "--fork"],
            ),
        ]
    )
    for answer in answers:
        assert answer["results"] == ["ok"] * 6, answer
    assert strict.count(status=429) == 0
    check_arrivals([record.time for record in strict.requests])


async def test_a_live_process_in_another_pid_namespace_is_not_taken_for_dead(
    strict: MockAutocalls,
) -> None:
    """A process in another pid namespace (a container with --network host: the same host
    name) uses the token at 5/1s; a process here asks for 10/1s. Its registration is not probed
    with a pid of the wrong namespace (and deleted): the rate conflict is seen and refused."""
    unshare = require_namespaces("--pid", "--mount-proc")
    token = new_token()
    # Its pid in its namespace is 400001: a number no process of the host's namespace has.
    wrapper = [
        unshare,
        "--pid",
        "--mount-proc",
        "--fork",
        "sh",
        "-c",
        'echo 400000 > /proc/sys/kernel/ns_last_pid; "$@"',
        "sh",
    ]
    child = await spawn(
        {"token": token, "base_url": strict.base_url, "calls": 1, "name": "ns", "hold": True},
        child_env(),
        wrapper,
    )
    await child.ready()
    child.go()
    answer = await child.answer()
    assert answer["pid"] == 400001 and answer["results"] == ["ok"]
    async with AsyncAutocalls(
        token, base_url=strict.base_url, rate_limit=RateLimit(10, 1.0)
    ) as client:
        with pytest.raises(InvalidRequestError, match="already limited to 5/1s"):
            await client.generate_reply(assistant_id=123, customer_identifier="h", message="x")
    await child.finish()


# ---------------------------------------------------------------------- two OS users, one token


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory other users can reach (pytest's own are closed to them)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="autocalls-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timing
async def test_two_os_users_share_one_token_through_a_group_directory(
    strict: MockAutocalls, outside: Path
) -> None:
    """A web app as one user and a cron job as another, one token: HostRateLimiter(path,
    group=...) on a directory of their group, mode 2770. One schedule: 0 x 429."""
    (users, gid) = require_users()
    shared = outside / "shared"
    shared.mkdir()
    os.chown(shared, 0, gid)
    shared.chmod(0o2770)
    token = new_token()
    base = {
        "token": token,
        "base_url": strict.base_url,
        "calls": 5,
        "path": str(shared),
        "group": gid,
    }
    specs = [
        (
            {**base, "name": user.name, "uid": user.uid, "gid": user.gid, "groups": [gid]},
            child_env(),
            None,
        )
        for user in users[:2]
    ]
    answers = await run_together(specs)
    for answer in answers:
        assert answer["results"] == ["ok"] * 5, answer
    assert {answer["uid"] for answer in answers} == {users[0].uid, users[1].uid}
    assert strict.count(status=429) == 0
    check_arrivals([record.time for record in strict.requests])
    database = shared / hoststore.DB_NAME
    info = database.stat()
    assert info.st_gid == gid and stat.S_IMODE(info.st_mode) == 0o660
    # A user outside the group is refused by the kernel, with a clear error, nothing sent.
    outsider = {**base, "name": "outsider", "uid": users[2].uid, "gid": users[2].gid, "calls": 1}
    child = await spawn(outsider, child_env())
    out, err = await asyncio.wait_for(child.process.communicate(), 60)
    assert child.process.returncode != 0
    assert "not a member of group" in err.decode(), err.decode()


GROUP_MEMBER = r"""
import json, os, sys
from autocalls_async import _hoststore
from autocalls_async._stores import HostStore
path, gid, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
connect = _hoststore._Database._connect
def told(self):
    try:
        return connect(self)
    except Exception as exc:
        print(json.dumps(["refused", str(exc)]), flush=True)
        raise
_hoststore._Database._connect = told
print(json.dumps(["done", HostStore(path, group=gid).try_update("k" * 64, lambda s, n: "written")]))
"""


@pytest.mark.timing  # the member retries for 2 s: the test must answer within them
async def test_a_members_shm_file_not_yet_0660_is_waited_for(outside: Path) -> None:
    """Two members of the group open a new store at once: the one that finds the other's
    -shm file before SQLite gave it mode 0660 (it makes it with the umask first) opened it
    read-only, and failed with "attempt to write a readonly database" (under load, a few
    starts in a hundred). It tries again, as for a file it cannot open, until the mode is
    right."""
    (users, gid) = require_users()
    shared = outside / "shared"
    shared.mkdir()
    os.chown(shared, 0, gid)
    shared.chmod(0o2770)
    shm = shared / (hoststore.DB_NAME + "-shm")
    shm.touch()  # the first member's, as SQLite has just made it
    os.chown(shm, users[0].uid, gid)
    shm.chmod(0o640)
    member = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", GROUP_MEMBER, str(shared), str(gid), str(users[1].uid)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    assert member.stdout is not None
    said = json.loads(await asyncio.wait_for(member.stdout.readline(), 60))
    assert said[0] == "refused" and "readonly" in said[1], said  # it met the file read-only
    shm.chmod(0o660)  # and the first member's SQLite now gives it its mode
    out, err = await asyncio.wait_for(member.communicate(), 60)
    assert member.returncode == 0, err.decode()
    assert json.loads(out.decode().splitlines()[-1]) == ["done", [True, "written"]]


async def test_a_group_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    (_, gid) = require_users()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 0, gid)
    shared.chmod(0o2775)
    async with HostRateLimiter(shared, rate_limit=RATE, group=gid) as limiter:
        with pytest.raises(LimiterUnavailableError, match="closed to others.*chmod 2770"):
            async with limiter.slot(KEY):
                pytest.fail("must not be granted")
    with pytest.raises(ValueError, match="give its path"):
        HostRateLimiter(rate_limit=RATE, group=gid)
    with pytest.raises(ValueError, match="no such group"):
        HostRateLimiter(shared, rate_limit=RATE, group="no-such-group-here")


# ---------------------------------------------------------------------- a full disk


FULL_DISK = r"""
import asyncio, json, os, sys, threading, time
from autocalls_async import AsyncAutocalls, HostRateLimiter, LimiterUnavailableError, RateLimit
from autocalls_async._stores import HostStore

directory, base_url, token = sys.argv[1:4]
store = HostStore(directory)
store.try_update("k" * 64, lambda state, now: setattr(state, "due", now + 1000.0))
before = store.try_update("k" * 64, lambda state, now: state.due)[1]
# Fill the file system, then add tokens until a write fails for want of space.
filler = os.open(os.path.join(directory, "..", "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
try:
    while True:
        os.write(filler, b"x" * 512)
except OSError:
    pass
failed = None
for n in range(100000):
    try:
        store.try_update(f"{n:064d}", lambda state, now: setattr(state, "due", now + 1000.0))
    except LimiterUnavailableError as exc:
        failed = str(exc)
        break
after = store.try_update("k" * 64, lambda state, now: state.due)[1]
# 30 limiter instances in a thread pool, asyncio.run per call, while the disk is full.
results = []
def one(n):
    async def call():
        async with AsyncAutocalls(token, base_url=base_url, rate_limit=RateLimit(5, 1.0)) as c:
            await c.generate_reply(assistant_id=123, customer_identifier=f"t{n}", message="x")
    try:
        asyncio.run(call())
        results.append("ok")
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
threads = [threading.Thread(target=one, args=(n,)) for n in range(12)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"failed": failed, "before": before, "after": after, "results": results}))
"""


@pytest.mark.timing
async def test_a_full_disk_keeps_the_schedule_and_never_resets_it(
    strict: MockAutocalls, tmp_path: Path
) -> None:
    """A 1 MiB tmpfs filled to the last byte: a write that needs space fails as a whole with
    a clear error (the committed schedule is intact, never reset), and clients sharing the
    token in a thread pool keep the limit (one WARNING: they go on in this process)."""
    unshare = require_namespaces("--mount")
    mount = tmp_path / "small"
    mount.mkdir()
    directory = mount / "store"
    process = await asyncio.create_subprocess_exec(
        unshare,
        "--mount",
        "--fork",
        "sh",
        "-c",
        'mount -t tmpfs -o size=1m tmpfs "$1" && export AUTOCALLS_LIMITER_DIR="$2" && shift 2 && exec "$@"',
        "sh",
        str(mount),
        str(directory),
        sys.executable,
        "-c",
        FULL_DISK,
        str(directory),
        strict.base_url,
        new_token(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    answer = json.loads(out)
    assert answer["failed"] and "full" in answer["failed"], answer
    assert answer["before"] == answer["after"]
    assert answer["results"] == ["ok"] * 12, answer
    assert strict.count(status=429) == 0
    check_arrivals([record.time for record in strict.requests])
    # Said once, not once per client: what it means and what to do.
    assert stderr.count("rate limiter (host) unavailable") == 1, stderr
    assert "file system is full" in stderr and "free some space" in stderr


# ---------------------------------------------------------------------- resources


def test_descriptors_stay_bounded_with_many_tokens_clients_and_limiters(tmp_path: Path) -> None:
    """10,000 tokens and 300 limiters never closed: a handful of descriptors for the store,
    and rows deleted once idle."""
    program = r"""
import asyncio, gc, os, sys
from autocalls_async import HostRateLimiter, RateLimit
from autocalls_async._stores import HostStore

def fds():
    return len(os.listdir("/proc/self/fd"))

async def main():
    start = fds()
    limiters = []
    for n in range(300):
        limiter = HostRateLimiter(rate_limit=RateLimit(5, 1.0))
        async with limiter.slot(f"{n:064d}") as slot:
            slot.sent()
        limiters.append(limiter)  # never closed
    del limiters
    gc.collect()
    after_limiters = fds()
    store = HostStore(clock=None)
    for n in range(10_000):
        store.try_update(f"{n:064x}", lambda state, now: setattr(state, "due", now + 0.2))
    peak = fds()
    await asyncio.sleep(0.3)
    store._db.next_sweep = 0.0
    store.try_update("f" * 64, lambda state, now: None)
    rows = store._db.connection.execute("SELECT count(*) FROM tokens").fetchone()[0]
    print(start, after_limiters, peak, rows)

asyncio.run(main())
"""
    result = subprocess.run(
        ["sh", "-c", 'ulimit -n 256 && exec "$@"', "sh", sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=180,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    start, after_limiters, peak, rows = map(int, result.stdout.split())
    assert after_limiters - start <= 6, result.stdout
    assert peak - start <= 6, result.stdout
    assert rows == 300, result.stdout  # the unclosed limiters' registrations (60 s), no token
    assert "WARNING" not in result.stderr, result.stderr


def test_a_busy_database_is_waited_for_and_a_forked_child_opens_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the write lock: try_update says so without blocking; update()
    waits, warns once, and goes on when it is released. A forked child opens its own
    connection (SQLite forbids using a parent's)."""
    caplog.set_level(logging.WARNING, logger="autocalls_async")
    monkeypatch.setattr(hoststore, "LOCK_TIMEOUT", 0.05)
    store = HostStore(tmp_path, clock=None)
    assert store.try_update(KEY, lambda state, now: None) == (True, None)
    other = sqlite3.connect(
        tmp_path / hoststore.DB_NAME, isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")
    assert store.try_update(KEY, lambda state, now: None) == (False, None)
    threading.Timer(0.2, lambda: other.execute("COMMIT")).start()

    async def wait() -> Any:
        return await store.update(KEY, lambda state, now: "done")

    assert asyncio.run(wait()) == "done"
    other.close()
    assert "locked for over" in caplog.text
    parent_db = store._db
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            done, value = store.try_update(KEY, lambda state, now: "child")
            ok = done and value == "child" and store._db is not parent_db
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 2) == b"ok"
    os.close(read)
    os.waitpid(pid, 0)
    assert store.try_update(KEY, lambda state, now: "parent") == (True, "parent")
    asyncio.run(store.aclose())


# ---------------------------------------------------------------------- Redis by configuration


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Any]:
    from .redis_server import RedisServer, require_redis_server

    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


@pytest.mark.serial
async def test_a_redis_process_beside_the_host_store_is_said(
    strict: MockAutocalls, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis app and a default client on one token, on one host: a WARNING naming both."""
    from autocalls_async import RedisRateLimiter

    caplog.set_level(logging.WARNING, logger="autocalls_async")
    token = new_token()
    async with (
        RedisRateLimiter(redis_server.url, rate_limit=RATE, prefix="said:") as limiter,
        AsyncAutocalls(token, base_url=strict.base_url, limiter=limiter) as on_redis,
        AsyncAutocalls(token, base_url=strict.base_url, rate_limit=RATE) as on_host,
    ):
        await on_redis.generate_reply(assistant_id=123, customer_identifier="r", message="x")
        await on_host.generate_reply(assistant_id=123, customer_identifier="h", message="x")
    said = [r.getMessage() for r in caplog.records if "two rate-limit schedules" in r.getMessage()]
    assert len(said) == 1 and "Redis at" in said[0] and "host store" in said[0], said


async def test_redis_url_on_the_command_line_and_in_the_environment(
    strict: MockAutocalls, redis_server: Any
) -> None:
    """`reply --redis-url` and AUTOCALLS_REDIS_URL keep the token's schedule in that Redis;
    a URL that is not Redis's is a usage error before anything is sent."""
    import redis.asyncio as redis_asyncio

    inspector = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        await inspector.flushall()
        for how in ("flag", "env"):
            extra = {"AUTOCALLS_REDIS_URL": redis_server.url} if how == "env" else {}
            flag = ["--redis-url", redis_server.url] if how == "flag" else []
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "autocalls_async", "reply", *flag,
                "--assistant-id", "123", "--customer", f"+1415555{len(how)}", "Hi",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=child_env(AUTOCALLS_API_TOKEN=new_token(),
                              AUTOCALLS_BASE_URL=strict.base_url, **extra),
            )  # fmt: skip
            out, err = await asyncio.wait_for(child.communicate(), 60)
            assert child.returncode == 0, err.decode()
            keys = [key.decode() for key in await inspector.keys("*")]
            assert any(key.startswith("autocalls:rl:") for key in keys), keys
            await inspector.flushall()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "autocalls_async", "reply", "--redis-url", "http://x",
            "--assistant-id", "123", "--customer", "+14155550000", "Hi",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(AUTOCALLS_API_TOKEN="t-usage", AUTOCALLS_BASE_URL=strict.base_url),
        )  # fmt: skip
        out, err = await asyncio.wait_for(child.communicate(), 60)
        assert child.returncode == 2 and "--redis-url must start with redis://" in err.decode()
        assert len(strict.requests) == 2
    finally:
        await inspector.aclose()


# ---------------------------------------------------------------------- edges, one by one


@pytest.mark.timing
def test_the_facts_of_the_host_are_read_or_defaulted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc (not Linux, a sandbox): no boot id, no time offset, no file-system type;
    /tmp where there is no /dev/shm. With a time namespace's offsets: the host's clock."""
    import time

    real = Path.read_text

    def missing(self: Path, *args: Any, **kwargs: Any) -> str:
        if str(self).startswith("/proc"):
            raise FileNotFoundError(str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", missing)
    assert hoststore.boot_id() is None
    assert hoststore._timens_offset() == 0.0
    assert hoststore._file_system(os.stat("/").st_dev) is None
    assert hoststore.host_clock() is time.monotonic

    def offsets(self: Path, *args: Any, **kwargs: Any) -> str:
        if str(self) == "/proc/self/timens_offsets":
            return "monotonic     1000  500000000\nboottime  0  0\n"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", offsets)
    clock = hoststore.host_clock()
    assert abs(clock() - (time.monotonic() - 1000.5)) < 0.05
    monkeypatch.setattr(Path, "is_dir", lambda self: False)
    assert hoststore._shared_base() == Path("/tmp")
    assert not hoststore._shared(None)


def test_groups_are_checked(tmp_path: Path) -> None:
    (users, gid) = require_users()
    with pytest.raises(TypeError, match="group name or id"):
        hoststore._resolve_group(True)
    assert hoststore._resolve_group(gid) == gid
    assert hoststore._resolve_group("autocalls-test") == gid
    directory = tmp_path / "g"
    directory.mkdir()
    os.chown(directory, 0, gid)
    directory.chmod(0o2770)
    info = os.stat(directory)
    hoststore._check_directory(info, directory, gid)
    with pytest.raises(hoststore._Refused, match="must belong to group"):
        hoststore._check_directory(info, directory, os.getgid())
    database = directory / "db"
    database.write_bytes(b"")
    os.chown(database, 0, gid)
    database.chmod(0o660)
    hoststore._check_file(os.stat(database), database, gid)
    database.chmod(0o664)
    with pytest.raises(hoststore._Refused, match="closed to others"):
        hoststore._check_file(os.stat(database), database, gid)
    with pytest.raises(hoststore._Refused, match="not a directory"):
        hoststore._check_directory(os.stat(database), database, None)
    assert hoststore._group_name(2_000_000_000) == "2000000000"
    # A group directory is made with the group's mode when it does not exist yet.
    made = tmp_path / "made"
    fd = hoststore._open_directory(made, gid, create=True)
    os.close(fd)
    assert os.stat(made).st_gid == gid and stat.S_IMODE(os.stat(made).st_mode) == 0o2770


async def test_databases_that_cannot_be_used_are_said_clearly(tmp_path: Path) -> None:
    """A file where the directory should be, a database of another schema, a damaged one."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for path, match in ((a_file / "sub", "cannot create"), (a_file, "link or not a directory")):
        with pytest.raises(LimiterUnavailableError, match=match):
            HostStore(path).try_update(KEY, lambda state, now: None)
    newer = tmp_path / "newer"
    store = HostStore(newer)
    store.try_update(KEY, lambda state, now: None)
    await store.aclose()
    hoststore._close_all()
    with sqlite3.connect(newer / hoststore.DB_NAME, isolation_level=None) as connection:
        connection.execute("PRAGMA user_version=7")
    connection.close()
    with pytest.raises(LimiterUnavailableError, match="another version of autocalls-async"):
        HostStore(newer).try_update(KEY, lambda state, now: None)
    damaged = tmp_path / "damaged"
    damaged.mkdir(mode=0o700)
    (damaged / hoststore.DB_NAME).write_bytes(b"this is not a database" * 300)
    (damaged / hoststore.DB_NAME).chmod(0o600)
    with pytest.raises(LimiterUnavailableError, match="cannot use"):
        HostStore(damaged).try_update(KEY, lambda state, now: None)


def test_an_unusable_default_store_leaves_ids_and_notes_working(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Token ids use a key of the process's own, notes are skipped: nothing fails for it."""
    from autocalls_async import _identity

    blocked = tmp_path / "file"
    blocked.write_text("x")
    monkeypatch.setattr(hoststore, "_shared_base", lambda: blocked)
    monkeypatch.setattr(_identity, "_SECRETS", {})
    assert hoststore.user_secret() is None
    assert hoststore.note_schedule(KEY, "me", "here", 60.0) == []
    hoststore.forget_schedule([KEY], "me")
    first = _identity.token_id(KEY)
    assert first == _identity.token_id(KEY) and len(first) == 16


# ---------------------------------------------------------------------- found by the break round


@pytest.mark.serial
async def test_processes_with_and_without_autocalls_limiter_dir_are_said(
    strict: MockAutocalls, tmp_path: Path
) -> None:
    """AUTOCALLS_LIMITER_DIR in one process and not in the other: two schedules, and each
    process says so at its next call (their notes meet in the user's one place)."""
    from autocalls_async import _ratelimit

    token = new_token()
    again = _ratelimit._NOTE_RENEW + 0.5
    # Held open until both answered: a process that exited is no longer a schedule to name.
    base = {
        "token": token,
        "base_url": strict.base_url,
        "calls": 2,
        "again_after": again,
        "hold": True,
    }
    errs = []
    children = [
        await spawn({**base, "name": "set"}, child_env()),
        await spawn({**base, "name": "unset"}, default_env()),
    ]
    try:
        for child in children:
            await child.ready()
        for child in children:
            child.go()
        for child in children:
            await child.answer()
        errs = [await child.finish() for child in children]
    finally:
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
    for err in errs:
        assert err.count("two rate-limit schedules") == 1, errs


def test_a_relative_limiter_dir_is_refused_and_a_relative_path_is_made_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOCALLS_LIMITER_DIR", "limiter")
    with pytest.raises(LimiterUnavailableError, match="must be an absolute path"):
        HostStore().try_update(KEY, lambda state, now: None)
    monkeypatch.chdir(tmp_path)
    store = HostStore("relative")
    monkeypatch.chdir("/")
    assert store.try_update(KEY, lambda state, now: "ok") == (True, "ok")
    assert (tmp_path / "relative" / hoststore.DB_NAME).exists()
    asyncio.run(store.aclose())


def test_a_process_started_with_a_strict_umask_leaves_a_usable_directory(tmp_path: Path) -> None:
    """umask 0277 made the directory dr-x------ and the store unusable for every process."""
    base = tmp_path / "shm"
    base.mkdir()
    base.chmod(0o1777)
    old = os.umask(0o277)
    try:
        path, fd = hoststore._claim_default(base)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o500)  # left so by an earlier version: ours, made usable again
    again, fd = hoststore._claim_default(base)
    os.close(fd)
    assert again == path and stat.S_IMODE(path.stat().st_mode) == 0o700
    old = os.umask(0o277)
    try:
        fd = hoststore._open_directory(tmp_path / "explicit", None, create=True)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "explicit").stat().st_mode) == 0o700


def test_a_deleted_write_ahead_log_is_noticed(tmp_path: Path) -> None:
    """A cleaner removes limiter.db-wal and -shm under a running process: it opens the files
    the next process makes, instead of keeping the unlinked ones (no lock between the two)."""
    directory = tmp_path / "store"
    veteran = HostStore(directory)
    veteran.try_update(KEY, lambda state, now: setattr(state, "due", now + 30))
    for suffix in ("-wal", "-shm"):
        (directory / (hoststore.DB_NAME + suffix)).unlink()
    newcomer = HostStore(directory)
    newcomer.try_update(KEY, lambda state, now: setattr(state, "due", now + 60))
    done, due = veteran.try_update(KEY, lambda state, now: state.due)
    done2, due2 = newcomer.try_update(KEY, lambda state, now: state.due)
    assert done and done2 and due == due2
    asyncio.run(veteran.aclose())
    asyncio.run(newcomer.aclose())


def test_the_name_uses_the_hosts_uid_inside_a_user_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`unshare --user --map-root-user` run by uid 1001: the process sees uid 0 and a
    uid_map of "0 1001 1"; its directory is named with the host's uid, the one its other
    processes use. (A real one cannot run the interpreter here: it lives under /root.)"""
    assert hoststore._host_uid() == os.getuid()  # the host's own namespace: the identity
    real = Path.read_text

    def mapped(self: Path, *args: Any, **kwargs: Any) -> str:
        if str(self) == "/proc/self/uid_map":
            return "         0       1001          1\n"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", mapped)
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert hoststore._host_uid() == 1001
    assert hoststore.canonical_directory().name == "autocalls-async-1001"
    monkeypatch.setattr(os, "getuid", lambda: 5)  # not in the map: its own number
    assert hoststore._host_uid() == 5


@pytest.mark.timing
def test_the_process_that_made_a_time_namespace_keeps_the_hosts_clock(tmp_path: Path) -> None:
    """A process that called unshare(CLONE_NEWTIME) stays in its own namespace: the offsets
    /proc/self/timens_offsets shows are its children's, not its own."""
    require_namespaces("--time")
    program = (
        "import ctypes, os, time; from autocalls_async import _hoststore as h\n"
        "assert ctypes.CDLL(None, use_errno=True).unshare(0x80) == 0  # CLONE_NEWTIME\n"
        "open('/proc/self/timens_offsets', 'w').write('monotonic 1000 0')\n"
        "print(abs(h.host_clock()() - time.monotonic()) < 1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
        env=child_env(), check=False,
    )  # fmt: skip
    assert result.stdout.strip() == "True", result.stderr


def test_a_process_keeps_its_lock_on_the_database_while_it_uses_it(tmp_path: Path) -> None:
    """Another process that opens the store and closes it is never "the last connection":
    this one's lock on the database holds, so the -wal and -shm files in use are not deleted
    under it. (The store's own check of the file, on a descriptor closed after SQLite opened
    it, dropped SQLite's lock: the other process then deleted them, and the two kept two
    write-ahead indexes of one database, which split the schedule and damaged the file.)"""
    directory = tmp_path / "store"
    store = HostStore(directory)
    store.try_update(KEY, lambda state, now: setattr(state, "due", now + 30))
    assert store._db is not None
    files = dict(store._db.files)
    program = (
        "import sys; from autocalls_async._stores import HostStore; import asyncio\n"
        "s = HostStore(sys.argv[1])\n"
        "s.try_update('j' * 64, lambda state, now: setattr(state, 'due', now + 30))\n"
        "asyncio.run(s.aclose())\n"
        "from autocalls_async import _hoststore; _hoststore._close_all()\n"
    )
    for _ in range(3):
        subprocess.run(
            [sys.executable, "-c", program, str(directory)],
            check=True, timeout=60, env=child_env(),
        )  # fmt: skip
    for path, inode in files.items():
        info = os.stat(path)
        assert (info.st_dev, info.st_ino) == inode, path
    done, due = store.try_update("j" * 64, lambda state, now: state.due)
    assert done and due > 0  # the other processes' writes are seen: one database
    with sqlite3.connect(f"file:{directory / hoststore.DB_NAME}?mode=ro", uri=True) as check:
        assert check.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    check.close()
    asyncio.run(store.aclose())


FORKED = r"""
import os, sys, time, subprocess
from autocalls_async._stores import HostStore
directory, other = sys.argv[1], sys.argv[2]
store = HostStore(directory)
store.try_update("k" * 64, lambda state, now: setattr(state, "due", now + 30))
parent = os.getpid()
if os.fork():
    sys.exit(0)  # the parent exits normally: its connection is closed at exit
while os.getppid() == parent:  # until the parent is gone (the child is adopted)
    time.sleep(0.01)
store.try_update("k" * 64, lambda state, now: None)  # the child's own connection
files = dict(store._db.files)
for _ in range(3):  # other processes open, write and close the store
    subprocess.run([sys.executable, "-c", other, directory], check=True)
same = all((os.stat(p).st_dev, os.stat(p).st_ino) == i for p, i in files.items())
seen = store.try_update("j" * 64, lambda state, now: state.due)[1] > 0
print("ok" if same and seen else f"broken: files kept {same}, writes seen {seen}", flush=True)
"""


def test_a_forked_child_whose_parent_exits_keeps_one_database(tmp_path: Path) -> None:
    """A process uses the store, forks, and exits; its child goes on while other processes
    come and go. The child takes locks of its own (every connection is closed before a fork),
    so no other process deletes the files it uses: it sees their writes, one database."""
    directory = tmp_path / "store"
    other = (
        "import sys, asyncio; from autocalls_async._stores import HostStore\n"
        "s = HostStore(sys.argv[1])\n"
        "s.try_update('j' * 64, lambda state, now: setattr(state, 'due', now + 30))\n"
        "asyncio.run(s.aclose())\n"
        "from autocalls_async import _hoststore; _hoststore._close_all()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKED, str(directory), other],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    out, _ = parent.communicate(timeout=60)
    # The child outlives the parent: read its answer from the pipe it inherited.
    assert parent.returncode == 0
    assert out.strip() == "ok", out


# ---------------------------------------------------------------------- each failure, its words


def test_each_database_failure_says_what_to_do(tmp_path: Path) -> None:
    store = HostStore(tmp_path / "s")
    assert repr(store) == f"<HostStore {tmp_path / 's'}>"

    def failure(code: int) -> str:
        exc = sqlite3.OperationalError("boom")
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return str(store._failed(exc))

    assert "file system is full" in failure(sqlite3.SQLITE_FULL)
    assert "damaged" in failure(sqlite3.SQLITE_CORRUPT) and "remove" in failure(26)
    assert "read-only" in failure(sqlite3.SQLITE_READONLY)
    assert "its database failed: boom" in failure(sqlite3.SQLITE_IOERR)


def test_small_caches_and_a_store_retired_under_its_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remembered names and states are bounded; a database retired while a store holds
    it (its files deleted) answers "ask again", and the next ask opens the new one."""
    monkeypatch.setattr(hoststore, "_NAMES_KEPT", 2)
    monkeypatch.setattr(hoststore, "_STATES_KEPT", 2)
    store = HostStore(tmp_path / "s")
    for n in range(5):
        assert store.try_update(f"{n:064d}", lambda state, now: setattr(state, "due", now + 9))[0]
    db = store._db
    assert db is not None and len(db.names) <= 2 and len(db.states) <= 2
    db.closed = True
    assert store.try_update(KEY, lambda state, now: None) == (True, None)
    assert store._db is not db
    asyncio.run(store.aclose())


def test_a_database_replaced_by_another_file_is_noticed(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    store = HostStore(directory)
    store.try_update(KEY, lambda state, now: setattr(state, "due", now + 9))
    db = store._db
    assert db is not None and not db.deleted()
    copy = tmp_path / "copy"
    copy.write_bytes((directory / hoststore.DB_NAME).read_bytes())
    copy.chmod(0o600)
    os.replace(copy, directory / hoststore.DB_NAME)
    assert db.deleted()
    asyncio.run(store.aclose())


def test_a_database_made_by_hand_is_made_ready(tmp_path: Path) -> None:
    """An empty database (schema 0), or one without the key, is made ready under the write
    lock; an existing directory of ours is used as it is."""
    directory = tmp_path / "s"
    directory.mkdir(mode=0o700)
    with sqlite3.connect(directory / hoststore.DB_NAME, isolation_level=None) as made:
        made.execute("PRAGMA journal_mode=WAL")
        made.execute("CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        made.execute(f"PRAGMA user_version={hoststore._SCHEMA}")
    made.close()
    (directory / hoststore.DB_NAME).chmod(0o600)
    store = HostStore(directory)
    assert store.try_update(KEY, lambda state, now: "ready") == (True, "ready")
    asyncio.run(store.aclose())


def test_the_hosts_facts_when_proc_says_little(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.read_text

    def odd(self: Path, *args: Any, **kwargs: Any) -> str:
        if str(self) == "/proc/self/timens_offsets":
            return "boottime 5 0\n"
        if str(self) == "/proc/self/uid_map":
            raise PermissionError(str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", odd)
    assert hoststore._timens_offset() == 0.0
    assert hoststore._host_uid() == os.getuid()
    assert hoststore._file_system(os.makedev(4095, 4095)) is None


def test_a_group_the_process_is_not_in_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    (_, gid) = require_users()
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    monkeypatch.setattr(os, "getegid", lambda: 12345)
    monkeypatch.setattr(os, "getgroups", list)
    with pytest.raises(ValueError, match="not a member of group"):
        hoststore._resolve_group(gid)


def test_a_shared_directory_that_cannot_be_used(tmp_path: Path) -> None:
    """A base that does not exist; our own directory there open to others."""
    with pytest.raises(hoststore._Refused, match="cannot use"):
        hoststore._claim_default(tmp_path / "missing")
    base = tmp_path / "shm"
    base.mkdir()
    base.chmod(0o1777)
    ours = base / f"autocalls-async-{hoststore._host_uid()}"
    ours.mkdir()
    ours.chmod(0o777)
    with pytest.raises(hoststore._Refused, match="writable by others"):
        hoststore._claim_default(base)
