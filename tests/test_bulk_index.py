"""The index a run leaves beside OUT (issue 21 item 8, ``_checkpoint``): a resume that trusts it
finds exactly what reading OUT and the input finds, reads neither again when they are the bytes
it was made from, and never trusts it for any other bytes: an edited, truncated, replaced or
damaged OUT, an edited input, another way of reading it, a damaged or foreign index.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import _bulkio, _checkpoint
from autocalls_async._bulkio import InputError, InputFile, ResultLog, line_of
from autocalls_async._notes import DataNotes
from autocalls_async.cli import job
from autocalls_async.cli import main as cli_main
from autocalls_async.testing import MockAutocalls
from benchmarks.resume_scale import build
from tests.test_cli import TOKEN, ThreadedServer, read_lines, run_cli, write_csv

EXIT_USAGE = 2
EXIT_MAX_REPLIES = 9


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def close_run(source_path: Path, out: Path, **options: Any) -> None:
    """What a run does before it sends and as it closes, sending nothing: read OUT, check the
    input against it, leave the index."""
    log = ResultLog(out)
    log.open()
    source = InputFile(source_path, **options)
    try:
        ledger = log.read()
        source.take_snapshot()
        source.check(ledger, out=out, notes=DataNotes(), allow_foreign=True)
        log.checkpoint(source.checked)
    finally:
        log.close()
        source.close()


def found(source_path: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Everything a dry run's check finds: counts, examples, what is left to send, the rows
    observed, the notes, OUT's table (with the bits of the lines matched) and its foreign
    lines."""
    ledger = ResultLog(out).peek()
    source = InputFile(source_path, **options)
    source.take_snapshot()
    observed: list[tuple[int | None, str | None]] = []
    notes = DataNotes()
    try:
        source.check(
            ledger,
            out=out,
            notes=notes,
            allow_foreign=True,
            observe=lambda request, state: observed.append((request.row, state)),
        )
        notes.find_rows(source.numbered())
        unanswered = list(source.unanswered())
    finally:
        source.close()
    return {
        "counts": (
            source.rows,
            source.already_answered,
            source.already_failed,
            source.uncertain,
            source.already_invalid,
        ),
        "examples": source.examples,
        "unanswered": unanswered,
        "observed": observed,
        "notes": notes.lines(e164=False),
        "header": (source.header, source.extra_columns),
        "table": sorted(ledger.keys.items()),
        "foreign": [(e.line, e.state, e.id) for e in ledger.unmatched()],
        "unreadable": ledger.unreadable_lines,
    }


def without_index(source_path: Path, out: Path, **options: Any) -> dict[str, Any]:
    index = ResultLog(out).index_path
    kept = index.read_bytes() if index.exists() else None
    index.unlink(missing_ok=True)
    try:
        return found(source_path, out, **options)
    finally:
        if kept is not None:
            index.write_bytes(kept)


def varied(folder: Path) -> tuple[Path, Path]:
    """A run's OUT of every kind of row: answered, failed (valid and invalid), may have been
    processed, withdrawn, never sent; identical rows; one phone number spelled two ways."""
    source_path, out = build(folder, 40)
    text = source_path.read_text()
    text += "123,+1 555 000 0007,Hello number 7\n"  # a spelling of row 7's customer
    text += "123,+15550000003,Hello number 3\n" * 2  # two copies of row 3
    text += "abc,+15550000099,not a number\n"  # invalid
    source_path.write_text(text)
    lines = out.read_bytes().splitlines(keepends=True)
    keyed = list(InputFile(source_path).keyed())
    keys = {request.row: key for request, key in keyed}
    answer = {
        "row": None,
        "assistant_id": 123,
        "conversation_id": "c",
        "reply": "r",
        "function_calls": [],
        "ai_disabled": False,
    }
    lines[19] = line_of({"id": 10, "ok": False, "key": keys[10], "status": 503}) + b"\n"
    lines[21] = line_of({"id": 11, "ok": False, "key": keys[11], "status": 500}) + b"\n"
    del lines[23]  # row 12: its "sending" line only
    lines.append(line_of({"id": 43, "sending": True, "key": keys[43]}) + b"\n")
    lines.append(line_of({"id": 43, "sending": False, "key": keys[43]}) + b"\n")
    lines.append(line_of({"id": 42, "ok": True, "key": keys[42], **answer}) + b"\n")
    bad = {"id": 44, "ok": False, "key": keys[44], "error_code": "INVALID_ROW"}
    lines.append(line_of(bad) + b"\n")
    out.write_bytes(b"".join(lines))
    return source_path, out


