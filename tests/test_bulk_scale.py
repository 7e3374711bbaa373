"""Resuming on a big OUT (issue 21 item 8): the shortcuts that make it fast read exactly what
the long way reads, and a run's memory per row is a compact key set.

The shortcuts: a row's digest written without an encoder per row (``content_number``), the
usual CSV row made without ``_csv_request``, a line of OUT read without json
(``fast_line``), keys as integers in a ``KeyTable``, and a resume that reads no row again once
every row is answered (``InputFile.unanswered``). Each is compared with the long way on
generated data; the time and memory figures come from ``benchmarks/resume_scale.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from autocalls_async import _bulkio, _notes
from autocalls_async._bulkio import (
    InputError,
    InputFile,
    Ledger,
    ResultLog,
    _decode,
    _state,
    content_number,
    fast_line,
    line_of,
    row_digest,
)
from autocalls_async._keys import KeyTable, key_number, number_of
from autocalls_async._notes import DataNotes
from autocalls_async.bulk import BulkRequest
from benchmarks.resume_scale import build

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(st.characters(codec="utf-8"), max_size=12) | st.text(max_size=12)
ids = st.none() | st.integers(-(2**40), 2**40) | texts
variables = st.none() | st.dictionaries(texts, st.none() | st.integers() | texts, max_size=3)


def digest_the_long_way(request: BulkRequest) -> int:
    """The digest as issue 10 wrote it (OUT files written since must keep matching)."""
    explicit = request.id if request.id != request.row else None
    content = [
        explicit,
        request.assistant_id,
        request.customer_identifier,
        request.message,
        request.variables,
        request.problem,
    ]
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=repr)
    return int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), 16)


@SETTINGS
@given(
    row=st.integers(1, 10**6),
    row_id=ids,
    assistant=st.integers(0, 2**40),
    customer=texts,
    message=texts,
    variables=variables,
    problem=st.none() | texts,
)
def test_a_rows_digest_is_the_one_earlier_versions_wrote(
    row: int,
    row_id: Any,
    assistant: int,
    customer: str,
    message: str,
    variables: dict[str, Any] | None,
    problem: str | None,
) -> None:
    request = BulkRequest(
        row if row_id is None else row_id, assistant, customer, message, variables, row, problem
    )
    assert content_number(request) == digest_the_long_way(request)
    assert row_digest(request) == f"{digest_the_long_way(request):016x}"


cells = st.sampled_from(["", " ", "123", " 7 ", "+5", "x1", "0", "1.5", "٣", "-1"]) | texts
json_cells = st.sampled_from(["", " ", "{}", '{"a": 1}', "[1]", "nul", '{"x": "y"}'])


@SETTINGS
@given(
    rows=st.lists(st.tuples(cells, cells, cells, cells, json_cells, cells), min_size=1, max_size=6),
    with_id=st.booleans(),
    with_variables=st.booleans(),
    extra_as_variables=st.booleans(),
)
def test_the_usual_csv_row_is_made_as_the_long_way_makes_it(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[str, ...]],
    with_id: bool,
    with_variables: bool,
    extra_as_variables: bool,
) -> None:
    """Every row, usual or not: the request the reader yields is the one ``_csv_request``
    makes of its cells."""
    header = ["assistant_id", "customer_identifier", "message", "note"]
    header += ["id"] * with_id + ["variables"] * with_variables
    path = tmp_path_factory.mktemp("csv") / "in.csv"
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for assistant, customer, message, note, variables_cell, row_id in rows:
            record = [assistant, customer, message, note]
            record += [row_id] * with_id + [variables_cell] * with_variables
            writer.writerow(record)
    source = InputFile(path, extra_as_variables=extra_as_variables)
    with path.open(encoding="utf-8", newline="") as file:
        records = list(csv.reader(file))[1:]
    # (a record's number as a spreadsheet shows it: the header is 1, blank records count)
    written = [(cells, sheet) for sheet, cells in enumerate(records, 2) if "".join(cells).strip()]
    made = list(source)
    assert len(made) == len(written)
    for number, (request, (record, sheet)) in enumerate(zip(made, written, strict=True), 1):
        assert request == source._csv_request(header, record, number, sheet)


@SETTINGS
@given(
    rows=st.lists(st.tuples(cells, cells, cells, cells, json_cells, cells), min_size=1, max_size=6),
    with_id=st.booleans(),
    with_variables=st.booleans(),
    extra_as_variables=st.booleans(),
    copies=st.integers(1, 3),
)
def test_the_check_keys_each_row_as_the_requests_are_keyed(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[str, ...]],
    with_id: bool,
    with_variables: bool,
    extra_as_variables: bool,
    copies: int,
) -> None:
    """``check`` keys the usual row without making its request (``InputFile._items``): its
    keys, and the notes and outcomes, are those of the requests the reader yields."""
    header = ["assistant_id", "customer_identifier", "message", "note"]
    header += ["id"] * with_id + ["variables"] * with_variables
    path = tmp_path_factory.mktemp("csv") / "in.csv"
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for assistant, customer, message, note, variables_cell, row_id in rows * copies:
            record = [assistant, customer, message, note]
            record += [row_id] * with_id + [variables_cell] * with_variables
            writer.writerow(record)
    source = InputFile(path, extra_as_variables=extra_as_variables)
    source.take_snapshot()
    observed: list[BulkRequest] = []
    notes = DataNotes()
    try:
        try:
            source.check(Ledger(), notes=notes, observe=lambda request, _: observed.append(request))
        except InputError:  # ids repeated: refused either way
            assume(False)
        numbered = list(source.numbered())
    finally:
        source.close()
    assert source.checked is not None
    keys = [(digest, occurrence) for _, digest, occurrence in numbered]
    repeats = dict(zip(source.checked.repeat_rows, source.checked.repeat_counts, strict=True))
    assert [(d, repeats.get(n, 1)) for n, d in enumerate(source.checked.digests, 1)] == keys
    assert observed == [request for request, _, _ in numbered]
    long_way = DataNotes()
    for request, digest, occurrence in numbered:
        long_way.add(request, digest, occurrence)
    assert notes.state() == long_way.state()


def journal(key: str, sending: bool, **more: Any) -> bytes:
    data = {"id": 1, "sending": sending, "key": key, "row": 1, "assistant_id": 123}
    return line_of({**data, "customer_identifier": "+1", **more}) + b"\n"


def answer(key: str, reply: str = "Hi", row_id: Any = 1, **more: Any) -> bytes:
    data = {"id": row_id, "ok": True, "key": key, "row": 1, "assistant_id": 123}
    data |= {"customer_identifier": "+1555", "conversation_id": "7c9e", "reply": reply}
    return line_of({**data, "function_calls": [], "ai_disabled": False, **more}) + b"\n"


KEY = "6c071d3e46ca4c56.1"


def read_the_long_way(line: bytes) -> tuple[int, int] | None:
    """A line's key number and state code as json reads it (None: not a keyed line)."""
    data, problem = _decode(line)
    if problem is not None or "cut_line" in data or not isinstance(data.get("key"), str):
        return None
    codes = {"answered": 1, "failed": 2, "uncertain": 3, None: 4}
    return key_number(data["key"]), codes[_state(data)]


