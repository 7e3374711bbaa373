"""Issue 10 meets issue 14: the bulk journal ("sending" lines, rows matched by content) and
the runs that stop paying for certain failures (balance, 401, --max-replies), --dry-run and
--e164.

A row whose "sending" line was written and that then got a certain refusal (402, 401) or was
never sent after all (the run stopped while it waited to retry) must be sent by a plain rerun:
its "sending" line is withdrawn (``"sending": false``). A row never sent has no journal line.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async._bulkio import InputFile, Ledger, ResultLog
from autocalls_async.cli import job as cli_job
from autocalls_async.cli import main
from autocalls_async.cli.exits import EXIT_BALANCE, EXIT_INTERRUPTED
from autocalls_async.testing import Fault, MockAutocalls
from tests.test_cli import TOKEN, ThreadedServer, read_lines, write_csv


@pytest.fixture
def broke(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockAutocalls]:
    """An emulator whose account pays for nothing until topped up."""
    with ThreadedServer(rate_limit=None, balance=0) as server:
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", TOKEN)
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        yield server


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockAutocalls]:
    with ThreadedServer(rate_limit=None) as server:
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", TOKEN)
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        yield server


def rows(count: int, customer: str = "+1555000{n:04d}") -> list[dict[str, Any]]:
    return [
        {"assistant_id": 123, "customer_identifier": customer.format(n=n), "message": f"m{n}"}
        for n in range(1, count + 1)
    ]


def all_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def states(source: Path, out: Path) -> list[str | None]:
    ledger: Ledger = ResultLog(out).read()
    return [ledger.state_of(request, key) for request, key in InputFile(source).keyed()]


def processed(server: MockAutocalls) -> collections.Counter[str]:
    return collections.Counter(str(r.body["message"]) for r in server.requests if r.processed)


def bulk(source: Path, out: Path, *options: str) -> int:
    return main(["bulk", str(source), "--out", str(out), "--progress", "off", *options])


def test_balance_stop_withdraws_the_refused_rows_journal_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--balance 3, 10 rows: 4 requests, exit 5. Row 4 was journaled, then refused (402): its
    "sending" line is withdrawn; rows 5-10 were never sent and have no line at all. After a
    top-up a plain rerun answers the other 7 (the refused one included), none twice; a dry run
    in between says so; a third run sends nothing."""
    source, out = write_csv(tmp_path / "in.csv", rows(10)), tmp_path / "out.jsonl"
    with ThreadedServer(rate_limit=None, balance=3) as server:
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", TOKEN)
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        assert bulk(source, out, "--rate-limit", "4/1") == EXIT_BALANCE
        assert len(server.requests) == 4 and server.count(402) == 1
        assert (
            "Stopped at the first INSUFFICIENT_BALANCE: 7 rows left unsent"
            in capsys.readouterr().out
        )
        lines = all_lines(out)
        assert [(line["row"], line.get("sending"), line.get("ok")) for line in lines] == [
            (1, True, None),
            (1, None, True),
            (2, True, None),
            (2, None, True),
            (3, True, None),
            (3, None, True),
            (4, True, None),
            (4, False, None),  # withdrawn: refused unprocessed
        ]
        assert lines[-1]["error_code"] == "INSUFFICIENT_BALANCE"
        assert lines[-1]["key"] == lines[-2]["key"]
        assert states(source, out) == ["answered"] * 3 + [None] * 7  # 7 to send, none reported

        server.top_up(7)
        assert bulk(source, out, "--dry-run", "--rate-limit", "none") == 0
        report = capsys.readouterr().out
        assert "to send:  7\n" in report and "to skip:  3 (3 already answered" in report
        assert len(server.requests) == 4

        assert bulk(source, out, "--rate-limit", "none") == 0
        assert "7 answered, 0 failed, 3 skipped" in capsys.readouterr().out
        assert len(server.requests) == 4 + 7
        assert processed(server) == collections.Counter(f"m{n}" for n in range(1, 11))
        assert states(source, out) == ["answered"] * 10
        assert sorted(line["row"] for line in read_lines(out)) == list(range(1, 11))

        assert bulk(source, out, "--rate-limit", "none") == 0
        assert len(server.requests) == 11


