"""Real shapes of one host for the tests: Linux namespaces (mount, pid, time) made with
``unshare``, and real OS users made with ``useradd``. Skipped, with the reason, where the test
cannot make them (not root, no ``unshare``); a failure instead when ``AUTOCALLS_REQUIRE_HOSTS``
is set (CI, which runs as root)."""

from __future__ import annotations

import fcntl
import functools
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["TestUser", "require_namespaces", "require_users"]

REQUIRED = "AUTOCALLS_REQUIRE_HOSTS"


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRED):
        pytest.fail(f"{REQUIRED} is set but {reason}")
    pytest.skip(reason)


@functools.cache
def _unshare_works(flags: tuple[str, ...]) -> str | None:
    binary = shutil.which("unshare")
    if binary is None:
        return "unshare (util-linux) is not installed"
    try:
        result = subprocess.run(
            [binary, *flags, "--fork", "true"], capture_output=True, timeout=30, check=False
        )
    except OSError as exc:
        return f"unshare failed: {exc}"
    if result.returncode != 0:
        return f"unshare {' '.join(flags)} is not permitted here: {result.stderr.decode().strip()}"
    return None


def require_namespaces(*flags: str) -> str:
    """The path of ``unshare``, once ``unshare FLAGS --fork true`` works here."""
    reason = _unshare_works(tuple(flags))
    if reason is not None:
        _missing(reason)
    binary = shutil.which("unshare")
    assert binary is not None
    return binary


@dataclass(frozen=True)
class TestUser:
    name: str
    uid: int
    gid: int


GROUP = "autocalls-test"
USERS = ("autocalls-test1", "autocalls-test2", "autocalls-test3")


#: Held while the users are made: pytest-xdist's workers (and other checkouts' runs on this
#: host) may all ask at once, and a second ``groupadd`` of one name fails.
LOCK = Path(tempfile.gettempdir()) / "autocalls-async-test-users.lock"


def _add(command: list[str], exists: Callable[[], object]) -> None:
    """Run ``groupadd``/``useradd`` unless it exists; made meanwhile by someone else is fine."""
    try:
        exists()
        return
    except KeyError:
        pass
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    try:
        exists()
    except KeyError:
        raise subprocess.CalledProcessError(
            done.returncode, command, done.stdout, done.stderr
        ) from None


@functools.cache
def _make_users() -> tuple[tuple[TestUser, ...], int] | str:
    if os.geteuid() != 0:
        return "making OS users needs root"
    for tool in ("useradd", "groupadd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _add(["groupadd", "--system", GROUP], functools.partial(grp.getgrnam, GROUP))
        gid = grp.getgrnam(GROUP).gr_gid
        users = []
        for name in USERS:
            _add(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                functools.partial(pwd.getpwnam, name),
            )
            entry = pwd.getpwnam(name)
            users.append(TestUser(name, entry.pw_uid, entry.pw_gid))
    return tuple(users), gid


def require_users() -> tuple[tuple[TestUser, ...], int]:
    """Three real OS users, and a group (its gid) that the tests may add them to."""
    made = _make_users()
    if isinstance(made, str):
        _missing(made)
        raise AssertionError("unreachable")
    return made