@SETTINGS
@given(
    line=st.sampled_from(
        [
            answer(KEY),
            answer("00000000000000ff.12", reply='é \\ " \n \t \x00 \u2028', row_id="A-7"),
            journal(KEY, True),
            journal(KEY, False, error_code="INSUFFICIENT_BALANCE"),
            answer(KEY, note=-1.5e3),  # another shape: read field by field
            answer(KEY, reply="x", function_calls=[{"name": "f"}]),
            line_of({"id": 1, "ok": False, "key": KEY, "error_code": "X", "status": 500}) + b"\n",
        ]
    ),
    at=st.integers(0, 400),
    edit=st.sampled_from(["delete", "insert", "replace", "cut"]),
    byte=st.sampled_from(list(b'{}[]":,\\ \t\x00\x1f\x7fa0e-.nt') + [0xC3, 0xA9, 0xFF]),
)
@example(line=answer(KEY), at=5, edit="replace", byte=ord("o"))  # "ok" named twice
def test_a_line_read_without_json_reads_as_json_does(
    line: bytes, at: int, edit: str, byte: int
) -> None:
    """Damage anywhere in a line: the shortcut either declines it (it is then decoded the
    long way, and refused if it is damage) or reads exactly what json reads."""
    at = min(at, len(line))
    if edit == "delete":
        line = line[:at] + line[at + 1 :]
    elif edit == "insert":
        line = line[:at] + bytes([byte]) + line[at:]
    elif edit == "replace":
        line = line[:at] + bytes([byte]) + line[at + 1 :]
    else:
        line = line[:at]
    fast = fast_line(line)
    if fast is not None:
        assert fast == read_the_long_way(line)


