"""Hostile servers: purpose-built aiohttp handlers that misbehave in the ways real networks do."""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls

from .conftest import FAST_RETRIES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Start = Callable[[Handler], Awaitable["Hostile"]]
GOOD = {
    "success": True,
    "conversation_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "customer_identifier": "c",
    "reply": "ok",
    "function_calls": [],
    "ai_disabled": False,
}


class Hostile:
    """One handler on a loopback port; counts the requests it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.hits = 0
        self.base_url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        return await self.handler(request)


@pytest.fixture
async def hostile() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Hostile:
        server = Hostile(handler)
        app = web.Application()
        app.router.add_post("/api/ai/generate-reply", server._handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        server.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/api"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


async def call(server: Hostile, **options: object) -> sdk.Reply:
    options.setdefault("rate_limit", None)
    options.setdefault("retry_policy", FAST_RETRIES)
    async with AsyncAutocalls("t", base_url=server.base_url, **options) as client:
        return await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")


async def test_streamed_body_past_the_cap_is_not_read_whole(hostile: Start) -> None:
    """A chunked body with no length that keeps going is cut at max_response_size."""
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(10_000):
                await response.write(b"x" * 65536)
                sent += 65536
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    server = await hostile(endless)
    with pytest.raises(sdk.APIResponseValidationError, match="max_response_size"):
        await call(server, max_response_size=1024 * 1024)
    assert server.hits == 1
    assert sent < 200 * 1024 * 1024  # the client stopped reading long before the end


@pytest.mark.timing
async def test_dripping_server_is_bounded_by_the_timeout(hostile: Start) -> None:
    """One byte a second never completes: the attempt ends at `timeout`, not retried."""

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            for byte in json.dumps(GOOD).encode():
                await response.write(bytes([byte]))
                await asyncio.sleep(1.0)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    server = await hostile(drip)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(sdk.APITimeoutError):
        await call(server, timeout=0.5)
    assert loop.time() - began < 2.0
    assert server.hits == 1


async def test_gzip_body_is_decoded(hostile: Start) -> None:
    """A gzip-encoded reply is decompressed."""

    async def gzipped(_: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(json.dumps(GOOD).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    reply = await call(await hostile(gzipped))
    assert reply.reply == "ok"


async def test_json_with_a_wrong_content_type_is_still_read(hostile: Start) -> None:
    """A valid reply labelled text/html is still a valid reply."""

    async def mislabelled(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(GOOD), content_type="text/html")

    assert (await call(await hostile(mislabelled))).reply == "ok"


async def test_truncated_body_is_a_connection_error_not_retried(hostile: Start) -> None:
    """Content-Length larger than what arrives: the reply may exist, so it is not retried."""

    async def truncated(request: web.Request) -> web.StreamResponse:
        body = json.dumps(GOOD).encode()
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": str(len(body) + 100)}
        )
        await response.prepare(request)
        await response.write(body[:20])
        assert request.transport is not None
        request.transport.close()
        return response

    server = await hostile(truncated)
    with pytest.raises(sdk.APIConnectionError) as caught:
        await call(server)
    assert caught.value.sent is True
    assert server.hits == 1


@pytest.mark.timing
@pytest.mark.parametrize(
    ("retry_after", "retried"),
    [("garbage", True), ("-5", True), ("Wed, 21 Oct 2015 07:28:00 GMT", True), ("86400", False)],
)
async def test_hostile_retry_after_values(hostile: Start, retry_after: str, retried: bool) -> None:
    """Garbage, negative or past Retry-After is retried promptly; an enormous one is raised."""

    async def throttled_once(_: web.Request) -> web.Response:
        if server.hits == 1:
            return web.json_response(
                {"message": "Too Many Attempts."}, status=429, headers={"Retry-After": retry_after}
            )
        return web.json_response(GOOD)

    server = await hostile(throttled_once)
    loop = asyncio.get_running_loop()
    began = loop.time()
    if retried:
        assert (await call(server, rate_limit=sdk.RateLimit(100, 1.0))).reply == "ok"
        assert server.hits == 2
    else:
        with pytest.raises(sdk.RateLimitError) as caught:
            await call(server, rate_limit=sdk.RateLimit(100, 1.0))
        assert caught.value.retry_after == 86400.0
        assert server.hits == 1
    assert loop.time() - began < 3.0


async def test_redirect_is_never_followed(hostile: Start) -> None:
    """A 307 to another host is an error: the token never travels there."""
    target = await hostile(lambda _: _json(GOOD))

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target.base_url + "/ai/generate-reply")

    server = await hostile(redirect)
    with pytest.raises(sdk.APIError, match="redirect") as caught:
        await call(server)
    assert caught.value.status == 307
    assert target.hits == 0


async def _json(data: object) -> web.Response:
    return web.json_response(data)


# -- compression bombs: the cap counts decoded bytes ------------------------------------------

#: The cap in these tests, and how much a bomb decodes to: 64 times the cap.
CAP = 1024 * 1024
BOMB = 64 * CAP


def _padded_reply(size: int) -> bytes:
    """A valid reply padded with JSON whitespace to ``size`` bytes: a client that decodes it
    whole gets a Reply, so the bomb must be refused, not merely fail to parse."""
    reply = json.dumps(GOOD).encode()
    return reply[:-1] + b" " * (size - len(reply)) + b"}"


def _deflate(data: bytes, *, raw: bool = False) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, 9),
    "x-gzip": lambda data: gzip.compress(data, 9),
    "deflate": _deflate,
    "deflate-raw": lambda data: _deflate(data, raw=True),
    "gzip, gzip": lambda data: gzip.compress(gzip.compress(data, 9), 9),
    "deflate, gzip": lambda data: gzip.compress(_deflate(data), 9),
    "identity, gzip, identity": lambda data: gzip.compress(data, 9),
}


def _encoded(encoding: str, data: bytes) -> tuple[str, bytes]:
    return encoding.replace("deflate-raw", "deflate"), _ENCODERS[encoding](data)


def _bounded_server(encoding: str, body: bytes, *, chunked: bool) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
        if not chunked:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(body), 4096):
                await response.write(body[start : start + 4096])
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    return handler


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("encoding", list(_ENCODERS))
async def test_a_compression_bomb_is_refused_at_the_cap(
    hostile: Start, encoding: str, chunked: bool
) -> None:
    """1 MiB cap, a body that decodes to 64 MiB (a few KiB on the wire, under the cap, with a
    Content-Length or chunked), in every encoding the SDK accepts and nested: refused, and the
    memory used stays near the cap, not the decoded size."""
    header, body = _encoded(encoding, _padded_reply(BOMB))
    assert len(body) < CAP // 4
    server = await hostile(_bounded_server(header, body, chunked=chunked))
    tracemalloc.start()
    try:
        with pytest.raises(sdk.APIResponseValidationError, match="max_response_size") as caught:
            await call(server, max_response_size=CAP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "decompresses to more" in str(caught.value)
    assert peak < 2 * CAP, f"peak {peak / CAP:.1f} MiB"  # the cap, and a piece per layer
    assert server.hits == 1


@pytest.mark.parametrize("encoding", list(_ENCODERS))
async def test_an_honest_compressed_reply_is_decoded(hostile: Start, encoding: str) -> None:
    """The same encodings, a reply just under the cap once decoded: it is a Reply."""
    header, body = _encoded(encoding, _padded_reply(CAP))
    server = await hostile(_bounded_server(header, body, chunked=False))
    assert (await call(server, max_response_size=CAP)).reply == "ok"


async def test_the_bomb_is_refused_on_a_callers_session_too(hostile: Start) -> None:
    """``session=``: a caller's session decodes by default (auto_decompress=True); the SDK
    asks for the raw bytes per request all the same."""
    header, body = _encoded("gzip", _padded_reply(BOMB))
    server = await hostile(_bounded_server(header, body, chunked=False))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(sdk.APIResponseValidationError, match="decompresses to more"):
            await call(server, max_response_size=CAP, session=session)


async def test_only_what_can_be_bounded_is_asked_for(hostile: Start) -> None:
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding"))
        return web.json_response(GOOD)

    await call(await hostile(record))
    assert seen == ["gzip, deflate"]


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        # aiohttp decodes br and zstd when their libraries are installed, without a bound
        # before 3.14: the SDK never asks for them, and refuses them unread.
        ("br", b"\x1b\xff\xff\x00" * 64, "Content-Encoding 'br', which was not asked for"),
        ("zstd", b"\x28\xb5\x2f\xfd" * 64, "Content-Encoding 'zstd', which was not asked for"),
        ("gzip, gzip, gzip, gzip", b"x", "4 layers of Content-Encoding"),
        ("x" * 30, b"x", r"Content-Encoding '\?'"),  # a name not worth quoting
        ("gzip", b"not gzip at all", "not valid gzip data"),
        ("gzip", gzip.compress(json.dumps(GOOD).encode())[:-12], "gzip body was cut short"),
        ("deflate", _deflate(json.dumps(GOOD).encode())[:-6], "deflate body was cut short"),
    ],
)
async def test_an_encoding_that_is_not_decoded_is_refused(
    hostile: Start, encoding: str, body: bytes, message: str
) -> None:
    server = await hostile(_bounded_server(encoding, body, chunked=False))
    with pytest.raises(sdk.APIResponseValidationError, match=message) as caught:
        await call(server)
    assert caught.value.status == 200
    assert server.hits == 1


async def test_bytes_after_a_deflate_stream_are_ignored(hostile: Start) -> None:
    """As browsers and aiohttp do: what follows the end of the stream is not the body."""
    body = _deflate(json.dumps(GOOD).encode()) + b"trailing garbage"
    assert (await call(await hostile(_bounded_server("deflate", body, chunked=True)))).reply == "ok"


async def test_several_gzip_members_are_one_body(hostile: Start) -> None:
    """RFC 1952 allows a gzip body of several members; they are decoded in turn."""
    data = json.dumps(GOOD).encode()
    body = gzip.compress(data[:10]) + gzip.compress(data[10:])
    assert (await call(await hostile(_bounded_server("gzip", body, chunked=True)))).reply == "ok"
    many = b"".join(gzip.compress(data[i : i + 1]) for i in range(len(data)))
    with pytest.raises(sdk.APIResponseValidationError, match="more than 64 members"):
        await call(await hostile(_bounded_server("gzip", many, chunked=False)))
