"""The API token never shows, even when a server or a gateway echoes it back.

A real aiohttp server on a loopback port answers with the request's ``Authorization`` header
in its body (401 and 422 JSON, 500 JSON, a 502 HTML page, a 200 ``success: false``, a 200 that
is not a reply) or in a response header; the token must appear in none of ``str``, ``repr``,
the traceback, ``.message``, ``.body``, ``.headers``, the DEBUG log, nor the CLI's stderr.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import sys
import traceback
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
from aiohttp import web

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls
from autocalls_async._wire import REDACTED, Redactor, check_base_url, shown_url

TOKEN = "SECRET-tok/en+abc&123"  # a '/', a '+' and a '&': escaped differently by JSON, HTML, URLs


async def _echo(request: web.Request) -> web.StreamResponse:
    auth = request.headers.get("Authorization", "")
    token = auth.removeprefix("Bearer ")
    mode = request.match_info["mode"]
    if mode == "401":  # a gateway: "invalid credentials: Bearer ..."
        return web.json_response({"message": f"Invalid credentials: {auth}"}, status=401)
    if mode == "422":
        errors = {"authorization": [f"{auth} is not valid"]}
        return web.json_response({"message": f"Bad {auth}", "errors": errors}, status=422)
    if mode == "500":  # PHP escapes '/' in JSON; a debug page quotes it HTML-escaped too
        text = json.dumps({"message": f"Server Error for {auth}", "escaped": token})
        return web.Response(
            text=text.replace("/", "\\/"), status=500, content_type="application/json"
        )
    if mode == "502":
        page = f"<html><head><title>Bad auth {html.escape(auth)}</title></head></html>"
        return web.Response(text=page, status=502, content_type="text/html")
    if mode == "false":
        body = {"success": False, "error": f"rejected {auth}", "error_code": "SOMETHING"}
        return web.json_response(body)
    if mode == "invalid":  # a 200 that is not a reply, echoing the token URL-encoded
        return web.json_response({"success": True, "debug": quote(token, safe="")})
    if mode == "header":  # the token echoed in a response header only
        return web.json_response(
            {"message": "Unauthenticated."}, status=401, headers={"X-Debug-Auth": auth}
        )
    reply = {
        "success": True,
        "conversation_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "customer_identifier": "c",
        "reply": f"you sent {auth}",
        "function_calls": [],
        "ai_disabled": False,
    }
    return web.json_response(reply)


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """The base URL of a server whose every answer echoes the token: ``{base}/{mode}``."""
    app = web.Application()
    app.router.add_post("/{mode}/api/ai/generate-reply", _echo)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def _shows_token(text: str) -> bool:
    forms = (TOKEN, TOKEN.replace("/", "\\/"), html.escape(TOKEN), quote(TOKEN, safe=""))
    return any(form in text for form in forms)


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("401", sdk.AuthenticationError),
        ("422", sdk.UnprocessableEntityError),
        ("500", sdk.InternalServerError),
        ("502", sdk.InternalServerError),
        ("false", sdk.APIError),
        ("invalid", sdk.APIResponseValidationError),
        ("header", sdk.AuthenticationError),
    ],
)
async def test_an_echoed_token_is_masked_everywhere(
    echo: str, mode: str, error: type[sdk.APIError], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    async with AsyncAutocalls(TOKEN, base_url=f"{echo}/{mode}/api", rate_limit=None) as client:
        with pytest.raises(error) as caught:
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    exc = caught.value
    shown = {
        "str": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "message": exc.message,
        "body": json.dumps(exc.body),
        "headers": json.dumps(dict(exc.headers)),
        "log": caplog.text,
    }
    assert not {where for where, text in shown.items() if _shows_token(text)}
    if mode == "header":
        assert exc.headers["X-Debug-Auth"] == f"Bearer {REDACTED}"
    elif mode == "invalid":
        assert exc.body["debug"] == REDACTED
    else:  # the message still says what the server said, the token masked
        assert f"Bearer {REDACTED}" in str(exc)
    if isinstance(exc, sdk.UnprocessableEntityError):
        assert exc.errors == {"authorization": [f"Bearer {REDACTED} is not valid"]}


async def test_a_reply_that_echoes_the_token_keeps_it_masked(echo: str) -> None:
    async with AsyncAutocalls(TOKEN, base_url=f"{echo}/ok/api", rate_limit=None) as client:
        reply = await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    assert reply.reply == f"you sent Bearer {REDACTED}"
    assert not _shows_token(repr(reply)) and not _shows_token(json.dumps(dict(reply.raw)))


async def test_a_retried_echo_is_logged_masked(echo: str, caplog: pytest.LogCaptureFixture) -> None:
    """The INFO line of a retry quotes the error: masked like the error itself."""
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    policy = sdk.RetryPolicy(max_retries=1, retry_unsafe=True, backoff_base=0.01)
    async with AsyncAutocalls(
        TOKEN, base_url=f"{echo}/502/api", rate_limit=None, retry_policy=policy
    ) as client:
        with pytest.raises(sdk.InternalServerError):
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    assert "retrying after InternalServerError" in caplog.text
    assert f"Bearer {REDACTED}" in caplog.text and not _shows_token(caplog.text)


async def test_the_cli_never_prints_an_echoed_token(echo: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCALLS_")}
    env.update(
        AUTOCALLS_LIMITER_DIR=os.environ["AUTOCALLS_LIMITER_DIR"],
        AUTOCALLS_API_TOKEN=TOKEN,
        AUTOCALLS_BASE_URL=f"{echo}/401/api",
        AUTOCALLS_LOG="debug",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autocalls_async",
        "reply",
        "--assistant-id",
        "1",
        "--customer",
        "c",
        "--rate-limit",
        "none",
        "Hi",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode not in (0, None)
    assert "Invalid credentials: Bearer ***" in err.decode(), err.decode()
    assert not _shows_token(out.decode() + err.decode())


# -- the redactor itself, and base URLs -------------------------------------------------------


def test_every_escaped_form_of_the_token_is_masked() -> None:
    redactor = Redactor(TOKEN)
    forms = [TOKEN, TOKEN.replace("/", "\\/"), html.escape(TOKEN), quote(TOKEN, safe="")]
    for form in forms:
        assert redactor.text(f"<{form}>") == f"<{REDACTED}>"
        assert redactor.body(f"x{form}y".encode()) == f"x{REDACTED}y".encode()
    assert "SECRET" not in repr(redactor)
    headers = {"A": "plain"}
    assert redactor.headers(headers) is headers  # nothing to mask: no copy


def test_a_short_token_is_masked_only_after_bearer() -> None:
    """A test's token "t" must not turn every "t" into "***"; after "Bearer " it is masked."""
    redactor = Redactor("t")
    assert redactor.text("Unauthenticated: bearer t, Bearer t.") == (
        "Unauthenticated: bearer ***, Bearer ***."
    )
    assert redactor.text("Bearer token") == "Bearer token"