def test_the_lines_a_run_writes_take_the_shortcut_and_others_do_not() -> None:
    long_way = answer("00000000000000ff.12", reply='é \\ " \n \t \u2028', row_id="A-7")
    other_shape = answer(KEY, note=None, more=[], less=1.5)
    usual = (answer(KEY), long_way, journal(KEY, True))
    for line in (*usual, journal(KEY, False, error_code="X"), other_shape):
        assert fast_line(line) is not None, line
        assert fast_line(line) == read_the_long_way(line)
    assert fast_line(answer(KEY).rstrip(b"\n")) is not None  # a last line without its newline
    for line in (
        answer(KEY, function_calls=[{"name": "f"}]),  # not scalars: decoded
        line_of({"id": 1, "ok": False, "key": KEY}) + b"\n",  # a failure: decoded
        answer(KEY)[:-3] + b"\n",  # cut short
        answer(KEY)[:40] + answer(KEY),  # two lines glued
        answer(KEY).replace(b'"Hi"', b'"H\ti"'),  # a tab in a string
        answer(KEY).replace(b'"Hi"', b'"H\\qi"'),  # an escape json does not know
        answer(KEY).replace(b'"Hi"', b'"H\xffi"'),  # not UTF-8
        answer(KEY).replace(b'"reply"', b'"ok"'),  # "ok" named twice: json keeps the last
        answer(KEY).replace(b'"row":1', b'"row":01'),  # not a JSON number
        b" " + answer(KEY),  # not the compact shape a run writes
        line_of({"id": None, "cut_line": 3}) + b"\n",
        line_of({"id": 1, "ok": True}) + b"\n",  # an old line: no key
    ):
        assert fast_line(line) is None, line


@SETTINGS
@given(
    st.text(st.sampled_from("0123456789+-() ./٣²x@"), max_size=16)
    | st.from_regex(r"\+?[0-9]{5,14}", fullmatch=True)
)
def test_a_phone_numbers_last_digits_are_read_as_the_long_way_reads_them(text: str) -> None:
    tail = _notes._tail(text)
    expected = tail if _notes.phone_like(text) and len(tail) >= 7 else None
    assert _notes._phone_tail(text) == expected


def test_key_numbers_and_the_key_table() -> None:
    assert key_number("00000000000000ff.1") == 0xFF
    assert key_number("00000000000000ff.2") == number_of(0xFF, 2) != 0xFF
    assert key_number("0000000000000000.1") == 1  # 0 marks an empty slot
    assert key_number("k.1") == key_number("k.1") != key_number("k.2")  # a hand-made key
    table = KeyTable(0, "B")
    numbers = [n << 4 | 5 for n in range(1, 40)]  # the same low bits: every one collides
    for number in numbers:
        slot = table.slot(number)
        assert not table.numbers[slot]
        table.put(slot, number, number & 0xFF)
    assert len(table) == 39 and len(table.numbers) == 64  # grew from 16, kept under 70 % full
    assert all(table.get(number) == number & 0xFF for number in numbers)
    assert table.get(7) is None
    assert sorted(table.items()) == sorted((n, n & 0xFF) for n in numbers)


def write_run(folder: Path, rows: int) -> tuple[Path, Path]:
    return build(folder, rows)


def test_a_resume_reads_no_row_again_once_every_row_is_answered(tmp_path: Path) -> None:
    source_path, out = write_run(tmp_path, 50)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-2]))  # the last row's answer and journal: gone
    source = InputFile(source_path)
    source.take_snapshot()
    source.check(ResultLog(out).peek())
    assert (source.rows, source.already_answered) == (50, 49)
    assert list(source.unanswered()) == [
        (request, key) for request, key in InputFile(source_path).keyed() if request.row == 50
    ]
    out.write_bytes(b"".join(lines))
    source.check(ResultLog(out).peek())
    assert source.snapshot is not None
    source.snapshot.path.unlink()  # a pass would now fail: none is made
    assert list(source.unanswered()) == []
    assert list(InputFile(source_path).unanswered()) == list(InputFile(source_path).keyed())
    source.close()


