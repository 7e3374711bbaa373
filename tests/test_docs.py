"""The documentation runs: every code block of README.md and docs/**/*.md is executed or checked.

Each fenced ```python block is, by default, a **complete program**: it is saved to a file and
run with ``sys.executable`` in a subprocess, in a fresh temporary directory, against the
emulator (``autocalls-async mock-server``, as the tutorial starts it: the service's 5 requests
per minute, assistants 123 and 456), with ``AUTOCALLS_BASE_URL`` pointing at it, its own
``AUTOCALLS_API_TOKEN`` and ``AUTOCALLS_LIMITER_DIR``, and a timeout. It must exit 0. The
directory also holds the tutorial's ``messages.csv`` and the ``replies.jsonl`` that the
tutorial's two ``bulk`` commands write, for the programs that read them.

A block that is not a complete program says so in an HTML comment on the line right before its
fence (invisible on the site), ``<!-- docs-test: KIND ... -->``:

``fragment (WHY)``
    part of a program (top-level ``await``, a name defined elsewhere on the page): it is
    compiled, not run.
``skip (WHY)``
    a complete program that needs what CI does not have (an OTLP collector, exporter packages):
    it is compiled, not run. WHY is required, so that a reader of the Markdown sees it.
``app [redis|tenants]``
    a FastAPI application: saved as ``app.py``, served by ``uvicorn app:app`` in a subprocess
    (``redis``: with ``REDIS_URL`` pointing at a ``redis-server`` of its own; ``tenants``: the
    many-accounts how-to's routes, ``/tenants/{name}/chat/{customer}``), sent real HTTP
    requests, then stopped with SIGINT; it must shut down cleanly.
``pytest``
    a test module: the page's ``pytest`` blocks and its ``conftest`` block are written to a
    temporary directory and run by pytest in a subprocess, in pytest-asyncio's strict mode (no
    configuration) and in auto mode.
``conftest``
    the ``conftest.py`` of the page's ``pytest`` blocks.
``file NAME``
    any language: a file that the programs find in their directory (``messages.csv``).
``output NAME``
    JSON lines the docs show as a command's real output: each line must be, byte for byte
    (conversation ids aside, which are random), a line that command writes; see ``OUTPUTS``.

An unmarked ```python block that does not run fails its test; an unknown marker fails, and so
does a marker with no fence after it. Other languages (console, text, json, toml) are not
executed unless marked. Besides: README.md stays under 150 lines, and every relative link and
image of README.md and the docs resolves to a file (anchors within the site are checked by
``mkdocs build --strict``), and the client reference's "at a glance" blocks list the
parameters of ``AsyncAutocalls()`` and ``generate_reply`` with their real defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._shared import once_per_run

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
TIMEOUT = 60.0

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
_MARKER = re.compile(r"^\s*<!-- docs-test: (?P<kind>[a-z-]+)(?: (?P<arg>.*?))? -->\s*$")
_KINDS = {"fragment", "skip", "app", "pytest", "conftest", "file", "output"}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_URL = re.compile(r"http://127\.0\.0\.1:\d+/api")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    kind: str | None  # None: unmarked
    arg: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the marker on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str, str] | None = None
    index = 0
    while index < len(lines):
        marker = _MARKER.match(lines[index])
        if marker:
            assert marker["kind"] in _KINDS, f"{page}:{index + 1}: unknown marker {lines[index]!r}"
            pending = (index, marker["kind"], (marker["arg"] or "").strip())
            index += 1
            continue
        opening = _FENCE.match(lines[index])
        if not opening:
            assert pending is None or not lines[index].strip(), (
                f"{page}:{pending[0] + 1}: a docs-test marker must be right before a fence"
            )
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            body.append(lines[end][indent:])
            end += 1
        assert end < len(lines), f"{page}:{index + 1}: a fence is never closed"
        kind, arg = (pending[1], pending[2]) if pending else (None, "")
        language = opening["info"].strip().split(" ")[0].lower()
        blocks.append(Block(page, index + 1, language, "\n".join(body) + "\n", kind, arg))
        pending = None
        index = end + 1
    assert pending is None, f"{page}:{pending[0] + 1}: a docs-test marker with no fence after it"
    return blocks


BLOCKS = [block for page in PAGES for block in extract(page)]
PYTHON = [block for block in BLOCKS if block.language in {"python", "py"}]


def _of(*kinds: str | None) -> list[Block]:
    return [block for block in PYTHON if block.kind in kinds]


def _params(blocks: list[Block]) -> list[object]:
    return [pytest.param(block, id=block.name) for block in blocks]


# ------------------------------------------------------------------ the emulator and the files


class MockServer:
    """``autocalls-async mock-server`` in a subprocess on a free port, as a user starts it."""

    def __init__(self, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "autocalls_async", "mock-server", "--port", "0", *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_environment(),
        )
        assert self.process.stdout is not None
        self._reader = threading.Thread()
        seen = []
        for line in self.process.stdout:  # the first lines name the URL
            seen.append(line)
            found = _URL.search(line)
            if found:
                self.base_url = found[0]
                # Keep reading what it prints (a request log), so that a full pipe never
                # blocks it.
                self._reader = threading.Thread(target=self.process.stdout.read, daemon=True)
                self._reader.start()
                return
        self.stop()
        raise AssertionError(f"mock-server printed no URL: {''.join(seen)!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - only if it hangs
                self.process.kill()
                self.process.wait(10)
        if self._reader.ident is not None:
            self._reader.join(10)  # at EOF once the process has exited
        assert self.process.stdout is not None
        self.process.stdout.close()


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCALLS_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def emulator() -> Iterator[MockServer]:
    server = MockServer("--assistants", "123,456")
    yield server
    server.stop()


def _files() -> dict[str, str]:
    return {block.arg: block.code for block in BLOCKS if block.kind == "file"}


def _bulk(out: Path, cwd: Path, *options: str, server: tuple[str, ...], token: str) -> list[str]:
    """Run the tutorial's ``bulk`` command against an emulator; return the lines it added."""
    before = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    mock = MockServer("--rate-limit", "5/1", *server)
    try:
        env = _environment(
            AUTOCALLS_BASE_URL=mock.base_url,
            AUTOCALLS_API_TOKEN=token,
            AUTOCALLS_LIMITER_DIR=str(cwd / "limiter"),
        )
        argv = [sys.executable, "-m", "autocalls_async", "bulk", "messages.csv", "--out", out.name]
        subprocess.run(
            [*argv, "--rate-limit", "5/1", "--progress", "off", *options],
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        mock.stop()
    return out.read_text(encoding="utf-8").splitlines()[len(before) :]


#: What each ``output NAME`` block is the real output of: the tutorial's messages.csv through
#: ``bulk`` (5/1 instead of 5/60 to take a second): the first run with assistant 123 only, the
#: ``--retry-failed`` run once assistant 999 exists, and a run with a balance of one reply.
OUTPUTS = {
    "bulk-first": ("replies.jsonl", (), ("--assistants", "123")),
    "bulk-retry": ("replies.jsonl", ("--retry-failed",), ("--assistants", "123,999")),
    "bulk-balance": ("balance.jsonl", (), ("--assistants", "123", "--balance", "1")),
}


def _run_the_tutorial(work: Path) -> None:
    for name, content in _files().items():
        (work / name).write_text(content, encoding="utf-8")
    outputs = {}
    for name, (out, options, server) in OUTPUTS.items():
        outputs[name] = _bulk(work / out, work, *options, server=server, token=f"docs-{name}")
    (work / "outputs.json").write_text(json.dumps(outputs), encoding="utf-8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """messages.csv and the outputs of the tutorial's bulk commands, run once (for all the
    workers of a parallel run)."""
    return once_per_run(tmp_path_factory, "docs-bulk", _run_the_tutorial)


def _program_dir(tmp_path: Path, workdir: Path) -> Path:
    for name in [*_files(), "replies.jsonl"]:
        shutil.copy(workdir / name, tmp_path / name)
    return tmp_path


def _program_env(
    emulator: MockServer, tmp_path: Path, block: Block, **extra: str
) -> dict[str, str]:
    token = "docs-" + re.sub(r"[^a-z0-9]+", "-", block.name.lower())
    return _environment(
        AUTOCALLS_BASE_URL=emulator.base_url,
        AUTOCALLS_API_TOKEN=token,
        AUTOCALLS_LIMITER_DIR=str(tmp_path / "limiter"),
        **extra,
    )


# ------------------------------------------------------------------ the blocks themselves


def test_the_docs_have_blocks_of_every_kind() -> None:
    """The extraction works: a regression here would make every other test vacuous."""
    kinds = {block.kind for block in PYTHON}
    assert {None, "fragment", "app", "pytest"} <= kinds, kinds
    assert len(_of(None)) >= 8
    assert {block.arg for block in BLOCKS if block.kind == "output"} == set(OUTPUTS)
    assert "messages.csv" in _files()


@pytest.mark.parametrize("block", _params(_of(None)))
def test_program_runs(block: Block, emulator: MockServer, workdir: Path, tmp_path: Path) -> None:
    """A complete program runs against the emulator and exits 0."""
    cwd = _program_dir(tmp_path, workdir)
    (cwd / "program.py").write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "program.py"],
        cwd=cwd,
        env=_program_env(emulator, tmp_path, block),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (
        f"{block.name} (a complete program: mark it <!-- docs-test: fragment (WHY) --> if it "
        f"is not) exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


@pytest.mark.parametrize("block", _params(_of("fragment", "skip")))
def test_fragment_compiles(block: Block) -> None:
    """A fragment is still Python (top-level await allowed), and says why it does not run."""
    if block.kind == "skip":
        assert block.arg, f"{block.name}: a skipped program must say why"
    compile(block.code, block.name, "exec", flags=0x2000)  # ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


@pytest.mark.parametrize("block", _params([b for b in BLOCKS if b.kind == "output"]))
def test_output_is_the_real_output(block: Block, workdir: Path) -> None:
    """The JSON lines the docs show are what the command writes, byte for byte."""
    real = json.loads((workdir / "outputs.json").read_text(encoding="utf-8"))[block.arg]
    assert real, f"{block.arg}: the command wrote nothing"
    real_lines = {_UUID.sub("<uuid>", line) for line in real}
    shown = block.code.splitlines()
    assert shown
    for line in shown:
        assert _UUID.sub("<uuid>", line) in real_lines, (
            f"{block.name}: this line is not what `bulk` writes:\n{line}\nreal output:\n"
            + "\n".join(real)
        )


# ------------------------------------------------------------------ FastAPI apps under uvicorn


def _post(url: str) -> tuple[int, dict[str, str], dict[str, object]]:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.mark.timing
@pytest.mark.parametrize("block", _params(_of("app")))
def test_app_serves_and_shuts_down(
    block: Block, emulator: MockServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Served by uvicorn as users run it: replies while the window has room (5 per minute: at
    once), then 503 while the token is busy, then a clean shutdown on SIGINT (the lifespan
    closes the client)."""
    extra = {}
    if block.arg == "redis":
        from .redis_server import RedisServer, require_redis_server

        redis = RedisServer(require_redis_server()).start()
        request.addfinalizer(redis.stop)
        extra["REDIS_URL"] = redis.url
    (tmp_path / "app.py").write_text(block.code, encoding="utf-8")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path,
        env=_program_env(emulator, tmp_path, block, **extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    log: list[str] = []
    try:
        base = None
        deadline = time.monotonic() + TIMEOUT
        while base is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            log.append(line)
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            base = found[1] if found else None
        assert base is not None, "uvicorn did not start:\n" + "".join(log)

        chat = f"{base}/chat"
        if block.arg == "tenants":  # the many-accounts how-to: two tenants, two tokens
            chat = f"{base}/tenants/acme/chat"
            status, _, body = _post(f"{base}/tenants/nobody/chat/+15550001234?text=Hi")
            assert status == 404, body
        for n in range(5):  # the window's five, each at once
            started = time.monotonic()
            status, _, body = _post(f"{chat}/+1555000123{n}?text=Hi")
            assert status == 200, body
            assert body["reply"] == "Hi there! Thanks for your message: Hi"
            assert time.monotonic() - started < 5.0
        if block.arg == "tenants":  # another token: its own window, answered at once
            status, _, other = _post(f"{base}/tenants/globex/chat/+15550001234?text=Hi")
            assert status == 200, other
            assert other["conversation"] != body["conversation"]
        # The next slot is a minute away, longer than the app's max_wait: an answer at once.
        started = time.monotonic()
        status, headers, body = _post(f"{chat}/+15550005678?text=Hello")
        assert status == 503, body
        assert time.monotonic() - started < 5.0
        assert {k.lower(): v for k, v in headers.items()}.get("retry-after")
        if "HTTPException(422" in block.code:  # the caller's input: 422, never 502
            status, _, body = _post(f"{chat}/{'9' * 300}?text=Hi")
            assert status == 422, body
            assert "customer_identifier" in body["detail"], body
    finally:
        server.send_signal(signal.SIGINT)
        try:
            rest = server.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:  # pragma: no cover - only if it hangs
            server.kill()
            rest = server.communicate()[1]
        log.append(rest)
    output = "".join(log)
    assert server.returncode == 0, output
    assert "Application shutdown complete." in output, output
    assert "Traceback" not in output and "ERROR" not in output, output


# ------------------------------------------------------------------ pytest snippets


def _pytest_pages() -> list[Path]:
    return sorted({block.page for block in _of("pytest")})


@pytest.mark.parametrize("mode", ["strict", "auto"])
@pytest.mark.parametrize(
    "page", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in _pytest_pages()]
)
def test_pytest_snippets_pass(page: Path, mode: str, emulator: MockServer, tmp_path: Path) -> None:
    """The testing how-to's tests pass as a user's suite: strict mode (pytest-asyncio's
    default, with ``@pytest.mark.asyncio``) and ``asyncio_mode = auto``."""
    blocks = [b for b in PYTHON if b.page == page and b.kind in {"pytest", "conftest"}]
    tests = 0
    for number, block in enumerate(blocks):
        if block.kind == "conftest":
            (tmp_path / "conftest.py").write_text(block.code, encoding="utf-8")
        else:
            tests += block.code.count("\ndef test_") + block.code.count("\nasync def test_")
            (tmp_path / f"test_snippet_{number}.py").write_text(block.code, encoding="utf-8")
    assert tests, f"{page}: no test function in its pytest blocks"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["-o", f"asyncio_mode={mode}", "-o", "asyncio_default_fixture_loop_scope=function"]
        + ["-W", "error"],  # as the page says to configure it; a warning is a failure
        cwd=tmp_path,
        env=_environment(AUTOCALLS_LIMITER_DIR=str(tmp_path / "limiter")),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"\b{tests} passed\b", done.stdout), done.stdout


