"""Issue 21: bulk runs people can trust and read.

Every test is a finding of the issue, run through the real command as a subprocess against the
emulator; the emulator's own request log judges what was sent, and how often."""

from __future__ import annotations

import asyncio
import collections
import csv
import json
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async.testing import MockAutocalls
from tests._env import child_env
from tests.test_cli import TOKEN, Run, ThreadedServer, read_lines, run_cli, start_cli


@pytest.fixture
def emulator() -> Iterator[MockAutocalls]:
    with ThreadedServer(rate_limit=None, assistants=(123, 456)) as server:
        yield server


def env_for(server: MockAutocalls) -> dict[str, str]:
    return {"AUTOCALLS_API_TOKEN": TOKEN, "AUTOCALLS_BASE_URL": server.base_url}


def write_rows(path: Path, rows: list[tuple[str, str]], *, header: bool = True) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if header:
            writer.writerow(["assistant_id", "customer_identifier", "message"])
        writer.writerows([123, customer, message] for customer, message in rows)


def processed(server: MockAutocalls) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(
        (str(record.body["customer_identifier"]), str(record.body["message"]))
        for record in server.requests
        if record.processed
    )


async def bulk(server: MockAutocalls, source: Path, out: Path, *options: str) -> Run:
    return await run_cli(
        "bulk",
        str(source),
        "--out",
        str(out),
        "--rate-limit",
        "none",
        "--progress",
        "off",
        *options,
        **env_for(server),
    )


async def wait_for_lines(out: Path, count: int) -> None:
    async with asyncio.timeout(30):
        while len(read_lines(out)) < count:
            await asyncio.sleep(0.01)


# -- item 1: one read of the input ------------------------------------------------------------


@pytest.mark.slow
async def test_an_input_rewritten_in_place_during_a_run_is_never_read_again(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """F1: `> in.csv` during a run made the run read the new content from where it was: rows
    already sent were sent again, and rows appended were sent without the check. The run now
    sends its snapshot: every row once, nothing appended, and the change is reported."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    rows = [(f"+1555{n:07d}", f"message {n} " + "x" * 40) for n in range(400)]
    write_rows(source, rows)
    process = await start_cli(
        "bulk",
        str(source),
        "--out",
        str(out),
        "--rate-limit",
        "200/1",
        "--progress",
        "off",
        **env_for(emulator),
    )
    await wait_for_lines(out, 20)
    added = [(f"+1666{n:07d}", f"appended {n}") for n in range(50)]
    with source.open("r+", newline="", encoding="utf-8") as file:  # in place: same inode
        file.truncate(0)
        writer = csv.writer(file)
        writer.writerow(["assistant_id", "customer_identifier", "message"])
        writer.writerows([123, c, m] for c, m in [*reversed(rows), *added])
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    text = stdout.decode()
    sent = processed(emulator)
    assert max(sent.values()) == 1, [item for item, n in sent.items() if n > 1][:5]
    assert set(sent) == set(rows)  # every row of the snapshot, none appended
    assert process.returncode == 1, (text, stderr.decode())
    assert "The input file changed during the run (it was rewritten" in text
    assert "400 rows: 400 answered" in text


def test_a_snapshot_of_a_file_that_keeps_changing_is_refused(tmp_path: Path) -> None:
    """A copy is never taken of a file being written: its stamp moved during the copy."""
    from autocalls_async import _snapshot

    source = tmp_path / "in.csv"
    source.write_text("a\n")
    real = _snapshot.Snapshot._copy
    calls = 0

    def moving(original: Path, copy: Path) -> Any:
        nonlocal calls
        calls += 1
        return None  # as if the file changed during each copy

    _snapshot.Snapshot._copy = staticmethod(moving)  # type: ignore[method-assign]
    try:
        with pytest.raises(_snapshot.SnapshotError, match="kept changing"):
            _snapshot.Snapshot.take(source)
    finally:
        _snapshot.Snapshot._copy = staticmethod(real)  # type: ignore[method-assign]
    assert calls == 5


# -- item 4: a damaged OUT --------------------------------------------------------------------


def lines_of(out: Path) -> list[bytes]:
    return out.read_bytes().splitlines(keepends=True)


async def test_a_garbled_middle_line_is_refused_and_a_cut_last_line_is_accepted(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """F4: a garbled line in the middle of OUT was skipped, and its row sent again. It is now
    refused, naming the line; a last line cut short by a crash is still accepted (once marked,
    for good), and its row, whose "sending" line shows it may have been processed, is reported
    rather than sent again."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A"), ("+2", "B"), ("+3", "C")])
    assert (await bulk(emulator, source, out)).code == 0
    good = lines_of(out)
    answer = next(n for n, line in enumerate(good) if b'"ok":true' in line)
    damaged = list(good)
    damaged[answer] = b'{"id":1,"ok":tru\xff garbled\n'
    out.write_bytes(b"".join(damaged))
    run = await bulk(emulator, source, out)
    assert run.code == 2, run
    assert f"line {answer + 1} cannot be read" in run.err
    assert f"sed -n '{answer + 1}p'" in run.err and "Traceback" not in run.err
    assert sum(processed(emulator).values()) == 3

    # The last line cut short (a crash while writing a result): accepted, reported.
    out.write_bytes(b"".join(good)[:-20])
    run = await bulk(emulator, source, out)
    assert run.code == 1, run
    assert "1 row may have been processed by an earlier run" in run.out
    assert json.loads(lines_of(out)[-1]) == {"id": None, "cut_line": len(good)}
    run = await bulk(emulator, source, out)  # the cut line is now in the middle, marked
    assert run.code == 1 and "1 row may have been processed" in run.out, run
    assert max(processed(emulator).values()) == 1 and sum(processed(emulator).values()) == 3


