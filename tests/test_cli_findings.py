"""An adversarial tester's findings on the CLI (issue 13), each run for real: the command in a
subprocess, the emulator on a loopback port."""

from __future__ import annotations

import asyncio
import csv
import os
import pty
import re
import signal
import sys
from pathlib import Path

import pytest

from autocalls_async._bulkio import InputFile
from autocalls_async.cli import progress as cli_progress
from autocalls_async.testing import MockAutocalls

from .test_cli_edges import TOKEN, Run, env_for, result_lines, run, start

LONG = 150_000  # characters: over csv's default field_size_limit (131,072), far under 1 MiB
OVER = 400_000  # three-byte characters: 1.2 MB, over the 1 MiB request limit


def write_rows(path: Path, messages: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["assistant_id", "customer_identifier", "message"])
        for n, message in enumerate(messages):
            writer.writerow([123, f"+1555{n:04d}", message])
    return path


# -- 1. a CSV message longer than csv's field size limit ----------------------------------------


async def test_a_long_csv_message_is_sent_and_one_too_big_fails_alone(tmp_path: Path) -> None:
    """A 150,000-character message (over csv's default field limit, under 1 MiB) is sent; a
    1.2 MB one fails alone as INVALID_ROW, naming the CLI's option; the others are sent."""
    source = write_rows(tmp_path / "in.csv", ["a" * LONG, "€" * OVER, "Hi"])
    out = tmp_path / "out.jsonl"
    dry = await run("bulk", str(source), "--out", str(out), "--dry-run", env=env_for())
    assert dry.code == 1, dry.err  # one row would fail as INVALID_ROW
    assert "to send:  2" in dry.out and "invalid:  1" in dry.out
    assert "pass --max-request-bytes N" in dry.out and "AsyncAutocalls(" not in dry.out
    async with MockAutocalls(rate_limit=None) as server:
        done = await run(
            *("bulk", str(source), "--out", str(out), "--rate-limit", "none"),
            env=env_for(server),
        )
        assert server.count() == 2  # the long row and "Hi"; the too-big row never left
    assert done.code == 1, done.err
    lines = {line["row"]: line for line in result_lines(out)}
    assert lines[1]["ok"] is True and lines[1]["reply"].endswith("a" * 100)
    assert lines[3]["ok"] is True
    bad = lines[2]
    assert bad["ok"] is False and bad["error_code"] == "INVALID_ROW" and bad["sent"] is False
    assert "1,200,06" in bad["error"] and "pass --max-request-bytes N" in bad["error"]
    assert "AsyncAutocalls(" not in bad["error"]


async def test_an_unclosed_quote_in_a_big_csv_is_named_as_such(tmp_path: Path) -> None:
    """A stray quote early in a file bigger than csv's default field limit: refused as a quote
    never closed (not "field larger than field limit"), exit 2, nothing sent."""
    source = tmp_path / "in.csv"
    rows = "".join(f"123,+1555{n:06d},message number {n}\n" for n in range(8000))
    source.write_text('assistant_id,customer_identifier,message\n123,+1,"oops\n' + rows)
    assert source.stat().st_size > 131_072
    result = await run(
        "bulk", str(source), "--out", str(tmp_path / "o.jsonl"), "--dry-run", env=env_for()
    )
    assert result.code == 2
    assert "opens a quoted field that is never closed" in result.err, result.err
    assert "field limit" not in result.err


def test_reading_long_fields_leaves_csvs_limit_as_it_was(tmp_path: Path) -> None:
    """A program using the reader keeps its own csv.field_size_limit: raised only while one
    record is read, back to the program's value between rows and afterwards."""
    source = write_rows(tmp_path / "in.csv", ["a" * LONG, "b" * LONG, "Hi"])
    mine = 1000
    before = csv.field_size_limit(mine)
    try:
        file = InputFile(source)
        file.check()
        assert file.rows == 3 and csv.field_size_limit() == mine
        rows = iter(file)
        first = next(rows)
        assert len(first.message) == LONG
        assert csv.field_size_limit() == mine  # suspended between rows: the program's limit
        assert [len(request.message) for request in rows] == [LONG, 2]
        assert csv.field_size_limit() == mine
        with pytest.raises(csv.Error, match="field larger than field limit"):
            next(csv.reader(["x" * (mine + 1)]))  # the program's own readers keep its limit
    finally:
        csv.field_size_limit(before)


