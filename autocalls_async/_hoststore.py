"""The host store: every process of this OS user (or of one group) on the host, in one SQLite
database.

SQLite carries what a home-made file format had to get right by hand: one writer at a time
(``BEGIN IMMEDIATE``), atomic commits (a full disk or a crash leaves the last committed state,
never half of one), one file and a handful of descriptors per process whatever the number of
tokens, rows deleted when idle. What stays ours is the schedule (``_schedule``) and the rules
of *where* the database is and *who* may use it:

* **One place per user.** ``AUTOCALLS_LIMITER_DIR`` if set; otherwise
  ``/dev/shm/autocalls-async-<uid>`` (``/tmp`` where there is no ``/dev/shm``). Nothing else
  from the environment: not ``XDG_RUNTIME_DIR``, ``TMPDIR`` or ``HOME``, and a private ``/tmp``
  (systemd's ``PrivateTmp=``) does not hide it. A name another user took first in that shared
  directory is passed over, in a fixed order, so every process of the user still finds one
  and the same directory.
* **Safe from other users.** The directory and the database are opened without following links
  and checked with ``fstat`` (type, owner, mode, link count) before anything is written: mode
  0700/0600, or, shared by a group on purpose (``HostRateLimiter(path, group=...)``), owned by
  that group and closed to others. Tokens are stored under a keyed hash (HMAC) whose random key
  lives in the database.
* **One kernel.** A database on a network or shared file system (NFS, SMB, FUSE, 9p, virtiofs,
  ...) is refused: each machine would keep a schedule of its own, and SQLite's locks do not
  hold there; so is a store written by another running kernel (another ``boot_id``). Use Redis
  to share a token between machines.
* **One clock.** The store's clock is the host's monotonic clock, read through the process's
  time namespace (``/proc/self/timens_offsets``), so a restored or namespaced process agrees
  with the others.
* **Never a silent second schedule.** A state that cannot be read costs one period of caution
  (``TokenState.suspect``) and a WARNING, never a fresh start; a database that cannot be used is
  a ``LimiterUnavailableError`` (the default client logs it and falls back, loudly); a database
  deleted under a running process (a tmp cleaner, logind's ``RemoveIPC``) is noticed and joined
  again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import grp
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from ._errors import LimiterUnavailableError
from ._log import logger
from ._schedule import RateConflict, TokenState

__all__ = [
    "DB_NAME",
    "DIRECTORY_HINT",
    "NOTHING_SENT",
    "HostStore",
    "boot_id",
    "default_host_directory",
    "host_clock",
    "note_schedule",
    "note_schedules",
    "forget_schedule",
    "user_secret",
]

T = TypeVar("T")
Update = Callable[[TokenState, float], T]
#: One item of a batch: (True, its result) or (False, the RateConflict it raised).
Outcome = tuple[bool, Any]

DB_NAME = "limiter.db"
#: Past this many seconds of a busy database, a WARNING says so (a stopped process?).
LOCK_TIMEOUT = 2.0
#: Names tried, in this order, in the shared directory before giving up (others took them).
_CANDIDATES = 8
_SCHEMA = 1
_SWEEP_EVERY = 30.0  # seconds between deletions of idle rows
_NAMES_KEPT = 100_000  # token -> row name, remembered (about 200 B each)
_STATES_KEPT = 10_000  # the decoded states of the tokens used last
_GROUP_PATIENCE = 2.0  # seconds a group member waits for another's new file to get its mode
_MAX_STATE = 1 << 20  # a row larger than this is not a state of ours: read with caution
#: How every message of a store that failed ends: the call failed before anything was sent.
NOTHING_SENT = "; nothing was sent"
#: What the host limiter's directory must be, and how to choose another.
DIRECTORY_HINT = (
    "set AUTOCALLS_LIMITER_DIR (or HostRateLimiter(path=...)) to a directory of your own: "
    "one that exists or can be created, owned by you and not writable by group or others "
    "(it is created with mode 0700), on a local file system"
)
#: File systems whose files other machines may share (or whose locks SQLite cannot trust).
SHARED_FILE_SYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "virtiofs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "afs",
        "ocfs2",
        "gfs2",
        "beegfs",
        "davfs",
        "sshfs",
    }
)


# ---------------------------------------------------------------------- the host's facts


def boot_id() -> str | None:
    """This kernel's boot id: another one writing the same store is another machine."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _timens_offset() -> float:
    """How far this process's monotonic clock is ahead of the host's (a time namespace).

    ``timens_offsets`` shows the namespace of the process's children: the same as its own,
    unless it called ``unshare(CLONE_NEWTIME)`` itself, which it then does not belong to."""
    try:
        if os.readlink("/proc/self/ns/time") != os.readlink("/proc/self/ns/time_for_children"):
            return 0.0
        text = Path("/proc/self/timens_offsets").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("monotonic", "1"):
            return int(parts[1]) + int(parts[2]) / 1e9
    return 0.0