# ------------------------------------------------------------------ the README and the links


def test_no_merge_conflict_markers_are_published() -> None:
    """A marker left in a docstring passes ruff, mypy and the strict build, and is published
    by mkdocstrings: it happened once (the pytest plugin's how-to)."""
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yml", "*.toml", "Makefile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked
    marker = re.compile(r"^(<{7}|>{7}) |^={7}$", re.MULTILINE)
    found = [
        name
        for name in tracked
        if (ROOT / name).is_file() and marker.search((ROOT / name).read_text(encoding="utf-8"))
    ]
    assert not found, f"merge conflict markers in {found}"


def test_readme_is_a_short_landing_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines: move the detail to docs/"


_LINK = re.compile(
    r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?: \"[^\"]*\")?\)|<img [^>]*src=\"(?P<img>[^\"]+)\""
)


def _links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code is not a link
        text = re.sub(r"`[^`\n]*`", "", text)
        for match in _LINK.finditer(text):
            target = match["target"] or match["img"]
            if not re.match(r"^[a-z]+:", target) and not target.startswith("#"):
                found.append((page, target))
    return found


def test_every_relative_link_resolves() -> None:
    links = _links()
    assert len(links) > 20  # the pages do link to each other: the pattern works
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page, target in links
        if not (page.parent / target.split("#")[0]).exists()
    ]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_markers_are_documented_here() -> None:
    """Each marker kind the extractor accepts is explained in this module's docstring."""
    doc = textwrap.dedent(__doc__ or "")
    for kind in _KINDS:
        assert f"``{kind}" in doc, kind