async def test_a_bom_is_read_through_and_nul_bytes_are_explained(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """F9: a byte-order mark (an editor saved OUT) or NUL bytes (a power loss) got "pass
    another --out", which resends every row in flight. A BOM is read through; NULs are
    explained, with the way on."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A"), ("+2", "B")])
    assert (await bulk(emulator, source, out)).code == 0
    good = out.read_bytes()
    out.write_bytes(b"\xef\xbb\xbf" + good)
    run = await bulk(emulator, source, out)
    assert run.code == 0 and "2 skipped" in run.out, run
    out.write_bytes(b"\0" * 300 + good)
    run = await bulk(emulator, source, out)
    assert run.code == 2, run
    assert "line 1 holds 300 NUL byte(s)" in run.err and "power loss" in run.err
    assert "tr -d" in run.err and "pass another --out" not in run.err
    assert sum(processed(emulator).values()) == 2


async def test_a_deeply_nested_row_fails_alone_and_a_deep_out_line_is_refused(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """F10: deeply nested JSON in an input row, or in OUT, gave a RecursionError traceback.
    The row now fails alone (INVALID_ROW); a line of OUT is refused, named."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    source.write_text(
        '{"assistant_id":123,"customer_identifier":"+1","message":"hi","variables":'
        + deep
        + "}\n"
        + '{"assistant_id":123,"customer_identifier":"+2","message":"ok"}\n'
    )
    run = await bulk(emulator, source, out)
    assert run.code == 1 and "Traceback" not in run.err, run
    (failed,) = [line for line in read_lines(out) if not line["ok"]]
    assert failed["error_code"] == "INVALID_ROW" and "nested too deeply" in failed["error"]
    assert processed(emulator) == {("+2", "ok"): 1}
    text = out.read_text().splitlines()
    text.insert(1, '{"id":' + "[" * 100_000 + "]" * 100_000 + "}")
    out.write_text("\n".join(text) + "\n")
    run = await bulk(emulator, source, out)
    assert run.code == 2 and "Traceback" not in run.err, run
    assert "line 2 cannot be read (nested too deeply to be read)" in run.err