def host_clock() -> Callable[[], float]:
    """The host's monotonic clock, as every process of the host reads it."""
    offset = _timens_offset()
    if not offset:
        return time.monotonic
    return lambda: time.monotonic() - offset


def _boot_started() -> float:
    """When this kernel booted, on the wall clock."""
    try:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return time.time() - time.monotonic()


def _file_system(device: int) -> str | None:
    """The type of the mounted file system that ``device`` (``st_dev``) belongs to."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] == wanted and "-" in fields:
            after = fields[fields.index("-") + 1 :]
            return after[0] if after else None
    return None


def _shared(fs_type: str | None) -> bool:
    if fs_type is None:
        return False
    return fs_type in SHARED_FILE_SYSTEMS or fs_type.startswith("fuse")


def _host_uid() -> int:
    """This user's uid as the host knows it: inside a user namespace (``unshare --user``,
    rootless containers) ``os.getuid()`` is the mapped one, and the name must be the host's."""
    uid = os.getuid()
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return uid
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and all(part.isdigit() for part in parts):
            inside, outside, count = map(int, parts)
            if inside <= uid < inside + count:
                return outside + uid - inside
    return uid


def default_host_directory() -> Path:
    """Where ``HostRateLimiter`` keeps its database when no ``path`` is given.

    ``$AUTOCALLS_LIMITER_DIR`` if set, else ``/dev/shm/autocalls-async-<uid>`` (``/tmp`` on
    systems without ``/dev/shm``). If another user took that name first, the next free one of
    ``autocalls-async-<uid>.1`` ... ``.7`` is used, the same one by every process of the user.
    """
    explicit = os.environ.get("AUTOCALLS_LIMITER_DIR")
    if explicit:
        return Path(explicit)
    return canonical_directory()


def canonical_directory() -> Path:
    """This user's place on this host, whatever ``AUTOCALLS_LIMITER_DIR`` says: where every
    limiter notes which schedule it keeps (so that two are said), and where the key of token
    ids is kept."""
    return _shared_base() / f"autocalls-async-{_host_uid()}"


def _shared_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path("/tmp")


# ---------------------------------------------------------------------- opening safely


class _Refused(Exception):
    """The directory or database may not be used: the message says why."""


def _check_directory(info: os.stat_result, path: Path, group: int | None) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise _Refused(f"{path} is not a directory")
    if group is None:
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _Refused(
                f"the host rate limiter's directory {path} belongs to another user or is "
                "writable by others"
            )
    else:
        if info.st_gid != group or info.st_mode & (stat.S_IWOTH | stat.S_IROTH | stat.S_IXOTH):
            raise _Refused(
                f"the host rate limiter's shared directory {path} must belong to group "
                f"{_group_name(group)} and be closed to others (mode 2770: "
                f"chgrp {_group_name(group)} {path} && chmod 2770 {path}); it has group "
                f"{_group_name(info.st_gid)} and mode {stat.filemode(info.st_mode)}"
            )


def _check_file_system(directory: Path, device: int) -> None:
    fs_type = _file_system(device)
    if _shared(fs_type):
        raise _Refused(
            f"{directory} is on a {fs_type} file system, which other machines may share and "
            "where SQLite's locks do not hold: each machine would keep its own schedule. Use a "
            "local directory, or RedisRateLimiter (AUTOCALLS_REDIS_URL) to share a token "
            "between machines"
        )