def test_the_reference_documents_every_public_name() -> None:
    """Each name of ``autocalls_async.__all__`` has its ``:::`` entry in docs/reference/, and
    the public submodules are documented whole."""
    import autocalls_async

    reference = "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "docs/reference").glob("*.md")
    )
    missing = [
        name
        for name in autocalls_async.__all__
        if name != "__version__" and f"::: autocalls_async.{name}\n" not in reference
    ]
    assert not missing, f"not in docs/reference/: {missing}"
    for module in ("bulk", "identifiers", "testing", "testing.pytest_plugin"):
        assert f"::: autocalls_async.{module}\n" in reference, module


_GLANCE_LINE = re.compile(r"^(?P<name>\w+)(?:=(?P<default>.*?))?,\s*(?:#.*)?$")


def _glance(opening: str) -> list[tuple[str, str | None]]:
    """(name, default as written) of each parameter in client.md's "at a glance" block that
    starts with ``opening``."""
    page = (ROOT / "docs/reference/client.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```text\n(.*?)```", page, re.S)
    block = next(b for b in blocks if b.startswith(opening))
    parameters = []
    for line in block.splitlines()[1:]:
        line = line.strip()
        if line.startswith(")"):
            break
        if line in {"*,", ""} or line.startswith("#"):
            continue
        match = _GLANCE_LINE.match(line)
        assert match is not None, f"not a parameter line: {line!r}"
        parameters.append((match["name"], match["default"]))
    return parameters


