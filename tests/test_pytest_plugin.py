"""The pytest plugin as a user gets it: its client fixture, and a clean venv that installs
``autocalls-async[testing]`` and runs the documented example in strict and in auto mode."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import AsyncAutocalls
from autocalls_async.testing import Fault, MockAutocalls, pytest_plugin

REPO = Path(__file__).resolve().parents[1]


async def ask(client: AsyncAutocalls, customer: str = "+14155551234") -> str:
    reply = await client.generate_reply(
        assistant_id=123, customer_identifier=customer, message="Hi"
    )
    return reply.reply


# -- the client fixture, here -----------------------------------------------------------------


@pytest.mark.timing
async def test_two_calls_are_instant(
    autocalls_client: AsyncAutocalls, autocalls_server: MockAutocalls
) -> None:
    """The default client's 5 per 60 s made the second call wait 12 s; this one waits for
    nothing (the emulator has no limit)."""
    started = time.monotonic()
    assert await ask(autocalls_client) == "Hi there! Thanks for your message: Hi"
    assert await ask(autocalls_client)
    assert time.monotonic() - started < 2.0
    assert autocalls_server.count(200) == 2
    assert autocalls_client.base_url.port == int(autocalls_server.base_url.split(":")[2][:-4])


@pytest.mark.timing
@pytest.mark.autocalls_server(rate_limit=(4, 0.5))
async def test_the_client_keeps_the_emulators_limit_in_its_own_store(
    autocalls_client: AsyncAutocalls, autocalls_server: MockAutocalls
) -> None:
    """A limited emulator: the client spaces its calls to that limit (no 429) in a private
    store; the host-wide store (AUTOCALLS_LIMITER_DIR, set per test) is never touched."""
    started = time.monotonic()
    for n in range(9):
        await ask(autocalls_client, f"+1{n}")
    assert time.monotonic() - started > 0.8  # 9 starts at 4 per 0.5 s: two full windows
    assert autocalls_server.count(429) == 0 and autocalls_server.count(200) == 9
    assert held_schedules(os.environ["AUTOCALLS_LIMITER_DIR"]) == []


@pytest.mark.autocalls_server(tokens=["the-only-token"])
async def test_the_client_uses_the_emulators_token(
    autocalls_client: AsyncAutocalls, autocalls_server: MockAutocalls
) -> None:
    assert await ask(autocalls_client)
    assert autocalls_server.count(200) == 1


@pytest.mark.timing
async def test_retries_do_not_back_off_for_seconds(
    autocalls_client: AsyncAutocalls, autocalls_server: MockAutocalls
) -> None:
    """Two 503s without Retry-After are retried after milliseconds (the default policy's
    backoff is 0.5 s and then 1 s)."""
    for _ in range(2):
        autocalls_server.inject(Fault.status(503))
    started = time.monotonic()
    assert await ask(autocalls_client)
    assert time.monotonic() - started < 0.5
    assert autocalls_server.count(503) == 2 and autocalls_server.count(200) == 1


# -- a clean venv -----------------------------------------------------------------------------

CONFTEST = 'pytest_plugins = ["autocalls_async.testing.pytest_plugin"]\n'


def held_schedules(directory: str | os.PathLike[str]) -> list[Any]:
    """The token schedules kept in a host store (its key may exist: token ids use it)."""
    import sqlite3
    from contextlib import closing

    database = Path(directory) / "limiter.db"
    if not database.exists():
        return []
    with closing(sqlite3.connect(database)) as connection:
        try:
            return connection.execute("SELECT name FROM tokens").fetchall()
        except sqlite3.OperationalError:
            return []


def documented_example() -> str:
    """The example test of the plugin's docstring (the how-to), as a user copies it."""
    doc = pytest_plugin.__doc__
    assert doc is not None
    block = doc[doc.index("```python\nimport pytest\n") + len("```python\n") :]
    return block[: block.index("```")].strip() + "\n"


MORE = """

import time

CLIENTS = []


@pytest.mark.asyncio
async def test_two_calls_are_instant(autocalls_client, autocalls_server):
    started = time.monotonic()
    for _ in range(2):
        await autocalls_client.generate_reply(
            assistant_id=123, customer_identifier="+14155551234", message="Hi"
        )
    assert time.monotonic() - started < 2.0
    assert autocalls_server.count() == 2
    CLIENTS.append(autocalls_client)


@pytest.mark.asyncio
@pytest.mark.autocalls_server(balance=0)
async def test_marker(autocalls_client):
    from autocalls_async import InsufficientBalanceError

    assert CLIENTS[0].closed  # the previous test's client was closed after it
    with pytest.raises(InsufficientBalanceError):
        await autocalls_client.generate_reply(
            assistant_id=123, customer_identifier="+14155551234", message="Hi"
        )
"""


