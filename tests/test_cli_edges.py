"""The newcomer's rough edges of the CLI and the emulator (issue 13), each run for real: the
command in a subprocess, the emulator on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import json
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from autocalls_async import (
    AssistantNotFoundError,
    AsyncAutocalls,
    InvalidRequestError,
    NotFoundError,
    cli,
)
from autocalls_async.cli import exits as cli_exits
from autocalls_async.cli import mock_server as cli_mock
from autocalls_async.cli import output as cli_output
from autocalls_async.cli import reply as cli_reply
from autocalls_async.testing import AccessRecord, Fault, MockAutocalls

from ._env import child_env

#: This process's own: pytest-xdist's workers run these tests at the same time, each test with
#: its own limiter directory, and one token kept in two places at once is said on the stderr
#: the tests read ("two rate-limit schedules").
TOKEN = f"edge-token-never-printed-{os.getpid()}"
SUMMARY = re.compile(
    r"(?P<state>Done|Interrupted|Stopped: [^:]*) in \S+: (?P<total>\d+) rows?: (?P<answered>\d+) answered, "
    r"(?P<failed>\d+) failed, (?P<skipped>\d+) skipped \(already in [^)]*\)"
    r"(?:, (?P<cut_off>\d+) cut off in flight)?(?:, (?P<not_sent>\d+) not sent)?$"
)


@attrs.frozen
class Run:
    code: int | None
    out: str
    err: str


def env_for(server: MockAutocalls | None = None, /, **extra: str) -> dict[str, str]:
    """The child's environment: this test's limiter directory (conftest) kept, the other
    AUTOCALLS_ variables dropped unless given."""
    env = child_env()
    if server is not None:
        env.update(AUTOCALLS_API_TOKEN=TOKEN, AUTOCALLS_BASE_URL=server.base_url)
    env.update(extra)
    return env


async def start(*args: str, env: dict[str, str], **options: Any) -> asyncio.subprocess.Process:
    options.setdefault("stdout", asyncio.subprocess.PIPE)
    options.setdefault("stderr", asyncio.subprocess.PIPE)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autocalls_async", *args, env=env, **options
    )


async def run(*args: str, env: dict[str, str]) -> Run:
    process = await start(*args, env=env)
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:  # timed out: no child left behind
            process.kill()
            await process.wait()
    return Run(process.returncode, out.decode(), err.decode())


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(count: int, customers: int | None = None) -> list[dict[str, Any]]:
    customers = customers or count
    return [
        {
            "assistant_id": 123,
            "customer_identifier": f"+1555{n % customers:04d}",
            "message": f"m{n}",
        }
        for n in range(count)
    ]


def accounted(text: str) -> dict[str, int]:
    """The summary's counts, checked to add up to the input's rows."""
    match = next(filter(None, map(SUMMARY.match, text.splitlines())), None)
    assert match is not None, text
    counts = {k: int(v or 0) for k, v in match.groupdict().items() if k != "state"}
    parts = ("answered", "failed", "skipped", "cut_off", "not_sent")
    assert sum(counts[k] for k in parts) == counts["total"], text
    return counts


def result_lines(path: Path) -> list[dict[str, Any]]:
    """The complete result lines of a bulk output (none before it exists)."""
    lines = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line being written
                data = json.loads(line)
                if "sending" not in data:
                    lines.append(data)
    return lines


# -- bare command, plurals, absurd rates -------------------------------------------------------


async def test_bare_command_prints_the_help_on_stdout() -> None:
    """`autocalls-async` alone: the whole help on stdout (exit codes included), no usage
    error on stderr; exit 2 as argparse does for a missing command."""
    bare = await run(env=env_for())
    assert bare.code == 2
    assert bare.err == ""
    assert bare.out.startswith("usage: autocalls-async")
    assert "exit codes:" in bare.out and "start here: autocalls-async demo" in bare.out


@pytest.mark.timing
async def test_a_one_row_run_shows_no_rate_and_says_1_row(tmp_path: Path) -> None:
    """One row: no "12924% of the limit", no "1 rows"; the summary adds up. Twenty rows at a
    scaled limit: a measured rate, near the limit, never an absurd percentage."""
    one = write_csv(tmp_path / "one.csv", rows(1))
    many = write_csv(tmp_path / "many.csv", rows(12))
    async with MockAutocalls(rate_limit=None) as server:
        first = await run("bulk", str(one), "--out", str(tmp_path / "1.jsonl"), env=env_for(server))
        second = await run(
            *("bulk", str(many), "--out", str(tmp_path / "2.jsonl"), "--rate-limit", "10/1"),
            *("--progress", "plain"),
            env=env_for(server),
        )
    assert first.code == 0, first.err
    assert "Done in 0s: 1 row: 1 answered, 0 failed, 0 skipped" in first.out
    assert "Rate: not measured (1 request; a rate needs at least 5)" in first.out
    assert "%" not in first.out
    assert "one.csv: 1 row to send" in first.err and "1/1 row (1 answered" in first.err
    assert (
        re.search(r"\b1 (rows|requests|retries|429s|conversations)\b", first.out + first.err)
        is None
    )
    assert accounted(first.out)["answered"] == 1

    assert second.code == 0, second.err
    share = re.search(r"per 1s, (\d+)% of the limit 10 per 1s\)", second.out)
    assert share is not None, second.out
    assert 50 <= int(share.group(1)) <= 110
    assert "ETA" not in second.err.splitlines()[-1]  # the last progress line: finished


async def test_a_finished_bar_says_done_without_spinner_or_eta(tmp_path: Path) -> None:
    """--progress bar (rich): the bar's last state shows "done", no spinner, no ETA."""
    source = write_csv(tmp_path / "in.csv", rows(6))
    async with MockAutocalls(rate_limit=None) as server:
        done = await run(
            *("bulk", str(source), "--out", str(tmp_path / "o.jsonl"), "--progress", "bar"),
            *("--rate-limit", "100/1"),
            env=env_for(server, COLUMNS="80"),
        )
    assert done.code == 0, done.err
    last = [line for line in done.err.splitlines() if "6/6" in line][-1]
    assert last.lstrip().startswith("done in.csv"), last
    assert "ETA" not in last
    assert not set(last) & set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # no spinner frame
    assert all(len(line) <= 80 for line in done.err.splitlines())


