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
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any, Final, Literal

import attrs

from ._bulkio import _UNPROCESSED_CODES, Entry, InputError, InputFile, Ledger, ResultLog, _decode
from ._differ import difference, explain
from .bulk import BulkRequest, RowId

__all__ = [
    "RESULT_COLUMNS",
    "OutCheck",
    "Status",
    "check_out",
    "neutralise",
    "read_results",
    "write_results",
]

#: What became of a row, as ``results`` says it. ``edited_since_sent``: OUT holds an answer
#: (or a send) for this row as it was before an edit, none for the row as it is now.
Status = Literal[
    "answered", "edited_since_sent", "failed", "invalid", "maybe_processed", "not_sent"
]

#: The columns ``results`` adds to the input's.
RESULT_COLUMNS: Final = ("status", "reply", "conversation_id", "error_code", "error")

#: A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV injection").
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


#: A phone number written with a leading ``+`` (``+14155550001``, ``+1 (415) 555-1234``):
#: digits, spaces, dots, dashes and parentheses only, at least 7 digits.
_PHONE: Final = re.compile(r"\+[0-9][0-9 ().-]*")
_PHONE_DIGITS: Final = 7


def neutralise(cell: str) -> str:
    """A cell a spreadsheet shows as text: a leading ``'`` before ``=``, ``+``, ``-``, ``@``,
    a tab or a carriage return (Excel, LibreOffice and Google Sheets hide the quote).

    A phone number (``+14155550001``, ``+1 (415) 555-1234``) is kept as it is, so that the
    file matches the CRM's numbers: a formula does harm by calling a function
    (``HYPERLINK``, ``WEBSERVICE``), naming a cell or a DDE target (``cmd|'...'!A0``), which
    all need a letter or ``|``/``!``; a cell of a ``+`` then only digits, spaces, dots, dashes
    and parentheses has none of them, and at worst a spreadsheet reads it as a number."""
    if not cell.startswith(_FORMULA_START):
        return cell
    if _PHONE.fullmatch(cell) and sum(c.isdigit() for c in cell) >= _PHONE_DIGITS:
        return cell
    return "'" + cell


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


@attrs.define
class OutCheck:
    """What ``check_out`` found: OUT against the input as it is now."""

    running: bool = False  #: a bulk run holds OUT's lock: a snapshot of a live file
    lines: int = 0  #: the rows OUT holds lines for (keyed or not)
    matched: int = 0  #: of them, rows of the input as it is now
    #: Rows edited since OUT's answered (or sent) line for them: row -> (entry, what differs)
    edited: dict[int, tuple[Entry, str]] = attrs.Factory(dict)
    #: OUT's answered or sent lines that speak for no row, edited or not (deleted rows, or
    #: another input's lines)
    deleted: list[Entry] = attrs.Factory(list)
    #: the rows of ``edited`` as a spreadsheet numbers them (``BulkRequest.sheet_row``)
    sheet_rows: dict[int, int] = attrs.Factory(dict)
    #: ``with --vars-from-columns`` (or ``without``): how OUT's lines read the rows, when
    #: they match the rows read that way and not as asked
    flag: str | None = None

    @property
    def foreign(self) -> bool:
        """OUT belongs to another input: it has answered or sent lines, and none of them is a
        row of the input, edited or not."""
        return bool(self.deleted) and not self.matched and not self.edited


