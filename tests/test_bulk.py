"""The bulk runner (autocalls_async.bulk) and its files (_bulkio), against the emulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import (
    APIConnectionError,
    AssistantNotFoundError,
    AsyncAutocalls,
    AuthenticationError,
    ClientClosedError,
    InternalServerError,
    InvalidRequestError,
    RateLimit,
    RateLimitTimeout,
    UnprocessableEntityError,
)
from autocalls_async._bulkio import InputError, InputFile, Ledger, ResultLog
from autocalls_async.bulk import (
    BulkRequest,
    BulkResult,
    BulkRunner,
    error_code,
    generated_requests,
)
from autocalls_async.testing import MockAutocalls

Maker = Callable[..., AsyncAutocalls]


def rows_for(customers: int, per_customer: int) -> list[dict[str, Any]]:
    """Interleaved rows: customer c's k-th message is "c<c> m<k>"."""
    return [
        {
            "id": f"r{k}-{c}",
            "assistant_id": 123,
            "customer_identifier": f"+1555000{c:04d}",
            "message": f"c{c} m{k}",
        }
        for k in range(per_customer)
        for c in range(customers)
    ]


def runner_tasks() -> list[asyncio.Task[Any]]:
    """The runner's per-row tasks still alive (the emulator's own tasks share the loop)."""
    return [t for t in asyncio.all_tasks() if "BulkRunner._call" in repr(t.get_coro())]


async def collect(runner: BulkRunner) -> list[BulkResult]:
    async with runner:
        return [result async for result in runner]


# -- the runner -------------------------------------------------------------------------------


async def test_every_row_yields_one_result_in_per_customer_order(
    server: MockAutocalls, make_client: Maker
) -> None:
    """All rows answered once, with their ids; each customer's messages arrive in input order."""
    server.reply_delay = 0.01
    rows = rows_for(customers=6, per_customer=5)
    results = await collect(BulkRunner(make_client(server.base_url), rows, concurrency=8))
    assert sorted(r.id for r in results) == sorted(row["id"] for row in rows)
    assert all(r.ok and r.reply is not None for r in results)
    for result in results:
        assert result.reply is not None
        assert result.reply.reply.endswith(result.request.message)
        assert result.reply.customer_identifier == result.request.customer_identifier
    for c in range(6):
        conversation = server.conversations[(123, f"+1555000{c:04d}")]
        assert conversation.messages == [f"c{c} m{k}" for k in range(5)]


async def test_streams_with_a_bounded_window(server: MockAutocalls, make_client: Maker) -> None:
    """A 10,000-row generator is pulled lazily: never more than the window is in the runner."""
    server.reply_delay = 0.0
    concurrency = 16
    runner = BulkRunner(
        make_client(server.base_url), generated_requests(10_000), concurrency=concurrency
    )
    seen = most_active = most_ahead = 0
    async with runner:
        async for result in runner:
            seen += 1
            most_active = max(most_active, runner.active)
            most_ahead = max(most_ahead, runner.pulled - seen)
            assert result.ok
    assert seen == 10_000
    assert server.replies_served == 10_000
    assert most_active <= concurrency
    assert most_ahead <= concurrency
    assert not runner_tasks()


@pytest.mark.timing
async def test_runs_at_the_full_rate_without_429(make_client: Maker) -> None:
    """A strict server with the client's limit: the rate is the limit's and no 429 happens."""
    limit = RateLimit(10, 0.5)
    async with MockAutocalls(rate_limit=(10, 0.5), reply_delay=0.05) as strict:
        client = make_client(strict.base_url, rate_limit=limit)
        started = time.monotonic()
        results = await collect(BulkRunner(client, rows_for(customers=4, per_customer=8)))
        elapsed = time.monotonic() - started
    assert all(r.ok for r in results)
    assert strict.count(status=429) == 0
    assert client.stats.rate_limited == 0
    floor = 31 * limit.period / limit.requests
    assert floor <= elapsed < floor * 1.02 + 1.5


