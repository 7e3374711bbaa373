"""``--token-file PATH`` and ``--token -``: the token reaches the command without appearing in
its command line (``ps``, ``/proc/PID/cmdline``, shell history), and a token file other users can
read is refused as ssh refuses such a key. Each case runs the real command in a subprocess
against the emulator on a loopback port, which accepts only the right token."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autocalls_async.testing import Fault, MockAutocalls

from .test_cli_edges import env_for

TOKEN = "42|Zt8Qm2Lx9Vb4Nc7Rf1Hj6Kp3Ws5Yd0Ga8Ue2Io"
REPLY = ("reply", "--assistant-id", "123", "--customer", "+1555", "--rate-limit", "none")

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes and /proc are POSIX")


@pytest.fixture
async def server() -> AsyncIterator[MockAutocalls]:
    async with MockAutocalls(rate_limit=None, tokens=[TOKEN]) as emulator:
        yield emulator


def token_file(tmp_path: Path, mode: int, content: str = TOKEN + "\n") -> Path:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(mode)
    return path


async def cli(
    server: MockAutocalls, *args: str, stdin: bytes | None = None
) -> tuple[int | None, str, str]:
    env = env_for(AUTOCALLS_BASE_URL=server.base_url)  # no AUTOCALLS_API_TOKEN
    env.pop("AUTOCALLS_API_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autocalls_async",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate(stdin)
    return process.returncode, out.decode(), err.decode()


async def test_a_private_token_file_is_read(server: MockAutocalls, tmp_path: Path) -> None:
    path = token_file(tmp_path, 0o600)
    code, out, err = await cli(server, *REPLY, "--token-file", str(path), "Hi")
    assert code == 0, err
    assert server.conversation(123, "+1555").messages == ["Hi"]
    assert TOKEN not in out + err
    # a symlink to it, as ssh allows; surrounding whitespace is not part of the token
    link = tmp_path / "link"
    link.symlink_to(token_file(tmp_path, 0o400, f"  {TOKEN}  \r\n"))
    code, _, err = await cli(server, *REPLY, "--token-file", str(link), "Again")
    assert code == 0, err


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666])
async def test_a_token_file_others_may_read_is_refused(
    server: MockAutocalls, tmp_path: Path, mode: int
) -> None:
    path = token_file(tmp_path, mode)
    code, out, err = await cli(server, *REPLY, "--token-file", str(path), "Hi")
    assert code == 2
    assert f"has mode {mode:04o}" in err and f"chmod 600 {path}" in err
    assert TOKEN not in out + err
    assert server.requests == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        (f"{TOKEN}\nsecond line\n", "holds several lines"),
        ("x" * 5000, "over 4096 bytes"),
    ],
)
async def test_a_token_file_that_holds_no_single_token_is_refused(
    server: MockAutocalls, tmp_path: Path, content: str, problem: str
) -> None:
    path = token_file(tmp_path, 0o600, content)
    code, out, err = await cli(server, *REPLY, "--token-file", str(path), "Hi")
    assert code == 2 and problem in err, err
    assert TOKEN not in out + err and server.requests == []


async def test_what_is_not_a_token_file_is_refused(server: MockAutocalls, tmp_path: Path) -> None:
    for path, problem in (
        (tmp_path / "missing", "cannot be opened"),
        (tmp_path, "is not a regular file"),
    ):
        code, _, err = await cli(server, *REPLY, "--token-file", str(path), "Hi")
        assert code == 2 and problem in err, err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    code, _, err = await cli(server, *REPLY, "--token-file", str(fifo), "Hi")  # no hang
    assert code == 2 and "is not a regular file" in err
    binary = token_file(tmp_path, 0o600)
    binary.write_bytes(b"\xff\xfe\x00")
    code, _, err = await cli(server, *REPLY, "--token-file", str(binary), "Hi")
    assert code == 2 and "is not text" in err
    path = token_file(tmp_path, 0o600)
    code, _, err = await cli(server, *REPLY, "--token", TOKEN, "--token-file", str(path), "Hi")
    assert code == 2 and "pass one" in err
    assert server.requests == []


async def test_the_token_from_stdin(server: MockAutocalls) -> None:
    code, out, err = await cli(server, *REPLY, "--token", "-", "Hi", stdin=f"{TOKEN}\n".encode())
    assert code == 0, err
    # the token on the first line, the message on the next ones (message "-")
    code, out, err = await cli(
        server, *REPLY, "--token", "-", "-", stdin=f"{TOKEN}\nline one\nline two\n".encode()
    )
    assert code == 0, err
    assert server.conversation(123, "+1555").messages == ["Hi", "line one\nline two"]
    code, out, err = await cli(server, *REPLY, "--token", "-", "Hi", stdin=b"\n")
    assert code == 2 and "gave no token" in err
    assert TOKEN not in out + err


def _proc(pid: int) -> tuple[str, bytes]:
    return Path(f"/proc/{pid}/limits").read_text(), Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
async def test_the_command_leaves_no_core_dump_and_no_token_in_ps(
    server: MockAutocalls, tmp_path: Path
) -> None:
    """While it waits for the reply: its core size limit is 0, and its command line (what
    ``ps`` shows every user) does not hold the token."""
    server.inject(Fault.slow(3.0))
    path = token_file(tmp_path, 0o600)
    env = env_for(AUTOCALLS_BASE_URL=server.base_url)
    env.pop("AUTOCALLS_API_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autocalls_async",
        *REPLY,
        "--token-file",
        str(path),
        "Hi",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            while not server.requests:  # it has read the token and sent the request
                await asyncio.sleep(0.05)
        limits, cmdline = _proc(process.pid)
    finally:
        async with asyncio.timeout(30):
            await process.communicate()
    (core,) = [line for line in limits.splitlines() if line.startswith("Max core file size")]
    assert core.split()[4] == "0", core  # the soft limit
    assert TOKEN.encode() not in cmdline
    assert process.returncode == 0


def _take_terminal() -> None:  # in the child, before exec: the pty becomes its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def test_the_token_typed_on_a_terminal_is_not_echoed(server: MockAutocalls) -> None:
    """``--token -`` on a terminal prompts on stderr and reads without echo (getpass)."""
    primary, secondary = pty.openpty()
    env = env_for(AUTOCALLS_BASE_URL=server.base_url)
    env.pop("AUTOCALLS_API_TOKEN", None)
    loop = asyncio.get_running_loop()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "autocalls_async",
            *REPLY,
            "--token",
            "-",
            "Hi",
            stdin=secondary,
            stdout=asyncio.subprocess.PIPE,
            stderr=secondary,
            env=env,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(secondary)
        seen = b""
        async with asyncio.timeout(30):
            while b"API token: " not in seen:  # the prompt, on the terminal
                seen += await loop.run_in_executor(None, os.read, primary, 1024)
            os.write(primary, f"{TOKEN}\n".encode())
            out, _ = await process.communicate()
            while True:
                try:
                    chunk = await loop.run_in_executor(None, os.read, primary, 65536)
                except OSError:  # EIO: the child has closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
    finally:
        os.close(primary)
    assert process.returncode == 0, seen
    assert TOKEN.encode() not in seen  # not echoed
    assert server.conversation(123, "+1555").messages == ["Hi"]


async def test_a_token_file_of_another_user_is_refused(
    server: MockAutocalls, tmp_path: Path
) -> None:
    """Even private to its owner: another user could change it (or read it)."""
    path = token_file(tmp_path, 0o600)
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)  # nobody
    else:
        path = Path("/etc/passwd")  # root's
    code, out, err = await cli(server, *REPLY, "--token-file", str(path), "Hi")
    assert code == 2 and "belongs to another user" in err, err
    assert server.requests == []
