"""A bulk run's results aligned with its input (issue 21): one row per input row, in input order.

OUT is a log: lines appended as rows finish, several per row after a rerun, named by ``id``
(the row number when the input has no ``id`` column, which shifts when rows are inserted or
deleted). Read "the last line for an id wins" after an edit and answers land on the wrong rows.
``read_results`` joins by the row's content key instead, exactly as a run matches rows: each
input row gets the line that speaks for it (an answer beats any failure; otherwise the last
line), or none.

Memory: one offset per row identity in OUT (the deciding line is read back when its row comes),
not the lines themselves.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final, Literal

from ._bulkio import _UNPROCESSED_CODES, InputFile, _decode
from .bulk import RowId

__all__ = ["RESULT_COLUMNS", "Status", "neutralise", "read_results", "write_results"]

#: What became of a row, as ``results`` says it.
Status = Literal["answered", "failed", "invalid", "maybe_processed", "not_sent"]

#: The columns ``results`` adds to the input's.
RESULT_COLUMNS: Final = ("status", "reply", "conversation_id", "error_code", "error")

#: A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV injection").
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """A cell a spreadsheet shows as text: a leading ``'`` before ``=``, ``+``, ``-``, ``@``,
    a tab or a carriage return (Excel, LibreOffice and Google Sheets hide the quote)."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def _index(file: IO[bytes]) -> tuple[dict[str, int], dict[RowId, int], int]:
    """For each row identity (key; id for old lines without one), the offset of the line that
    speaks for it; and the number of lines that could not be read."""
    by_key: dict[str, int] = {}
    by_id: dict[RowId, int] = {}
    answered: set[int] = set()  # offsets of answers: final
    unreadable = 0
    offset = 0
    file.seek(0)
    for line in file:
        here, offset = offset, offset + len(line)
        if not line.strip():
            continue
        data, problem = _decode(line.removeprefix(b"\xef\xbb\xbf"))
        if problem is not None:
            unreadable += 1
            continue
        if "cut_line" in data:
            continue
        key = data.get("key")
        table: dict[Any, int] = by_key if isinstance(key, str) else by_id
        name = key if isinstance(key, str) else data["id"]
        previous = table.get(name)
        if previous is not None and previous in answered:
            continue  # an answer is final
        table[name] = here
        if data.get("ok") is True:
            answered.add(here)
    return by_key, by_id, unreadable


def _line_at(file: IO[bytes], offset: int) -> dict[str, Any]:
    file.seek(offset)
    data, _ = _decode(file.readline().removeprefix(b"\xef\xbb\xbf"))
    assert isinstance(data, dict)
    return data


def status_of(data: dict[str, Any] | None) -> Status:
    """A row's status from the line that speaks for it (None: OUT has none)."""
    if data is None or data.get("sending") is False:
        return "not_sent"
    if data.get("ok") is True:
        return "answered"
    if data.get("sending") is True:
        return "maybe_processed"
    if data.get("error_code") == "INVALID_ROW":
        return "invalid"
    stated = data.get("maybe_processed")
    if stated is True or (stated is None and data.get("error_code") not in _UNPROCESSED_CODES):
        return "maybe_processed"
    return "failed"


def read_results(
    input: str | Path,
    out: str | Path,
    *,
    format: Literal["csv", "jsonl"] | None = None,
    delimiter: str | None = None,
    extra_as_variables: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield one dict per row of ``input``, in input order: the row's own fields (a CSV row's
    cells by column, a JSONL line's object) and ``status``, ``reply``, ``conversation_id``,
    ``error_code``, ``error`` from the bulk run's ``out``, joined by content as a run matches
    rows. Give the options the run was given (``--format``, ``--delimiter``,
    ``--vars-from-columns``): they decide a row's content. A result field named like an input
    column is prefixed ``result_``.

    Raises ``InputError`` for an input the bulk command would refuse.
    """
    source = InputFile(
        Path(input), format=format, delimiter=delimiter, extra_as_variables=extra_as_variables
    )
    out = Path(out)
    try:
        file: IO[bytes] | None = out.open("rb")
    except FileNotFoundError:
        file = None  # no run yet: every row is not sent
    source.take_snapshot()
    try:
        by_key, by_id, _ = _index(file) if file is not None else ({}, {}, 0)
        for request, key in source.keyed():
            data = _speaking(file, by_key.get(key), by_id.get(request.id), request)
            if data is None and request.problem is not None:  # never sent: invalid now
                data = {"ok": False, "error_code": "INVALID_ROW", "error": request.problem}
            status = status_of(data)
            fields: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
            fields["status"] = status
            if data is not None and status == "answered":
                fields["reply"] = data.get("reply")
                fields["conversation_id"] = data.get("conversation_id")
            elif data is not None and "ok" in data:
                fields["error_code"] = data.get("error_code")
                fields["error"] = data.get("error")
            row = dict(source.record)
            for name, value in fields.items():
                row["result_" + name if name in row else name] = value
            yield row
    finally:
        source.close()
        if file is not None:
            file.close()


def _speaking(
    file: IO[bytes] | None, offset: int | None, old: int | None, request: Any
) -> dict[str, Any] | None:
    """The line of OUT that speaks for a row: by key; else an old line (no key) by id, if it
    names the same assistant and customer."""
    if file is None:
        return None
    if offset is not None:
        return _line_at(file, offset)
    if old is None:
        return None
    data = _line_at(file, old)
    same = data.get("assistant_id") in (None, request.assistant_id) and data.get(
        "customer_identifier"
    ) in (None, request.customer_identifier)
    return data if same else None


def write_results(rows: Iterator[dict[str, Any]], file: IO[str], format: str) -> dict[str, int]:
    """Write ``rows`` as CSV (formulas neutralised) or JSONL; return the count per status."""
    counts: dict[str, int] = {}
    writer: Any = None
    for row in rows:
        status = row.get("status") if "result_status" not in row else row["result_status"]
        counts[str(status)] = counts.get(str(status), 0) + 1
        if format == "jsonl":
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
            continue
        if writer is None:  # a JSONL input's later lines: the first line's columns
            writer = csv.DictWriter(file, list(row), restval="", extrasaction="ignore")
            writer.writerow({name: neutralise(name) for name in row})
        writer.writerow({name: neutralise(_cell(value)) for name, value in row.items()})
    return counts


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