async def test_async_iterable_input(server: MockAutocalls, make_client: Maker) -> None:
    """An async generator of BulkRequest works; missing row numbers become positions."""

    async def source() -> AsyncIterator[BulkRequest]:
        for n in range(5):
            await asyncio.sleep(0)
            yield BulkRequest(f"x{n}", 123, "+1", f"m{n}")

    results = await collect(BulkRunner(make_client(server.base_url), source(), concurrency=2))
    assert sorted((r.request.row, r.id) for r in results) == [(n + 1, f"x{n}") for n in range(5)]
    assert server.conversations[(123, "+1")].messages == [f"m{n}" for n in range(5)]


async def test_bad_rows_fail_alone_and_are_never_sent(
    server: MockAutocalls, make_client: Maker
) -> None:
    """Invalid rows get INVALID_ROW results naming the row; the good rows still run."""
    rows: list[Any] = [
        {"assistant_id": 123, "customer_identifier": "+1", "message": "good"},
        {"assistant_id": 123, "customer_identifier": "+1"},
        {"assistant_id": "12x", "customer_identifier": "+1", "message": "m"},
        {"assistant_id": 123, "customer_identifier": "+1", "message": "m", "variables": [1]},
        {"assistant_id": 123, "customer_identifier": "+1", "message": "   "},
        {"id": 1.5, "assistant_id": 123, "customer_identifier": "+1", "message": "m"},
        "not a mapping",
        {"assistant_id": 999, "customer_identifier": "+2", "message": "unknown assistant"},
    ]
    results = {
        r.request.row: r for r in await collect(BulkRunner(make_client(server.base_url), rows))
    }
    assert results[1].ok
    for row, words in [
        (2, "missing message"),
        (3, "assistant_id must be an integer"),
        (4, "variables must be a JSON object"),
        (5, "message is empty"),
        (6, "id must be a string or an integer"),
        (7, "a row must be a mapping"),
    ]:
        error = results[row].error
        assert isinstance(error, InvalidRequestError)
        assert f"row {row}" in str(error) and words in str(error)
        assert not results[row].sent
        assert results[row].to_json()["error_code"] == "INVALID_ROW"
    assert isinstance(results[8].error, AssistantNotFoundError)
    assert results[8].sent
    assert server.count() == 2  # the good row and the unknown assistant


async def test_stop_finishes_calls_in_flight_and_sends_nothing_new(make_client: Maker) -> None:
    """stop(): sent calls finish with replies, waiting ones end NOT_SENT, no row is pulled."""
    pulled: list[int] = []

    def source() -> Iterator[BulkRequest]:
        for row in range(1, 101):
            pulled.append(row)
            yield BulkRequest(row, 123, f"+1{row % 7}", f"m{row}")

    async with MockAutocalls(rate_limit=None, reply_delay=0.3) as slow:
        client = make_client(slow.base_url, rate_limit=RateLimit(20, 1.0))
        runner = BulkRunner(client, source(), concurrency=10)
        results: list[BulkResult] = []
        async with runner:
            async for result in runner:
                results.append(result)
                if len(results) == 1:
                    runner.stop()
                    assert runner.stopping
        assert client.closed
    answered = [r for r in results if r.ok]
    not_sent = [r for r in results if isinstance(r.error, ClientClosedError)]
    assert len(answered) + len(not_sent) == len(results) == 10
    assert not any(r.sent for r in not_sent)
    assert len(pulled) <= 11  # the generator may be one row ahead, never more
    assert slow.count() == len(answered)  # nothing was sent that did not finish
    assert {r.to_json()["error_code"] for r in not_sent} <= {"NOT_SENT"}