def test_a_resume_on_the_index_finds_what_reading_everything_finds(tmp_path: Path) -> None:
    source_path, out = varied(tmp_path)
    expected = found(source_path, out)
    assert expected["counts"] == (44, 38, 2, 2, 1)  # sanity: every kind is there
    assert expected["notes"] and expected["observed"]
    close_run(source_path, out)
    assert ResultLog(out).index_path.exists()
    assert found(source_path, out) == expected
    # And without it, still.
    assert without_index(source_path, out) == expected


def test_a_resume_on_the_index_reads_no_line_of_out_nor_row_of_the_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of it: once every row is answered, neither OUT's lines nor the input's rows
    are read again (the input is copied, and OUT hashed, once each)."""
    source_path, out = build(tmp_path, 200)
    close_run(source_path, out)
    monkeypatch.setattr(_bulkio, "_count_lines", None)  # reading OUT whole would call it
    monkeypatch.setattr(_bulkio._LineReader, "line", None)
    monkeypatch.setattr(_bulkio, "_USUAL_LINES", None)
    monkeypatch.setattr(InputFile, "__iter__", None)  # so would reading a row
    ledger = ResultLog(out).peek()
    source = InputFile(source_path)
    source.take_snapshot()
    source.check(ledger, out=out, notes=DataNotes())
    assert (source.rows, source.already_answered, list(source.unanswered())) == (200, 200, [])
    source.close()


def test_the_lines_a_later_run_appended_are_read_after_the_index(tmp_path: Path) -> None:
    source_path, out = varied(tmp_path)
    close_run(source_path, out)
    keys = {request.row: key for request, key in InputFile(source_path).keyed()}
    with out.open("ab") as file:  # a later run: row 12 answered, row 43 failed, row 2 again
        file.write(line_of({"id": 12, "ok": True, "key": keys[12]}) + b"\n")
        file.write(line_of({"id": 43, "ok": False, "key": keys[43], "status": 400}) + b"\n")
        file.write(line_of({"id": 2, "ok": False, "key": keys[2], "status": 400}) + b"\n")
    expected = without_index(source_path, out)
    assert found(source_path, out) == expected
    assert expected["counts"][1:4] == (39, 3, 1)
    close_run(source_path, out)  # the index now covers them too
    assert found(source_path, out) == expected


def same_size_edit(out: Path, line: int, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    lines = out.read_bytes().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    size = out.stat().st_size
    out.write_bytes(b"".join(lines))
    assert out.stat().st_size == size


def test_an_out_edited_in_the_middle_is_read_whole_and_damage_refused(tmp_path: Path) -> None:
    """The index covers OUT's bytes by their SHA-256: a line damaged in place, OUT's size
    unchanged, is found and refused as without an index."""
    source_path, out = build(tmp_path, 30)
    close_run(source_path, out)
    index = ResultLog(out).index_path.read_bytes()
    same_size_edit(out, 22, b'"ok":true', b'"ok":tru#')
    with pytest.raises(InputError, match="line 22 cannot be read"):
        ResultLog(out).peek()
    assert ResultLog(out).index_path.read_bytes() == index  # not trusted, and still there


@pytest.mark.parametrize(
    "change",
    [
        "answer edited",
        "out truncated",
        "out replaced",
        "index damaged",
        "index truncated",
        "index extended",
        "index of another format",
        "index of another out",
    ],
)
def test_an_index_is_trusted_only_for_the_bytes_it_was_made_from(
    tmp_path: Path, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_path, out = varied(tmp_path)
    close_run(source_path, out)
    index_path = ResultLog(out).index_path
    index = index_path.read_bytes()
    if change == "answer edited":  # row 5's answer speaks for no row now
        lines = out.read_bytes().splitlines()
        key = json.loads(lines[9])["key"]
        flipped = key[:3] + ("0" if key[3] != "0" else "1") + key[4:]
        same_size_edit(out, 10, key.encode(), flipped.encode())
    elif change == "out truncated":
        out.write_bytes(out.read_bytes()[:-300])
    elif change == "out replaced":
        other_source, other = build(mkdir(tmp_path / "other"), 40)
        other.replace(out)
    elif change == "index damaged":
        middle = len(index) // 2
        index_path.write_bytes(index[:middle] + bytes([index[middle] ^ 1]) + index[middle + 1 :])
    elif change == "index truncated":
        index_path.write_bytes(index[:-1])
    elif change == "index extended":
        index_path.write_bytes(index + b"\n")
    elif change == "index of another format":
        monkeypatch.setattr(_checkpoint, "FORMAT", _checkpoint.FORMAT + 1)
    else:
        other_source, other = build(mkdir(tmp_path / "other"), 40)
        close_run(other_source, other)
        ResultLog(other).index_path.replace(index_path)
    with out.open("rb") as file:
        assert _checkpoint.load(index_path, file) is None
    expected = without_index(source_path, out)
    assert found(source_path, out) == expected
    if change == "answer edited":
        assert (5, "uncertain") in expected["observed"]  # its "sending" line says so


@pytest.mark.parametrize(
    ("edit", "options"),
    [
        (lambda text: text.replace("Hello number 9,", "Hello number nine,"), {}),
        (lambda text: text + "\n123,+15550000077,one more,x", {}),
        (lambda text: text, {"extra_as_variables": True}),
        (lambda text: text.replace(",", ";"), {"delimiter": ";"}),
    ],
)
def test_an_input_edited_or_read_otherwise_is_read_whole(
    tmp_path: Path, edit: Any, options: dict[str, Any]
) -> None:
    source_path, out = build(tmp_path, 30)
    lines = source_path.read_text().splitlines()  # and a column not sent (unless asked to)
    source_path.write_text("\n".join([lines[0] + ",note", *(line + ",x" for line in lines[1:])]))
    close_run(source_path, out)
    source_path.write_text(edit(source_path.read_text()))
    expected = without_index(source_path, out, **options)
    assert found(source_path, out, **options) == expected


def test_a_dry_run_never_writes_the_index(tmp_path: Path) -> None:
    source_path, out = build(tmp_path, 20)
    assert cli_main(["bulk", str(source_path), "--out", str(out), "--dry-run"]) == 0
    assert not ResultLog(out).index_path.exists()
    close_run(source_path, out)
    index = ResultLog(out).index_path.read_bytes()
    source_path.write_text(source_path.read_text() + "123,+1,new\n")
    assert cli_main(["bulk", str(source_path), "--out", str(out), "--dry-run"]) == 0
    assert ResultLog(out).index_path.read_bytes() == index


async def test_runs_through_the_index_send_each_row_once_and_refuse_damage(
    tmp_path: Path,
) -> None:
    """The real command, as subprocesses against the emulator: a run stopped after 3 replies
    leaves an index (mode 0600); the resume sends the 5 rows left, once each; a third run
    sends nothing; OUT damaged in place (same size) is then refused, nothing sent; and an
    edited input is reported, not sent, though an index describes the old one."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    rows = [
        {"assistant_id": 123, "customer_identifier": f"+{n}", "message": f"m{n}"}
        for n in range(1, 9)
    ]
    write_csv(source, rows)
    bulk = ("bulk", str(source), "--out", str(out), "--rate-limit", "none", "--progress", "off")
    index = ResultLog(out).index_path
    async with MockAutocalls(rate_limit=None, assistants=(123,)) as server:
        env = {"AUTOCALLS_API_TOKEN": "index-test", "AUTOCALLS_BASE_URL": server.base_url}

        def sent() -> list[str]:
            return sorted(str(r.body["message"]) for r in server.requests if r.processed)

        first = await run_cli(*bulk, "--max-replies", "3", **env)
        assert first.code == EXIT_MAX_REPLIES, first.err
        assert index.exists() and stat.S_IMODE(index.stat().st_mode) == 0o600
        assert len(sent()) == 3
        second = await run_cli(*bulk, **env)
        assert second.code == 0, second.err
        assert sent() == [f"m{n}" for n in range(1, 9)]
        third = await run_cli(*bulk, **env)
        assert (third.code, len(sent())) == (0, 8), third.err
        assert "0 answered, 0 failed, 8 skipped" in third.out
        assert len(read_lines(out)) == 8

        lines = out.read_bytes().splitlines(keepends=True)
        number = next(n for n, line in enumerate(lines, 1) if b'"ok":true' in line)
        kept = out.read_bytes()
        same_size_edit(out, number, b'"ok":true', b'"ok":tru#')
        damaged = await run_cli(*bulk, **env)
        assert damaged.code == EXIT_USAGE
        assert f"line {number} cannot be read" in damaged.err
        out.write_bytes(kept)

        rows[3]["message"] = "m4, edited"
        write_csv(source, rows)
        edited = await run_cli(*bulk, **env)
        assert edited.code == EXIT_USAGE
        assert "not in in.csv as it is now" in edited.err
        assert len(sent()) == 8
    assert os.stat(out).st_size == len(kept)


