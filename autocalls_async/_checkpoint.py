"""The index beside OUT (``.OUT.index``): what reading OUT and checking the input found, kept
for the next run on them, so that a resume need not read two million lines of OUT and a million
rows of input again to learn what it learnt last time (issue 21 item 8).

A run writes it as it closes (a dry run never writes it); the next run, or dry run, reads it,
and trusts it only for the exact bytes it was made from:

* **OUT**: the index names how many bytes of OUT it covers and their SHA-256. Those bytes are
  hashed again, every time, before the index is used (about 0.5 s for a 400 MiB OUT, an eighth
  of reading its lines); OUT is append-only, so what a later run appended is read after them,
  line by line as ever. An OUT edited, truncated, replaced, damaged, or that lost lines in a
  power cut hashes otherwise: the index is then ignored and OUT read whole, which refuses a
  damaged line as before.
* **The input**: the index names the digest of the snapshot it was checked from (blake2b of
  every byte copied, see ``_snapshot``), its size, its format, delimiter and
  ``--vars-from-columns``. Any other input, or the same one edited by a byte, is read and
  checked whole, so an edit between runs is found and reported as before. A change *during*
  a run is unaffected: the snapshot is still the one read.
* **The index itself** ends with the SHA-256 of all it holds, and names its format and this
  package's version: a damaged, truncated, foreign or older index is ignored.

A valid index is therefore the result of the same computation, by the same code, on the same
bytes: trusting it finds exactly what reading OUT and the input would (a test compares the
two). What it holds: OUT's key table as ``Ledger`` keeps it (9 bytes a slot), and for the
input its row count, header, data notes and each row's digest and occurrence (8 bytes a row).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from array import array
from pathlib import Path
from typing import IO, Any, Final

import attrs

from ._keys import KeyTable
from ._version import __version__

__all__ = ["Checked", "Index", "OutPrefix", "load", "write"]

_MAGIC: Final = b"autocalls-async OUT index\n"
#: Bump when what the index holds, or what a run derives from OUT or the input, changes.
FORMAT: Final = 1
_HEADER_LIMIT: Final = 1 << 20
_CHUNK: Final = 1 << 22
#: The state bits of a ledger's byte (the "matched" bit is a run's own, never written).
_STATES_ONLY: Final = bytes(value & 7 for value in range(256))


@attrs.define
class OutPrefix:
    """The first ``size`` bytes of OUT, and where reading them left the reader."""

    size: int
    sha256: str
    lines: int  #: lines read (the next one is ``lines + 1``)
    seen_one: bool  #: a line of this command was read (OUT is ours)
    unreadable_lines: int


@attrs.define
class Checked:
    """What ``InputFile.check`` derived from the input alone: the same for the same bytes read
    the same way (``identity``), whatever OUT holds."""

    identity: dict[str, Any]  #: the snapshot's digest and size, format, delimiter, flags
    rows: int
    header: list[str]
    extra_columns: list[str]
    unnamed_columns: list[str]  #: columns without a name (``column_N``)
    unnamed_values: int  #: rows with a value in one
    notes: dict[str, Any] | None  #: ``DataNotes.state()`` after every row (None: not taken)
    digests: array[int]  #: each row's content digest ('Q'), in row order
    repeat_rows: array[int]  #: the rows whose occurrence is not 1 ('Q'), ascending
    repeat_counts: array[int]  #: their occurrences ('Q')


@attrs.define
class Index:
    out: OutPrefix
    table: KeyTable  #: the ledger's keys: number -> state code
    checked: Checked | None


def _arrays(index: Index) -> list[array[int]]:
    found = [index.table.numbers, index.table.values]
    if index.checked is not None:
        found += [index.checked.digests, index.checked.repeat_rows, index.checked.repeat_counts]
    return found


def write(path: Path, index: Index) -> None:
    """Write ``index`` to ``path`` whole or not at all (a temporary file renamed over it),
    mode 0600. Raises ``OSError``."""
    checked = index.checked
    header = {
        "format": FORMAT,
        "package": __version__,
        "byteorder": sys.byteorder,
        "out": attrs.asdict(index.out),
        "table": {"capacity": len(index.table.numbers), "size": len(index.table)},
        "input": None
        if checked is None
        else {
            "identity": checked.identity,
            "rows": checked.rows,
            "header": checked.header,
            "extra_columns": checked.extra_columns,
            "unnamed_columns": checked.unnamed_columns,
            "unnamed_values": checked.unnamed_values,
            "notes": checked.notes,
            "repeats": len(checked.repeat_rows),
        },
    }
    hasher = hashlib.sha256()
    fd, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            parts: list[bytes | memoryview] = [
                _MAGIC,
                json.dumps(header, separators=(",", ":")).encode() + b"\n",
            ]
            for part in _arrays(index):
                if part is index.table.values:
                    parts.append(part.tobytes().translate(_STATES_ONLY))
                else:
                    parts.append(memoryview(part).cast("B"))
            for data in parts:
                hasher.update(data)
                file.write(data)
            file.write(hasher.digest())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def load(path: Path, out: IO[bytes]) -> tuple[Index, Any] | None:
    """The index at ``path`` if it is whole, of this format and version, and the bytes of
    ``out`` it covers hash as it says; with the SHA-256 of those bytes so far (to go on
    hashing what follows), and ``out`` positioned after them. None: no index to trust (then
    ``out``'s position is anywhere)."""
    try:
        with path.open("rb") as file:
            return _load(file, out)
    except (OSError, ValueError, TypeError, KeyError, EOFError, OverflowError):
        return None


def _load(file: IO[bytes], out: IO[bytes]) -> tuple[Index, Any] | None:
    hasher = hashlib.sha256()
    magic = file.read(len(_MAGIC))
    line = file.readline(_HEADER_LIMIT)
    if magic != _MAGIC or not line.endswith(b"\n"):
        return None
    hasher.update(magic)
    hasher.update(line)
    header = json.loads(line)
    if (header["format"], header["package"], header["byteorder"]) != (
        FORMAT,
        __version__,
        sys.byteorder,
    ):
        return None
    prefix = OutPrefix(**header["out"])
    if not all(isinstance(n, int) for n in (prefix.size, prefix.lines, prefix.unreadable_lines)):
        return None
    capacity, size = int(header["table"]["capacity"]), int(header["table"]["size"])
    if capacity < 16 or capacity & (capacity - 1) or not 0 <= size < capacity:
        return None

    def read(typecode: str, count: int) -> array[int]:
        found = array(typecode)
        if count:
            found.fromfile(file, count)  # EOFError if short
        hasher.update(memoryview(found).cast("B"))
        return found

    if array("Q").itemsize != 8:  # pragma: no cover - no such platform in use
        return None
    numbers, values = read("Q", capacity), read("B", capacity)
    checked = None
    part = header["input"]
    if part is not None:
        rows, repeats = int(part["rows"]), int(part["repeats"])
        checked = Checked(
            identity=dict(part["identity"]),
            rows=rows,
            header=[str(name) for name in part["header"]],
            extra_columns=[str(name) for name in part["extra_columns"]],
            unnamed_columns=[str(name) for name in part["unnamed_columns"]],
            unnamed_values=int(part["unnamed_values"]),
            notes=part["notes"],
            digests=read("Q", rows),
            repeat_rows=read("Q", repeats),
            repeat_counts=read("Q", repeats),
        )
    if file.read(33) != hasher.digest():  # its checksum, and nothing after it
        return None
    # The index is whole; now the bytes of OUT it covers.
    out.seek(0)
    hashed = hashlib.sha256()
    left = prefix.size
    while left > 0:
        chunk = out.read(min(left, _CHUNK))
        if not chunk:
            return None  # OUT is shorter now: truncated or replaced
        hashed.update(chunk)
        left -= len(chunk)
    if hashed.hexdigest() != prefix.sha256:
        return None
    table = KeyTable.of(numbers, values, size)
    return Index(prefix, table, checked), hashed