@pytest.mark.parametrize(
    "url",
    [
        "https://user:SECRET-PASSWORD@app.autocalls.ai/api",
        "htps://user:SECRET-PASSWORD@app.autocalls.ai/api",  # the scheme is checked first
        "https://SECRET-PASSWORD@example.com/api/ai/generate-reply",
        "https://user:SECRET/PASSWORD@example.com/api",  # a '/' in the password
        "user:SECRET-PASSWORD@example.com/api",
        "https://user:SECRET-PASSWORD@[::1/api",  # not even a URL
    ],
)
def test_a_base_url_with_credentials_is_never_echoed_with_them(url: str) -> None:
    with pytest.raises(sdk.InvalidRequestError) as caught:
        check_base_url(url)
    assert "SECRET" not in str(caught.value) and "PASSWORD" not in str(caught.value)
    assert f"{REDACTED}@" in str(caught.value)


def test_a_token_passed_as_base_url_is_masked() -> None:
    with pytest.raises(sdk.InvalidRequestError) as caught:
        AsyncAutocalls(TOKEN, base_url=TOKEN)
    assert not _shows_token(str(caught.value)) and REDACTED in str(caught.value)
    with pytest.raises(sdk.InvalidRequestError) as caught:
        AsyncAutocalls(TOKEN, base_url=f"https://example.com:{TOKEN}/api")
    assert not _shows_token(str(caught.value))


def test_shown_url_keeps_what_is_not_a_secret() -> None:
    assert shown_url("https://example.com/api") == "https://example.com/api"
    assert shown_url("https://u:p@example.com/api") == f"https://{REDACTED}@example.com/api"


async def test_a_malformed_response_quoting_the_token_is_masked() -> None:
    """aiohttp's parser quotes the bad line it met: the connection error masks the token and
    does not chain aiohttp's exception (a traceback would print it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: x" + TOKEN.encode() + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with (
        server,
        AsyncAutocalls(TOKEN, base_url=f"http://127.0.0.1:{port}/api", rate_limit=None) as client,
    ):
        with pytest.raises(sdk.APIConnectionError) as caught:
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    text = "".join(traceback.format_exception(caught.value))
    assert f"x{REDACTED}" in str(caught.value) and not _shows_token(text)
    assert caught.value.__cause__ is None
