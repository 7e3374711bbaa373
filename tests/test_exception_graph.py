"""No SDK exception leads to the token, nor to an aiohttp object, by any path an error
reporter follows.

A Sentry-style reporter serialises the whole exception graph: ``__cause__`` and ``__context__``
chains, each exception's attributes, and the local variables of every frame of every
traceback (``repr()`` of each, walking into containers). aiohttp's ``ClientResponseError``
keeps the request's headers (``request_info.headers['Authorization']``), so one of them
anywhere in that graph hands the token over. Each error path below is driven by a real server
on a loopback port (a raw TCP one for responses aiohttp cannot parse), and the graph is
searched for aiohttp objects and for the token in every encoding the redactor knows.
"""

from __future__ import annotations

import asyncio
import base64
import html
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls, Budget

from .conftest import FAST_RETRIES

TOKEN = "SECRET-tok/en+abc&123-k3J9xQpL2mN8vB4cR7tY1wZ5aS6dF0gH"


def token_forms(token: str = TOKEN) -> list[str]:
    """The token as the redactor knows to find it: as is, escaped, encoded, and long runs."""
    bearer = f"Bearer {token}"
    forms = [
        token,
        token.replace("/", "\\/"),
        html.escape(token),
        quote(token, safe=""),
        "".join(f"\\u{ord(char):04x}" for char in token),
    ]
    for secret in (token, bearer):
        raw = secret.encode()
        forms += [
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            raw.hex(),
            raw.hex().upper(),
        ]
    forms += [token[:16], token[-16:], token[::-1]]
    return forms


FORMS = token_forms()
PACKAGE = str(Path(sdk.__file__).parent)