async def test_at_80_columns_the_summary_wraps_between_words(tmp_path: Path) -> None:
    """On a terminal of 80 columns, each summary line is wrapped at word boundaries: no line
    is wider than the terminal, and the words read back whole."""
    write_csv(tmp_path / "in.csv", rows(6))
    out = "a-rather-long-output-file-name-for-the-results.jsonl"
    primary, secondary = pty.openpty()
    try:
        async with MockAutocalls(rate_limit=None) as server:
            process = await start(
                *("bulk", "in.csv", "--out", out, "--progress", "off"),
                *("--rate-limit", "100/1"),
                env=env_for(server, COLUMNS="80", TERM="dumb"),
                stdout=secondary,
                cwd=tmp_path,
            )
            os.close(secondary)
            async with asyncio.timeout(60):
                _, err = await process.communicate()
        assert process.returncode == 0, err
        chunks = []
        with contextlib.suppress(OSError):  # EIO: the child has closed the terminal
            while chunk := os.read(primary, 65536):
                chunks.append(chunk)
    finally:
        os.close(primary)
    screen = b"".join(chunks).decode().replace("\r\n", "\n").splitlines()
    assert len(screen) > 2  # something was wrapped
    assert all(len(line) < 80 for line in screen), screen
    text = " ".join(line.strip() for line in screen)
    assert f"6 answered, 0 failed, 0 skipped (already in {out})" in text
    assert "0 429s received, 0 retries" in text and "% of the limit 100 per 1s" in text


# -- Ctrl-C: every row accounted for -----------------------------------------------------------