async def test_cancelling_the_consumer_cancels_every_call(make_client: Maker) -> None:
    """Cancelling the iterating task stops at once and leaves no task behind."""
    async with MockAutocalls(rate_limit=None, reply_delay=5.0) as slow:
        # Without the first-row probe, so that 5 rows go out at once (probing: test_cost_bulk).
        runner = BulkRunner(
            make_client(slow.base_url),
            generated_requests(50),
            concurrency=5,
            skip_unknown_assistants=False,
        )

        async def consume() -> list[BulkResult]:
            return await collect(runner)

        task = asyncio.create_task(consume())
        async with asyncio.timeout(10):
            while slow.count() < 5:  # noqa: ASYNC110 - the emulator has no event to wait on
                await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.active == 0
        assert runner.pulled == 5
        assert not runner_tasks()


async def test_a_broken_input_drains_then_raises(server: MockAutocalls, make_client: Maker) -> None:
    """An input that raises lets the calls already started finish, then re-raises."""

    def source() -> Iterator[BulkRequest]:
        yield BulkRequest(1, 123, "+1", "one")
        yield BulkRequest(2, 123, "+2", "two")
        raise OSError("disk gone")

    seen: list[BulkResult] = []

    async def consume() -> None:
        async with runner:
            async for result in runner:
                seen.append(result)

    runner = BulkRunner(make_client(server.base_url), source())
    with pytest.raises(OSError, match="disk gone"):
        await consume()
    assert sorted(r.id for r in seen if r.ok) == [1, 2]


async def test_a_runner_iterates_once_and_checks_concurrency(
    server: MockAutocalls, make_client: Maker
) -> None:
    """A second iteration and a bad concurrency are refused."""
    client = make_client(server.base_url)
    runner = BulkRunner(client, [])
    assert await collect(runner) == []
    with pytest.raises(RuntimeError, match="only once"):
        aiter(runner)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidRequestError):
            BulkRunner(client, [], concurrency=bad)  # type: ignore[arg-type]


# -- values -----------------------------------------------------------------------------------


def test_from_mapping_strips_the_customer_and_merges_extra_fields() -> None:
    """Extra keys become variables on request; the variables field wins a clash."""
    data = {"assistant_id": 1, "customer_identifier": "  +1  ", "message": "m", "name": "J"}
    plain = BulkRequest.from_mapping({**data, "id": 7}, 3)
    assert (plain.id, plain.row, plain.customer_identifier, plain.variables) == (7, 3, "+1", None)
    merged = BulkRequest.from_mapping(
        {**data, "variables": {"name": "K", "x": 1}}, 4, extra_as_variables=True
    )
    assert merged.variables == {"name": "K", "x": 1}
    assert merged.id == 4
    typed = BulkRequest.from_mapping({"assistant_id": True, "customer_identifier": 5}, 1)
    assert typed.problem is not None
    assert "missing message" in typed.problem
    assert "assistant_id must be an integer" in typed.problem
    assert "customer_identifier must be a string" in typed.problem


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("x"), "INVALID_REQUEST"),
        (RateLimitTimeout("x"), "RATE_LIMIT_TIMEOUT"),
        (ClientClosedError("x"), "NOT_SENT"),
        (APIConnectionError("x", sent=False), "CONNECTION_ERROR"),
        (AuthenticationError("x", status=401), "UNAUTHENTICATED"),
        (UnprocessableEntityError("x", status=422), "VALIDATION_FAILED"),
        (InternalServerError("x", status=500), "SERVER_ERROR"),
        (
            AssistantNotFoundError("x", status=404, error_code="ASSISTANT_NOT_FOUND"),
            "ASSISTANT_NOT_FOUND",
        ),
    ],
)
def test_error_codes(error: Any, code: str) -> None:
    """Every error gets a stable code: the service's own, else one naming its class."""
    assert error_code(error) == code


def test_result_lines() -> None:
    """to_json: a failed row names its error; a sent connection failure counts as sent."""
    request = BulkRequest("a", 123, "+1", "m", row=1)
    line = BulkResult(request, error=InternalServerError("boom", status=500)).to_json()
    assert line == {
        "id": "a",
        "ok": False,
        "row": 1,
        "assistant_id": 123,
        "customer_identifier": "+1",
        "error": "boom",
        "error_code": "SERVER_ERROR",
        "error_type": "InternalServerError",
        "status": 500,
        "sent": True,
        "maybe_processed": True,
    }
    assert BulkResult(request, error=APIConnectionError("x", sent=True)).sent
    assert not BulkResult(request, error=APIConnectionError("x", sent=False)).sent


