"""Files of the bulk command: the input (CSV or JSONL) and the resumable JSONL output.

The input is read twice: a first pass checks the whole file before anything is sent (it is
text, it has the required columns, its ids are unique so that a resumed run is unambiguous)
and counts rows; the run then streams it again, one row at a time. Neither pass keeps rows.

The output is append-only, one JSON line per finished row, flushed as it is written. A run
killed mid-line leaves a truncated last line: it is ignored when read, and the next run starts
its first line on a fresh line.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final, Literal

import attrs

from .bulk import BulkRequest, BulkResult, RowId

__all__ = ["InputError", "InputFile", "ResultLog", "Skips"]

Format = Literal["csv", "jsonl"]

REQUIRED: Final = ("assistant_id", "customer_identifier", "message")
OPTIONAL: Final = ("id", "variables")
_INTEGER: Final = re.compile(r"^\+?\d+$")

try:  # POSIX: keep two runs from appending to one output at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class InputError(Exception):
    """A file the bulk command refuses before sending anything (exit code 2)."""


@attrs.define
class Skips:
    """Ids found in the output of earlier runs."""

    answered: set[RowId] = attrs.Factory(set)
    failed: set[RowId] = attrs.Factory(set)  #: failed and never answered since
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
        """
        explicit: dict[RowId, int] = {}
        self.already_answered = self.already_failed = 0
        implicit = bytearray()  # bit n: row n has no id of its own (its id is n)
        rows = 0
        try:
            for request in self:
                rows = request.row or rows + 1
                if skips is not None:
                    if request.id in skips.answered:
                        self.already_answered += 1
                    elif request.id in skips.failed:
                        self.already_failed += 1
                if request.id != request.row:
                    first = explicit.setdefault(request.id, rows)
                    if first != rows:
                        raise InputError(
                            f"{self.path}: rows {first} and {rows} have the same id "
                            f"{request.id!r}; ids must be unique so that a rerun knows which "
                            "rows are done"
                        )
                else:
                    _set_bit(implicit, rows)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "save the file as UTF-8"
            ) from None
        except csv.Error as exc:
            raise InputError(f"{self.path}: not a readable CSV file ({exc})") from None
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        for row_id, row in explicit.items():
            if isinstance(row_id, int) and 0 < row_id <= rows and _bit(implicit, row_id):
                raise InputError(
                    f"{self.path}: row {row} has the id {row_id}, which is also the number of "
                    f"row {row_id} (a row without an id is named by its number); give every "
                    "row an id, or none"
                )
        self.rows = rows

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
