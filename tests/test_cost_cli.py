"""Issue 14 on the command line: the real ``autocalls-async bulk`` in a subprocess against the
emulator on a loopback port (--max-replies, --dry-run, --e164, stopping at the balance, 401
and unknown assistants), counting what the emulator received."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import cli
from autocalls_async.cli import exits as cli_exits
from autocalls_async.testing import MockAutocalls

from .test_cli import TOKEN, read_lines, run_cli, write_csv

FAST = ("--rate-limit", "4/1", "--progress", "off")  # one start every 0.25 s


def env_for(server: MockAutocalls, token: str = TOKEN) -> dict[str, str]:
    return {"AUTOCALLS_API_TOKEN": token, "AUTOCALLS_BASE_URL": server.base_url}


def messages_received(server: MockAutocalls) -> collections.Counter[str]:
    return collections.Counter(m for c in server.conversations.values() for m in c.messages)


async def test_balance_3_stops_after_4_requests_and_a_rerun_sends_the_rest(
    tmp_path: Path,
) -> None:
    """Done when: with --balance 3 a 10-row run sends 4 requests (3 replies and the 402),
    stops with exit 5 and a clear message, writes only the 3 answers; after a top-up the same
    command answers the other 7, none twice."""
    rows = [
        {"assistant_id": 123, "customer_identifier": f"+1555000{n:04d}", "message": f"m{n}"}
        for n in range(1, 11)
    ]
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    argv = ("bulk", str(source), "--out", str(out), *FAST)
    async with MockAutocalls(rate_limit=None, balance=3) as server:
        first = await run_cli(*argv, **env_for(server))
        assert first.code == cli_exits.EXIT_BALANCE == 5, first.err
        assert server.count() == 4 and server.count(402) == 1
        assert [line["ok"] for line in read_lines(out)] == [True] * 3
        assert "Stopped at the first INSUFFICIENT_BALANCE: 7 rows left unsent" in first.out
        assert "top up the account's balance" in first.out

        server.top_up(7)
        second = await run_cli(*argv, **env_for(server))
        assert second.code == 0, second.err
        assert "7 answered, 0 failed, 3 skipped" in second.out
        assert server.count() == 4 + 7
        assert messages_received(server) == collections.Counter(f"m{n}" for n in range(1, 11))
        lines = read_lines(out)
        assert len(lines) == 10 and all(line["ok"] for line in lines)
        assert TOKEN not in first.out + first.err + second.out + second.err


async def test_max_replies_dry_run_and_e164(tmp_path: Path) -> None:
    """--max-replies stops after N (exit 9, resumable); --dry-run reports the counts and sends
    nothing, with no token; --e164 makes three spellings one conversation and fails an
    impossible number as INVALID_ROW."""
    spelled = [
        "+1 (415) 555-1234",
        "415-555-1234",
        "+14155551234",
        "212-555-0100",
        "555-12",  # not a possible number
        "+44 20 7946 0018",
        "+15550001111",
        "(415) 555 1234",
    ]
    rows: list[dict[str, Any]] = [
        {"assistant_id": 123, "customer_identifier": c, "message": f"m{n}"}
        for n, c in enumerate(spelled, 1)
    ]
    rows[6]["message"] = ""  # row 7: invalid, no message
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    argv = ("bulk", str(source), "--out", str(out), "--e164", "US", *FAST)
    async with MockAutocalls(rate_limit=None) as server:
        first = await run_cli(*argv, "--max-replies", "2", **env_for(server))
        assert first.code == cli_exits.EXIT_MAX_REPLIES == 9, first.err
        assert server.count() == 2
        assert "Stopped at --max-replies: 4 rows left unsent" in first.out
        by_row = {line["row"]: line for line in read_lines(out)}
        assert sorted(by_row) == [1, 2, 5, 7]
        assert by_row[5]["error_code"] == "INVALID_ROW"
        assert "'555-12' is not a possible phone number" in by_row[5]["error"]

        dry = await run_cli(*argv, "--dry-run", "--retry-failed", "--rate-limit", "5/60")
        assert dry.code == 1, dry.err  # some rows would fail as INVALID_ROW
        assert "Dry run: nothing was sent. 8 rows in the input:" in dry.out
        assert "to send:  4\n" in dry.out
        assert "to skip:  2 (2 already answered" in dry.out
        assert "invalid:  2 " in dry.out
        assert "row 6: customer_identifier '555-12'" in dry.out
        assert "row 8: missing message" in dry.out
        assert "distinct customers: 3 (3 conversations with 1 assistant)" in dry.out
        assert "time at 5/60s: about 37s (4 requests, one every 12.24s" in dry.out
        assert server.count() == 2

        dry = await run_cli(*argv, "--dry-run", "--max-replies", "1")
        assert dry.code == 0, dry.err
        assert "to send:  4 (--max-replies stops after 1)" in dry.out
        assert "2 failed before: add --retry-failed to send them" in dry.out
        assert "invalid:  0" in dry.out
        assert server.count() == 2 and not dry.err

        rest = await run_cli(*argv, **env_for(server))
        assert rest.code == 1, rest.err  # rows 5 and 7 failed in the first run
        assert server.count() == 6
        assert server.conversations[(123, "+14155551234")].messages == ["m1", "m2", "m3", "m8"]
        assert sorted(server.conversations) == [
            (123, "+12125550100"),
            (123, "+14155551234"),
            (123, "+442079460018"),
        ]


async def test_unknown_assistant_rows_are_skipped_then_retried(tmp_path: Path) -> None:
    """After ASSISTANT_NOT_FOUND the assistant's other rows are SKIPPED_ASSISTANT_NOT_FOUND,
    unsent; --retry-failed sends them once the assistant exists."""
    rows = [
        {"assistant_id": a, "customer_identifier": f"+1555{n:07d}", "message": f"m{n}"}
        for n, a in enumerate([999, 123, 999, 999, 123, 999], 1)
    ]
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    argv = ("bulk", str(source), "--out", str(out), *FAST)
    async with MockAutocalls(rate_limit=None) as server:
        first = await run_cli(*argv, **env_for(server))
        assert first.code == 1, first.err
        assert server.count() == 3 and server.count(404) == 1
        codes = {line["row"]: line.get("error_code") for line in read_lines(out)}
        assert codes == {
            1: "ASSISTANT_NOT_FOUND",
            2: None,
            3: "SKIPPED_ASSISTANT_NOT_FOUND",
            4: "SKIPPED_ASSISTANT_NOT_FOUND",
            5: None,
            6: "SKIPPED_ASSISTANT_NOT_FOUND",
        }
        server.assistants.add(999)
        again = await run_cli(*argv, "--retry-failed", **env_for(server))
        assert again.code == 0, again.err
        assert server.count() == 3 + 4
        assert messages_received(server) == collections.Counter(f"m{n}" for n in range(1, 7))


async def test_a_wrong_token_stops_at_the_first_401(tmp_path: Path) -> None:
    """A 401 is learned once: exit 3, nothing written, the same command works with the token."""
    rows = [
        {"assistant_id": 123, "customer_identifier": f"+1555{n:07d}", "message": "m"}
        for n in range(5)
    ]
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    argv = ("bulk", str(source), "--out", str(out), *FAST)
    async with MockAutocalls(rate_limit=None, tokens=[TOKEN]) as server:
        wrong = await run_cli(*argv, **env_for(server, token="not-the-token"))
        assert wrong.code == cli_exits.EXIT_AUTH == 3, wrong.err
        assert server.count() == 1 and server.count(401) == 1
        assert "Stopped at the first UNAUTHENTICATED: 5 rows left unsent" in wrong.out
        assert "check AUTOCALLS_API_TOKEN" in wrong.out
        assert read_lines(out) == []
        right = await run_cli(*argv, **env_for(server))
        assert right.code == 0 and server.count() == 6
        assert "not-the-token" not in wrong.out + wrong.err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--e164", "XX"], "--e164 'XX' is not a region"),
        (["--max-replies", "-1"], "'-1' must be >= 0"),
    ],
)
def test_cost_option_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    """Bad cost options are usage errors that say what is wrong."""
    source = write_csv(tmp_path / "in.csv", [{"assistant_id": 1, "customer_identifier": "x"}])
    code = cli.main(["bulk", str(source), "--out", str(tmp_path / "o.jsonl"), *extra])
    assert code == 2
    assert says in capsys.readouterr().err


def test_dry_run_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run checks the file as a run would: a missing column, a missing file."""
    bad = tmp_path / "bad.csv"
    bad.write_text("assistant_id,message\n1,hi\n", encoding="utf-8")
    out = str(tmp_path / "o.jsonl")
    assert cli.main(["bulk", str(bad), "--out", out, "--dry-run"]) == 2
    assert "lacks the required column(s) customer_identifier" in capsys.readouterr().err
    assert cli.main(["bulk", str(tmp_path / "none.csv"), "--out", out, "--dry-run"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_dry_run_without_a_rate_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a limit the dry run says so instead of a time."""
    source = write_csv(
        tmp_path / "in.csv", [{"assistant_id": 1, "customer_identifier": "x", "message": "m"}]
    )
    argv = ["bulk", str(source), "--out", str(tmp_path / "o.jsonl"), "--dry-run"]
    assert cli.main([*argv, "--rate-limit", "none"]) == 0
    assert "time: no client-side rate limit" in capsys.readouterr().out


async def test_mock_server_prints_the_admin_endpoints() -> None:
    """mock-server tells a shell user how to read its state and top up the balance."""
    process = await asyncio.create_subprocess_exec(
        *_python_cli("mock-server", "--port", "0", "--balance", "2"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        text = b""
        async with asyncio.timeout(30):
            while b"top up" not in text:
                text += await process.stdout.readline()
        assert b"/_emulator/state" in text and b"/_emulator/top-up" in text
    finally:
        process.terminate()
        await process.wait()


def _python_cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "autocalls_async", *args]