def test_a_row_refused_on_its_retry_is_withdrawn_too(
    broke: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """First attempt 503 (retried), second 402: the row was journaled once and is withdrawn;
    the assistant's other row, held behind it, was never sent (no line)."""
    source, out = write_csv(tmp_path / "in.csv", rows(2)), tmp_path / "out.jsonl"
    broke.inject(Fault.status(503, headers={"Retry-After": "0"}))
    assert bulk(source, out, "--rate-limit", "none") == EXIT_BALANCE
    assert [r.status for r in broke.requests] == [503, 402]
    lines = all_lines(out)
    assert [(line["row"], line["sending"]) for line in lines] == [(1, True), (1, False)]
    assert states(source, out) == [None, None]
    capsys.readouterr()

    broke.top_up(2)
    assert bulk(source, out, "--rate-limit", "none") == 0
    assert "2 answered, 0 failed, 0 skipped" in capsys.readouterr().out
    assert processed(broke) == collections.Counter({"m1": 1, "m2": 1})


def test_a_401_withdraws_the_journal_and_the_token_fixed_sends_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong token: one 401, exit 3, no result line and nothing pending; the same command
    with the right token sends every row."""
    source, out = write_csv(tmp_path / "in.csv", rows(3)), tmp_path / "out.jsonl"
    with ThreadedServer(rate_limit=None, tokens=[TOKEN]) as server:
        monkeypatch.setenv("AUTOCALLS_BASE_URL", server.base_url)
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", "wrong-token")
        assert bulk(source, out, "--rate-limit", "none") == 3
        assert [line.get("sending") for line in all_lines(out)] == [True, False]
        assert read_lines(out) == []
        monkeypatch.setenv("AUTOCALLS_API_TOKEN", TOKEN)
        capsys.readouterr()
        assert bulk(source, out, "--rate-limit", "none") == 0
        assert "3 answered, 0 failed, 0 skipped" in capsys.readouterr().out
        assert server.count(200) == 3


def test_stopped_while_waiting_to_retry_is_withdrawn_not_reported(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while a journaled row waits to retry a 503: nothing more is sent, and the row,
    certainly not processed, is withdrawn rather than left "possibly processed"."""
    source, out = write_csv(tmp_path / "in.csv", rows(1)), tmp_path / "out.jsonl"
    emulator.inject(Fault.status(503, headers={"Retry-After": "20"}))

    async def interrupt_when_refused() -> None:
        while not emulator.requests or emulator.requests[0].status is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the client has read the 503 and sleeps before retrying
        os.kill(os.getpid(), signal.SIGINT)

    async def run() -> int:

        interrupter = asyncio.create_task(interrupt_when_refused())
        try:
            client, starts = cli_job.bulk_client(TOKEN, emulator.base_url, None)
            outcome = await cli_job.run_job(
                client,
                InputFile(source),
                ResultLog(out),
                rate_limit=None,
                starts=starts,
                retry_failed=False,
                concurrency=4,
                progress_mode="off",
            )
        finally:
            await interrupter
        return outcome.exit_code

    assert asyncio.run(run()) == EXIT_INTERRUPTED
    assert [r.status for r in emulator.requests] == [503]
    assert [line["sending"] for line in all_lines(out)] == [True, False]
    assert states(source, out) == [None]
    assert bulk(source, out, "--rate-limit", "none") == 0
    assert processed(emulator) == collections.Counter({"m1": 1})


# -- --dry-run with rows matched by content ---------------------------------------------------


def test_dry_run_matches_rows_by_content_and_refuses_foreign_lines(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edited input: the dry run refuses it as the run would (exit 2, OUT untouched);
    --allow-foreign counts the rows by content. Rows possibly processed are counted apart."""
    source, out = write_csv(tmp_path / "in.csv", rows(3)), tmp_path / "out.jsonl"
    assert bulk(source, out, "--rate-limit", "none") == 0
    # Row 1's message replaced (m4, same customer: a second message to them), so its line
    # protects something (a deleted row's line would not block: issue 21).
    write_csv(
        source,
        [{**rows(4)[3], "customer_identifier": rows(1)[0]["customer_identifier"]}, *rows(3)[1:]],
    )
    capsys.readouterr()
    assert bulk(source, out, "--dry-run") == 2
    assert "out.jsonl has 1 line(s) for rows that are not in in.csv" in capsys.readouterr().err
    assert bulk(source, out, "--dry-run", "--allow-foreign") == 0
    report = capsys.readouterr().out
    assert "to send:  1\n" in report and "to skip:  2 (2 already answered" in report

    # A row journaled by a run that was killed: possibly processed, not counted as to send.
    key = {request.message: key for request, key in InputFile(source).keyed()}["m4"]
    with out.open("a", encoding="utf-8") as file:
        file.write(json.dumps({"id": 1, "sending": True, "key": key, "row": 1}) + "\n")
    before = out.read_bytes()
    assert bulk(source, out, "--dry-run", "--allow-foreign") == 0
    report = capsys.readouterr().out
    assert "to send:  0\n" in report
    assert "1 may have been processed: --retry-unsafe-failed sends them" in report
    assert bulk(source, out, "--dry-run", "--allow-foreign", "--retry-unsafe-failed") == 0
    assert "to send:  1\n" in capsys.readouterr().out
    assert out.read_bytes() == before
    assert len(emulator.requests) == 3


def test_dry_run_neither_creates_nor_repairs_out_and_respects_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dry run reads OUT under a shared lock: a run writing it makes the dry run refuse
    (exit 2), as the run itself would be refused; a cut last line is left as it is (only a run
    repairs it); a file that is not a bulk output, or not a regular file, is refused."""
    source, out = write_csv(tmp_path / "in.csv", rows(2)), tmp_path / "out.jsonl"
    assert bulk(source, out, "--dry-run") == 0
    assert "to send:  2\n" in capsys.readouterr().out
    assert not out.exists()

    out.write_bytes(b'{"id": 1, "ok": tr')  # cut by a crash
    writer = ResultLog(out)
    writer.open()
    try:
        assert bulk(source, out, "--dry-run") == 2
        assert "being written by another run" in capsys.readouterr().err
    finally:
        writer.close()
    assert bulk(source, out, "--dry-run") == 0
    assert out.read_bytes() == b'{"id": 1, "ok": tr'

    reader = ResultLog(out)
    assert reader.peek().unreadable_lines == 1
    (tmp_path / "people.csv").write_text("name\nJane\n", encoding="utf-8")
    assert bulk(source, tmp_path / "people.csv", "--dry-run") == 2
    assert "is not the output of a bulk run" in capsys.readouterr().err
    os.mkfifo(tmp_path / "fifo")
    assert bulk(source, tmp_path / "fifo", "--dry-run") == 2
    assert "is not a regular file" in capsys.readouterr().err


# -- --e164 and row keys -------------------------------------------------------------------------


def test_keys_are_the_rows_as_read_so_e164_does_not_change_them(
    emulator: MockAutocalls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key is computed from the row as read, before --e164 normalises it: a rerun with or
    without --e164 matches the same lines (nothing sent twice); OUT keeps the spelling of the
    input, and the number sent is the E.164 one."""
    spelled = [
        {"assistant_id": 123, "customer_identifier": c, "message": f"m{n}"}
        for n, c in enumerate(["(415) 555-1234", "+1 415 555 1234", "555-12"], 1)
    ]
    source, out = write_csv(tmp_path / "in.csv", spelled), tmp_path / "out.jsonl"
    assert bulk(source, out, "--rate-limit", "none", "--e164", "US") == 1  # row 3: INVALID_ROW
    assert list(emulator.conversations) == [(123, "+14155551234")]
    lines = {line["row"]: line for line in read_lines(out)}
    assert lines[1]["customer_identifier"] == "(415) 555-1234"
    assert lines[3]["error_code"] == "INVALID_ROW" and lines[3]["maybe_processed"] is False
    keys = [key for _, key in InputFile(source).keyed()]
    assert [lines[row]["key"] for row in (1, 2, 3)] == keys

    for flags in (["--e164", "US"], []):
        capsys.readouterr()
        assert bulk(source, out, "--rate-limit", "none", *flags) == 1
        assert "0 answered, 0 failed, 3 skipped" in capsys.readouterr().out
    assert len(emulator.requests) == 2

    # --retry-failed sends the refused row again, here normalised (and refused) once more.
    assert bulk(source, out, "--rate-limit", "none", "--e164", "US", "--retry-failed") == 1
    assert len(emulator.requests) == 2
    assert states(source, out) == ["answered", "answered", "failed"]
