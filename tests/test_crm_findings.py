"""Issue 21, the CRM-user tester's findings: messy, edited spreadsheets through `bulk` and
`results`, as someone who read only the docs runs them. Each test runs the real command in a
subprocess against the emulator; the emulator's request log judges what was sent, and how often.
"""

from __future__ import annotations

import collections
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from autocalls_async.testing import MockAutocalls
from tests.test_cli import TOKEN, Run, ThreadedServer, run_cli


@pytest.fixture
def emulator() -> Iterator[MockAutocalls]:
    with ThreadedServer(rate_limit=None, assistants=(123, 456)) as server:
        yield server


def env_for(server: MockAutocalls) -> dict[str, str]:
    return {"AUTOCALLS_API_TOKEN": TOKEN, "AUTOCALLS_BASE_URL": server.base_url}


def processed(server: MockAutocalls) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(
        (str(record.body["customer_identifier"]), str(record.body["message"]))
        for record in server.requests
        if record.processed
    )


async def bulk(server: MockAutocalls, source: Path, out: Path, *options: str) -> Run:
    return await run_cli(
        *("bulk", str(source), "--out", str(out), "--rate-limit", "none", "--progress", "off"),
        *options,
        **env_for(server),
    )


async def results(*args: str) -> Run:
    return await run_cli("results", *args)


SHEET = "assistant_id,customer_identifier,message\n123,+14155550001,Hi\n123,+14155550002,Hi\n"


# -- 1. results -o OUT / -o INPUT ----------------------------------------------------------------


async def test_results_never_writes_over_its_input_or_out(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """`results IN OUT -o OUT` emptied OUT (the log that prevents double sends: the next run
    needed a new --out and resent everyone); `-o IN` emptied the sheet. Both are refused, also
    through a symlink or a hard link; a results file is written whole or not at all."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(SHEET)
    assert (await bulk(emulator, source, out)).code == 0
    kept_out, kept_in = out.read_bytes(), source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(out)
    os.link(source, tmp_path / "hard.csv")
    for target in (out, source, tmp_path / "link.jsonl", tmp_path / "hard.csv"):
        run = await results(str(source), str(out), "-o", str(target))
        assert run.code == 2, run
        assert "nothing was written" in run.err and "results.csv" in run.err
        assert out.read_bytes() == kept_out and source.read_bytes() == kept_in
    rerun = await bulk(emulator, source, out)
    assert rerun.code == 0 and "2 skipped" in rerun.out, rerun
    assert max(processed(emulator).values()) == 1

    # bulk --out given a hard link of the input: refused, nothing sent.
    refused = await bulk(emulator, source, tmp_path / "hard.csv")
    assert refused.code == 2 and "must not be the input" in refused.err, refused
    assert source.read_bytes() == kept_in and len(emulator.requests) == 2

    # Written whole or not at all: an input refused half-way leaves the old results as they were.
    target = tmp_path / "results.csv"
    target.write_text("the old results\n")
    source.write_text(SHEET + "123,+14155550003\n")  # row 3 lacks a field: refused when read
    run = await results(str(source), str(out), "-o", str(target))
    assert run.code == 2 and "fields but the header has" in run.err, run
    assert target.read_text() == "the old results\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results.csv")]
