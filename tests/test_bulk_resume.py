"""Issue 10: a bulk run can neither send a row twice nor skip one silently.

Each test is one situation of the issue, run through the real command (``main()`` in-process
against the emulator on a loopback port, or a real subprocess where the process matters)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async._bulkio import ResultLog
from autocalls_async.cli import main
from autocalls_async.testing import Fault, MockAutocalls
from tests.test_cli import TOKEN, ThreadedServer, read_lines, run_cli, write_csv


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockAutocalls]:
    with ThreadedServer(rate_limit=None, assistants=(123, 456)) as server:
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", TOKEN)
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        yield server


def row(customer: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"assistant_id": 123, "customer_identifier": customer, "message": message, **extra}


def sent_messages(server: MockAutocalls) -> list[str]:
    return [str(record.body["message"]) for record in server.requests if record.processed]


def bulk(source: Path, out: Path, *options: str) -> int:
    return main(["bulk", str(source), "--out", str(out), "--rate-limit", "none", *options])


# -- 1. an input edited between runs ----------------------------------------------------------


def test_a_row_inserted_at_the_top_is_sent_and_no_other_row_again(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[A, B] answered, Z inserted at the top: before, B was sent again and Z never (exit 0).
    Rows are matched by content now: Z is sent, A and B are not."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(source, [row("+1", "A"), row("+2", "B")])
    assert bulk(source, out) == 0
    write_csv(source, [row("+3", "Z"), row("+1", "A"), row("+2", "B")])
    capsys.readouterr()
    assert bulk(source, out) == 0
    assert "1 answered, 0 failed, 2 skipped" in capsys.readouterr().out
    assert sorted(sent_messages(emulator)) == ["A", "B", "Z"]
    # Reordered and run again: nothing to send.
    write_csv(source, [row("+2", "B"), row("+3", "Z"), row("+1", "A")])
    assert bulk(source, out) == 0
    assert len(sent_messages(emulator)) == 3
    lines = read_lines(out)
    assert len({line["key"] for line in lines}) == 3 and all(line["ok"] for line in lines)


def test_a_changed_message_is_refused_then_sent_with_allow_foreign(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row whose message changed is another request: OUT's line for the old one matches no
    row, so the run refuses, saying what differs and how to go on."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(source, [row("+1", "A"), row("+2", "B")])
    assert bulk(source, out) == 0
    write_csv(source, [row("+1", "A"), row("+2", "B, corrected")])
    capsys.readouterr()
    assert bulk(source, out) == 2
    err = capsys.readouterr().err
    assert "out.jsonl has 1 line(s) for rows that are not in in.csv" in err
    # Its first line: the "sending" line (after row 1's two lines: each assistant's first row
    # is answered before its other rows go, so that an unknown assistant costs one request).
    first = next(n for n, line in enumerate(out.read_text().splitlines(), 1) if '"row":2' in line)
    assert first == 3
    assert f"line {first}: the 2nd row when written (assistant 123, customer +2)" in err
    assert "row 3 of the input has this customer and no line in OUT" in err
    assert "pass a new --out" in err and "--allow-foreign" in err
    assert len(sent_messages(emulator)) == 2
    assert bulk(source, out, "--allow-foreign") == 0
    assert sent_messages(emulator) == ["A", "B", "B, corrected"]


# -- 2. OUT reused for another input ----------------------------------------------------------


def test_another_days_input_on_the_same_out_is_refused(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """day2's rows 1-2 were "already answered" by day1's lines and never sent (exit 0)."""
    day1, day2, out = tmp_path / "day1.csv", tmp_path / "day2.csv", tmp_path / "days.jsonl"
    write_csv(day1, [row("+1", "day 1 a"), row("+2", "day 1 b")])
    write_csv(day2, [row("+3", "day 2 a"), row("+2", "day 2 b"), row("+4", "day 2 c")])
    assert bulk(day1, out) == 0
    capsys.readouterr()
    assert bulk(day2, out) == 2
    err = capsys.readouterr().err
    assert "days.jsonl has 2 line(s) for rows that are not in day2.csv" in err
    assert "no row of the input has its content, nor this customer" in err  # +1's line
    assert "row 3 of the input has this customer and no line in OUT" in err  # +2's line
    assert "or days.jsonl belongs to another input" in err
    assert len(sent_messages(emulator)) == 2  # nothing of day 2
    assert bulk(day2, out, "--allow-foreign") == 0
    assert sorted(sent_messages(emulator))[2:] == ["day 2 a", "day 2 b", "day 2 c"]


def test_old_out_files_keep_working_where_unambiguous(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lines written before keys existed name rows by id (the row number): they match a row
    whose assistant and customer agree, and are refused when another row is behind them."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(source, [row("+1", "A"), row("+2", "B")])
    old = {"ok": True, "assistant_id": 123, "conversation_id": "c", "reply": "r"}
    out.write_text(json.dumps({"id": 1, "row": 1, "customer_identifier": "+1", **old}) + "\n")
    assert bulk(source, out) == 0
    assert sent_messages(emulator) == ["B"]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": 1, "row": 1, "customer_identifier": "+9", **old}) + "\n")
    capsys.readouterr()
    assert bulk(source, other) == 2
    assert "no row of the input has its content, nor this customer" in capsys.readouterr().err
    assert sent_messages(emulator) == ["B"]


def test_identical_rows_are_each_sent_once(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two identical rows are two rows: both sent once; a rerun sends neither; deleting one
    leaves a line that no row matches, which protects nothing (nothing is sent in its place):
    the rerun sends nothing (issue 21; it was refused)."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(source, [row("+1", "same"), row("+2", "B"), row("+1", "same")])
    assert bulk(source, out) == 0
    assert bulk(source, out) == 0
    assert sorted(sent_messages(emulator)) == ["B", "same", "same"]
    assert sorted(line["key"][-2:] for line in read_lines(out)) == [".1", ".1", ".2"]
    write_csv(source, [row("+1", "same"), row("+2", "B")])
    capsys.readouterr()
    assert bulk(source, out) == 0
    assert "0 answered, 0 failed, 2 skipped" in capsys.readouterr().out
    assert len(sent_messages(emulator)) == 3


# -- 3. two runs on one OUT -------------------------------------------------------------------


async def test_a_second_run_is_refused_before_it_reads_anything(tmp_path: Path) -> None:
    """OUT is locked first: a second run fails at once with "being written by another run"
    (exit 2), before checking its input (here even a bad one), and sends nothing."""
    out = tmp_path / "out.jsonl"
    bad = tmp_path / "bad.csv"
    bad.write_text('assistant_id,customer_identifier,message\n123,+1,"never closed\n')
    holder = ResultLog(out)
    holder.open()
    try:
        async with MockAutocalls(rate_limit=None) as server:
            run = await run_cli(
                "bulk",
                str(bad),
                "--out",
                str(out),
                AUTOCALLS_API_TOKEN=TOKEN,
                AUTOCALLS_BASE_URL=server.base_url,
            )
            assert run.code == 2
            assert "is being written by another run" in run.err
            assert "never closed" not in run.err
            assert server.requests == []
    finally:
        holder.close()


# -- 4. CSV that is not what it seems ---------------------------------------------------------

HEADER = "assistant_id,customer_identifier,message\n"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            HEADER + '123,+191,hello\n123,+192,"I said hi\n123,+193,x\n123,+194,y\n',
            "row 3 (from line 3) opens a quoted field that is never closed",
        ),
        (
            HEADER + "123,+191,hello\n123,+192,hi, how are you\n",
            "row 3 (line 3) has 4 fields but the header has 3 columns",
        ),
        (HEADER + "123,+191\n", "row 2 (line 2) has 2 fields"),
        (
            HEADER + '123,+192,"I said hi\n123,+193,x\n123,+194,y"\n',
            "row 2 (lines 2-4): its message field runs over several lines, one of which looks "
            "like a row of this file ('123,+193,x')",
        ),
        (
            HEADER + '123,+192,"I said hi\nassistant_id,customer_identifier,message\n"\n',
            "looks like the header of this file",
        ),
        (HEADER + '123,+1,"a"b\n', "row 2 (from line 2) is not valid CSV"),
    ],
    ids=["unterminated", "too-many", "too-few", "swallowed-rows", "swallowed-header", "quote"],
)
def test_csv_that_is_not_what_it_seems_is_refused(
    emulator: MockAutocalls,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    words: str,
) -> None:
    """A stray quote merged the rest of the file into one message (9 rows to one customer);
    now the file is refused with the row and line, and nothing is sent."""
    source = tmp_path / "in.csv"
    source.write_text(text, encoding="utf-8")
    assert bulk(source, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert words in err and "nothing was sent" in err
    assert emulator.requests == []


def test_a_genuine_multi_line_message_is_sent(emulator: MockAutocalls, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text(HEADER + '123,+1,"Dear team,\nplease call me back.\nThanks, Ann"\n')
    assert bulk(source, tmp_path / "out.jsonl") == 0
    assert sent_messages(emulator) == ["Dear team,\nplease call me back.\nThanks, Ann"]


# -- 5 and 6. what --out and the input may be -------------------------------------------------


def test_tsv_and_delimiter(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """.tsv is split on tabs; --delimiter sets any separator; a tab-separated .csv is refused
    with a hint."""
    tsv = tmp_path / "in.tsv"
    tsv.write_text("assistant_id\tcustomer_identifier\tmessage\n123\t+1\thi, there\n")
    assert bulk(tsv, tmp_path / "a.jsonl") == 0
    semi = tmp_path / "in.csv"
    semi.write_text("assistant_id;customer_identifier;message\n123;+2;hello, you\n")
    assert bulk(semi, tmp_path / "b.jsonl", "--delimiter", ";") == 0
    assert sent_messages(emulator) == ["hi, there", "hello, you"]
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text(tsv.read_text())
    capsys.readouterr()
    assert bulk(tabbed, tmp_path / "c.jsonl") == 2
    assert "seems separated by tabs: pass --delimiter 'tab'" in capsys.readouterr().err
    assert bulk(tabbed, tmp_path / "c.jsonl", "--delimiter", "tab") == 0
    assert main(["bulk", str(tabbed), "--out", "x", "--delimiter", "ab"]) == 2


def test_an_existing_file_that_is_not_our_output_is_refused(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out pointing at an existing CSV appended JSON into it; now it is left untouched."""
    source = write_csv(tmp_path / "in.csv", [row("+1", "A")])
    precious = tmp_path / "customers.csv"
    precious.write_text("name,phone\nAnn,+1\n")
    assert bulk(source, precious) == 2
    assert "exists and is not the output of a bulk run" in capsys.readouterr().err
    assert precious.read_text() == "name,phone\nAnn,+1\n"
    assert emulator.requests == []