def _objects(error: BaseException) -> Iterator[tuple[str, Any]]:
    """Every object a reporter reaches from ``error``, with the path to it."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("error", error)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield path, obj
        if isinstance(obj, BaseException):
            stack += [
                (f"{path}.__cause__", obj.__cause__),
                (f"{path}.__context__", obj.__context__),
            ]
            stack += [(f"{path}.args[{i}]", arg) for i, arg in enumerate(obj.args)]
            stack += [(f"{path}.{name}", value) for name, value in vars(obj).items()]
            stack.append((f"{path}.__traceback__", obj.__traceback__))
        elif isinstance(obj, TracebackType):
            tb: TracebackType | None = obj
            while tb is not None:
                frame = tb.tb_frame
                if frame.f_code.co_filename.startswith(PACKAGE):  # the caller's frames are theirs
                    where = f"{path}[{frame.f_code.co_qualname}]"
                    stack += [(f"{where}.{name}", value) for name, value in frame.f_locals.items()]
                tb = tb.tb_next
        elif isinstance(obj, Mapping):
            for key, value in list(obj.items()):
                stack += [(f"{path}<key>", key), (f"{path}[{key!r}]", value)]
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += [(f"{path}[{i}]", item) for i, item in enumerate(obj)]


def leaks(error: BaseException, forms: list[str] = FORMS) -> list[str]:
    """Where the graph of ``error`` holds an aiohttp object or shows the token."""
    found = []
    for path, obj in _objects(error):
        module = type(obj).__module__ or ""
        if module.split(".")[0] == "aiohttp":
            found.append(f"{path}: an aiohttp object, {type(obj).__qualname__}")
            continue
        if isinstance(obj, bytes):
            text = obj.decode("latin-1")
        elif isinstance(obj, str):
            text = obj
        else:
            try:
                text = repr(obj)
            except Exception:  # a reporter skips what cannot be shown
                continue
        shown = [form for form in forms if form in text]
        if shown:
            found.append(f"{path}: shows the token as {shown[0]!r}")
    return found


def test_the_walk_finds_what_it_looks_for() -> None:
    """The search itself: a raw aiohttp exception, as chained before, is caught by it."""
    info = aiohttp.RequestInfo(
        aiohttp.client_reqrep.URL("http://x/"),
        "POST",
        aiohttp.client_reqrep.CIMultiDictProxy(
            aiohttp.client_reqrep.CIMultiDict(Authorization=f"Bearer {TOKEN}")
        ),
    )
    try:
        try:
            raise aiohttp.ClientResponseError(info, (), status=400, message="bad header")
        except aiohttp.ClientResponseError as exc:
            raise sdk.APIConnectionError("request failed", sent=True) from exc
    except sdk.APIConnectionError as error:
        found = leaks(error)
    assert any("an aiohttp object" in where for where in found)
    assert any("shows the token" in where for where in found)
    for form in FORMS:
        assert leaks(sdk.APIConnectionError(f"x {form} y", sent=False)), form


# -- the servers ------------------------------------------------------------------------------

#: Answers aiohttp cannot parse, each quoting the request's Authorization header.
MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "bad header byte": lambda auth: b"HTTP/1.1 200 OK\r\nX-Echo: " + auth + b"\x00\r\n\r\n",
    "too many headers": lambda auth: (
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, auth) for i in range(300)) + b"\r\n"
    ),
    "line over 8190 bytes": lambda auth: (
        b"HTTP/1.1 200 OK\r\nX-Echo: " + auth + b"x" * 9000 + b"\r\n\r\n"
    ),
    "bad status line": lambda auth: b"HTTP/1.1 2x0 " + auth + b"\r\n\r\n",
    "bad chunk": lambda auth: (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz " + auth + b"\r\n"
    ),
    "truncated body": lambda auth: (
        b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"auth": "' + auth + b'"'
    ),
}


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[str], str]]:
    """A TCP server answering each request with ``MALFORMED[mode]``: ``url(mode)``."""
    mode_of: dict[int, str] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        auth = next(
            line.split(b":", 1)[1].strip()
            for line in lines
            if line.lower().startswith(b"authorization:")
        )
        mode = lines[0].split(b" ")[1].decode().split("/")[1]
        writer.write(MALFORMED[mode.replace("-", " ")](auth))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield lambda mode: f"http://127.0.0.1:{port}/{mode.replace(' ', '-')}/api"
    del mode_of
    server.close()
    await server.wait_closed()


async def _echo(request: web.Request) -> web.StreamResponse:
    auth = request.headers["Authorization"]
    mode = request.match_info["mode"]
    if mode == "slow":
        await asyncio.sleep(5)
    if mode == "big":
        return web.Response(body=b"x" * 4096 + auth.encode(), status=500)
    if mode == "false":
        return web.json_response({"success": False, "error": auth, "error_code": auth})
    if mode == "invalid":
        return web.json_response({"success": True, "reply": 5, "debug": auth})
    status = int(mode)
    return web.json_response(
        {"message": f"no: {auth}", "errors": {auth: [auth]}},
        status=status,
        headers={"X-Echo": auth, "Retry-After": "0.01"},
    )


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/{mode}/api/ai/generate-reply", _echo)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def _caught(
    base_url: str, *, call: Callable[[AsyncAutocalls], Awaitable[Any]] | None = None, **options: Any
) -> BaseException:
    options.setdefault("rate_limit", None)
    options.setdefault("retry_policy", FAST_RETRIES)
    async with AsyncAutocalls(TOKEN, base_url=base_url, **options) as client:
        try:
            if call is None:
                await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
            else:
                await call(client)
        except sdk.AutocallsError as error:
            return error
    pytest.fail("no error")


# -- the error paths --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MALFORMED))
async def test_a_malformed_response_leaves_nothing(
    raw_server: Callable[[str], str], mode: str
) -> None:
    error = await _caught(raw_server(mode))
    assert not leaks(error)
    assert error.__cause__ is None and error.__context__ is None
    if isinstance(error, sdk.APIConnectionError):  # aiohttp 3.12 accepts some of these
        # What aiohttp said stays readable: its type's name, its text with the token masked.
        assert "Error" in str(error), str(error)


@pytest.mark.parametrize(
    "mode", ["401", "403", "404", "422", "429", "500", "503", "false", "invalid", "big"]
)
async def test_an_error_response_leaves_nothing(echo: str, mode: str) -> None:
    error = await _caught(f"{echo}/{mode}/api", max_response_size=2048)
    assert isinstance(error, sdk.APIError)
    assert not leaks(error)


async def test_timeouts_and_refused_connections_leave_nothing(echo: str) -> None:
    error = await _caught(f"{echo}/slow/api", timeout=0.2)
    assert isinstance(error, sdk.APITimeoutError) and not leaks(error)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = await _caught(f"http://127.0.0.1:{port}/api", max_retries=0)
    assert isinstance(error, sdk.APIConnectionError) and not leaks(error)


async def test_a_callers_session_leaves_nothing(raw_server: Callable[[str], str]) -> None:
    async with aiohttp.ClientSession() as session:
        error = await _caught(raw_server("bad header byte"), session=session)
    assert not leaks(error)


async def test_errors_raised_before_sending_leave_nothing(echo: str) -> None:
    async def bad_input(client: AsyncAutocalls) -> None:
        await client.generate_reply(assistant_id=0, customer_identifier="c", message="m")

    async def over_budget(client: AsyncAutocalls) -> None:
        for _ in range(2):
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")

    async def closed(client: AsyncAutocalls) -> None:
        await client.close()
        await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")

    async def no_slot(client: AsyncAutocalls) -> None:
        for _ in range(2):
            await client.generate_reply(
                assistant_id=1, customer_identifier="c", message="m", max_wait=0
            )

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "conversation_id": "c", "reply": "r"})

    errors = [
        await _caught(f"{echo}/200/api", call=bad_input),
        await _caught(f"{echo}/200/api", call=closed),
    ]
    app = web.Application()
    app.router.add_post("/api/ai/generate-reply", ok)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/api"
    try:
        errors.append(await _caught(base, call=over_budget, budget=Budget(replies=1)))
        errors.append(
            await _caught(base, call=no_slot, limiter=sdk.LocalRateLimiter(sdk.RateLimit(1, 60)))
        )
    finally:
        await runner.cleanup()
    kinds = [type(error) for error in errors]
    assert kinds == [
        sdk.InvalidRequestError,
        sdk.ClientClosedError,
        sdk.BudgetExceededError,
        sdk.RateLimitTimeout,
    ]
    assert not [leaks(error) for error in errors if leaks(error)]


def test_a_refused_construction_leaves_nothing() -> None:
    """The constructor's own frame held the token (and the headers made from it)."""
    for options in ({"base_url": "http://example.com/api"}, {"rate_limit": 5}, {"timeout": 0}):
        with pytest.raises(sdk.InvalidRequestError) as caught:
            AsyncAutocalls(TOKEN, **options)
        assert not leaks(caught.value), options
