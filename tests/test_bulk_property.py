"""A property test of resuming (issue 10): random inputs, runs killed at random points, edits
between runs (insert, delete, reorder, change a message) and two runs at once on one OUT.

It drives the real pieces in one process: the bulk command's ``run_job`` with its
``InputFile`` and ``ResultLog`` on real files, a real client, and the emulator on a loopback
port. A kill cancels the run after a random number of lines written to OUT (between a row's
"sending" line and its result, too), as SIGKILL or a second Ctrl-C would.

Runs may also stop at the first INSUFFICIENT_BALANCE (issue 14), leaving the rest to a later
run. Invariants: after a final run, every row of the final input is answered exactly once or
reported (it may have been processed by a killed run); no message reaches the emulator more
often than it occurs in the input (two identical rows are two rows)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from autocalls_async._bulkio import InputError, InputFile, ResultLog
from autocalls_async.cli.job import Outcome, bulk_client, run_job
from autocalls_async.testing import MockAutocalls

Row = tuple[str, str]  # (customer, message)

contents = st.tuples(st.sampled_from(["+1", "+2", "+3"]), st.sampled_from(["a", "b", "c", "d"]))
inputs = st.lists(contents, min_size=1, max_size=8)


class KilledLog(ResultLog):
    """OUT, but the run is killed (its task cancelled) once ``kill_after`` lines are written;
    ``rewrite`` (a path and rows) rewrites the input in place after the first line (issue 21:
    an export job or an editor saving during a run)."""

    def __init__(
        self, path: Path, kill_after: int | None, rewrite: dict[Path, list[Row]] | None = None
    ) -> None:
        super().__init__(path)
        self.kill_after = kill_after
        self.task: asyncio.Task[Any] | None = None
        self.rewrite = rewrite

    def _append(self, data: dict[str, Any]) -> None:
        super()._append(data)
        if self.rewrite and "cut_line" not in data:  # (a cut mark is written before the copy)
            rewrite_in_place(*self.rewrite.popitem())
        if self.kill_after is not None:
            self.kill_after -= 1
            if self.kill_after <= 0 and self.task is not None:
                self.task.cancel()


def write_input(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["assistant_id", "customer_identifier", "message"])
        writer.writerows([123, customer, message] for customer, message in rows)


def rewrite_in_place(path: Path, rows: list[Row]) -> None:
    """``> in.csv``: the same file (inode), truncated and written again."""
    with path.open("r+", newline="", encoding="utf-8") as file:
        file.truncate(0)
        writer = csv.writer(file)
        writer.writerow(["assistant_id", "customer_identifier", "message"])
        writer.writerows([123, customer, message] for customer, message in rows)


async def one_run(
    server: MockAutocalls,
    source: Path,
    out: Path,
    *,
    kill_after: int | None = None,
    allow_foreign: bool = False,
    rewrite: dict[Path, list[Row]] | None = None,
) -> Outcome | str:
    """A run of the bulk command: its outcome, or why it did not run or end."""
    client, _ = bulk_client(f"t-{uuid.uuid4().hex}", server.base_url, None)
    log = KilledLog(out, kill_after, rewrite)
    log.task = asyncio.current_task()
    try:
        outcome = await run_job(
            client,
            InputFile(source),
            log,
            rate_limit=None,
            retry_failed=False,
            concurrency=3,
            progress_mode="off",
            allow_foreign=allow_foreign,
        )
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Killed after its last await (a run with nothing to send, say): it had ended. The
            # kill is taken here, or it would cancel this task as it returns.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            task.uncancel()
        return outcome
    except InputError as exc:
        await client.close()
        if "cannot be read" in str(exc):
            return "damaged"
        assert "being written by another run" in str(exc) or "not in in.csv" in str(exc), exc
        return "refused"
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await client.close()
        return "killed"


async def killed_run(server: MockAutocalls, source: Path, out: Path, **options: Any) -> Any:
    # A task of its own, so that the kill cancels this run only.
    return await asyncio.create_task(one_run(server, source, out, **options))


edits = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 6), contents),
    st.tuples(st.just("delete"), st.integers(0, 6)),
    st.tuples(st.just("reorder"), st.randoms(use_true_random=False)),
    st.tuples(st.just("change"), st.integers(0, 6), st.sampled_from(["e", "f"])),
)
steps = st.one_of(
    st.tuples(st.just("run"), st.integers(1, 9), st.booleans()),  # killed, unless it ends first
    st.tuples(st.just("run"), st.none(), st.booleans()),
    st.tuples(st.just("edit"), edits),
    st.tuples(st.just("concurrent"), st.booleans()),
    # The input is rewritten in place during a run (after its first line in OUT).
    st.tuples(st.just("rewrite"), st.integers(1, 9), edits),
    # OUT damaged: its last line cut short (a crash while writing a result), or a line in the
    # middle garbled (then a run must refuse, naming it; the line is restored afterwards).
    st.tuples(st.just("damage"), st.sampled_from(["cut", "garble"]), st.integers(0, 20)),
    # The account can pay for n more replies: a run stops at the first 402 (issue 14) and
    # leaves the rest, the refused row included, to a later run.
    st.tuples(st.just("balance"), st.integers(0, 3)),
)


def edit(rows: list[Row], change: tuple[Any, ...]) -> list[Row]:
    rows = list(rows)
    kind = change[0]
    if kind == "insert":
        rows.insert(change[1] % (len(rows) + 1), change[2])
    elif kind == "delete" and len(rows) > 1:
        del rows[change[1] % len(rows)]
    elif kind == "reorder":
        change[1].shuffle(rows)
    elif kind == "change":
        index = change[1] % len(rows)
        rows[index] = (rows[index][0], rows[index][1] + change[2])
    return rows


def damage(out: Path, kind: str, index: int) -> bytes | str:
    """Damage OUT as a crash or an editor would: what happened, or (a garbled middle line,
    which the next run must refuse) OUT as it was before, to be restored."""
    original = out.read_bytes()
    lines = original.splitlines(keepends=True)
    if kind == "cut":
        # Only a result line can be cut by a crash: a "sending" line is written before the
        # request leaves, and a failed write stops the row from being sent.
        if not lines or b'"ok":' not in lines[-1]:
            return "nothing to cut"
        out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
        return "last line cut"
    if len(lines) < 2:
        return "nothing to garble"
    number = index % (len(lines) - 1)  # any line but the last
    out.write_bytes(b"".join([*lines[:number], b'{"id":1,"ok":tr#garbled\n', *lines[number + 1 :]]))
    return original


async def scenario(
    directory: Path, rows: list[Row], plan: list[tuple[Any, ...]], balance: int | None = None
) -> None:
    source, out = directory / "in.csv", directory / "out.jsonl"
    most: collections.Counter[Row] = collections.Counter(rows)  # max occurrences ever
    killed = False  # a run was killed: rows on the wire then may be reported, never otherwise
    write_input(source, rows)
    async with MockAutocalls(rate_limit=None, balance=balance) as server:
        for step in plan:
            if step[0] == "run":
                result = await killed_run(
                    server, source, out, kill_after=step[1], allow_foreign=step[2]
                )
                killed |= result == "killed"
                if isinstance(result, Outcome):
                    result = "stopped at a 402" if result.stopped_by is not None else "ended"
                event(f"run: {result}")
            elif step[0] == "rewrite":
                rows = edit(rows, step[2])
                most |= collections.Counter(rows)
                pending = {source: rows}
                result = await killed_run(server, source, out, kill_after=step[1], rewrite=pending)
                if pending:  # the run wrote no line (nothing to send, or refused)
                    write_input(source, rows)
                killed |= result == "killed"
                if isinstance(result, Outcome):
                    assert (result.input_changed is None) == bool(pending), result
                    result = "ended"
                event(f"rewritten during a run: {result}")
            elif step[0] == "damage" and out.exists():
                happened = damage(out, step[1], step[2])
                if isinstance(happened, bytes):  # a middle line garbled: refused, restored
                    assert await one_run(server, source, out) == "damaged"
                    out.write_bytes(happened)
                    happened = "middle line garbled: refused"
                killed |= happened == "last line cut"  # a crash: its row is reported
                event(f"damage: {happened}")
            elif step[0] == "balance":
                left = server.balance_remaining
                server.balance = step[1] if left is None else server.balance + step[1] - left
            elif step[0] == "edit":
                rows = edit(rows, step[1])
                most |= collections.Counter(rows)
                write_input(source, rows)
            else:
                both = await asyncio.gather(
                    one_run(server, source, out, allow_foreign=step[1]),
                    one_run(server, source, out, allow_foreign=step[1]),
                )
                assert "refused" in both or all(isinstance(o, Outcome) for o in both)
                event(f"concurrent: {'one refused' if 'refused' in both else 'both ran'}")
        server.balance = None  # the final run is paid for
        final = await one_run(server, source, out, allow_foreign=True)
        assert isinstance(final, Outcome), final

        # Every row of the final input: answered exactly once, or reported.
        log = ResultLog(out)
        ledger = log.read()
        answers = collections.Counter(
            key for key, entry in ledger.by_key.items() if entry.state == "answered"
        )
        keyed = list(InputFile(source).keyed())
        states = [ledger.state_of(request, key) for request, key in keyed]
        # A row not answered is uncertain, or held behind an uncertain row of its customer.
        waiting: set[str] = set()
        for (request, _), state in zip(keyed, states, strict=True):
            if state == "uncertain":
                waiting.add(request.customer_identifier)
            assert state in ("answered", "uncertain") or (
                state is None and request.customer_identifier in waiting
            ), states
        assert states.count(None) == final.held
        assert killed or "uncertain" not in states, states  # a stop leaves nothing uncertain
        assert states.count("uncertain") == final.uncertain
        event(f"final: {'some rows reported' if final.uncertain else 'all answered'}")
        assert final.already_answered + final.meter.answered == states.count("answered")
        assert final.meter.failed == 0 and final.meter.not_sent == 0
        assert all(count == 1 for count in answers.values())
        replies: dict[str, list[str]] = collections.defaultdict(list)
        for line in out.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if data.get("ok") is True:
                    replies[data["key"]].append(data["reply"])
        assert all(len(texts) == 1 for texts in replies.values()), replies  # never twice
        keyed = list(InputFile(source).keyed())
        assert len({key for _, key in keyed}) == len(keyed)  # each row has its own identity
        for (request, key), state in zip(keyed, states, strict=True):
            if state == "answered":  # with its own reply
                assert replies[key][0].endswith(f": {request.message}"), (request, replies[key])

        # No message reached the emulator more often than it occurs in an input.
        processed = collections.Counter(
            (record.body["customer_identifier"], record.body["message"])
            for record in server.requests
            if record.processed
        )
        for content, count in processed.items():
            assert count <= most[content], (content, count, most[content])


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=inputs,
    plan=st.lists(steps, min_size=1, max_size=6),
    balance=st.one_of(st.none(), st.integers(0, 6)),  # replies the account pays for at first
)
def test_resume_never_sends_twice_nor_skips(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[Row],
    plan: list[tuple[Any, ...]],
    balance: int | None,
) -> None:
    asyncio.run(scenario(tmp_path_factory.mktemp("resume"), rows, plan, balance))