# -- input files ------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_csv_rows(tmp_path: Path) -> None:
    """Header names are trimmed and lower-cased; BOM, blank lines and extra columns handled."""
    path = write(
        tmp_path,
        "in.csv",
        "\ufeffAssistant_ID , customer_identifier,message,variables,name,city\n"
        '123, +1 ,Hi,"{""a"": 1}",John,\n'
        "\n"
        "12x,+2,Hi,,,\n"
        '123,+3,Hi,"{bad",,\n'
        "123,+4,,,,\n"
        '123,+5,Hi,"[1]",Jane,Oslo\n',
    )
    source = InputFile(path, extra_as_variables=True)
    source.check()
    assert source.rows == 5
    rows = list(source)
    assert source.extra_columns == ("name", "city")
    first = rows[0]
    assert (first.id, first.assistant_id, first.customer_identifier) == (1, 123, "+1")
    assert first.variables == {"name": "John", "a": 1}
    assert first.problem is None
    problems = [row.problem or "" for row in rows[1:]]
    assert "assistant_id '12x' is not a whole number" in problems[0]
    assert "variables is not valid JSON" in problems[1]
    assert "missing message" in problems[2]
    assert "variables must be a JSON object" in problems[3]


def test_jsonl_rows(tmp_path: Path) -> None:
    """JSONL: blank lines skipped, bad JSON and non-objects are bad rows, not bad files."""
    path = write(
        tmp_path,
        "in.data",
        '{"id": "a", "assistant_id": 1, "customer_identifier": "+1", "message": "m"}\n'
        "\n"
        "{oops\n"
        "[1, 2]\n"
        '{"assistant_id": 1, "customer_identifier": "+1", "message": "a", "message": "b"}\n'
        '{"assistant_id": 1, "customer_identifier": "+1", "message": "m",'
        ' "variables": {"k": 1, "k": 2}}\n',
    )
    source = InputFile(path)
    assert source.format == "jsonl"
    source.check()
    rows = list(source)
    assert [row.id for row in rows] == ["a", 2, 3, 4, 5]
    assert (
        rows[1].problem is not None
        and "not valid JSON" in rows[1].problem
        and rows[1].sheet_row == 3
    )
    assert rows[2].problem == "not a JSON object" and rows[2].sheet_row == 4
    # A key written twice: which value was meant is the writer's to say (as a CSV column
    # named twice), at any depth; the row fails alone.
    assert rows[3].problem is not None
    assert "not valid JSON (the key 'message' appears twice" in rows[3].problem
    assert rows[4].problem is not None and "the key 'k' appears twice" in rows[4].problem


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.csv", "", "needs a header row"),
        ("nohead.csv", "123,+1,Hi\n", "lacks the required column(s) assistant_id"),
        ("twice.csv", "assistant_id,customer_identifier,message,message\n", "named twice"),
        (
            "dup.csv",
            "id,assistant_id,customer_identifier,message\nx,1,+1,a\ny,1,+1,b\nx,1,+1,c\n",
            "rows 2 and 4 have the same id 'x'",
        ),
        (
            "clash.jsonl",
            '{"assistant_id": 1, "customer_identifier": "+1", "message": "a"}\n'
            '{"id": 1, "assistant_id": 1, "customer_identifier": "+1", "message": "b"}\n',
            "row 2 has the id 1, which is also the id of the 1st row",
        ),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, name: str, text: str, message: str) -> None:
    """A file that cannot be run safely is refused by check(), before anything is sent."""
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InputFile(write(tmp_path, name, text)).check()


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    """Non-UTF-8 text and a missing file are refused with a clear message."""
    latin = tmp_path / "latin.csv"
    latin.write_bytes("assistant_id,customer_identifier,message\n1,+1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        InputFile(latin).check()
    with pytest.raises(InputError, match="cannot read"):
        InputFile(tmp_path / "missing.csv").check()
    with pytest.raises(InputError, match="cannot read"):
        InputFile(tmp_path / "missing").check()


def test_check_counts_rows_done_before(tmp_path: Path) -> None:
    """check(ledger) counts the rows answered, failed or possibly processed by earlier runs."""
    path = write(
        tmp_path, "in.csv", "assistant_id,customer_identifier,message\n1,+1,a\n1,+1,b\n1,+1,c\n"
    )
    source = InputFile(path)
    keys = [key for _, key in source.keyed()]
    ledger = Ledger()
    ledger.note(keys[0], 1, {"ok": True}, 1)
    ledger.note(keys[1], 2, {"ok": False, "maybe_processed": False}, 2)
    ledger.note(keys[2], 3, {"sending": True}, 3)
    source.check(ledger)
    assert (source.rows, source.already_answered, source.already_failed) == (3, 1, 1)
    assert source.uncertain == 1


# -- the output log ---------------------------------------------------------------------------


def test_result_log_resumes_after_a_cut_line(tmp_path: Path) -> None:
    """Old lines (no key) are kept by id; a truncated last line is ignored and the next line
    starts on a fresh line; an answer beats any failure, otherwise the last line says."""
    out = tmp_path / "out.jsonl"
    out.write_text(
        '{"id": 1, "ok": false, "error": "x", "error_code": "NOT_SENT"}\n'
        '{"id": 2, "ok": true}\n'
        '{"id": 1, "ok": true}\n'
        '{"id": 3, "ok": false, "status": 404}\n'
        '{"id": 5, "ok": false, "status": 500}\n'
        '{"id": 6, "ok": false, "error_code": "TIMEOUT"}\n'
        '{"id": 4, "ok": tr'
    )
    log = ResultLog(out, fsync=True)
    log.open()
    ledger = log.read()
    assert {i: e.state for i, e in ledger.legacy.items()} == {
        1: "answered",
        2: "answered",
        3: "failed",  # the service refused it: safe to send again
        5: "uncertain",  # a 500 may have been processed
        6: "uncertain",
    }
    assert ledger.unreadable_lines == 1
    log.write(BulkResult(BulkRequest(4, 123, "+1", "é"), error=ClientClosedError("x")), "k.1")
    log.close()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[-3] == '{"id": 4, "ok": tr'
    assert lines[-2] == '{"id":null,"cut_line":7}'  # seen: never taken for damage later
    assert json.loads(lines[-1])["key"] == "k.1"
    assert ResultLog(out).read().by_key["k.1"].state == "failed"


def test_result_log_is_locked_before_it_is_read(tmp_path: Path) -> None:
    """A second writer is refused; a missing output means nothing was done yet."""
    out = tmp_path / "out.jsonl"
    assert len(ResultLog(out).read()) == 0
    first = ResultLog(out)
    first.open()
    try:
        with pytest.raises(InputError, match="being written by another run"):
            ResultLog(out).open()
    finally:
        first.close()
    with pytest.raises(InputError, match="cannot write"):
        ResultLog(tmp_path / "no" / "such" / "dir.jsonl").open()


async def test_result_lines_of_a_real_run_round_trip(
    tmp_path: Path, server: MockAutocalls, make_client: Maker
) -> None:
    """Lines written from real results parse back into the same answered/failed sets."""
    log = ResultLog(tmp_path / "out.jsonl")
    log.open()
    rows: list[dict[str, Any]] = [
        {"id": "ok", "assistant_id": 123, "customer_identifier": "+1", "message": "book it"},
        {"id": "nf", "assistant_id": 5, "customer_identifier": "+1", "message": "m"},
    ]
    for result in await collect(BulkRunner(make_client(server.base_url), rows)):
        log.write(result, f"{result.id}.1")
    log.close()
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    lines = {line["id"]: line for line in map(json.loads, text.splitlines())}
    assert lines["ok"]["function_calls"][0]["name"] == "book_appointment"
    assert lines["ok"]["conversation_id"] == server.conversations[(123, "+1")].conversation_id
    assert lines["nf"]["error_code"] == "ASSISTANT_NOT_FOUND"
    assert lines["nf"]["status"] == 404
    ledger = ResultLog(tmp_path / "out.jsonl").read()
    assert {k: e.state for k, e in ledger.by_key.items()} == {"ok.1": "answered", "nf.1": "failed"}


def test_distinct_ids_with_equal_hashes_are_accepted(tmp_path: Path) -> None:
    """Only the hashes of ids are kept at first; equal hashes (-1 and -2 in CPython) are then
    compared exactly, so distinct ids are not refused."""
    assert hash(-1) == hash(-2)
    lines = [
        json.dumps({"id": row_id, "assistant_id": 1, "customer_identifier": "+1", "message": "m"})
        for row_id in (-1, -2, "x")
    ]
    source = InputFile(write(tmp_path, "in.jsonl", "\n".join(lines)))
    source.check()
    assert source.rows == 3


# -- issue 10: per-row errors never kill the run; on_send marks the moment of sending ----------


async def test_any_per_row_error_is_that_rows_failure(
    server: MockAutocalls, make_client: Maker
) -> None:
    """A Mapping variables value json.dumps cannot take (MappingProxyType, nested ChainMap)
    used to escape as a bare TypeError and kill the run; a row whose mapping breaks, or a
    hand-made request of the wrong types, now fails alone and the other rows are answered."""
    from collections import ChainMap
    from types import MappingProxyType

    class BrokenRow(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            raise RuntimeError("the database cursor went away")

    rows: list[Any] = [
        {
            **rows_for(1, 1)[0],
            "id": "proxy",
            "variables": MappingProxyType({"a": ChainMap({"b": 1})}),
        },
        BrokenRow(),
        BulkRequest("typed", 123, "+1", "m", variables={"x": {1, 2}}),  # type: ignore[dict-item]
        {
            **rows_for(1, 1)[0],
            "id": "bad key",
            "variables": ChainMap({"k": MappingProxyType({2: 3})}),
        },
        {**rows_for(1, 1)[0], "id": "fine", "message": "still answered"},
    ]
    results = {
        result.id: result
        for result in await collect(BulkRunner(make_client(server.base_url), rows))
    }
    assert results["proxy"].ok
    assert server.conversations[(123, "+15550000000")].variables == {"a": {"b": 1}}
    assert results["fine"].ok
    broken = results[2]
    assert isinstance(broken.error, InvalidRequestError) and not broken.sent
    assert "could not be read (RuntimeError: the database cursor went away)" in str(broken.error)
    assert isinstance(results["typed"].error, InvalidRequestError)
    assert "variables['x'] is a set" in str(results["typed"].error)
    assert isinstance(results["bad key"].error, InvalidRequestError)
    assert len(server.requests) == 2


async def test_on_send_is_called_once_per_row_just_before_it_leaves(
    server: MockAutocalls, make_client: Maker
) -> None:
    """on_send runs once per sent row (not per retry), before the server sees the request;
    rows that fail before sending never call it; if it raises, the row is not sent and the
    run stops with that error."""
    from autocalls_async.testing import Fault

    server.inject(Fault.status(503), times=1)
    seen: list[tuple[Any, int]] = []

    def on_send(request: BulkRequest) -> None:
        seen.append((request.id, len(server.requests)))

    rows = [*rows_for(2, 1), {"assistant_id": 123, "customer_identifier": "", "message": "x"}]
    client = make_client(server.base_url)
    results = await collect(BulkRunner(client, rows, concurrency=1, on_send=on_send))
    assert sorted(r.ok for r in results) == [False, True, True]  # the invalid row fails alone
    assert seen == [("r0-0", 0), ("r0-1", 2)]  # the 503 retry did not call it again
    assert client.stats.retries == 1

    def failing(request: BulkRequest) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await collect(BulkRunner(make_client(server.base_url), rows_for(1, 1), on_send=failing))
    assert len(server.requests) == 3
