"""Files of the bulk command: the input (CSV or JSONL) and the resumable JSONL output.

The input is read twice: a first pass checks the whole file before anything is sent (it is
text, it has the required columns, its ids are unique so that a resumed run is unambiguous)
and counts rows; the run then streams it again, one row at a time. Neither pass keeps rows.

The output is append-only, one JSON line per finished row, flushed as it is written. A run
killed mid-line leaves a truncated last line: it is ignored when read, and the next run starts
its first line on a fresh line.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Final, Literal

import attrs

from .bulk import BulkRequest, BulkResult, RowId

__all__ = ["IdSet", "InputError", "InputFile", "ResultLog", "Skips"]

Format = Literal["csv", "jsonl"]

REQUIRED: Final = ("assistant_id", "customer_identifier", "message")
OPTIONAL: Final = ("id", "variables")
_INTEGER: Final = re.compile(r"^\+?\d+$")
#: Integer ids below this are kept as bits (2 MB at most); larger ones in a plain set.
_ROW_NUMBER_LIMIT: Final = 1 << 24

try:  # POSIX: keep two runs from appending to one output at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class InputError(Exception):
    """A file the bulk command refuses before sending anything (exit code 2)."""


class IdSet:
    """Row ids, exactly: row numbers as bits (a million take 125 KB), other ids in a set.

    A resumed run holds the ids of every row done before; most inputs have no ``id`` column,
    so their ids are row numbers and this keeps a resumed run's memory flat.
    """

    __slots__ = ("_bits", "_count", "_others")

    def __init__(self, ids: Iterable[RowId] = ()) -> None:
        self._bits = bytearray()
        self._count = 0
        self._others: set[RowId] = set()
        for row_id in ids:
            self.add(row_id)

    def add(self, row_id: RowId) -> None:
        if _is_row_number(row_id):
            assert isinstance(row_id, int)
            if not _bit(self._bits, row_id):
                _set_bit(self._bits, row_id)
                self._count += 1
        else:
            self._others.add(row_id)

    def discard(self, row_id: RowId) -> None:
        if _is_row_number(row_id):
            assert isinstance(row_id, int)
            if _bit(self._bits, row_id):
                self._bits[row_id >> 3] &= ~(1 << (row_id & 7)) & 0xFF
                self._count -= 1
        else:
            self._others.discard(row_id)

    def clear(self) -> None:
        self._bits, self._count = bytearray(), 0
        self._others.clear()

    def __contains__(self, row_id: object) -> bool:
        if _is_row_number(row_id):
            assert isinstance(row_id, int)
            return _bit(self._bits, row_id)
        return row_id in self._others

    def __len__(self) -> int:
        return self._count + len(self._others)

    def __iter__(self) -> Iterator[RowId]:
        for byte_index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield byte_index * 8 + bit
        yield from self._others

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IdSet | set | frozenset):
            return set(self) == set(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"IdSet({sorted(self, key=repr)!r})"


def _is_row_number(row_id: object) -> bool:
    return type(row_id) is int and 0 < row_id < _ROW_NUMBER_LIMIT


@attrs.define
class Skips:
    """Ids found in the output of earlier runs."""

    answered: IdSet = attrs.field(factory=IdSet, converter=IdSet)
    failed: IdSet = attrs.field(factory=IdSet, converter=IdSet)  #: and never answered since
    unreadable_lines: int = 0


class InputFile:
    """A bulk input file; ``check()`` validates it whole, iterating streams its rows."""

    def __init__(
        self, path: Path, *, format: Format | None = None, extra_as_variables: bool = False
    ) -> None:
        self.path = path
        self.format: Format = format or _guess_format(path)
        self.extra_as_variables = extra_as_variables
        self.rows = 0  #: counted by check()
        self.already_answered = 0
        self.already_failed = 0
        self.extra_columns: tuple[str, ...] = ()

    def check(self, skips: Skips | None = None) -> None:
        """Read the whole file once: refuse it (``InputError``) if it cannot be run safely.

        Sets ``rows``, and with ``skips`` (from the output of earlier runs) how many rows
        were ``already_answered`` and ``already_failed``.

        Ids must be unique. Memory stays small for big files: the first pass keeps only an
        8-byte hash per explicit id (bucketed, sorted a bucket at a time) and a bit per row
        without one; only ids whose hashes collide are compared exactly, in a second pass.
        """
        self.already_answered = self.already_failed = 0
        buckets = [array("q") for _ in range(256)]
        int_ids = array("q")  # explicit integer ids: one may be the number of an id-less row
        implicit = bytearray()  # bit n: row n has no id of its own (its id is n)
        rows = 0
        with self._refusing():
            for request in self:
                rows = request.row or rows + 1
                if skips is not None:
                    if request.id in skips.answered:
                        self.already_answered += 1
                    elif request.id in skips.failed:
                        self.already_failed += 1
                if request.id == request.row:
                    _set_bit(implicit, rows)
                    continue
                digest = hash(request.id)
                buckets[digest & 0xFF].append(digest)
                if isinstance(request.id, int) and 0 < request.id < _ROW_NUMBER_LIMIT:
                    int_ids.append(request.id)
        self.rows = rows
        collisions: set[int] = set()
        for bucket in buckets:
            ordered = sorted(bucket)
            collisions.update(a for a, b in itertools.pairwise(ordered) if a == b)
        clashes = {i for i in int_ids if i <= rows and _bit(implicit, i)}
        if collisions or clashes:
            self._find_duplicates(collisions, clashes)

    def _find_duplicates(self, collisions: set[int], clashes: set[int]) -> None:
        seen: dict[RowId, int] = {}
        with self._refusing():
            for request in self:
                row = request.row or 0
                if request.id == request.row:
                    continue
                if request.id in clashes:
                    raise InputError(
                        f"{self.path}: row {row} has the id {request.id}, which is also the "
                        f"number of row {request.id} (a row without an id is named by its "
                        "number); give every row an id, or none"
                    )
                if hash(request.id) in collisions:
                    first = seen.setdefault(request.id, row)
                    if first != row:
                        raise InputError(
                            f"{self.path}: rows {first} and {row} have the same id "
                            f"{request.id!r}; ids must be unique so that a rerun knows which "
                            "rows are done"
                        )

    @contextlib.contextmanager
    def _refusing(self) -> Iterator[None]:
        try:
            yield
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "save the file as UTF-8"
            ) from None
        except csv.Error as exc:
            raise InputError(f"{self.path}: not a readable CSV file ({exc})") from None
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def __iter__(self) -> Iterator[BulkRequest]:
        with self.path.open(encoding="utf-8-sig", newline="") as file:
            if self.format == "csv":
                yield from self._csv_rows(file)
            else:
                yield from self._jsonl_rows(file)

    def _csv_rows(self, file: IO[str]) -> Iterator[BulkRequest]:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise InputError(
                f"{self.path}: empty; a CSV input needs a header row "
                "(assistant_id,customer_identifier,message[,variables][,id])"
            )
        columns = [cell.strip().lower() for cell in header]
        missing = [name for name in REQUIRED if name not in columns]
        if missing:
            raise InputError(
                f"{self.path}: the header row lacks the required column(s) "
                f"{', '.join(missing)} (found: {', '.join(columns)}); the first row must name "
                "the columns: assistant_id,customer_identifier,message[,variables][,id]"
            )
        duplicated = sorted({name for name in columns if columns.count(name) > 1 and name})
        if duplicated:
            raise InputError(f"{self.path}: column(s) named twice: {', '.join(duplicated)}")
        self.extra_columns = tuple(c for c in columns if c and c not in (*REQUIRED, *OPTIONAL))
        row = 0
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # blank lines are not rows
            row += 1
            yield self._csv_request(columns, cells, row)

    def _csv_request(self, columns: list[str], cells: list[str], row: int) -> BulkRequest:
        problems: list[str] = []
        if len(cells) > len(columns):
            problems.append(f"{len(cells)} cells but the header names {len(columns)} columns")
        data: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, cell in zip(columns, cells, strict=False):
            if name in REQUIRED or name in OPTIONAL:
                data[name] = cell.strip() if name != "message" else cell
            elif name and cell.strip():
                extra[name] = cell  # CSV cannot tell an empty value from none: leave it out
        assistant_id = data.get("assistant_id")
        if assistant_id:
            if _INTEGER.match(assistant_id):
                data["assistant_id"] = int(assistant_id)
            else:
                problems.append(f"assistant_id {assistant_id!r} is not a whole number")
                data["assistant_id"] = 0
        variables = data.pop("variables", "") or None
        if variables is not None:
            try:
                data["variables"] = json.loads(variables)
            except ValueError as exc:
                problems.append(f"variables is not valid JSON ({exc})")
        if self.extra_as_variables and extra:
            merged = data.get("variables")
            data["variables"] = {**extra, **merged} if isinstance(merged, dict) else extra
            if merged is not None and not isinstance(merged, dict):
                problems.append(f"variables must be a JSON object, got {type(merged).__name__}")
        request = BulkRequest.from_mapping(data, row)
        if problems:
            joined = "; ".join([*problems, *([request.problem] if request.problem else [])])
            request = attrs.evolve(request, problem=joined)
        return request

    def _jsonl_rows(self, file: IO[str]) -> Iterator[BulkRequest]:
        row = 0
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            row += 1
            try:
                data = json.loads(line)
            except ValueError as exc:
                yield _bad(row, f"line {number} is not valid JSON ({exc})")
                continue
            if not isinstance(data, dict):
                yield _bad(row, f"line {number} is not a JSON object")
                continue
            yield BulkRequest.from_mapping(data, row, extra_as_variables=self.extra_as_variables)


def _bad(row: int, problem: str) -> BulkRequest:
    return BulkRequest(row, 0, "", "", row=row, problem=problem)


def _set_bit(bits: bytearray, index: int) -> None:
    byte = index >> 3
    if byte >= len(bits):
        bits.extend(bytes(byte - len(bits) + 1024))
    bits[byte] |= 1 << (index & 7)


def _bit(bits: bytearray, index: int) -> bool:
    byte = index >> 3
    return byte < len(bits) and bool(bits[byte] & (1 << (index & 7)))


def _guess_format(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    if suffix in {".csv", ".txt", ".tsv"}:
        return "csv"
    try:
        with path.open("rb") as file:
            start = file.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return "jsonl" if start.startswith(b"{") else "csv"


class ResultLog:
    """The bulk command's output: append-only JSONL, one flushed line per finished row."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._file: IO[bytes] | None = None

    def read(self) -> Skips:
        """Ids answered or failed by earlier runs (an answer beats any earlier failure)."""
        skips = Skips()
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            return skips
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        with file:
            for line in file:
                try:
                    data = json.loads(line)
                except ValueError:
                    skips.unreadable_lines += line.strip() != b""  # a line cut by a crash
                    continue
                row_id = data.get("id") if isinstance(data, dict) else None
                if isinstance(row_id, bool) or not isinstance(row_id, int | str):
                    skips.unreadable_lines += 1
                    continue
                if data.get("ok") is True:
                    skips.answered.add(row_id)
                    skips.failed.discard(row_id)
                elif row_id not in skips.answered:
                    skips.failed.add(row_id)
        return skips

    def open(self) -> None:
        """Open for appending, locked against a second run, on a fresh line."""
        try:
            file = self.path.open("ab")
        except OSError as exc:
            raise InputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                raise InputError(
                    f"{self.path} is being written by another run; wait for it to finish"
                ) from None
        if file.tell() > 0:
            with self.path.open("rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    file.write(b"\n")  # the last line was cut short by a crash
                    file.flush()
        self._file = file

    def write(self, result: BulkResult) -> None:
        assert self._file is not None, "open() first"
        data = result.to_json()
        try:
            line = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate in a bad row: escape rather than fail
            line = json.dumps(data, separators=(",", ":")).encode()
        self._file.write(line + b"\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