async def test_out_is_created_private(emulator: MockAutocalls, tmp_path: Path) -> None:
    """OUT holds customer data: created 0600 (it was 0644 under the usual umask)."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A")])
    old = os.umask(0o022)
    try:
        assert (await bulk(emulator, source, out)).code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.slow
async def test_moving_out_away_during_a_run_does_not_let_a_second_run_start(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """The lock was per inode: `mv out.jsonl out.old` during a run let a second run on
    out.jsonl start afresh and send every row again. The path is locked too."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [(f"+{n}", f"m{n}") for n in range(20)])
    first = await start_cli(
        "bulk",
        str(source),
        "--out",
        str(out),
        "--rate-limit",
        "10/1",
        "--progress",
        "off",
        **env_for(emulator),
    )
    await wait_for_lines(out, 1)
    # Held still (and alive, its locks held) while the second run starts: the whole first run
    # takes 2 s at 10/1, less than a second command may take to start on a loaded machine,
    # which then found no run left to refuse.
    first.send_signal(signal.SIGSTOP)
    try:
        out.rename(tmp_path / "out.old")
        second = await bulk(emulator, source, out)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.code == 2 and "being written by another run" in second.err, second
    async with asyncio.timeout(30):
        await first.communicate()
    assert first.returncode == 0
    assert processed(emulator) == {(f"+{n}", f"m{n}"): 1 for n in range(20)}


async def full_disk_run(server: MockAutocalls, source: Path, out: Path, blocks: int) -> Run:
    """The bulk command with a file size limit (RLIMIT_FSIZE, `ulimit -f`, 512-byte blocks):
    writes past it fail with EFBIG, as they would with ENOSPC on a full disk."""
    command = [
        sys.executable,
        "-m",
        "autocalls_async",
        "bulk",
        str(source),
        "--out",
        str(out),
        "--rate-limit",
        "none",
        "--concurrency",
        "3",
        "--progress",
        "off",
    ]
    script = f"ulimit -f {blocks}; trap '' XFSZ; exec \"$@\""
    # Without pytest-cov's subprocess hook: coverage could not save its data past the limit.
    env = {
        k: v
        for k, v in child_env(**env_for(server)).items()
        if not k.startswith(("COV_CORE", "COVERAGE"))
    }
    process = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script,
        "sh",
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    return Run(process.returncode, stdout.decode(), stderr.decode())


@pytest.mark.slow
async def test_a_full_disk_stops_sending_and_keeps_every_reply(tmp_path: Path) -> None:
    """F: disk full gave two stacked tracebacks, exit 1, and replies billed but lost. Now the
    run stops sending, lets calls in flight finish, prints the replies it could not write on
    stderr as JSON lines, and exits 10 with one message; a rerun (disk freed) sends the rest
    and never a row twice."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    rows = [(f"+1555{n:07d}", f"m{n}") for n in range(40)]
    write_rows(source, rows)
    with ThreadedServer(rate_limit=None, reply_delay=0.05) as server:
        run = await full_disk_run(server, source, out, blocks=4)
        assert run.code == 10, run
        assert "Traceback" not in run.err, run.err
        assert "File too large: stopped sending" in run.err
        printed = [json.loads(line) for line in run.err.splitlines() if line.startswith("{")]
        assert printed and all("ok" in line and "key" in line for line in printed)
        written = [line for line in read_lines(out) if line.get("ok")]
        answered = {line["key"] for line in written} | {
            line["key"] for line in printed if line["ok"]
        }
        assert sum(processed(server).values()) == len(answered)  # every billed reply is kept
        assert len(processed(server)) < len(rows)  # it stopped sending

        rerun = await bulk(server, source, out)
        assert rerun.code == 1, rerun  # the rows printed on stderr are reported, not resent
        sent = processed(server)
        assert max(sent.values()) == 1
        assert len(sent) == len(rows)


# -- item 2: results aligned with the input -----------------------------------------------


async def test_results_join_by_content_after_an_edit_and_neutralise_formulas(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """After deleting one row and adding one (no id column), reading OUT as the docs said
    ("the last line for an id wins") tied answers to the wrong rows and showed a fixed row as
    INVALID_ROW. `results` joins by content: each input row, in order, with its own answer;
    CSV cells a spreadsheet would run (=, +, -, @) are neutralised."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    header = "assistant_id,customer_identifier,message,customer_name\n"
    first = ["123,+1,one,Ann", "123,+2,two,Bob", "x,+3,three,Cy", "123,+4,=1+2,Dee"]
    source.write_text(header + "\n".join(first) + "\n")
    assert (await bulk(emulator, source, out)).code == 1  # row 3 is INVALID_ROW
    edited = ["123,+2,two,Bob", "123,+3,three,Cy", "123,+4,=1+2,Dee", "123,+5,five,Eve"]
    source.write_text(header + "\n".join(edited) + "\n")
    assert (await bulk(emulator, source, out, "--allow-foreign")).code == 0

    # What the tutorial's reader did: the last line for an id (a row number) wins.
    last: dict[Any, dict[str, Any]] = {}
    for line in read_lines(out):
        last[line["id"]] = line
    wrong = [
        n
        for n, row in enumerate(edited, 1)
        if last[n].get("customer_identifier") != row.split(",")[1]
    ]
    assert wrong  # the old reading misleads

    run = await run_cli("results", str(source), str(out), "--format", "jsonl")
    assert run.code == 1, run  # OUT answered a row deleted since: said, exit 1
    assert ": the 1st row when written (assistant 123, customer +1): no row of the input" in run.err
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert [row["customer_identifier"] for row in rows] == ["+2", "+3", "+4", "+5"]
    assert all(row["status"] == "answered" for row in rows), rows
    for row in rows:
        assert row["reply"].endswith(f": {row['message']}"), row
    assert rows[0]["customer_name"] == "Bob"
    assert "4 rows: 4 answered" in run.err

    target = tmp_path / "results.csv"
    run = await run_cli(
        "results", str(source), "--out", str(out), "-o", str(target), "--allow-foreign"
    )
    assert run.code == 0, run
    table = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert [row["customer_identifier"] for row in table] == ["'+2", "'+3", "'+4", "'+5"]  # short
    assert table[2]["message"] == "'=1+2"
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in table for cell in row.values())