def _locked(log: ResultLog) -> bool:
    """Whether a bulk run holds OUT (its path's lock, or the file's own)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    import os

    for path in (log.lock_path, log.path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


def check_out(source: InputFile, out: Path) -> OutCheck:
    """Check OUT against ``source`` (snapshot taken) as a bulk run would, and say what it
    holds that the input does not: rows edited since they were answered (or sent), with what
    differs; lines that speak for no row; a run of the other ``--vars-from-columns``.

    Raises ``InputError`` for an input the bulk command would refuse, an OUT that is not a
    bulk run's output or is damaged; ``FileNotFoundError`` when OUT does not exist.
    """
    log = ResultLog(out)
    if not out.exists():
        source.check()  # a bad input is said first
        raise FileNotFoundError(out)
    found = OutCheck()
    ledger: Ledger
    try:
        ledger = log.peek()
    except InputError:
        if not _locked(log):
            raise
        found.running = True  # read as it is, unlocked: its last line may be being written
        with out.open("rb") as file:
            ledger, _, _ = log._parse(file)
    found.lines = len(ledger)
    source.check(ledger, out=out, allow_foreign=True)
    found.matched = ledger.matched + sum(entry.matched for entry in ledger.legacy.values())
    foreign = ledger.unmatched(states=("answered", "uncertain"))
    if not foreign:
        return found
    flag, rest = source._flag_that_matches(foreign)
    if flag is not None:
        found.flag = flag[0]
        foreign = rest
    _attribute(source, ledger, foreign, found)
    return found


def _attribute(source: InputFile, ledger: Ledger, foreign: list[Entry], found: OutCheck) -> None:
    """Pair each foreign line with the row of its conversation that OUT has no line for (the
    row edited since): one whose content an invisible edit explains first, then the row of
    the same number, then the first one; the lines left over speak for no row."""
    wanted = {(e.assistant_id, e.customer_identifier) for e in foreign}
    candidates: dict[tuple[int | None, str | None], list[BulkRequest]] = {}
    for request, key in source.keyed():
        conversation = (request.assistant_id, request.customer_identifier)
        if (
            conversation in wanted
            and ledger.state_of_key(key) is None
            and request.problem is None
            and request.row is not None
        ):
            candidates.setdefault(conversation, []).append(request)
    for entry in foreign:
        rows = candidates.get((entry.assistant_id, entry.customer_identifier), [])
        chosen = next((r for r in rows if explain(entry.key, r) is not None), None)
        chosen = chosen or next((r for r in rows if r.row == entry.row), None)
        chosen = chosen or (rows[0] if rows else None)
        if chosen is None or chosen.row is None:
            found.deleted.append(entry)
            continue
        rows.remove(chosen)
        found.edited[chosen.row] = (entry, difference(entry.key, chosen))
        found.sheet_rows[chosen.row] = chosen.sheet_row or chosen.row


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
    source.take_snapshot()
    try:
        yield from result_rows(source, Path(out))
    finally:
        source.close()


def result_rows(
    source: InputFile,
    out: Path,
    check: OutCheck | None = None,
    taken: Collection[str] = (),
) -> Iterator[dict[str, Any]]:
    """``read_results`` of an input whose snapshot is taken; with ``check`` (``check_out``),
    the rows edited since OUT answered them are ``edited_since_sent``, with the earlier
    reply. A result field named like an input field of any row (``taken``) is prefixed
    ``result_``."""
    edited = check.edited if check is not None else {}
    try:
        file: IO[bytes] | None = out.open("rb")
    except FileNotFoundError:
        file = None  # no run yet: every row is not sent
    try:
        by_key, by_id, _ = _index(file) if file is not None else ({}, {}, 0)
        for request, key in source.keyed():
            data = _speaking(file, by_key.get(key), by_id.get(request.id), request)
            fields: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
            earlier = edited.get(request.row) if data is None and request.row else None
            if earlier is not None and file is not None:
                entry, what = earlier
                offset = by_key.get(entry.key) if entry.key is not None else by_id.get(entry.id)
                then = _line_at(file, offset) if offset is not None else {}
                fields["status"] = "edited_since_sent"
                was = status_of(then) if then else "maybe_processed"
                fields["reply"] = then.get("reply") if was == "answered" else None
                fields["conversation_id"] = then.get("conversation_id")
                fields["error"] = (
                    f"edited since line {entry.line} of {out.name} was written for it: {what}; "
                    + (
                        "that earlier version was answered (the reply shown is its reply)"
                        if was == "answered"
                        else "that earlier version may have been processed"
                    )
                )
            else:
                if data is None and request.problem is not None:  # never sent: invalid now
                    data = {"ok": False, "error_code": "INVALID_ROW", "error": request.problem}
                status = status_of(data)
                fields["status"] = status
                if data is not None and status == "answered":
                    fields["reply"] = data.get("reply")
                    fields["conversation_id"] = data.get("conversation_id")
                elif data is not None and "ok" in data:
                    fields["error_code"] = data.get("error_code")
                    fields["error"] = data.get("error")
            row = dict(source.record)
            for name, value in fields.items():
                row["result_" + name if name in row or name in taken else name] = value
            yield row
    finally:
        if file is not None:
            file.close()


def input_columns(source: InputFile) -> tuple[list[str], list[str]]:
    """Every field name of a JSONL input, in the order first seen (one pass); and the header
    of its results as CSV (those, then the result columns), so that a field only some lines
    have (their variables) keeps its column."""
    names: dict[str, None] = {}
    for _ in source:
        names.update(dict.fromkeys(source.record))
    fields = list(names)
    return fields, [*fields, *("result_" + n if n in names else n for n in RESULT_COLUMNS)]


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


def write_results(
    rows: Iterator[dict[str, Any]],
    file: IO[str],
    format: str,
    columns: list[str] | None = None,
) -> dict[str, int]:
    """Write ``rows`` as CSV (formulas neutralised; the header ``columns``, else the first
    row's fields) or JSONL; return the count per status."""
    counts: dict[str, int] = {}
    writer: Any = None
    for row in rows:
        status = row.get("status") if "result_status" not in row else row["result_status"]
        counts[str(status)] = counts.get(str(status), 0) + 1
        if format == "jsonl":
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
            continue
        if writer is None:  # a JSONL input's later lines: the first line's columns
            names = columns or list(row)
            writer = csv.DictWriter(file, names, restval="", extrasaction="ignore")
            writer.writerow({name: neutralise(name) for name in names})
        writer.writerow({name: neutralise(_cell(value)) for name, value in row.items()})
    return counts


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