async def wait_for_results(out: Path, count: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30):
        while len(result_lines(out)) < count:  # noqa: ASYNC110 - another process writes it
            assert process.returncode is None, "the run ended before it was interrupted"
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("signals", [1, 2])
async def test_after_ctrl_c_the_summary_accounts_for_every_row(
    tmp_path: Path, signals: int
) -> None:
    """One SIGINT (graceful) or two (at once): answered + failed + skipped + cut off + not
    sent = the 32 rows, and a rerun finds what the summary said: the rows cut off reported,
    the rows not sent sent."""
    source = write_csv(tmp_path / "in.csv", rows(32))
    out = tmp_path / "out.jsonl"
    async with MockAutocalls(rate_limit=None, reply_delay=0.6) as server:
        argv = ["bulk", str(source), "--out", str(out), "--rate-limit", "20/1", "--progress", "off"]
        process = await start(*argv, env=env_for(server))
        await wait_for_results(out, 4, process)
        process.send_signal(signal.SIGINT)
        if signals == 2:
            assert process.stderr is not None
            async with asyncio.timeout(30):
                assert b"stopping" in await process.stderr.readline()
            process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            stdout, _ = await process.communicate()
        assert process.returncode == 130
        counts = accounted(stdout.decode())
        assert counts["total"] == 32 and counts["skipped"] == 0
        assert counts["answered"] == len(result_lines(out))
        if signals == 1:
            assert counts["cut_off"] == 0
        else:
            assert counts["cut_off"] >= 1  # ~ 20/s x 0.6 s were on the wire
            assert f"{counts['cut_off']} row" in stdout.decode().split("cut off in flight by")[0]
        assert counts["not_sent"] >= 1
        await asyncio.sleep(0.7)  # the cut-off requests finish server-side

        again = await run(*argv, env=env_for(server))
    counts_again = accounted(again.out)
    assert counts_again["skipped"] == counts["answered"] + counts["cut_off"]
    assert counts_again["answered"] == counts["not_sent"]
    if counts["cut_off"]:
        assert f"{counts['cut_off']} row" in again.out.split("may have been processed")[0]


# -- reply: waits said out loud ----------------------------------------------------------------


@pytest.mark.timing
async def test_reply_says_it_waits_for_a_429_and_for_how_long() -> None:
    """A 429 with Retry-After: one stderr line says it waits and how long, then the reply;
    with no retry left, the hint quotes the Retry-After instead of "wait a minute"."""
    async with MockAutocalls(rate_limit=(1, 2.0)) as server:
        args = ("reply", "--assistant-id", "123", "--customer", "+1", "--rate-limit", "none")
        first = await run(*args, "Hi", env=env_for(server))
        waited = await run(*args, "--max-retries", "1", "Hi again", env=env_for(server))
        refused = await run(*args, "--max-retries", "0", "Hi once more", env=env_for(server))
    assert first.code == 0 and first.err == ""
    assert waited.code == 0, waited.err
    assert waited.out == "Hi there! Thanks for your message: Hi again\n"
    assert re.fullmatch(
        r"autocalls-async: 429 Too Many Requests: the token's limit is used up; the service "
        r"asks to wait [12]s \(Retry-After\): waiting [12]s, then retrying \(retry 1 of 1; "
        r"Ctrl-C stops\)\n",
        waited.err,
    ), waited.err
    assert refused.code == 6
    assert "hint: the service asks to wait" in refused.err and "(Retry-After)" in refused.err
    assert "minute" not in refused.err


@pytest.mark.timing
async def test_after_a_429_the_limiter_wait_is_not_announced_twice() -> None:
    """With the client-side limiter (its limit above the server's), a 429 pauses the token:
    the retry's notice says why and how long; the slot wait that follows is not announced
    again as a rate-limit wait."""
    async with MockAutocalls(rate_limit=(1, 2.0)) as server:
        args = ("reply", "--assistant-id", "123", "--customer", "+1", "--rate-limit", "10/1")
        first = await run(*args, "Hi", env=env_for(server))
        second = await run(*args, "--max-retries", "1", "Hi again", env=env_for(server))
        assert server.count(429) == 1
    assert first.code == 0 and second.code == 0, second.err
    assert second.out == "Hi there! Thanks for your message: Hi again\n"
    assert "429 Too Many Requests: the token's limit is used up; the service asks" in second.err
    assert "waiting for a rate-limit slot" not in second.err


def test_the_retry_notices_without_retry_after_and_for_other_errors() -> None:
    """Other retried errors are said too; a 429 without Retry-After says so."""
    from autocalls_async import APIConnectionError, RateLimitError

    told: list[str] = []
    policy = cli_reply.TellingRetryPolicy(max_retries=2, tell=told.append)
    assert policy.decide(RateLimitError("slow", status=429), 0, lambda: 0.0) is not None
    assert policy.decide(APIConnectionError("refused", sent=False), 1, lambda: 0.0) is not None
    assert policy.decide(APIConnectionError("refused", sent=False), 2, lambda: 0.0) is None
    assert "it gave no Retry-After" in told[0] and "(retry 1 of 2" in told[0]
    assert told[1].startswith("CONNECTION_ERROR: retrying in") and "(retry 2 of 2" in told[1]
    assert len(told) == 2