def test_results_as_a_library_function(tmp_path: Path) -> None:
    """The same join for a program: rows in input order; a row never sent says so; an invalid
    row is invalid before any run."""
    from autocalls_async.bulk import read_results

    source = tmp_path / "in.csv"
    source.write_text("assistant_id,customer_identifier,message\n123,+1,hi\nx,+2,bad\n")
    rows = list(read_results(source, tmp_path / "missing.jsonl"))
    assert [row["status"] for row in rows] == ["not_sent", "invalid"]
    assert "assistant_id 'x' is not a whole number" in rows[1]["error"]


# -- item 3: refuse only what protects something ------------------------------------------


async def test_fixing_the_invalid_rows_the_dry_run_listed_is_never_refused(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """Fixing exactly the rows listed as INVALID_ROW (never sent) got the rerun refused (exit
    2, one 900-character line). Their lines protect nothing: the fixed rows are sent."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    header = "assistant_id,customer_identifier,message\n"
    source.write_text(header + "123,+1,one\n12x,+2,two\n123,,three\n")
    run = await bulk(emulator, source, out)
    assert run.code == 1 and "2 failed" in run.out, run
    source.write_text(header + "123,+1,one\n123,+2,two\n123,+3,three\n")
    run = await bulk(emulator, source, out)
    assert run.code == 0, run
    assert "2 answered, 0 failed, 1 skipped" in run.out
    assert processed(emulator) == {("+1", "one"): 1, ("+2", "two"): 1, ("+3", "three"): 1}


async def test_a_forgotten_vars_from_columns_is_named_not_called_an_edit(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A rerun without the --vars-from-columns of the first run was told the input "was
    edited since those lines were written", which was false; it is now told the flag."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message,customer_name\n123,+1,hi,Ann\n123,+2,yo,Bob\n"
    )
    assert (await bulk(emulator, source, out, "--vars-from-columns")).code == 0
    run = await bulk(emulator, source, out)
    assert run.code == 2, run
    assert "written by a run with --vars-from-columns" in run.err
    assert "Run again with --vars-from-columns" in run.err and "edited" not in run.err
    assert (await bulk(emulator, source, out, "--vars-from-columns")).code == 0
    assert sum(processed(emulator).values()) == 2


async def test_a_refusal_names_each_line_on_its_own_line(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A refusal was one long line; it now names each line of OUT on a line of its own, what
    the input holds there, and the option that goes on."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A"), ("+2", "B"), ("+3", "C")])
    assert (await bulk(emulator, source, out)).code == 0
    write_rows(source, [("+1", "A, fixed"), ("+2", "B"), ("+9", "C")])
    run = await bulk(emulator, source, out)
    assert run.code == 2, run
    lines = run.err.splitlines()
    assert len(lines) >= 5, lines
    named = [line for line in lines if line.startswith("  line ")]
    assert len(named) == 2, lines
    assert "row 2 of the input has this customer and no line in OUT" in named[0]
    assert "no row of the input has its content, nor this customer" in named[1]
    assert any(line.strip().endswith("add --allow-foreign") for line in lines)
    assert sum(processed(emulator).values()) == 3


# -- item 7: order after an uncertain row -------------------------------------------------


async def test_later_rows_wait_behind_a_row_that_may_have_been_processed(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A run killed while row 1 (customer +1) was on the wire: row 1 may have been processed.
    Resuming sent row 2 of the same customer, and resending row 1 later with
    --retry-unsafe-failed put the conversation out of order. Row 2 is now held and named;
    --retry-unsafe-failed sends row 1 then row 2; other customers are not held."""
    from autocalls_async._bulkio import InputFile

    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A"), ("+1", "B"), ("+2", "C")])
    (first, key), *_ = InputFile(source).keyed()
    journal = {"id": 1, "sending": True, "key": key, "row": 1, "assistant_id": 123}
    out.write_text(json.dumps({**journal, "customer_identifier": "+1"}) + "\n")

    dry = await bulk(emulator, source, out, "--dry-run")
    assert (
        "1 row(s) held, not sent" in dry.out and "row 3 (customer +1) waits behind row 2" in dry.out
    ), dry
    run = await bulk(emulator, source, out)
    assert run.code == 1, run
    assert "1 answered, 0 failed, 1 skipped" in run.out and "1 held" in run.out
    assert "row 3 (customer +1) waits behind row 2" in run.out
    assert "--give-up-uncertain" in run.out
    assert processed(emulator) == {("+2", "C"): 1}

    run = await bulk(emulator, source, out, "--retry-unsafe-failed")
    assert run.code == 0, run
    order = [
        str(r.body["message"]) for r in emulator.requests if r.body["customer_identifier"] == "+1"
    ]
    assert order == ["A", "B"]


async def test_give_up_uncertain_sends_the_rows_behind_and_never_that_row(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    from autocalls_async._bulkio import InputFile

    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A"), ("+1", "B")])
    (_, key), _ = InputFile(source).keyed()
    line = {
        "id": 1,
        "sending": True,
        "key": key,
        "row": 1,
        "assistant_id": 123,
        "customer_identifier": "+1",
    }
    out.write_text(json.dumps(line) + "\n")
    run = await bulk(emulator, source, out, "--give-up-uncertain")
    assert run.code == 1 and "1 row may have been processed" in run.out, run
    assert processed(emulator) == {("+1", "B"): 1}


# -- item 5: say what the data means ------------------------------------------------------

MESSY = """assistant_id,customer_identifier,message,customer_name
123,+1 (415) 555-1234,Hi,Ann
123,415-555-1234,Hi again,Ann
123,ann@example.com,Hello,Ann
123,555-0199,Yo,Bob
123,+14155550000,Same,Cy
123,+14155550000,Same,Cy
x,+1,bad,Dee
"""


async def test_the_dry_run_and_the_run_say_what_the_data_means(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """Extra columns were ignored in silence (replies said "Hi there!"), identical rows sent
    twice without a word, three spellings of one number became three conversations with no
    hint. The dry run and the run's summary now name each, with the flag that helps."""
    source, out = tmp_path / "contacts.csv", tmp_path / "out.jsonl"
    source.write_text(MESSY)
    for options in (("--dry-run",), ()):
        run = await bulk(emulator, source, out, *options)
        assert run.code == 1, run
        assert "column(s) not sent: customer_name; add --vars-from-columns" in run.out
        assert "1 identical row(s)" in run.out and "rows 6, 7" in run.out
        assert "+1 (415) 555-1234 = 415-555-1234" in run.out and "--e164" in run.out


async def test_e164_leaves_emails_alone_and_refuses_local_numbers(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """--e164 rejected every e-mail or CRM-id row (the demo file's too), and sent 555-0199 as
    +15550199. Phone-like identifiers are normalised, others left alone, local-only numbers
    refused."""
    source, out = tmp_path / "contacts.csv", tmp_path / "out.jsonl"
    source.write_text(MESSY)
    run = await bulk(emulator, source, out, "--e164", "US")
    assert run.code == 1, run
    customers = {customer for customer, _ in processed(emulator)}
    assert customers == {"+14155551234", "ann@example.com", "+14155550000"}
    (local,) = [line for line in read_lines(out) if line["row"] == 4]
    assert local["error_code"] == "INVALID_ROW" and "local number" in local["error"]
    assert "phone number(s) written in several ways" not in run.out


async def test_e164_without_the_phone_extra_is_one_line_exit_2(tmp_path: Path) -> None:
    """--e164 without the phone extra printed a 40-line traceback and exited 1."""
    hidden = tmp_path / "hide"
    (hidden / "phonenumbers").mkdir(parents=True)
    (hidden / "phonenumbers" / "__init__.py").write_text("raise ImportError('no phonenumbers')\n")
    source = tmp_path / "in.csv"
    write_rows(source, [("+1", "A")])
    run = await run_cli(
        "bulk",
        str(source),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--e164",
        "US",
        AUTOCALLS_API_TOKEN=TOKEN,
        PYTHONPATH=str(hidden),
    )
    assert run.code == 2, run
    assert run.err.count("\n") == 1 and "pip install 'autocalls-async[phone]'" in run.err, run.err
    assert not (tmp_path / "o.jsonl").exists()


async def test_show_all_lists_every_invalid_row(emulator: MockAutocalls, tmp_path: Path) -> None:
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message\n" + "".join(f"x{n},+{n},m\n" for n in range(8))
    )
    run = await bulk(emulator, source, out, "--dry-run")
    assert "… and 3 more (--show-all lists them)" in run.out
    run = await bulk(emulator, source, out, "--dry-run", "--show-all")
    assert all(f"assistant_id 'x{n}'" in run.out for n in range(8)) and "more" not in run.out


async def test_e164_accepts_every_row_of_the_bundled_demo_file(tmp_path: Path) -> None:
    """The demo's e-mails and CRM ids were all INVALID_ROW under --e164."""
    from importlib import resources

    demo = resources.files("autocalls_async") / "examples" / "demo.csv"
    source = tmp_path / "demo.csv"
    source.write_bytes(demo.read_bytes())
    run = await run_cli(
        "bulk", str(source), "--out", str(tmp_path / "o.jsonl"), "--e164", "US", "--dry-run"
    )
    assert run.code == 0 and "invalid:  0" in run.out, run


# -- item 6: summaries name rows ----------------------------------------------------------


async def test_the_summary_names_rows_and_fits_its_advice(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """ "1 failed" named no row, and --retry-failed was suggested for INVALID_ROW, which a
    retry cannot fix. Each kind of failure now names its first rows, with its own advice, and
    the command that shows every row."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message\n123,+1,a\nx,+2,b\n999,+3,c\n123,+4,d\n999,+5,e\n"
    )
    run = await bulk(emulator, source, out)
    assert run.code == 1, run
    assert "1 row invalid, never sent: row 3: fix them in the input" in run.out
    assert "2 rows failed without being processed: rows 4, 6" in run.out
    assert f"Every row with its result: autocalls-async results {source} {out}" in run.out
    invalid = next(line for line in run.out.splitlines() if "invalid, never sent" in line)
    assert "--retry-failed" not in invalid

    again = await bulk(emulator, source, out)
    assert "1 row invalid, never sent: row 3" in again.out
    assert "2 rows failed in an earlier run: rows 4, 6: add --retry-failed" in again.out


async def test_cli_messages_name_flags_and_other_traffic_only_when_there_was_some(
    tmp_path: Path,
) -> None:
    """CLI users were told `rate_limit=RateLimit(5, 5)`, and "76% of slots to other traffic"
    when nothing else used the token."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [(f"+{n}", "m") for n in range(6)])
    with ThreadedServer(rate_limit=(50, 1.0), assistants=(123,)) as server:
        run = await run_cli(
            "bulk",
            str(source),
            "--out",
            str(out),
            "--rate-limit",
            "100/1",
            "--progress",
            "plain",
            **env_for(server),
        )
    assert run.code == 0, run
    assert "pass --rate-limit 50/1 to match it" in run.err
    assert "RateLimit(" not in run.err and "rate_limit=" not in run.err
    assert "other traffic" not in run.err + run.out


# -- F14: terminal control sequences ----------------------------------------------------------


async def test_control_sequences_from_the_server_never_reach_the_terminal() -> None:
    """A server message (or a reply) with ESC sequences reached the terminal as it was: it
    could rewrite the screen or the window title. They are shown escaped."""
    from autocalls_async.testing import Fault

    evil = "\x1b]0;pwned\x07\x1b[2J gone"
    with ThreadedServer(rate_limit=None) as server:
        server.inject(Fault.status(422, body={"message": evil, "errors": {}}))
        run = await run_cli(
            "reply", "--assistant-id", "123", "--customer", "+1", "hi", **env_for(server)
        )
    assert run.code == 1, run
    assert "\x1b" not in run.err and "\x07" not in run.err
    assert "\\x1b]0;pwned\\x07" in run.err


# -- item 10: the demo cleans its directory unless --keep -------------------------------------


@pytest.mark.parametrize("keep", [False, True])
async def test_the_demo_removes_its_temporary_files_unless_kept(tmp_path: Path, keep: bool) -> None:
    run = await run_cli(
        "demo", "--progress", "off", *(["--keep"] if keep else []), TMPDIR=str(tmp_path)
    )
    assert run.code == 0, run
    left = [tmp_path / name for name in os.listdir(tmp_path) if name.startswith("autocalls-demo-")]
    if keep:
        assert len(left) == 1 and (left[0] / "replies.jsonl").is_file()
        assert f"The files are kept in {left[0]}" in run.out
    else:
        assert left == [] and "--keep" in run.out


async def test_deleting_an_answered_row_never_blocks_a_rerun(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A row answered and then deleted: nothing is sent in its place, so its line protects
    nothing; a changed row of an answered customer (a second message to them) still refuses."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    write_rows(source, [("+1", "A"), ("+2", "B"), ("+3", "C")])
    assert (await bulk(emulator, source, out)).code == 0
    write_rows(source, [("+1", "A"), ("+3", "C"), ("+4", "D")])
    run = await bulk(emulator, source, out)
    assert run.code == 0 and "1 answered, 0 failed, 2 skipped" in run.out, run
    write_rows(source, [("+1", "A, corrected"), ("+3", "C"), ("+4", "D")])
    run = await bulk(emulator, source, out)
    assert run.code == 2, run
    assert "row 2 of the input has this customer and no line in OUT" in run.err
    assert sum(processed(emulator).values()) == 4


# -- results and the snapshot: the remaining cases ------------------------------------------


def test_results_reads_old_lines_a_bom_a_cut_line_and_every_status(tmp_path: Path) -> None:
    """Old lines (no key) join by id when assistant and customer agree; a BOM and a cut last
    line are read through; a `sending` line alone is maybe_processed; a refusal before
    processing is failed; a withdrawn row is not_sent; an input column named like a result
    column keeps its name, the result's gets a prefix; JSONL input to CSV output."""
    from autocalls_async._bulkio import InputFile
    from autocalls_async._results import read_results, write_results

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"assistant_id": 123, "customer_identifier": f"+{n}", "message": "m", "status": "vip"}
        for n in range(6)
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    keys = [key for _, key in InputFile(source).keyed()]
    lines = [
        {
            "id": 1,
            "ok": True,
            "row": 1,
            "assistant_id": 123,
            "customer_identifier": "+0",
            "reply": "old",
            "conversation_id": "c0",
        },
        {
            "id": 2,
            "ok": True,
            "row": 2,
            "assistant_id": 123,
            "customer_identifier": "+999",
            "reply": "someone else's",
        },
        {"id": 3, "sending": True, "key": keys[2]},
        {
            "id": 4,
            "ok": False,
            "key": keys[3],
            "error_code": "RATE_LIMITED",
            "error": "429",
            "maybe_processed": False,
        },
        {"id": 5, "sending": True, "key": keys[4]},
        {"id": 5, "sending": False, "key": keys[4], "error_code": "INSUFFICIENT_BALANCE"},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    out.write_bytes(b"\xef\xbb\xbf" + text.encode() + b'{"id":6,"ok":tr')
    got = list(read_results(source, out))
    assert [row["result_status"] for row in got] == [
        "answered",
        "not_sent",
        "maybe_processed",
        "failed",
        "not_sent",
        "not_sent",
    ]
    assert got[0]["reply"] == "old" and got[0]["status"] == "vip"
    assert got[3]["error_code"] == "RATE_LIMITED"
    import io

    buffer = io.StringIO()
    counts = write_results(iter(got), buffer, "csv")
    assert counts == {"answered": 1, "not_sent": 3, "maybe_processed": 1, "failed": 1}
    header = buffer.getvalue().splitlines()[0]
    assert header.startswith("assistant_id,customer_identifier,message,status,result_status")


async def test_results_refuses_what_it_cannot_read_or_write(tmp_path: Path) -> None:
    missing = await run_cli("results", str(tmp_path / "nope.csv"), str(tmp_path / "o.jsonl"))
    assert missing.code == 2 and "no such file" in missing.err
    source = tmp_path / "in.csv"
    write_rows(source, [("+1", "A")])
    no_out = await run_cli("results", str(source))
    assert no_out.code == 2 and "needs the bulk run's OUT" in no_out.err
    into_dir = await run_cli("results", str(source), str(tmp_path / "o.jsonl"), "-o", str(tmp_path))
    assert into_dir.code == 2 and "cannot write" in into_dir.err
    bad = tmp_path / "bad.csv"
    bad.write_text("name\nAnn\n")
    refused = await run_cli("results", str(bad), str(tmp_path / "o.jsonl"))
    assert refused.code == 2 and "lacks the required column" in refused.err


def test_the_snapshot_tells_how_the_input_changed(tmp_path: Path) -> None:
    from autocalls_async._snapshot import Snapshot

    source = tmp_path / "in.csv"
    source.write_text("a\n")
    snapshot = Snapshot.take(source)
    try:
        assert snapshot.changed() is None
        assert (
            snapshot.path.read_text() == "a\n"
            and stat.S_IMODE(snapshot.path.stat().st_mode) == 0o600
        )
        source.write_text("a\nb\n")
        assert "rewritten (2 bytes then, 4 now)" in str(snapshot.changed())
        os.utime(source, ns=(0, 0))
        source.write_text("c\n")
        os.utime(source, ns=(1, 1))
        assert "modification time" in str(snapshot.changed())
        replacement = tmp_path / "new.csv"
        replacement.write_text("a\n")
        replacement.replace(source)
        assert snapshot.changed() == "it was replaced by another file"
        source.unlink()
        assert snapshot.changed() == "it was deleted or renamed"
    finally:
        snapshot.close()
    assert not snapshot.path.parent.exists()


@pytest.mark.timing
def test_the_header_check_is_linear(tmp_path: Path) -> None:
    """A header of 40,000 columns took 33 s (each name counted against all the others); it is
    checked in one pass now, and the note names the first unused columns, not all of them."""
    import time

    from autocalls_async._bulkio import InputFile
    from autocalls_async._notes import DataNotes

    extra = [f"c{n}" for n in range(40_000)]
    source = tmp_path / "wide.csv"
    source.write_text(
        ",".join(["assistant_id", "customer_identifier", "message", *extra])
        + "\n"
        + ",".join(["123", "+1", "hi", *("x" for _ in extra)])
        + "\n"
    )
    started = time.perf_counter()
    wide = InputFile(source)
    wide.check()
    assert time.perf_counter() - started < 5.0
    notes = DataNotes(unused_columns=wide.extra_columns)
    (note,) = notes.lines(e164=False)
    assert "c0, c1," in note and "and 39990 more" in note and len(note) < 300
