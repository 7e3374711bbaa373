"""One read of a bulk run's input: a private snapshot, checked and sent from (issue 21).

Reading the input twice by its path (once to check it, once to send it) let a file rewritten
during a run (``> in.csv``, an export job, an editor saving in place) be read again: rows were
counted afresh, keys shifted, and rows were sent twice or without any check. ``Snapshot.take``
copies the input once, byte for byte, into a private file (mode 0600, in a private temporary
directory) while hashing it, and notes the original's size, mtime, inode and device. Every
later pass (the check, the run, the dry run's counts, the refusal's details) reads the copy,
which nothing else writes. ``changed()`` tells, at the end of the run, whether the original is
still what was copied; a change is reported, never read.

A copy taken while the file was being written (its size or mtime moved during the copy) is
taken again, a few times, then refused: a half-written input must not be checked as whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Final

import attrs

__all__ = ["Snapshot", "SnapshotError"]

_CHUNK: Final = 1 << 20
_ATTEMPTS: Final = 5


class SnapshotError(Exception):
    """The input could not be copied as one consistent version (or not read at all)."""


@attrs.frozen
class Stamp:
    """What identifies one version of a file without reading it."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, result: os.stat_result) -> Stamp:
        return cls(result.st_size, result.st_mtime_ns, result.st_ino, result.st_dev)


@attrs.define
class Snapshot:
    """A private copy of ``original``; ``path`` is the copy every pass reads."""

    original: Path
    path: Path
    stamp: Stamp
    digest: str  #: blake2b of the bytes copied, hex
    lines: int = 0  #: line breaks in the copy: no more rows than this (to size tables)

    @classmethod
    def take(cls, original: Path) -> Snapshot:
        directory = Path(tempfile.mkdtemp(prefix="autocalls-input-"))  # mode 0700
        copy = directory / ("input" + original.suffix.lower())
        try:
            for _ in range(_ATTEMPTS):
                taken = cls._copy(original, copy)
                if taken is not None:
                    stamp, digest, lines = taken
                    return cls(original, copy, stamp, digest, lines)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        shutil.rmtree(directory, ignore_errors=True)
        raise SnapshotError(
            f"{original} kept changing while it was read (it is being written): wait until "
            "whatever writes it has finished, then run again; nothing was sent"
        )

    @staticmethod
    def _copy(original: Path, copy: Path) -> tuple[Stamp, str, int] | None:
        """Copy once; None if the file changed during the copy."""
        try:
            source = original.open("rb")
        except OSError as exc:
            raise SnapshotError(f"cannot read {original}: {exc.strerror or exc}") from None
        hasher = hashlib.blake2b(digest_size=16)
        with source:
            before: os.stat_result | None = os.fstat(source.fileno())
            if before is not None and not stat.S_ISREG(before.st_mode):
                before = None  # a pipe or a device: read once, as it comes; nothing to re-check
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as target:
                size = lines = 0
                while chunk := source.read(_CHUNK):
                    hasher.update(chunk)
                    target.write(chunk)
                    size += len(chunk)
                    lines += chunk.count(b"\n") or chunk.count(b"\r")  # CR only: old Macs
            if before is None:
                return Stamp(size, 0, 0, 0), hasher.hexdigest(), lines
            after = os.fstat(source.fileno())
        if Stamp.of(before) != Stamp.of(after) or after.st_size != size:
            return None
        return Stamp.of(after), hasher.hexdigest(), lines

    def changed(self) -> str | None:
        """How the original differs from the copy now (None: it does not, as far as its
        size, mtime, inode and device tell), in words for a report."""
        try:
            now = Stamp.of(self.original.stat())
        except FileNotFoundError:
            return "it was deleted or renamed"
        except OSError as exc:
            return f"it cannot be read any more ({exc.strerror or exc})"
        if self.stamp.inode == 0 or now == self.stamp:
            return None
        if (now.inode, now.device) != (self.stamp.inode, self.stamp.device):
            return "it was replaced by another file"
        if now.size != self.stamp.size:
            return f"it was rewritten ({self.stamp.size} bytes then, {now.size} now)"
        return "it was rewritten (its modification time changed)"

    def close(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)