# -- base URL, token, input --------------------------------------------------------------------


async def test_a_wrong_base_url_says_so_with_its_own_exit_code(tmp_path: Path) -> None:
    """The site's root instead of the API's (no /api): a 404 that is not
    ASSISTANT_NOT_FOUND says the base URL looks wrong and what it should be, exit 2 (an
    unknown assistant stays 4). The whole endpoint pasted: refused before sending."""
    async with MockAutocalls(rate_limit=None) as server:
        args = ("reply", "--assistant-id", "123", "--customer", "+1", "--rate-limit", "none", "Hi")
        base_url = server.base_url
        root = base_url.removesuffix("/api")
        no_api = await run(*args, env=env_for(server, AUTOCALLS_BASE_URL=root))
        pasted = await run(*args, env=env_for(server, AUTOCALLS_BASE_URL=server.url))
        unknown = await run(*args[:2], "9", *args[3:], env=env_for(server))
        source = write_csv(tmp_path / "in.csv", rows(1))
        bulk = await run(
            *("bulk", str(source), "--out", str(tmp_path / "o.jsonl"), "--base-url", server.url),
            env=env_for(server),
        )
        sent = server.count()
    assert no_api.code == 2 == cli_exits.EXIT_USAGE
    assert "NOT_FOUND (HTTP 404)" in no_api.err and "the base URL looks wrong" in no_api.err
    assert "https://app.autocalls.ai/api" in no_api.err and "--base-url" in no_api.err
    assert "see the message above" not in no_api.err
    assert pasted.code == 2
    assert "is the whole endpoint" in pasted.err and f"'{base_url}'" in pasted.err
    assert unknown.code == 4 and "ASSISTANT_NOT_FOUND" in unknown.err
    assert bulk.code == 2 and "is the whole endpoint" in bulk.err
    assert sent == 1  # the unknown assistant's: neither wrong URL reached the endpoint
    assert "exit codes:" in (await run("--help", env=env_for())).out


async def test_the_sdk_refuses_a_pasted_endpoint_and_names_a_wrong_route(
    server: MockAutocalls, token: str
) -> None:
    """In Python too: the endpoint as base_url is refused; app.autocalls.ai without /api
    too; a route 404 says the base URL looks wrong, ASSISTANT_NOT_FOUND stays itself."""
    with pytest.raises(InvalidRequestError, match="is the whole endpoint"):
        AsyncAutocalls(token, base_url=server.url + "/")
    with pytest.raises(InvalidRequestError, match="it is at 'https://app.autocalls.ai/api'"):
        AsyncAutocalls(token, base_url="https://app.autocalls.ai")
    root = server.base_url.removesuffix("/api")
    async with AsyncAutocalls(token, base_url=root, rate_limit=None) as client:
        with pytest.raises(NotFoundError, match="the base URL looks wrong") as wrong:
            await client.generate_reply(assistant_id=123, customer_identifier="a", message="m")
    assert not isinstance(wrong.value, AssistantNotFoundError)
    async with AsyncAutocalls(token, base_url=server.base_url, rate_limit=None) as client:
        with pytest.raises(AssistantNotFoundError) as unknown:
            await client.generate_reply(assistant_id=9, customer_identifier="a", message="m")
    assert "base URL" not in str(unknown.value)


async def test_a_directory_as_input_is_called_a_directory(tmp_path: Path) -> None:
    """bulk (and --dry-run) on a directory: "it is a directory", exit 2, no OUT created; an
    OUT that is a directory likewise."""
    out = tmp_path / "o.jsonl"
    source = write_csv(tmp_path / "in.csv", rows(1))
    for extra in ((), ("--dry-run",)):
        result = await run(
            "bulk", str(tmp_path), "--out", str(out), *extra, env=env_for(AUTOCALLS_API_TOKEN="t")
        )
        assert result.code == 2
        assert f"cannot read {tmp_path}: it is a directory" in result.err
        assert "no such file" not in result.err
    into_dir = await run(
        *("bulk", str(source), "--out", str(tmp_path), "--dry-run"),
        env=env_for(AUTOCALLS_API_TOKEN="t"),
    )
    assert into_dir.code == 2
    assert (
        f"--out {tmp_path} is a directory; give a file, e.g. --out {tmp_path / 'replies.jsonl'}"
        in into_dir.err
    )
    missing = await run(
        "bulk", str(tmp_path / "nope.csv"), "--out", str(out), env=env_for(AUTOCALLS_API_TOKEN="t")
    )
    assert missing.code == 2 and "no such file" in missing.err
    assert not out.exists()