@pytest.mark.parametrize(
    ("opening", "method"),
    [("AsyncAutocalls(", "__init__"), ("await client.generate_reply(", "generate_reply")],
)
def test_the_glance_tables_match_the_signatures(opening: str, method: str) -> None:
    """client.md's "at a glance" blocks name every keyword of ``AsyncAutocalls.__init__`` and
    ``generate_reply``, in order, with their real defaults (evaluated), so they cannot drift."""
    import inspect

    import autocalls_async
    from autocalls_async._client import _UNSET

    signature = inspect.signature(getattr(autocalls_async.AsyncAutocalls, method))
    real = [p for p in signature.parameters.values() if p.name != "self"]
    documented = _glance(opening)
    assert [name for name, _ in documented] == [p.name for p in real]
    names = vars(autocalls_async)
    for (name, written), parameter in zip(documented, real, strict=True):
        if parameter.default is inspect.Parameter.empty:
            assert written is None, f"{name} is required, the table gives it a default"
        elif parameter.default is _UNSET:  # "the client's": described, not a value
            assert written is not None and written.startswith("<"), name
        else:
            assert written is not None, f"{name} has a default, the table shows none"
            assert eval(written, dict(names)) == parameter.default, name  # noqa: S307


def test_the_reference_shows_no_private_implementation_lines() -> None:
    """Attribute values such as ``max_wait = _check_seconds('max_wait', max_wait)`` or
    ``attrs.field(validator=_positive)`` showed private helpers in the reference pages; the
    docs' griffe extension hides such values (the defaults are in the signatures)."""
    import importlib.util

    import griffe  # the dev extra brings it (griffelib)

    spec = importlib.util.spec_from_file_location(
        "griffe_comments", ROOT / "docs" / "_hooks" / "griffe_comments.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extensions = griffe.load_extensions(module.HashColonComments())
    package = griffe.load("autocalls_async", search_paths=[ROOT], extensions=extensions)
    shown: list[str] = []
    seen: set[str] = set()

    def walk(obj: object) -> None:
        for member in getattr(obj, "members", {}).values():
            if member.name.startswith("_"):
                continue
            if member.is_alias:  # a public name re-exported: the reference shows its target
                try:
                    member = member.final_target
                except Exception:  # noqa: BLE001 - a name from another package
                    continue
            if member.path in seen:
                continue
            seen.add(member.path)
            if member.is_attribute and member.value is not None:
                shown.append(f"{member.path} = {member.value}")
            if member.is_class or member.is_module:
                walk(member)

    walk(package)
    assert len(shown) > 50  # the public classes' attributes were seen
    pattern = re.compile(r"(?<![\w.])_[A-Za-z]\w*|\bself\._")
    private = [line for line in shown if pattern.search(line.partition(" = ")[2])]
    assert not private, private