# -- 2. --max-request-bytes ----------------------------------------------------------------------


async def run_stdin(path: Path, *args: str, env: dict[str, str]) -> Run:
    """The command with ``path`` as its stdin (a message too big for the command line)."""
    with path.open("rb") as stdin:
        process = await start(*args, env=env, stdin=stdin)
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    return Run(process.returncode, out.decode(), err.decode())


async def test_reply_names_max_request_bytes_and_honours_it(tmp_path: Path) -> None:
    """reply: a message over the limit is refused before sending with a hint the CLI user can
    follow (--max-request-bytes, not the SDK's argument); the option lowers and raises it."""
    async with MockAutocalls(rate_limit=None) as server:
        common = ("reply", "--assistant-id", "123", "--customer", "+1", "--rate-limit", "none")
        small = await run(*common, "--max-request-bytes", "2000", "x" * 3000, env=env_for(server))
        assert small.code == 2 and server.count() == 0
        assert "over the limit of 2,000 bytes" in small.err
        assert "pass --max-request-bytes N" in small.err and "AsyncAutocalls(" not in small.err
        fits = await run(*common, "--max-request-bytes", "4000", "x" * 3000, env=env_for(server))
        assert fits.code == 0, fits.err
        assert server.count() == 1
        # raised past what the server accepts: it is sent, and the 413 gets its own hint
        big = tmp_path / "big.txt"
        big.write_text("€" * OVER, encoding="utf-8")
        refused = await run_stdin(big, *common, "-", env=env_for(server))
        assert refused.code == 2 and "pass --max-request-bytes N" in refused.err
        assert server.count() == 1
        sent = await run_stdin(
            big, *common, "--max-request-bytes", "none", "-", env=env_for(server)
        )
        assert server.count(status=413) == 1
    assert sent.code == 1
    assert "HTTP 413" in sent.err and "--max-request-bytes N, at the server's limit" in sent.err


async def test_bulk_and_its_dry_run_honour_max_request_bytes(tmp_path: Path) -> None:
    """bulk --max-request-bytes: the dry run counts by it, the run fails the rows over it alone
    (INVALID_ROW, not sent) and sends the others; bad values are usage errors."""
    source = write_rows(tmp_path / "in.csv", ["x" * 3000, "Hi"])
    out = tmp_path / "out.jsonl"
    limit = ("--max-request-bytes", "2000")
    default = await run("bulk", str(source), "--out", str(out), "--dry-run", env=env_for())
    assert default.code == 0 and "invalid:  0" in default.out
    lowered = await run("bulk", str(source), "--out", str(out), "--dry-run", *limit, env=env_for())
    assert lowered.code == 1 and "invalid:  1" in lowered.out and "to send:  1" in lowered.out
    assert "over the limit of 2,000 bytes" in lowered.out
    async with MockAutocalls(rate_limit=None) as server:
        done = await run(
            *("bulk", str(source), "--out", str(out), "--rate-limit", "none", *limit),
            env=env_for(server),
        )
        assert server.count() == 1
    assert done.code == 1, done.err
    lines = {line["row"]: line for line in result_lines(out)}
    assert lines[1]["error_code"] == "INVALID_ROW" and lines[1]["sent"] is False
    assert "pass --max-request-bytes N" in lines[1]["error"]
    assert lines[2]["ok"] is True
    for bad in ("0", "-5", "lots"):
        refused = await run(
            *("bulk", str(source), "--out", str(tmp_path / "o2.jsonl"), "--dry-run"),
            *("--max-request-bytes", bad),
            env=env_for(),
        )
        assert refused.code == 2 and "argument --max-request-bytes" in refused.err, bad
    assert "--max-request-bytes N" in (await run("bulk", "--help", env=env_for())).out


# -- 3. one time estimate --------------------------------------------------------------------------