# -- mock-server -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def mock_server(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """``mock-server`` on a free port; yields the process and its banner's lines."""
    process = await start("mock-server", "--port", "0", *args, env=env_for())
    assert process.stdout is not None
    banner: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not banner or "Ctrl-C stops" not in banner[-1]:
                banner.append((await process.stdout.readline()).decode().rstrip("\n"))
        yield process, banner
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def exported(banner: list[str]) -> dict[str, str]:
    line = next(line for line in banner if line.strip().startswith("export "))
    return dict(word.split("=", 1) for word in shlex.split(line)[1:])


async def stop(process: asyncio.subprocess.Process, signum: int) -> Run:
    process.send_signal(signum)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    return Run(process.returncode, out.decode(), err.decode())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("tokens", [(), ("--token", "my-test-token"), ("--token", "it's;$HOME|x")])
async def test_mock_server_prints_commands_that_work(tokens: tuple[str, ...]) -> None:
    """The printed export sets a token the server accepts; the printed export and curl lines,
    pasted into a shell, get a reply, not a 401 (a token with quotes, `;` or `$` included);
    so does the printed reply command."""
    async with mock_server(*tokens) as (process, banner):
        env = exported(banner)
        assert env["AUTOCALLS_API_TOKEN"] == (tokens[1] if tokens else "test-token")
        export = next(line.strip() for line in banner if line.strip().startswith("export "))
        curl = next(line.strip() for line in banner if line.strip().startswith("curl -X POST"))
        shell = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            export + "\ncurl -sS " + curl.removeprefix("curl "),
            env=env_for(),
            stdout=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            body = json.loads((await shell.communicate())[0])
        assert body["success"] is True and body["reply"] == "Hi there! Thanks for your message: Hi"
        command = next(
            line.strip() for line in banner if line.strip().startswith("autocalls-async reply")
        )
        reply = await run(*shlex.split(command)[1:], env=env_for(**env))
        assert reply.code == 0, reply.err
        stopped = await stop(process, signal.SIGINT)
    assert stopped.code == 0
    assert (
        "Autocalls emulator stopped: 2 requests (200: 2); 2 replies; 1 conversation" in stopped.out
    )
    if tokens:
        assert "only 1 token given with --token" in "\n".join(banner)
    else:
        assert "any non-empty token" in "\n".join(banner)


async def test_mock_server_on_all_interfaces_prints_a_loopback_url_the_sdk_accepts() -> None:
    """--host 0.0.0.0: the URL printed is the loopback one (the SDK refuses http:// to any
    other host), the banner says it listens on every interface, and the URL works."""
    async with mock_server("--host", "0.0.0.0", "--rate-limit", "none") as (process, banner):
        url = banner[0].split()[-1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", url), banner[0]
        assert "on all interfaces (0.0.0.0 port" in banner[1]
        assert exported(banner)["AUTOCALLS_BASE_URL"] == url
        reply = await run(
            "reply",
            "--assistant-id",
            "123",
            "--customer",
            "+1",
            "Hi",
            env=env_for(AUTOCALLS_BASE_URL=url, AUTOCALLS_API_TOKEN="t"),
        )
        assert reply.code == 0, reply.err
        await stop(process, signal.SIGTERM)


async def test_mock_server_logs_each_request_and_sums_up_on_sigterm() -> None:
    """One stderr line per request (time, method, path, status, the token's id, latency),
    never the token; SIGTERM prints requests by status, replies and conversations."""
    secret = "a-secret-the-log-must-not-show"
    async with mock_server("--token", secret, "--rate-limit", "2/60") as (process, banner):
        url = banner[0].split()[-1]
        good = env_for(AUTOCALLS_BASE_URL=url, AUTOCALLS_API_TOKEN=secret)
        args = ("reply", "--assistant-id", "123", "--rate-limit", "none", "--max-retries", "0")
        assert (await run(*args, "--customer", "+1", "Hi", env=good)).code == 0
        assert (await run(*args, "--customer", "+2", "Hi", env=good)).code == 0
        assert (await run(*args, "--customer", "+1", "Hi", env=good)).code == 6  # 429
        bad = env_for(AUTOCALLS_BASE_URL=url, AUTOCALLS_API_TOKEN="wrong")
        assert (await run(*args, "--customer", "+1", "Hi", env=bad)).code == 3
        stopped = await stop(process, signal.SIGTERM)
    assert stopped.code == 0
    log = stopped.err.splitlines()
    pattern = r"\d\d:\d\d:\d\d\.\d{3} POST /api/ai/generate-reply (\d{3}) token=([0-9a-f]{8}) \d+ms"
    matches = [re.fullmatch(pattern, line) for line in log]
    assert all(matches), log
    ours = hashlib.sha256(secret.encode()).hexdigest()[:8]
    wrong = hashlib.sha256(b"wrong").hexdigest()[:8]
    assert [(m.group(1), m.group(2)) for m in matches if m] == [
        ("200", ours),
        ("200", ours),
        ("429", ours),
        ("401", wrong),
    ]
    assert secret not in stopped.out + stopped.err
    assert stopped.out.rstrip().endswith(
        "Autocalls emulator stopped: 4 requests (200: 2, 401: 1, 429: 1); 2 replies; "
        "2 conversations"
    )


async def test_mock_server_quiet_still_sums_up() -> None:
    """--quiet: no request log, the summary still counts every request."""
    async with mock_server("--quiet") as (process, banner):
        assert "(--quiet: off)" in banner[-1]
        url = banner[0].split()[-1].removesuffix("/api")
        fetch = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"import urllib.request as u; u.urlopen('{url}/_emulator/state')"
        )
        assert await fetch.wait() == 0
        stopped = await stop(process, signal.SIGINT)
    assert stopped.err == ""
    assert "stopped: 1 request (200: 1); 0 replies; 0 conversations" in stopped.out