def _check_file(info: os.stat_result, path: Path, group: int | None) -> None:
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise _Refused(f"{path} is not a regular file with one link")
    if group is None:
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise _Refused(f"{path} belongs to another user or is open to group or others")
    elif info.st_gid != group or info.st_mode & 0o007:
        raise _Refused(f"{path} must belong to group {_group_name(group)}, closed to others")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _resolve_group(group: str | int | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, bool) or not isinstance(group, str | int):
        raise TypeError(f"group must be a group name or id, got {group!r}")
    if isinstance(group, int):
        gid = group
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group: {group!r}") from None
    if gid != os.getegid() and gid not in os.getgroups() and os.geteuid() != 0:
        raise ValueError(
            f"this process is not a member of group {_group_name(gid)}: add the user to it "
            "(usermod -aG) and start a new session"
        )
    return gid


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_directory(path: Path, group: int | None, *, create: bool) -> int:
    """A descriptor of ``path``, created if needed, checked; never through a link."""
    parent = path.parent
    if create:
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise _Refused(f"cannot create {parent} ({exc.strerror or exc})") from exc
        try:
            os.mkdir(path, 0o2770 if group is not None else 0o700)
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, 0o2770 if group is not None else 0o700)  # whatever the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise _Refused(f"cannot create {path} ({exc.strerror or exc})") from exc
    try:
        fd = os.open(path, _NOFOLLOW_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Refused(f"{path} is a link or not a directory") from exc
        raise _Refused(f"cannot open {path} ({exc.strerror or exc})") from exc
    try:
        _check_directory(os.fstat(fd), path, group)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claim_default(base: Path) -> tuple[Path, int]:
    """The user's directory in the shared ``base``: the first name of ours, else a new one.

    In a sticky, world-writable directory (``/dev/shm``, ``/tmp``) another user can take a name
    first but cannot remove or replace ours: every process of the user scans the same names in
    the same order and uses the first that is ours, so they all meet in one directory.
    """
    uid, named = os.getuid(), _host_uid()
    try:
        base_info = os.stat(base)
    except OSError as exc:
        raise _Refused(f"cannot use {base} ({exc.strerror or exc})") from exc
    if base_info.st_mode & stat.S_IWOTH and not base_info.st_mode & stat.S_ISVTX:
        raise _Refused(f"{base} is writable by everyone and not sticky: others could replace it")
    names = [f"autocalls-async-{named}"] + [
        f"autocalls-async-{named}.{n}" for n in range(1, _CANDIDATES)
    ]
    taken: list[str] = []
    for _ in range(4):  # a name taken by someone else between our look and our mkdir
        free: Path | None = None
        taken = []
        for name in names:
            path = base / name
            try:
                fd = os.open(path, _NOFOLLOW_DIR)
            except FileNotFoundError:
                free = free or path
                continue
            except OSError:
                taken.append(name)  # a link, a file, or a directory we may not open
                continue
            info = os.fstat(fd)
            if info.st_uid == uid:
                if stat.S_IMODE(info.st_mode) & 0o700 != 0o700:
                    os.fchmod(fd, stat.S_IMODE(info.st_mode) | 0o700)  # ours, made unusable
                    info = os.fstat(fd)
                try:
                    _check_directory(info, path, None)
                except BaseException:
                    os.close(fd)
                    raise
                if name != names[0]:
                    _say_taken_once(base / names[0])
                return path, fd
            os.close(fd)
            taken.append(name)
        if free is None:
            break
        try:
            os.mkdir(free, 0o700)
            os.chmod(free, 0o700)  # whatever the umask (0277 made it unusable: dr-x------)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _Refused(f"cannot create {free} ({exc.strerror or exc})") from exc
    raise _Refused(
        f"every name for this user's limiter directory in {base} is taken by another user "
        f"({', '.join(taken)})"
    )


_said_taken: set[Path] = set()


def _say_taken_once(path: Path) -> None:
    if path not in _said_taken:
        _said_taken.add(path)
        logger.warning(
            "the host rate limiter's usual directory %s belongs to another user; every process "
            "of this user uses the next free name instead (ask an administrator to remove it)",
            path,
        )


# ---------------------------------------------------------------------- one database per process


class _Database:
    """One open database, shared by every store of this process that uses its directory."""

    def __init__(self, directory: Path, group: int | None, *, default: bool) -> None:
        self.requested = directory
        self.group = group
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.users = 0
        self.boot = boot_id() or ""
        self.next_sweep = 0.0
        self.warned_rows = False
        self.registry_key: _Key = (os.path.realpath(directory), group)
        self.closed = False
        self.names: dict[str, str] = {}
        self.states: dict[str, tuple[str, TokenState]] = {}  # name -> (row, decoded)
        #: ``PRAGMA data_version`` in this connection's last transaction (None: unknown)
        self.version: int | None = None
        dir_fd = -1
        guard = -1
        try:
            if default:
                self.directory, dir_fd = _claim_default(directory.parent)
            else:
                self.directory = directory
                dir_fd = _open_directory(directory, group, create=True)
            info = os.fstat(dir_fd)
            _check_file_system(self.directory, info.st_dev)
            mode = 0o660 if group is not None else 0o600
            # In a group's directory another member may have just created a file and not yet
            # given it the group's mode: a refusal for permission is tried again, briefly.
            patience = time.monotonic() + (_GROUP_PATIENCE if group is not None else 0.0)
            while True:
                try:
                    guard = os.open(
                        DB_NAME,
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                        mode,
                        dir_fd=dir_fd,
                    )
                    break
                except PermissionError as exc:
                    if time.monotonic() < patience:
                        time.sleep(0.005)
                        continue
                    raise _Refused(
                        f"cannot open {self.directory / DB_NAME} ({exc.strerror or exc})"
                    ) from exc
                except OSError as exc:
                    raise _Refused(
                        f"cannot open {self.directory / DB_NAME} ({exc.strerror or exc})"
                    ) from exc
            file_info = os.fstat(guard)
            if file_info.st_size == 0 and file_info.st_uid == os.getuid():
                # New (or never written): exactly our mode and group, whatever the umask.
                if group is not None and file_info.st_gid != group:
                    os.fchown(guard, -1, group)
                os.fchmod(guard, mode)
                file_info = os.fstat(guard)
            _check_file(file_info, self.directory / DB_NAME, group)
            self.inode = (file_info.st_dev, file_info.st_ino)
            self.path = str(self.directory / DB_NAME)
            # Closed before SQLite opens the file: POSIX locks belong to the process, and
            # closing any descriptor of a file drops all of them, SQLite's included. (A
            # connection that lost its lock on the database lets another process think it is
            # the last one, which then deletes the -wal and -shm files in use.)
            os.close(guard)
            guard = -1
            while True:
                try:
                    self.connection = self._connect()
                    break
                except sqlite3.OperationalError as exc:
                    # A member's new -wal or -shm file, not yet 0660: SQLite could not open
                    # it, or opened it read-only and cannot write (it would never write).
                    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                    if (
                        code not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY)
                        or time.monotonic() >= patience
                    ):
                        raise
                    time.sleep(0.005)
            self._note_files()
            if self.files[0][1] != self.inode or self.deleted():
                self.close()  # replaced between our checks and SQLite's open
                raise _Refused(f"{self.path} was replaced while it was being opened")
        finally:
            if guard >= 0:
                os.close(guard)
            if dir_fd >= 0:
                os.close(dir_fd)

    def _connect(self) -> sqlite3.Connection:
        path = quote(str(self.directory / DB_NAME))
        connection = sqlite3.connect(
            f"file:{path}?mode=rw",
            uri=True,
            timeout=0,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute("PRAGMA busy_timeout=0")
            self._initialise(connection)
            if self.group is not None:
                _writable(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _initialise(self, connection: sqlite3.Connection) -> None:
        if self._ready(connection):
            return
        # A new database (or one of an older schema): made ready once, under the write lock.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        if str(mode).lower() != "wal":
            raise _Refused(f"{self.directory} does not support SQLite's WAL mode ({mode})")
        _tune(connection)
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        try:
            self._check_version(connection.execute("PRAGMA user_version").fetchone()[0])
            for statement in _TABLES:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version={_SCHEMA}")
            connection.execute(
                "INSERT OR IGNORE INTO meta VALUES('key', ?)", (secrets.token_hex(32),)
            )
            self.key = bytes.fromhex(
                connection.execute("SELECT value FROM meta WHERE name='key'").fetchone()[0]
            )
            self._check_boots(connection)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise

    def _ready(self, connection: sqlite3.Connection) -> bool:
        """True when the database is ready for us, found by reading alone: a process that holds
        the write lock (or is stopped holding it) never blocks another one's start."""
        try:
            if str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                return False
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version != _SCHEMA:
                self._check_version(version)
                return False
            row = connection.execute("SELECT value FROM meta WHERE name='key'").fetchone()
            if row is None:
                return False
            self.key = bytes.fromhex(row[0])
            started = _boot_started()
            for other, seen in connection.execute(
                "SELECT boot, seen FROM boots WHERE boot != ?", (self.boot,)
            ):
                if not isinstance(seen, int | float):
                    return False  # not ours: made right under the write lock
                if float(seen) > started + 1.0:
                    raise _Refused(_two_kernels(self.directory, str(other)))
        except sqlite3.OperationalError as exc:
            if _busy(exc) or "no such table" in str(exc):
                return False
            raise
        _tune(connection)
        return True

    def _check_version(self, version: int) -> None:
        if version not in (0, _SCHEMA):
            raise _Refused(
                f"{self.directory / DB_NAME} was written by another version of autocalls-async "
                f"(schema {version}); give this one another directory"
            )

    def _check_boots(self, connection: sqlite3.Connection) -> None:
        """Refuse a store that another running kernel writes (a volume two machines share)."""
        now = time.time()
        started = _boot_started()
        for other, seen in connection.execute(
            "SELECT boot, seen FROM boots WHERE boot != ?", (self.boot,)
        ).fetchall():
            if isinstance(seen, int | float) and float(seen) > started + 1.0:
                raise _Refused(_two_kernels(self.directory, str(other)))
            connection.execute("DELETE FROM boots WHERE boot = ?", (other,))  # past, or garbage
        connection.execute("INSERT OR REPLACE INTO boots VALUES(?, ?)", (self.boot, now))

    def name(self, key: str) -> str:
        """The token's row: a keyed hash, remembered for the tokens in use."""
        name = self.names.get(key)
        if name is None:
            if len(self.names) >= _NAMES_KEPT:
                self.names.clear()
            name = self.names[key] = hmac.new(self.key, key.encode(), hashlib.sha256).hexdigest()[
                :32
            ]
        return name

    def remember(self, name: str, data: str | None, state: TokenState) -> None:
        """Keep the state just committed, decoded: the next operation on the token reuses it
        when the row still holds exactly what was written (most often, nobody else wrote)."""
        if data is None:
            self.states.pop(name, None)
            return
        if len(self.states) >= _STATES_KEPT:
            self.states.clear()
        self.states[name] = (data, state)

    def deleted(self) -> bool:
        """True once the database, or its write-ahead log or shared-memory file, was deleted
        or replaced under this process (a cleaner): a process that opens it then makes new ones,
        and the two would no longer lock against each other. A ``stat`` of each path."""
        for path, inode in self.files:
            try:
                info = os.stat(path, follow_symlinks=False)
            except OSError:
                return True
            if (info.st_dev, info.st_ino) != inode:
                return True
        return False

    def _note_files(self) -> None:
        """The inodes SQLite has open while this connection lives: the database, and its
        ``-wal`` and ``-shm`` (which no other process deletes while this one is open)."""
        files = []
        for suffix in ("", "-wal", "-shm"):
            try:
                info = os.stat(self.path + suffix, follow_symlinks=False)
            except OSError:
                if not suffix:
                    files.append((self.path, (-1, -1)))  # gone already: never the same
                continue
            files.append((self.path + suffix, (info.st_dev, info.st_ino)))
        self.files = files

    def close(self) -> None:
        if os.getpid() != self.pid or self.closed:
            return  # a forked child never closes its parent's connection (SQLite forbids it)
        self.closed = True
        with contextlib.suppress(sqlite3.Error):
            self.connection.close()


def _writable(connection: sqlite3.Connection) -> None:
    """Raise SQLite's READONLY error if this connection cannot write: in a group's directory
    it may have found another member's new -shm file before its mode was 0660 (SQLite makes
    it with the umask, then changes it) and opened it read-only. Reads work then, every write
    fails. A database another process is writing is writable."""
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _busy(exc):
            return
        raise
    connection.execute("ROLLBACK")


def _tune(connection: sqlite3.Connection) -> None:
    # A crash of the process never loses a commit; only a power loss may lose the last ones,
    # and the store lives on a tmpfs by default, which a power loss empties anyway.
    connection.execute("PRAGMA synchronous=NORMAL")
    # The write-ahead log is cut back to 1 MiB after each checkpoint: /dev/shm is memory.
    connection.execute("PRAGMA journal_size_limit=1048576")


def _parse_state(raw: Any) -> TokenState:
    if not isinstance(raw, str) or len(raw) > _MAX_STATE:
        raise TypeError("not a state")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise TypeError("not a state")
    return TokenState.from_json(data)


def _two_kernels(directory: Path, other: str) -> str:
    return (
        f"{directory} is also written by another running kernel (boot id {other[:8]}...): a "
        "volume shared between machines or virtual machines. Each would keep its own "
        "schedule; use RedisRateLimiter (AUTOCALLS_REDIS_URL) to share a token between "
        "machines, or give each machine a directory of its own"
    )


_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # One row per token in use: its schedule (``TokenState`` as JSON), the boot it was written
    # in, when (wall clock, to tell a reboot from another machine) and until when it matters.
    "CREATE TABLE IF NOT EXISTS tokens(name TEXT PRIMARY KEY, boot TEXT NOT NULL, "
    "written REAL NOT NULL, expires REAL NOT NULL, state TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS tokens_expires ON tokens(expires)",
    # Which limiters keep which token's schedule where: two places for one token are said.
    "CREATE TABLE IF NOT EXISTS schedules(name TEXT NOT NULL, who TEXT NOT NULL, "
    "place TEXT NOT NULL, boot TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY(name, who))",
    "CREATE TABLE IF NOT EXISTS boots(boot TEXT PRIMARY KEY, seen REAL NOT NULL)",
)


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)  # pragma: no cover - Python < 3.11 (no sqlite_errorcode)
    return "locked" in text or "busy" in text  # pragma: no cover