async def test_out_to_a_pipe_or_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """`--out /dev/stdout | cat` hung for ever (reading the pipe back); a pipe cannot be read
    back to resume nor locked, so it is refused with a clear message, as is a FIFO."""
    source = write_csv(tmp_path / "in.csv", [row("+1", "A")])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    async with MockAutocalls(rate_limit=None) as server:
        env = {"AUTOCALLS_API_TOKEN": TOKEN, "AUTOCALLS_BASE_URL": server.base_url}
        for out in ("/dev/stdout", str(fifo)):
            run = await asyncio.wait_for(run_cli("bulk", str(source), "--out", out, **env), 30)
            assert run.code == 2, run.err
            assert "is not a regular file" in run.err and "tail -f" in run.err
        assert server.requests == []


# -- 7. --retry-failed never resends what may have been processed -----------------------------


def test_retry_failed_leaves_rows_that_may_have_been_processed(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 500 after processing: the line says sent/maybe_processed; --retry-failed resends the
    404 row only; --retry-unsafe-failed resends the 500 row too."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_csv(source, [row("+1", "charged"), {**row("+2", "unknown"), "assistant_id": 999}])
    emulator.inject(Fault.status(500, processed=True))
    assert bulk(source, out, "--concurrency", "1") == 1
    lines = {line["customer_identifier"]: line for line in read_lines(out)}
    assert lines["+1"]["sent"] is True and lines["+1"]["maybe_processed"] is True
    assert lines["+2"]["sent"] is True and lines["+2"]["maybe_processed"] is False
    emulator.assistants.add(999)
    capsys.readouterr()
    assert bulk(source, out, "--retry-failed") == 1
    summary = capsys.readouterr().out
    assert "1 answered, 0 failed, 1 skipped" in summary
    assert "1 row may have been processed by an earlier run" in summary
    assert "--retry-unsafe-failed" in summary
    assert sent_messages(emulator) == ["charged", "unknown"]
    assert bulk(source, out, "--retry-unsafe-failed") == 0
    assert sent_messages(emulator) == ["charged", "unknown", "charged"]
    assert bulk(source, out) == 0
