"""Issue 21: bulk runs people can trust and read.

Every test is a finding of the issue, run through the real command as a subprocess against the
emulator; the emulator's own request log judges what was sent, and how often."""

from __future__ import annotations

import asyncio
import collections
import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async.testing import MockAutocalls
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