def test_an_index_is_not_left_where_out_was_not_read_clean(tmp_path: Path) -> None:
    """A cut last line (a crash), or lines without keys (an old OUT): no index; the next run
    reads OUT whole, as before."""
    source_path, out = build(tmp_path, 10)
    out.write_bytes(out.read_bytes() + b'{"id":11,"ok":tr')
    close_run(source_path, out)
    assert not ResultLog(out).index_path.exists()
    source_path, out = build(mkdir(tmp_path / "old"), 10)
    out.write_bytes(out.read_bytes() + line_of({"id": 11, "ok": True}) + b"\n")
    close_run(source_path, out)
    assert not ResultLog(out).index_path.exists()


def test_a_run_killed_by_a_crash_leaves_an_index_of_what_it_wrote_before(tmp_path: Path) -> None:
    """A run leaves an index now and then (``checkpoint()``), not only as it closes: after a
    crash, the resume reads the index and only the lines written since, a cut last line
    among them, and finds what reading OUT whole finds."""
    source_path, out = build(tmp_path, 30)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:20]))  # rows 1-10 answered by an earlier run
    log = ResultLog(out)
    log.open()
    source = InputFile(source_path)
    ledger = log.read()
    source.take_snapshot()
    source.check(ledger, out=out, notes=DataNotes())
    for line in lines[20:40]:  # rows 11-20
        log._write(line)
    log.checkpoint(source.checked)
    for line in lines[40:50]:  # rows 21-25, and row 26's "sending" line cut short: a crash
        log._write(line)
    log._write(lines[50][:30])
    log.close()  # (the crash: no checkpoint as it closes)
    source.close()
    index = ResultLog(out).index_path
    with out.open("rb") as file:
        loaded = _checkpoint.load(index, file)
    assert loaded is not None and loaded[0].out.lines == 40
    expected = without_index(source_path, out)
    assert found(source_path, out) == expected
    assert expected["counts"][:2] == (30, 25) and expected["unreadable"] == 1


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockAutocalls]:
    with ThreadedServer(rate_limit=None, assistants=(123,)) as server:
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", TOKEN)
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        yield server