async def test_mock_server_port_in_use_suggests_another() -> None:
    """A port taken: says it is in use and suggests --port 0 or another port; exit 1."""
    async with MockAutocalls(rate_limit=None) as taken:
        result = await run("mock-server", "--port", str(taken.port), env=env_for())
    assert result.code == 1
    assert f"cannot listen on 127.0.0.1:{taken.port}: the port is in use" in result.err
    assert f"--port {taken.port + 1}" in result.err and "--port 0 for a free one" in result.err


@pytest.mark.parametrize("token", ["sp ace", "caf\u00e9", ""])
async def test_mock_server_refuses_a_token_no_client_can_send(token: str) -> None:
    """A token with a space or a non-ASCII character would make every call a 401 (the SDK
    and the CLI refuse to send it): refused at once, exit 2, with the reason."""
    result = await run("mock-server", "--port", "0", "--token", token, env=env_for())
    assert result.code == 2
    assert "cannot be sent as a token: the SDK and the CLI send printable ASCII" in result.err
    assert "Traceback" not in result.err


def test_mock_server_piped_into_head_stops_without_a_traceback() -> None:
    """`mock-server | head -1`: the reader went away; SIGTERM stops the server, and its
    summary, which has nowhere to go, ends no traceback on stderr."""
    server = subprocess.Popen(
        [sys.executable, "-m", "autocalls_async", "mock-server", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(),
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        assert server.stdout.readline().startswith(b"Autocalls emulator listening on")
        # The rest of the banner first: a reader gone while the banner is still being written
        # (a loaded machine) fails the banner's own write, the server exits 1 at once, and the
        # SIGTERM below may then find it exiting, its handler removed (-15). Then, as `head -1`
        # does, it goes away: only the summary has nowhere to go.
        banner = [b""]
        while b"Ctrl-C stops" not in banner[-1]:
            banner.append(server.stdout.readline())
            assert banner[-1], banner  # not at its end: the server is still there
        server.stdout.close()
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        err = server.stderr.read().decode()
        assert server.wait(timeout=30) == 1
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_listen_problems_name_the_cause() -> None:
    """Other bind failures: a privileged port, or the OS's own words."""
    import argparse
    import errno

    args = argparse.Namespace(host="127.0.0.1", port=80)
    denied = cli_mock.listen_problem(args, OSError(errno.EACCES, "Permission denied"))
    assert "permission denied; use a port above 1023" in denied
    other = cli_mock.listen_problem(args, OSError(errno.EADDRNOTAVAIL, "Cannot assign address"))
    assert other == "cannot listen on 127.0.0.1:80: Cannot assign address"
    args.port = 0
    assert "--port 8001" in cli_mock.listen_problem(args, OSError(errno.EADDRINUSE, "in use"))


@pytest.mark.timing
async def test_the_emulator_reports_every_request_to_on_request(token: str) -> None:
    """on_request gets one AccessRecord per request on any route: the endpoint, the admin
    routes, an unknown route, a dropped connection (status None); the token only as an id."""
    import aiohttp

    records: list[AccessRecord] = []
    async with MockAutocalls(rate_limit=None, on_request=records.append) as server:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        body = {"assistant_id": 123, "customer_identifier": "+1", "message": "Hi"}
        root = server.base_url.removesuffix("/api")
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url, json=body, headers=headers) as response:
                assert response.status == 200
            async with session.get(root + "/_emulator/state") as response:
                assert response.status == 200
            async with session.post(root + "/nowhere", headers=headers) as response:
                assert response.status == 404
            server.inject(Fault.drop())
            with pytest.raises(aiohttp.ClientError):
                async with session.post(server.url, json=body, headers=headers) as response:
                    await response.read()
    assert [(r.method, r.path, r.status) for r in records] == [
        ("POST", "/api/ai/generate-reply", 200),
        ("GET", "/_emulator/state", 200),
        ("POST", "/nowhere", 404),
        ("POST", "/api/ai/generate-reply", None),
    ]
    token_id = hashlib.sha256(token.encode()).hexdigest()[:8]
    assert [r.token_id for r in records] == [token_id, None, token_id, token_id]
    assert all(0 <= r.latency < 5 and r.time > 1e9 for r in records)
    assert token not in repr(records)


# -- demo --------------------------------------------------------------------------------------


async def test_every_command_the_demo_prints_works_after_it_exits(tmp_path: Path) -> None:
    """The demo keeps its files; the mock-server, export and bulk lines it prints, run after
    it has ended (on a free port instead of 8000), run the same job again."""
    folder = tmp_path / "demo files"  # a space: the printed paths are quoted
    demo = await run("demo", "--progress", "off", "--dir", str(folder), env=env_for())
    assert demo.code == 0, demo.err
    assert (folder / "demo.csv").is_file()
    assert len(result_lines(folder / "replies.jsonl")) == 20
    assert "✗ None" not in demo.out  # the journal's lines are not results
    assert "3. 20 result lines in replies.jsonl" in demo.out
    lines = [line.strip() for line in demo.out.splitlines()]
    serve = shlex.split(
        next(line for line in lines if line.startswith("autocalls-async mock-server"))
    )
    export = next(line for line in lines if line.startswith("export AUTOCALLS_BASE_URL"))
    printed = [line for line in lines if line.startswith("autocalls-async bulk ")]
    resume, bulk = map(shlex.split, printed[:2])
    assert "<your-file.csv>" in printed[2]  # with the real service: a placeholder, as shown
    assert "--port" in serve and serve[serve.index("--port") + 1] == "8000"
    serve[serve.index("--port") + 1] = "0"
    async with mock_server(*serve[2:]) as (process, banner):
        env = dict(word.split("=", 1) for word in shlex.split(export)[1:])
        env["AUTOCALLS_BASE_URL"] = banner[0].split()[-1]  # the free port, not 8000
        resumed = await run(*resume[1:], "--progress", "off", env=env_for(**env))
        again = await run(*bulk[1:], "--progress", "off", env=env_for(**env))
        await stop(process, signal.SIGINT)
    assert resumed.code == 1, resumed.err  # the demo's output: nothing left to send
    assert "20 rows: 0 answered, 0 failed, 20 skipped" in resumed.out
    assert again.code == 1, again.err  # as in the demo: one row's assistant does not exist
    assert "20 rows: 19 answered, 1 failed" in again.out
    assert len(result_lines(Path(bulk[bulk.index("--out") + 1]))) == 20


def test_the_demo_says_when_it_cannot_write_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dir that cannot be created: one line, exit 2, nothing run."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["demo", "--dir", str(blocker / "sub")]) == 2
    assert "cannot write the demo's files in" in capsys.readouterr().err


def test_notices_wrap_between_words_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """reply's notices on a narrow terminal: wrapped at word boundaries, nothing lost."""
    notice = "waiting for a rate-limit slot (5 per 60s for this token: one every 12s)"
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cli_output.tell(notice)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 1 and all(len(line) < 40 for line in lines)
    assert " ".join(line.strip() for line in lines) == f"autocalls-async: {notice}"
