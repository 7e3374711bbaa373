"""The rough edges a newcomer meets first: a closed client, a plain ``with``, a client moved
between event loops, and a request too big for the server (issue 13)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autocalls_async import (
    AsyncAutocalls,
    ClientClosedError,
    InvalidRequestError,
    LocalRateLimiter,
    RateLimit,
    RedisConversationStore,
)
from autocalls_async.bulk import BulkRunner
from autocalls_async.testing import MockAutocalls
from autocalls_async.testing._server import MAX_BODY

from ._env import child_env

Make = Callable[..., AsyncAutocalls]
MiB = 1024 * 1024


async def ask(client: AsyncAutocalls, message: str = "Hi", **options: Any) -> Any:
    return await client.generate_reply(
        assistant_id=123, customer_identifier="+14155551234", message=message, **options
    )


def message_for_body(size: int) -> str:
    """A message whose request body (as ``ask`` sends it) is exactly ``size`` bytes."""
    overhead = len(
        json.dumps(
            {"assistant_id": 123, "customer_identifier": "+14155551234", "message": ""},
            separators=(",", ":"),
        ).encode()
    )
    return "x" * (size - overhead)


# -- after close() ----------------------------------------------------------------------------


async def test_a_call_after_close_says_to_create_a_new_client(
    server: MockAutocalls, make_client: Make
) -> None:
    """The error keeps its type and says what to do: a new client, or one kept open."""
    client = make_client(server.base_url)
    await ask(client)
    await client.close()
    with pytest.raises(ClientClosedError) as caught:
        await ask(client, "again")
    text = str(caught.value)
    assert "nothing was sent" in text
    assert "create a new AsyncAutocalls" in text and "lifespan" in text
    assert server.count() == 1


# -- a plain `with` ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: AsyncAutocalls("t", base_url="http://127.0.0.1:9/api", rate_limit=None),
        lambda: LocalRateLimiter(RateLimit(5, 1.0)),
        lambda: BulkRunner(AsyncAutocalls("t", base_url="http://127.0.0.1:9/api"), []),
        lambda: MockAutocalls(),
        lambda: RedisConversationStore("redis://127.0.0.1:9"),
    ],
    ids=["AsyncAutocalls", "LocalRateLimiter", "BulkRunner", "MockAutocalls", "Redis"],
)
def test_a_plain_with_says_to_use_async_with(make: Callable[[], object]) -> None:
    """Not Python's "does not support the context manager protocol": what to write instead."""
    resource = make()
    name = type(resource).__name__
    entered = False
    with pytest.raises(TypeError) as caught, resource:  # type: ignore[attr-defined]
        entered = True
    assert not entered
    assert f"use `async with {name}(...) as ...:`" in str(caught.value)
    assert "asyncio.run(" in str(caught.value)


# -- event loops ------------------------------------------------------------------------------


def test_a_client_made_outside_a_loop_works_in_the_loop_that_uses_it() -> None:
    """Creating the client at import time (no loop yet) is fine: it binds on first use."""
    with socket.socket() as probe:  # a free port, known before any loop exists
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = AsyncAutocalls("t", base_url=f"http://127.0.0.1:{port}/api", rate_limit=None)

    async def main() -> str:
        async with MockAutocalls(rate_limit=None, port=port), client:
            return (await ask(client)).reply

    assert asyncio.run(main()) == "Hi there! Thanks for your message: Hi"
    assert client.closed


def test_a_client_from_a_closed_loop_says_so() -> None:
    """Used again after its asyncio.run() ended: the loop is named as closed, and the fix."""
    client = AsyncAutocalls("t", base_url="http://127.0.0.1:9/api", rate_limit=None)

    async def bind() -> None:
        await client.__aenter__()  # binds the client to this loop; no session is made yet

    asyncio.run(bind())
    with pytest.raises(RuntimeError) as caught:
        asyncio.run(ask(client))
    text = str(caught.value)
    assert "event loop that has since closed" in text
    assert "create the client inside the loop that uses it" in text


def test_a_client_from_another_open_loop_says_one_client_per_loop() -> None:
    client = AsyncAutocalls("t", base_url="http://127.0.0.1:9/api", rate_limit=None)
    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(client.__aenter__())
        with pytest.raises(RuntimeError, match="first used in another event loop.*one per thread"):
            asyncio.run(ask(client))
    finally:
        first.close()


# -- the size of a request --------------------------------------------------------------------