#: Where clean venvs are kept between the two phases of `make unit` (built by the parallel
#: one, used by the timing tests after it): one per digest of what the install reads.
VENVS = Path(tempfile.gettempdir()) / "autocalls-async-clean-venvs"
#: A venv older than this is built again: the dependencies resolve as they would today.
FRESH = 3600.0


def _digest() -> str:
    """What ``pip install REPO[testing]`` installs from this checkout (the package and its
    metadata), and the interpreter that makes the venv."""
    digest = hashlib.sha256(sys.version.encode())
    for path in [REPO / name for name in ("pyproject.toml", "README.md", "LICENSE")] + sorted(
        (REPO / "autocalls_async").rglob("*")
    ):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(f"{path.relative_to(REPO)}\0{len(path.read_bytes())}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def clean_venv() -> Path:
    """A new venv with only ``autocalls-async[testing]`` installed (from the local mirror
    that pip's configuration names), as a user's first ``pip install`` makes it: made once
    per checkout's content and hour, so that the timing tests below reuse the one the
    parallel phase made (the install takes longer than all of them)."""
    VENVS.mkdir(exist_ok=True)
    key = _digest()
    with (VENVS / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        now = time.time()
        for old in VENVS.glob("*-*"):
            if now - old.stat().st_mtime > 2 * FRESH:
                shutil.rmtree(old, ignore_errors=True)
        built = sorted(VENVS.glob(f"{key}-*"))
        if built and now - built[-1].stat().st_mtime < FRESH:
            return built[-1] / "bin" / "python"
        venv = VENVS / f"{key}-{int(now)}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        python = venv / "bin" / "python"
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"{REPO}[testing]"],
            capture_output=True,
            text=True,
            timeout=300,
            env=_clean_env(),
        )
        if installed.returncode:
            shutil.rmtree(venv, ignore_errors=True)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        os.utime(venv)  # dated when complete
        return python


def test_the_testing_extra_brings_the_plugin_and_nothing_of_the_other_extras(
    clean_venv: Path,
) -> None:
    """The clean venv (also what the parallel phase of `make unit` builds for the timing tests
    below): its requirements are consistent, the plugin and pytest-asyncio import, and none of
    the other extras came with it."""
    checked = subprocess.run(
        [str(clean_venv), "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    program = (
        "import importlib.util as u, autocalls_async.testing.pytest_plugin, pytest_asyncio\n"
        "print([m for m in ('redis', 'rich', 'phonenumbers', 'opentelemetry') if u.find_spec(m)])"
    )
    found = subprocess.run(
        [str(clean_venv), "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
        cwd=clean_venv.parent,  # not this checkout: the installed package is imported
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("AUTOCALLS_", "COVERAGE_", "COV_CORE_", "PYTEST_", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "scope"), [("strict", "function"), ("auto", "function"), ("strict", "session")]
)
def test_the_documented_example_in_a_clean_venv(
    clean_venv: Path, tmp_path: Path, mode: str, scope: str
) -> None:
    """The plugin's docstring, followed to the letter: the install line, the conftest line,
    the example; strict mode with its marks, auto mode without them. Warnings are errors.
    A project whose fixtures default to a session loop (shared database fixtures) still gets
    fixtures in its tests' own loops."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(CONFTEST)
    doc = pytest_plugin.__doc__ or ""
    assert "pip install 'autocalls-async[testing]'" in doc  # what the fixture above does
    assert CONFTEST.strip() in doc and 'asyncio_default_fixture_loop_scope = "function"' in doc
    example = documented_example() + MORE
    assert example.count("@pytest.mark.asyncio\n") == 3
    if mode == "auto":
        example = example.replace("@pytest.mark.asyncio\n", "")
    (project / "test_example.py").write_text(example)
    (project / "pytest.ini").write_text(
        textwrap.dedent(
            f"""\
            [pytest]
            asyncio_mode = {mode}
            asyncio_default_fixture_loop_scope = {scope}
            addopts = --strict-markers -p no:cacheprovider
            filterwarnings = error
            """
        )
    )
    limiter_dir = tmp_path / "limiter"
    limiter_dir.mkdir()
    run = subprocess.run(
        [str(clean_venv), "-m", "pytest", "-q"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(AUTOCALLS_LIMITER_DIR=str(limiter_dir)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout and "warning" not in run.stdout.lower()
    assert held_schedules(limiter_dir) == []  # the host-wide store kept no schedule