_Key = tuple[str, int | None]
#: Every database open in this process: in use by a store, or idle (kept open for the next).
_DATABASES: dict[_Key, _Database] = {}
_IDLE: OrderedDict[_Key, None] = OrderedDict()
_IDLE_MAX = 4  # idle databases kept open: a few descriptors, however many come and go
_REGISTRY_LOCK = threading.Lock()
_ABANDONED: list[_Database] = []  # a forked child's copies of its parent's: never closed


def _acquire(requested: Path, group: int | None, *, default: bool) -> _Database:
    # One database object per file in a process, however it was named (the default, or the
    # same directory through AUTOCALLS_LIMITER_DIR or a link): never two connections whose
    # opening and closing could drop each other's locks.
    key = (os.path.realpath(requested), group)
    with _REGISTRY_LOCK:
        db = _DATABASES.get(key)
        if db is not None and (db.closed or db.deleted()):
            del _DATABASES[key]
            _IDLE.pop(key, None)
            # Closed now, even while other stores hold it (they see it closed and come back
            # here): SQLite cannot open the new files beside a connection to the old ones.
            with db.lock:
                db.close()
            db = None
        if db is None:
            db = _Database(requested, group, default=default)
            db.registry_key = key
            _DATABASES[key] = db
        _IDLE.pop(key, None)
        db.users += 1
        return db