def test_unmatched_lines_are_read_back_from_out(tmp_path: Path) -> None:
    """Only lines that speak for no row are read back, with what they name, in OUT's order;
    a ledger made by hand knows its keys only."""
    source_path, out = write_run(tmp_path, 6)
    edited = source_path.read_text().replace("Hello number 2\n", "Hello again\n")
    source_path.write_text(edited.replace("Hello number 5\n", "Hello once more\n"))
    ledger = ResultLog(out).peek()
    keyed = list(InputFile(source_path).keyed())
    for request, key in keyed:
        ledger.state_of(request, key)
    (two, five) = ledger.unmatched()
    assert (two.line, two.row, two.customer_identifier) == (3, 2, "+15550000002")
    assert two.state == "answered"
    assert (five.line, five.row, five.id) == (9, 5, 5)
    assert ledger.unmatched(states=("failed",)) == []
    assert {entry.row for entry in ledger.by_key.values()} == set(range(1, 7))
    by_hand = Ledger()
    by_hand.note("k.1", 1, {"ok": True}, 1)
    assert [(e.key, e.state) for e in by_hand.unmatched()] == [("k.1", "answered")]


def test_phone_spellings_are_named_in_a_second_pass() -> None:
    notes = DataNotes()
    rows = [
        BulkRequest(1, 123, "+1 (415) 555-1234", "a", row=1),
        BulkRequest(2, 123, "4155551234", "b", row=2),
        BulkRequest(3, 123, "+14155551234", "c", row=3),
        BulkRequest(4, 123, "+14155559999", "d", row=4),
        BulkRequest(5, 123, "415-555-1234", "e", row=5),
    ]
    keyed = [(request, n, 1) for n, request in enumerate(rows)]
    for request, digest, occurrence in keyed:
        notes.add(request, digest, occurrence)
    assert notes.merged == 1 and len(notes.phones) == 2
    notes.find_rows(keyed)
    (line,) = notes.lines(e164=False)
    assert line.startswith(
        "1 phone number(s) written in several ways, each way its own conversation: "
        "+1 (415) 555-1234 = 4155551234 = +14155551234 = 415-555-1234."
    )
    # With --e164 the spellings are compared as sent: written one way, no note.
    as_sent = DataNotes(
        normalize=lambda customer: "+1" + "".join(filter(str.isdigit, customer))[-10:]
    )
    for request, digest, occurrence in keyed:
        as_sent.add(request, digest, occurrence)
    as_sent.find_rows(keyed)
    assert as_sent.lines(e164=True) == []
    notes.find_rows(keyed, phones=False)
    assert notes.spellings == {}