def test_send_time_the_first_request_starts_at_once() -> None:
    assert cli_progress.send_time(0, 12.0) == 0.0
    assert cli_progress.send_time(1, 12.0) == 0.0
    assert cli_progress.send_time(4, 12.0) == 36.0
    assert cli_progress.send_time(4, 12.0, first_at_once=False) == 48.0


@pytest.mark.parametrize(
    ("options", "expected"),
    [((), "about 37s"), (("--max-replies", "2"), "about 12s")],
)
async def test_the_dry_run_and_the_run_give_the_same_time(
    tmp_path: Path, options: tuple[str, ...], expected: str
) -> None:
    """4 rows at 5/60 (one every 12.24 s): the first starts at once, so both say 3 intervals
    (37 s), not 4 (49 s); with --max-replies 2, both say 1 interval. The run is stopped with
    Ctrl-C once it has said it."""
    source = write_rows(tmp_path / "in.csv", ["a", "b", "c", "d"])
    out = tmp_path / "out.jsonl"
    args = ("bulk", str(source), "--out", str(out), "--rate-limit", "5/60", *options)
    dry = await run(*args, "--dry-run", env=env_for())
    assert dry.code == 0, dry.err
    assert f"time at 5/60s: {expected} (" in dry.out, dry.out
    async with MockAutocalls(rate_limit=None) as server:
        process = await start(*args, "--progress", "plain", env=env_for(server))
        assert process.stderr is not None
        try:
            async with asyncio.timeout(30):
                first = (await process.stderr.readline()).decode()
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert first.startswith("in.csv: 4 rows to send"), first
    assert first.rstrip().endswith(f"; at 5/60s {expected}"), first


# -- 4. mock-server's --port and --host -----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (("--port", "99999"), "99999 is not a port: ports are 0-65535"),
        (("--port", "-1"), "-1 is not a port: ports are 0-65535"),
        (("--port", "http"), "'http' is not a port number (0-65535)"),
        (("--host", "no host!"), "is not an address to listen on"),
        (("--host", "http://127.0.0.1"), "not a URL"),
        (("--host", "127.0.0.1:8000"), "without a port (give the port with --port)"),
    ],
)
async def test_mock_server_refuses_a_bad_port_or_host(option: tuple[str, ...], said: str) -> None:
    result = await run("mock-server", *option, env=env_for())
    assert result.code == 2
    assert said in result.err and "Traceback" not in result.err, result.err
    assert result.out == ""


async def test_mock_server_says_when_the_host_does_not_resolve() -> None:
    result = await run(
        "mock-server", "--port", "0", "--host", "no-such-host.invalid", env=env_for()
    )
    assert result.code == 1 and "Traceback" not in result.err
    assert "cannot listen on no-such-host.invalid:0" in result.err
    assert "--host must be an address of this machine" in result.err


async def test_mock_server_listens_on_a_bracketed_ipv6_loopback() -> None:
    process = await start("mock-server", "--port", "0", "--host", "[::1]", env=env_for())
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            banner = (await process.stdout.readline()).decode()
    finally:
        process.kill()
        await process.wait()
    assert re.match(r"Autocalls emulator listening on http://\[::1\]:\d+/api", banner), banner


# -- 5. AUTOCALLS_LOG ------------------------------------------------------------------------------


async def test_an_unknown_autocalls_log_is_said_once() -> None:
    """AUTOCALLS_LOG=verbose: one line on stderr naming the accepted values; the reply goes on."""
    async with MockAutocalls(rate_limit=None) as server:
        result = await run(
            *("reply", "--assistant-id", "123", "--customer", "+1", "Hi"),
            env=env_for(server, AUTOCALLS_LOG="verbose"),
        )
    assert result.code == 0, result.err
    assert result.out.startswith("Hi there!")
    assert result.err.splitlines() == [
        "autocalls-async: AUTOCALLS_LOG='verbose' is not a log level: use debug, info, "
        "warning, error (or unset "
        "it); no log handler was added"
    ]
    assert TOKEN not in result.err