async def test_the_default_limit_is_the_emulated_nginx_limit(
    server: MockAutocalls, make_client: Make
) -> None:
    """A body of exactly 1 MiB is sent and answered; one byte more is refused unsent."""
    assert MiB == MAX_BODY
    client = make_client(server.base_url)
    assert client.max_request_bytes == MiB
    assert (await ask(client, message_for_body(MiB))).reply
    with pytest.raises(InvalidRequestError) as caught:
        await ask(client, message_for_body(MiB + 1))
    assert "1,048,577 bytes" in str(caught.value)
    assert server.count() == 1


async def test_a_20_mb_message_never_leaves(server: MockAutocalls, make_client: Make) -> None:
    """The message of the issue: refused at once, saying the size, the limit and what to do."""
    client = make_client(server.base_url)
    with pytest.raises(InvalidRequestError) as caught:
        await ask(client, "é" * (10 * MiB))  # 20 MiB once encoded as UTF-8
    text = str(caught.value)
    assert "20,971,590 bytes (JSON, UTF-8)" in text
    assert "over the limit of 1,048,576 bytes (1 MiB: nginx's default client_max_body_size)" in text
    assert "shorten the message or the variables" in text
    assert "max_request_bytes=" in text and "nothing was sent" in text
    assert server.requests == []
    assert client.stats.requests == 0


# aiohttp warns about any body over 1 MiB sent as bytes (the default limit never lets one go)
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_max_request_bytes_sets_the_limit(server: MockAutocalls, make_client: Make) -> None:
    """A smaller limit counts the variables too; None lets anything go (and the emulator's
    nginx answers 413, as the real one would)."""
    small = make_client(server.base_url, max_request_bytes=200)
    with pytest.raises(InvalidRequestError, match=r"over the limit of 200 bytes, and the server"):
        await ask(small, variables={"notes": "n" * 150})
    assert server.count() == 0
    unlimited = make_client(server.base_url, max_request_bytes=None)
    with pytest.raises(Exception) as caught:
        await ask(unlimited, message_for_body(MiB + 1))
    assert not isinstance(caught.value, InvalidRequestError)
    assert server.count(413) == 1


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1000"])
def test_max_request_bytes_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="max_request_bytes must be a positive int"):
        AsyncAutocalls("t", max_request_bytes=value)  # type: ignore[arg-type]


async def test_bulk_fails_only_the_row_that_is_too_big(
    server: MockAutocalls, make_client: Make
) -> None:
    """The row fails alone, named and not sent; every other row is answered."""
    client = make_client(server.base_url)
    rows = [
        {"id": "a", "assistant_id": 123, "customer_identifier": "+1", "message": "one"},
        {"id": "big", "assistant_id": 123, "customer_identifier": "+2", "message": "x" * (2 * MiB)},
        {"id": "c", "assistant_id": 123, "customer_identifier": "+3", "message": "three"},
    ]
    results = {result.id: result async for result in BulkRunner(client, rows)}
    assert results["a"].ok and results["c"].ok
    big = results["big"]
    assert isinstance(big.error, InvalidRequestError)
    assert not big.sent and not big.maybe_processed
    line = big.to_json()
    assert line["error_code"] == "INVALID_ROW"
    assert line["error"].startswith("row 2 (id 'big'): the request would be 2,097,212 bytes")
    assert server.count() == 2


def _cli_env(server: MockAutocalls) -> dict[str, str]:
    return child_env(AUTOCALLS_API_TOKEN="cli-token", AUTOCALLS_BASE_URL=server.base_url)


async def _run(server: MockAutocalls, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autocalls_async",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_cli_env(server),
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_the_cli_refuses_a_message_too_big_before_sending(
    server: MockAutocalls, tmp_path: Path
) -> None:
    """`reply -` with 2 MiB on stdin: a usage-style error, nothing sent. `bulk`: that row
    fails in the output, the others are answered."""
    code, _, err = await _run(
        server, "reply", "--assistant-id", "123", "--customer", "+1", "-", stdin=b"x" * (2 * MiB)
    )
    assert code != 0
    assert "over the limit of 1,048,576 bytes" in err and "Traceback" not in err
    assert server.requests == []

    source = tmp_path / "in.jsonl"
    rows = [
        {"id": 1, "assistant_id": 123, "customer_identifier": "+1", "message": "one"},
        {"id": 2, "assistant_id": 123, "customer_identifier": "+2", "message": "x" * (2 * MiB)},
        {"id": 3, "assistant_id": 123, "customer_identifier": "+3", "message": "three"},
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, _, err = await _run(
        server, "bulk", str(source), "--out", str(out), "--rate-limit", "none"
    )
    assert code == 1, err
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert lines[1]["ok"] and lines[3]["ok"]
    assert lines[2]["ok"] is False and lines[2]["error_code"] == "INVALID_ROW"
    assert "over the limit of 1,048,576 bytes" in lines[2]["error"]
    assert lines[2]["sent"] is False
    assert server.count() == 2