def _release(db: _Database) -> None:
    with _REGISTRY_LOCK:
        if db.pid != os.getpid():
            return
        db.users -= 1
        if db.users > 0:
            return
        if _DATABASES.get(db.registry_key) is not db:
            with db.lock:
                db.close()  # retired: its file was deleted
            return
        _IDLE[db.registry_key] = None
        while len(_IDLE) > _IDLE_MAX:
            old, _ = _IDLE.popitem(last=False)
            _DATABASES.pop(old).close()


def _before_fork() -> None:
    """Close every connection before ``os.fork()`` (both sides open their own again at their
    next operation). A child that inherits an open connection inherits SQLite's record of the
    locks its parent holds, not the locks themselves: its own new connection to the file then
    believes it holds them and never takes them, and once the parent exits another process
    takes itself for the last connection and deletes the -wal and -shm in use (a split
    schedule, then a damaged database)."""
    with _REGISTRY_LOCK:
        for db in list(_DATABASES.values()):
            with db.lock:
                db.close()
        _DATABASES.clear()
        _IDLE.clear()


def _after_fork() -> None:
    """The child starts with no connection (closed before the fork) and locks of its own."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    _ABANDONED.extend(_DATABASES.values())  # opened by another thread during the fork: kept
    _DATABASES.clear()
    _IDLE.clear()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork)


@atexit.register
def _close_all() -> None:
    with _REGISTRY_LOCK:
        for db in list(_DATABASES.values()):
            db.close()
        _DATABASES.clear()
        _IDLE.clear()


# ---------------------------------------------------------------------- the store


class HostStore:
    """Every process of this OS user on the host (or of one group): one SQLite database.

    The database is opened at the first operation, once per process and directory, whatever
    the number of stores, clients and tokens: a handful of descriptors in all.
    """

    kind = "host"

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        group: str | int | None = None,
        canonical: bool = False,
    ) -> None:
        explicit = os.environ.get("AUTOCALLS_LIMITER_DIR")
        self._default = canonical or (directory is None and not explicit)
        self._refusal: str | None = None
        if canonical:
            self.requested = canonical_directory()
        elif directory is not None:
            # A relative path means the directory it names now, whatever the process's later
            # working directory.
            self.requested = Path(directory).absolute()
        else:
            self.requested = default_host_directory()
            if not self.requested.is_absolute():
                # Processes in other working directories would each find another one.
                self._refusal = (
                    f"AUTOCALLS_LIMITER_DIR must be an absolute path, got {explicit!r}: "
                    "processes started in other directories would keep other schedules"
                )
        self.group = _resolve_group(group)
        self.clock = clock or host_clock()
        self._db: _Database | None = None

    def __repr__(self) -> str:
        return f"<HostStore {self.directory}>"

    @property
    def directory(self) -> Path:
        """The directory in use (after the first operation), else the one asked for."""
        return self._db.directory if self._db is not None else self.requested

    @property
    def place(self) -> str:
        """Where the schedules are, as warnings name it: the real path (links resolved)."""
        return f"the host store in {os.path.realpath(self.directory)}"

    def _unavailable(self, what: str, hint: str = DIRECTORY_HINT) -> LimiterUnavailableError:
        return LimiterUnavailableError(
            f"the host rate limiter cannot use {self.requested} ({what}); {hint}{NOTHING_SENT}"
        )

    def _open(self) -> _Database:
        if self._refusal is not None:
            raise LimiterUnavailableError(f"{self._refusal}{NOTHING_SENT}")
        db = self._db
        if db is not None:
            if db.pid == os.getpid() and not db.closed and not db.deleted():
                return db
            self._db = None
            _release(db)
        try:
            db = _acquire(self.requested, self.group, default=self._default)
        except _Refused as exc:
            raise LimiterUnavailableError(
                f"the host rate limiter cannot use {self.requested}: {exc}; "
                f"{DIRECTORY_HINT}{NOTHING_SENT}"
            ) from None
        except sqlite3.Error as exc:
            raise self._unavailable(f"opening its database: {exc}") from None
        except OSError as exc:
            raise self._unavailable(exc.strerror or str(exc)) from None
        except (ValueError, TypeError, IndexError) as exc:
            raise self._unavailable(
                f"its database holds what this SDK did not write ({type(exc).__name__}: {exc})",
                f"remove {self.requested} to start afresh",
            ) from None
        self._db = db
        return db

    # ------------------------------------------------------------------ updates

    def try_update(self, key: str, update: Update[T]) -> tuple[bool, T | None]:
        outcomes = self.try_update_many([(key, update)])
        if outcomes is None:
            return False, None
        applied, result = outcomes[0]
        if not applied:
            raise result  # RateConflict, committed
        return True, result

    def try_update_many(self, items: Sequence[tuple[str, Update[Any]]]) -> list[Outcome] | None:
        """Apply every update in order, in one transaction (a token may appear more than once:
        each sees the state the one before left), if that needs no waiting: one outcome per
        item, ``(True, result)`` or ``(False, RateConflict)``; None when the database is busy
        (nothing was done). Any other failure undoes them all and is raised."""
        db = self._open()
        if not db.lock.acquire(blocking=False):
            return None
        try:
            if db.closed:
                return None  # retired under us (its files were deleted): ask again
            return self._transact(db, items)
        finally:
            db.lock.release()

    async def update(self, key: str, update: Update[T]) -> T:
        """Wait for the database as long as it takes: a process holding it is alive (SQLite's
        locks die with their process), so sending without it would break the limit. Callers
        bound the wait with their ``max_wait``."""
        applied, result = (await self.update_many([(key, update)]))[0]
        if not applied:
            raise result
        return result  # type: ignore[no-any-return]

    async def update_many(
        self,
        items: Sequence[tuple[str, Update[Any]]],
        keep: Callable[[int], bool] | None = None,
    ) -> list[Outcome]:
        """``try_update_many``, waiting for the database as ``update`` does. ``keep(i)`` is
        asked before each attempt: an item it refuses (its caller gave up) is left out, and
        answered ``(False, None)``."""
        delay = 0.0002
        warn_at = time.monotonic() + LOCK_TIMEOUT
        while True:
            chosen = (
                list(range(len(items)))
                if keep is None
                else [i for i in range(len(items)) if keep(i)]
            )
            outcomes = self.try_update_many([items[i] for i in chosen]) if chosen else []
            if outcomes is not None:
                answered: list[Outcome] = [(False, None)] * len(items)
                for i, outcome in zip(chosen, outcomes, strict=True):
                    answered[i] = outcome
                return answered
            if warn_at and time.monotonic() > warn_at:
                warn_at = 0.0
                logger.warning(
                    "the host rate limiter's database in %s has been locked for over %gs by "
                    "another process (stopped, or stalled?); waiting for it",
                    self.directory,
                    LOCK_TIMEOUT,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _transact(
        self, db: _Database, items: Sequence[tuple[str, Update[Any]]]
    ) -> list[Outcome] | None:
        connection = db.connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                return None
            raise self._failed(exc) from None
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        # name -> (the row as it now stands, or None: no row; its state)
        touched: dict[str, tuple[str | None, TokenState]] = {}
        outcomes: list[Outcome] = []
        try:
            # Nobody else committed since our last transaction: every row we remember is as we
            # left it, and is not read again.
            version = connection.execute("PRAGMA data_version").fetchone()[0]
            unchanged = version == db.version
            db.version = version
            for key, update in items:
                name = db.name(key)
                if name in touched:
                    raw, state = touched[name]
                else:
                    raw, state = self._load(db, name, unchanged)
                now = self.clock()
                try:
                    outcomes.append((True, update(state, now)))
                except RateConflict as conflict:
                    # Raised once the state was settled (bounded, expired): keep that, so that
                    # what expires is gone for the next caller too, then refuse.
                    outcomes.append((False, conflict))
                if state.holder is None and state.latest() <= now:
                    if raw is not None:
                        connection.execute("DELETE FROM tokens WHERE name = ?", (name,))
                    touched[name] = (None, state)
                else:
                    data = json.dumps(state.to_json(), separators=(",", ":"))
                    if data != raw:
                        connection.execute(
                            "INSERT OR REPLACE INTO tokens VALUES(?, ?, ?, ?, ?)",
                            (name, db.boot, time.time(), state.latest(), data),
                        )
                    touched[name] = (data, state)
            now = self.clock()
            if now >= db.next_sweep:
                db.next_sweep = now + _SWEEP_EVERY
                connection.execute(
                    "DELETE FROM tokens WHERE expires <= ? OR boot != ?", (now, db.boot)
                )
                connection.execute(
                    "DELETE FROM schedules WHERE expires <= ? OR boot != ?", (now, db.boot)
                )
                connection.execute(
                    "INSERT OR REPLACE INTO boots VALUES(?, ?)", (db.boot, time.time())
                )
                db.version = None  # rows we remember may be gone: read them again
            connection.execute("COMMIT")
            for written, (row, kept) in touched.items():
                db.remember(written, row, kept)
        except BaseException as exc:
            db.version = None
            for written in touched:
                db.states.pop(written, None)
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            if isinstance(exc, _Refused):
                raise LimiterUnavailableError(f"{exc}{NOTHING_SENT}") from None
            if isinstance(exc, sqlite3.Error):
                raise self._failed(exc) from None
            raise
        return outcomes

    def _load(self, db: _Database, name: str, unchanged: bool) -> tuple[str | None, TokenState]:
        """A token's row (None: there is none) and its state, inside a transaction."""
        if unchanged:
            kept = db.states.get(name)
            if kept is not None:
                return kept
        row = db.connection.execute(
            "SELECT boot, written, state FROM tokens WHERE name = ?", (name,)
        ).fetchone()
        state, raw = self._decode(db, name, row)
        # A row that could not be used (another boot's, unreadable) is replaced: known to exist.
        return (raw if raw is not None or row is None else "", state)

    def _failed(self, exc: sqlite3.Error) -> LimiterUnavailableError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_FULL:
            return self._unavailable(
                "its file system is full: the schedule is intact, but cannot be updated",
                f"free some space on the file system of {self.directory}",
            )
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            what = f"its database is damaged ({exc}); remove {self.directory} to start afresh"
        elif code == sqlite3.SQLITE_READONLY:
            what = "its database is read-only"
        else:
            what = f"its database failed: {exc}"
        return self._unavailable(what)

    def _decode(self, db: _Database, name: str, row: Any) -> tuple[TokenState, str | None]:
        if row is None:
            return TokenState(), None
        boot, written, raw = row
        if boot != db.boot:
            if float(written) > _boot_started() + 1.0:
                raise _Refused(_two_kernels(db.directory, str(boot)))
            return TokenState(), None  # written before a reboot: its clock means nothing now
        kept = db.states.get(name)
        if kept is not None and kept[0] == raw:
            return kept[1], raw  # what this process last wrote or read, nobody wrote since
        try:
            return _parse_state(raw), raw
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            if not db.warned_rows:
                db.warned_rows = True
                logger.warning(
                    "the host rate limiter's state for a token in %s could not be read; "
                    "waiting one period before that token's next start, to be safe",
                    db.directory,
                )
            return TokenState(suspect=True), None

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            _release(db)