def test_a_run_leaves_an_index_as_it_goes(
    emulator: MockAutocalls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CHECKPOINT_EVERY`` seconds apart (here: after every result), and as it closes."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(
        source,
        [
            {"assistant_id": 123, "customer_identifier": f"+{n}", "message": f"m{n}"}
            for n in range(1, 6)
        ],
    )
    covered: list[int] = []
    checkpoint = ResultLog.checkpoint

    def counted(log: ResultLog, checked: Any = None) -> None:
        checkpoint(log, checked)
        with out.open("rb") as file:
            loaded = _checkpoint.load(log.index_path, file)
        covered.append(loaded[0].out.lines if loaded is not None else 0)

    monkeypatch.setattr(job, "CHECKPOINT_EVERY", 0.0)
    monkeypatch.setattr(ResultLog, "checkpoint", counted)
    argv = ["bulk", str(source), "--out", str(out), "--rate-limit", "none", "--progress", "off"]
    assert cli_main([*argv, "--concurrency", "1"]) == 0
    assert covered == [2, 4, 6, 8, 10, 10]  # a "sending" line and a result line a row


@pytest.mark.parametrize("extra_as_variables", [False, True])
def test_the_index_keeps_what_the_columns_say(tmp_path: Path, extra_as_variables: bool) -> None:
    """Columns without a name (noted when they hold values) and columns sent as variables
    (``--vars-from-columns``, keyed as older versions keyed them): a resume on the index says
    and finds what reading the input says and finds."""
    source_path, out = build(tmp_path, 20)
    lines = source_path.read_text().splitlines()
    body = [f"{line},,{'x' if n % 3 else ''},Ann" for n, line in enumerate(lines[1:])]
    source_path.write_text("\n".join([lines[0] + ",,,FirstName", *body]) + "\n")
    options = {"extra_as_variables": extra_as_variables}
    expected = without_index(source_path, out, **options)
    assert expected["notes"]
    close_run(source_path, out, **options)
    assert found(source_path, out, **options) == expected