def test_a_resumes_memory_is_a_compact_key_set(tmp_path: Path) -> None:
    """Reading OUT and checking the input against it, as a resume does, keeps a few bytes per
    row (issue 21 measured about 500 before): the tables of keys, no object per row. (Reading
    OUT and copying the input also take a fixed megabyte or two of buffers, left out here.)"""
    rows = 20_000
    source_path, out = write_run(tmp_path, rows)
    tracemalloc.start()
    try:
        ledger = ResultLog(out).peek()
        kept, _ = tracemalloc.get_traced_memory()
        source = InputFile(source_path)
        source.take_snapshot()
        notes = DataNotes()
        tracemalloc.reset_peak()
        source.check(ledger, out=out, notes=notes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        source.close()
    assert source.already_answered == rows
    assert kept / rows < 30, f"OUT: {kept / rows:.0f} bytes a row"  # and a few free lists
    assert peak / rows < 100, f"OUT and the input: {peak / rows:.0f} bytes a row"


def test_a_big_out_reads_as_its_lines_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT is read a block of usual lines at a time: a block with another line (a failure, a
    withdrawal, an old line, damage) is read line by line, and line numbers stay right."""
    monkeypatch.setattr(_bulkio, "_BLOCK", 1 << 16)  # about 170 lines: 12 blocks
    source_path, out = write_run(tmp_path, 1000)
    lines = out.read_bytes().splitlines(keepends=True)
    keys = [json.loads(line)["key"] for line in lines]
    lines[1299] = line_of({"id": 650, "ok": False, "key": keys[1299], "status": 503}) + b"\n"
    lines[1301] = journal(keys[1301], False, error_code="INSUFFICIENT_BALANCE")
    lines[1303] = b"\n"  # a blank line
    lines[1701] = lines[1701].replace(b'.1"', b'.2"')  # the second of two identical rows
    lines[1304] = line_of({"id": 77, "ok": True}) + b"\n"  # an old line, without a key
    out.write_bytes(b"".join(lines) + answer(KEY)[:30])  # and a last line cut short
    ledger = ResultLog(out).peek()
    expected: dict[str, Any] = {}
    for line in lines:
        data, problem = _decode(line)
        key = data.get("key") if problem is None else None
        if isinstance(key, str) and expected.get(key) != "answered":
            expected[key] = _state(data)
    assert {key: entry.state for key, entry in ledger.by_key.items()} == expected
    assert expected[keys[1299]] == "failed" and expected[keys[1301]] is None
    assert list(ledger.legacy) == [77] and ledger.unreadable_lines == 1

    garbled = list(lines)
    garbled[1800] = b'{"id":901,"ok":tru#garbled\n'
    out.write_bytes(b"".join(garbled))
    with pytest.raises(InputError, match="line 1801 cannot be read"):
        ResultLog(out).peek()


def test_the_resume_benchmark_measures_a_dry_run_and_a_resume(tmp_path: Path) -> None:
    """``python -m benchmarks.resume_scale``, small: every run finds every row answered, the
    first two without an index, the last two with the one the first resume left."""
    from benchmarks.resume_scale import measure

    source_path, out = write_run(tmp_path, 300)
    before = out.read_bytes()
    results = measure(source_path, out)
    names = ["dry run, no index", "resume, no index", "dry run", "resume"]
    assert [name for name, *_ in results] == names
    for name, seconds, peak, code, said in results:
        assert code == 0 and seconds > 0 and peak > 0, (name, said)
        if name.startswith("dry run"):
            assert "300 already answered" in said
        else:
            assert "0 answered, 0 failed, 300 skipped" in said
    assert out.read_bytes() == before  # nothing was sent, nothing written
    assert ResultLog(out).index_path.exists()


@pytest.mark.parametrize(
    "damage",
    [
        (700, '123,+1,"a quote"inside\n'),  # not valid CSV (strict)
        (1300, '123,+1,"never closed\n'),
        (1025, "123,+1,three,four\n"),  # a field too many
        (600, '123,+1,"a message\n123,+2,swallowed"\n'),  # looks like a row: refused
        (513, '123,+1,"two\nlines"\n\n\n'),  # a genuine multi-line field, blank lines after
    ],
)
def test_csv_records_read_a_batch_at_a_time_read_as_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: tuple[int, str]
) -> None:
    """Records are read ``_CSV_BATCH`` at a time (the field size limit raised for the batch):
    the rows, and the refusal with its row and line numbers, are those of reading one record
    at a time."""
    at, text = damage
    rows = [f"123,+{n},message {n}\n" for n in range(1, 1500)]
    rows.insert(at - 1, text)
    source = tmp_path / "in.csv"
    source.write_text("assistant_id,customer_identifier,message\n" + "".join(rows))

    def read() -> tuple[list[BulkRequest], str | None]:
        found: list[BulkRequest] = []
        try:
            found.extend(InputFile(source))
        except InputError as exc:
            return found, str(exc)
        return found, None

    batched = read()
    monkeypatch.setattr(_bulkio, "_CSV_BATCH", 1)
    assert batched == read()
    assert batched[1] is not None or len(batched[0]) == 1500


@pytest.mark.parametrize("sized", [True, False])
def test_out_reads_as_its_lines_say_while_its_table_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sized: bool
) -> None:
    """The table of OUT's keys grows while a block is read (here from its smallest size, or
    sized for half the keys: rows only ever sent, never answered): every key is still found,
    with the state its lines say."""
    if not sized:
        monkeypatch.setattr(_bulkio, "_count_lines", lambda file: 0)
    source_path, out = write_run(tmp_path, 600)
    lines = out.read_bytes().splitlines(keepends=True)
    kept = []
    for n in range(0, len(lines), 2):  # every third row: its "sending" line only
        kept += lines[n : n + 1] if n % 6 == 0 else lines[n : n + 2]
    extra = [journal(f"{n:016x}.1", True) for n in range(1, 700)]  # rows sent, no answer
    out.write_bytes(b"".join(kept[:300] + extra + kept[300:]))
    expected: dict[str, Any] = {}
    for line in kept + extra:
        data, _ = _decode(line)
        if expected.get(data["key"]) != "answered":
            expected[data["key"]] = _state(data)
    ledger = ResultLog(out).peek()
    assert {key: entry.state for key, entry in ledger.by_key.items()} == expected
    for key, state in expected.items():
        assert ledger.state_of_key(key) == state