# ---------------------------------------------------------------------- who uses which schedule


#: The store in this user's one place (``canonical_directory``), kept open once used: notes are
#: written every few seconds, and opening it costs more than the note.
_CANONICAL: HostStore | None = None


@contextlib.contextmanager
def _default_database() -> Iterator[_Database | None]:
    global _CANONICAL
    store = _CANONICAL
    if store is None or store.requested != canonical_directory():
        store = HostStore(canonical=True)
    try:
        db = store._open()
    except LimiterUnavailableError:
        yield None
        return
    _CANONICAL = store
    yield db


def user_secret() -> bytes | None:
    """The random key of this user's default store, for keyed token ids; None if unusable."""
    with _default_database() as db:
        return None if db is None else db.key


def note_schedule(key: str, who: str, place: str, ttl: float) -> list[tuple[str, str]]:
    """Record in this user's default store that ``who`` keeps token ``key``'s schedule at
    ``place``; return the others (who, place) that keep it on this host and are not expired.
    Best effort: a store that cannot be used, or is busy, answers nothing."""
    return [(other, where) for _, other, where in note_schedules([key], who, place, ttl) or []]


def note_schedules(
    keys: Iterable[str], who: str, place: str, ttl: float
) -> list[tuple[str, str, str]] | None:
    """``note_schedule`` for many tokens, in one transaction: (key, who, place) of each other
    limiter that keeps one of these tokens' schedules on this host; None when the user's place
    was busy (another process writing its notes): nothing was written, ask again shortly."""
    found: list[tuple[str, str, str]] = []
    with _default_database() as db:
        if db is None:
            return []
        if not db.lock.acquire(blocking=False):
            return None
        try:
            connection = db.connection
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:
                return None  # busy: another process notes at the same moment
            try:
                now = host_clock()()
                for key in keys:
                    name = db.name(key)
                    connection.execute(
                        "INSERT OR REPLACE INTO schedules VALUES(?, ?, ?, ?, ?)",
                        (name, who, place, db.boot, now + ttl),
                    )
                    rows = connection.execute(
                        "SELECT who, place FROM schedules WHERE name = ? AND expires > ? "
                        "AND boot = ? AND who != ?",
                        (name, now, db.boot, who),
                    ).fetchall()
                    found.extend((key, str(other), str(where)) for other, where in rows)
                connection.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                return []
        finally:
            db.lock.release()
    return found


def forget_schedule(keys: Iterable[str], who: str) -> None:
    """``who`` no longer keeps these tokens' schedules (its limiter closed): one transaction."""
    with _default_database() as db:
        if db is None:
            return
        with db.lock, contextlib.suppress(sqlite3.Error):
            connection = db.connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(
                    "DELETE FROM schedules WHERE name = ? AND who = ?",
                    [(db.name(key), who) for key in keys],
                )
                connection.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                raise