async def test_an_unknown_autocalls_log_in_a_program_is_a_warning_once() -> None:
    """A program using the SDK: the package logger's WARNING, once however many clients; a
    program's own logging configuration decides where it goes; a valid level says nothing."""
    program = (
        "import logging, sys\n"
        "from autocalls_async import AsyncAutocalls\n"
        "if sys.argv[1] == 'configured':\n"
        "    logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
        "AsyncAutocalls('t'); AsyncAutocalls('t')\n"
    )
    for mode, value, expected in [
        ("plain", "verbose", "AUTOCALLS_LOG='verbose' is not a log level"),
        ("configured", "loud", "WARNING autocalls_async: AUTOCALLS_LOG='loud' is not a log level"),
        ("plain", "info", None),
        ("plain", "", None),
    ]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            program,
            mode,
            env=env_for(AUTOCALLS_LOG=value),
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            _, err = await process.communicate()
        assert process.returncode == 0
        lines = err.decode().splitlines()
        if expected is None:
            assert lines == [], lines
        else:
            assert len(lines) == 1 and lines[0].startswith(expected), lines


# -- 6. the demo's table ---------------------------------------------------------------------------


def demo_ids(text: str) -> list[int]:
    """The ids of the demo's table rows: plain lines (`    1  +1415...`) or rich (`│ 1  │`)."""
    ids = []
    for line in text.splitlines():
        match = re.match(r"^(?:│\s*|\s+)(\d+)\s+(?:│\s*)?\S", line)
        if match and ("│" in line or "  " in line.strip()):
            ids.append(int(match.group(1)))
    return ids


@pytest.mark.parametrize("terminal", [False, True])
async def test_the_demo_lists_each_row_once(tmp_path: Path, terminal: bool) -> None:
    """demo's table, piped and on a terminal (rich): rows 1 to 20, once each, no "None"."""
    env = env_for(COLUMNS="200", TERM="dumb")
    args = ("demo", "--progress", "off", "--dir", str(tmp_path))
    if not terminal:
        result = await run(*args, env=env)
        assert result.code == 0, result.err
        text = result.out
    else:
        primary, secondary = pty.openpty()
        try:
            process = await start(*args, env=env, stdout=secondary)
            os.close(secondary)
            chunks = []
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(60):
                while True:  # read as it comes: a full terminal buffer would block the demo
                    try:
                        chunk = await loop.run_in_executor(None, os.read, primary, 65536)
                    except OSError:  # EIO: the child has closed the terminal
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                _, err = await process.communicate()
            assert process.returncode == 0, err
        finally:
            os.close(primary)
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
        text = text.replace("\r\n", "\n")
        assert "┃ id" in text  # rich's table
    assert "None" not in text
    assert sorted(demo_ids(text)) == list(range(1, 21)), text
    assert "✗ ASSISTANT_NOT_FOUND" in text
    written = result_lines(tmp_path / "replies.jsonl")  # the demo's csv names rows "1".."20"
    assert sorted(int(line["id"]) for line in written) == list(range(1, 21))


# -- 7. no token: the CLI's words --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "said"),
    [(None, "no API token"), ("", "is empty"), ("two words", "contains a space")],
)
async def test_reply_and_bulk_name_the_cli_token_options(
    tmp_path: Path, token: str | None, said: str
) -> None:
    """No token (or an empty or broken one): reply and bulk name --token and
    AUTOCALLS_API_TOKEN, never the SDK's api_token=; exit 2; nothing reaches the server."""
    source = write_rows(tmp_path / "in.csv", ["Hi"])
    async with MockAutocalls(rate_limit=None) as server:
        env = env_for(AUTOCALLS_BASE_URL=server.base_url)
        if token is not None:
            env["AUTOCALLS_API_TOKEN"] = token
        results = [
            await run("reply", "--assistant-id", "123", "--customer", "+1", "Hi", env=env),
            await run("bulk", str(source), "--out", str(tmp_path / "o.jsonl"), env=env),
        ]
        assert server.count() == 0
    for result in results:
        assert result.code == 2
        assert said in result.err and "--token" in result.err, result.err
        assert "AUTOCALLS_API_TOKEN" in result.err
        assert "api_token" not in result.err and "Traceback" not in result.err
    assert not (tmp_path / "o.jsonl").exists()
