"""The API token never shows, even when a server or a gateway echoes it back.

A real aiohttp server on a loopback port answers with the request's ``Authorization`` header
in its body (401 and 422 JSON, 500 JSON, a 502 HTML page, a 200 ``success: false``, a 200 that
is not a reply) or in a response header; the token must appear in none of ``str``, ``repr``,
the traceback, ``.message``, ``.body``, ``.headers``, the DEBUG log, nor the CLI's stderr.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import html
import json
import logging
import re
import sys
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote, unquote

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls
from autocalls_async import _telemetry as telemetry
from autocalls_async._wire import REDACTED, WITHHELD, Redactor, check_base_url, shown_url

from ._env import child_env

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
    if mode == "u00":  # an encoder that escapes every character as \u00XX
        text = "".join(f"\\u{ord(char):04x}" for char in auth)
        raw = '{"message":"Invalid credentials: ' + text + '"}'
        return web.Response(text=raw, status=401, content_type="application/json")
    if mode == "gson":  # Gson's HTML-safe default: & = ' < > as \u0026 ..., upper-case hex here
        text = "".join(f"\\u{ord(char):04X}" if char in "&='<>" else char for char in auth)
        raw = '{"message":"Invalid credentials: ' + text + '"}'
        return web.Response(text=raw, status=401, content_type="application/json")
    if mode in ("utf16", "utf16le", "utf32"):  # json.loads reads them all, BOM or not
        encoding = {"utf16": "utf-16", "utf16le": "utf-16-le", "utf32": "utf-32"}[mode]
        data = json.dumps({"message": f"Invalid credentials: {auth}"}).encode(encoding)
        return web.Response(body=data, status=401, content_type="application/json")
    if mode == "html16":  # an HTML page in UTF-16: bytes-level masking sees \x00 between chars
        page = f"<html><head><title>Bad auth {html.escape(auth)}</title></head></html>"
        return web.Response(body=page.encode("utf-16"), status=502, content_type="text/html")
    if mode == "entities":  # numeric HTML entities, hex and decimal
        shown = auth.replace("&", "&#38;").replace("/", "&#x2F;").replace("+", "&#43;")
        page = f"<html><head><title>Bad auth {shown}</title></head></html>"
        return web.Response(text=page, status=502, content_type="text/html")
    if mode == "pct":  # lower-case URL encoding; urllib's default quote, which keeps '/'
        lower = "".join(char if char.isalnum() else f"%{ord(char):02x}" for char in token)
        return web.Response(text=f"token={lower} or {quote(token)}", status=400)
    if mode == "u00-ok":  # a 200 reply whose text holds the token as \u00XX escapes
        text = "".join(f"\\u{ord(char):04x}" for char in token)
        raw = (
            '{"success":true,"conversation_id":"c","customer_identifier":"c",'
            f'"reply":"you sent {text}","function_calls":[],"ai_disabled":false}}'
        )
        return web.Response(text=raw, content_type="application/json")
    if mode == "utf16-ok":
        reply = {"success": True, "conversation_id": "c", "reply": f"you sent {auth}"}
        return web.Response(
            body=json.dumps(reply).encode("utf-16"), content_type="application/json"
        )
    if mode == "twice":  # percent-encoded twice: no single form matches; the string goes
        twice = quote(quote(token, safe=""), safe="")
        body = {"message": f"Invalid credentials: Bearer {twice}", "hint": "check the token"}
        return web.json_response(body, status=401)
    if mode == "twice-text":  # the same in a body that is not JSON: it is withheld
        twice = quote(quote(token, safe=""), safe="")
        return web.Response(text=f"Invalid credentials: Bearer {twice}", status=401)
    if mode == "header-name":  # the token in a header's name (only tchars in that token)
        return web.json_response(
            {"message": "Unauthenticated."}, status=401, headers={f"X-Echo-{token}": "1"}
        )
    if mode == "both":  # the token in a header and in the body (checked in one pass)
        return web.json_response(
            {"message": f"Bad {auth}"}, status=401, headers={"X-Debug-Auth": auth}
        )
    if mode == "gzip":  # the same, gzip-encoded: read by the other path, headers masked first
        data = gzip.compress(json.dumps({"message": f"Bad {auth}"}).encode())
        return web.Response(
            body=data,
            status=401,
            content_type="application/json",
            headers={"Content-Encoding": "gzip", "X-Debug-Auth": auth},
        )
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


#: A 40-character token, as the service issues them.
LONG_TOKEN = "42|Zt8Qm2Lx9Vb4Nc7Rf1Hj6Kp3Ws5Yd0Ga8Ue2Io"


def _b64(data: str, *, urlsafe: bool = False) -> str:
    raw = data.encode()
    return (
        base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if urlsafe
        else base64.b64encode(raw).decode()
    )


#: Partial, reversed and encoded echoes of the Authorization header (name -> what is echoed,
#: from the token): each reached str(exc), .body and the CLI's stderr before.
ECHOES: dict[str, Callable[[str], str]] = {
    "prefix-16": lambda token: token[:16],
    "suffix-16": lambda token: token[-16:],
    "less-last-3": lambda token: token[:-3],
    "middle-20": lambda token: token[10:30],
    "reversed": lambda token: token[::-1],
    "base64": lambda token: _b64(token),
    "base64-bearer": lambda token: _b64(f"Bearer {token}"),
    "base64-authorization": lambda token: _b64(f"Authorization: Bearer {token}"),
    "base64url-bearer": lambda token: _b64(f"Bearer {token}", urlsafe=True),
    "base64-less-last-3": lambda token: _b64(token[:-3]),
    "hex": lambda token: token.encode().hex(),
    "hex-upper-bearer": lambda token: f"Bearer {token}".encode().hex().upper(),
    "hex-less-last-3": lambda token: token[:-3].encode().hex(),
}


async def _echo_form(request: web.Request) -> web.StreamResponse:
    token = request.headers["Authorization"].removeprefix("Bearer ")
    echoed = ECHOES[request.match_info["form"]](token)
    return web.json_response(
        {"message": f"Invalid credentials: {echoed}.", "token": echoed},
        status=401,
        headers={"X-Echo": echoed},
    )


def _leaked(text: str, token: str = LONG_TOKEN) -> list[str]:
    """The echoes of ``token`` whose first or last 16 characters ``text`` shows (not the
    first of an encoded ``Bearer``, which is not the token's)."""
    found = []
    for name, echo in ECHOES.items():
        echoed = echo(token)
        ends = [echoed[-16:]] + ([] if "bearer" in name or "auth" in name else [echoed[:16]])
        if any(end in text for end in ends):
            found.append(name)
    return found


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """The base URL of a server whose every answer echoes the token: ``{base}/{mode}``."""
    app = web.Application()
    app.router.add_post("/{mode}/api/ai/generate-reply", _echo)
    app.router.add_post("/gw/{key}/{mode}/api/ai/generate-reply", _echo)  # a token in the path
    app.router.add_post("/forms/{form}/api/ai/generate-reply", _echo_form)
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
        ("both", sdk.AuthenticationError),
        ("gzip", sdk.AuthenticationError),
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
    if mode in ("header", "both", "gzip"):
        assert exc.headers["X-Debug-Auth"] == f"Bearer {REDACTED}"
        if mode != "header":
            assert exc.message == f"Bad Bearer {REDACTED}"
    elif mode == "invalid":
        assert exc.body["debug"] == REDACTED
    else:  # the message still says what the server said, the token masked
        assert f"Bearer {REDACTED}" in str(exc)
    if isinstance(exc, sdk.UnprocessableEntityError):
        assert exc.errors == {"authorization": [f"Bearer {REDACTED} is not valid"]}


#: A Sanctum-style token: its '|' is a valid header-name character, and yarl writes it '%7C'.
PIPE_TOKEN = "123|k3J9xQpL2mN8vB4cR7tY1wZ5aS6dF0gH"


def _decoded(text: str) -> str:
    """What a reader gets from ``text`` by undoing every escape, twice over."""
    for _ in range(2):
        text = re.sub(
            r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text.replace("\x00", "")
        )
        text = unquote(html.unescape(text.replace("\\/", "/")))
    return text


def _reveals(text: str, token: str = TOKEN) -> bool:
    return _shows_token(text) or token in text or token in _decoded(text)


@pytest.mark.parametrize(
    ("mode", "token", "error", "shown"),
    [
        ("u00", TOKEN, sdk.AuthenticationError, f"Invalid credentials: Bearer {REDACTED}"),
        ("gson", TOKEN, sdk.AuthenticationError, f"Invalid credentials: Bearer {REDACTED}"),
        ("utf16", TOKEN, sdk.AuthenticationError, f"Invalid credentials: Bearer {REDACTED}"),
        ("utf16le", PIPE_TOKEN, sdk.AuthenticationError, f"Invalid credentials: Bearer {REDACTED}"),
        ("utf32", TOKEN, sdk.AuthenticationError, f"Invalid credentials: Bearer {REDACTED}"),
        ("html16", PIPE_TOKEN, sdk.InternalServerError, f"(Bad auth Bearer {REDACTED})"),
        ("entities", TOKEN, sdk.InternalServerError, f"(Bad auth Bearer {REDACTED})"),
        ("pct", TOKEN, sdk.APIError, f"(token={REDACTED} or {REDACTED})"),
        ("twice", TOKEN, sdk.AuthenticationError, f"HTTP 401: {REDACTED}"),
        ("twice-text", TOKEN, sdk.AuthenticationError, "(" + WITHHELD + ")"),
        ("header-name", PIPE_TOKEN, sdk.AuthenticationError, "Unauthenticated."),
    ],
)
async def test_a_disguised_token_is_masked_everywhere(
    echo: str,
    mode: str,
    token: str,
    error: type[sdk.APIError],
    shown: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Escaped character by character (JSON \\u00XX, HTML entities, URL encoding in either
    case), in UTF-16 or UTF-32, or in a header's name: found and masked; escaped twice over,
    the string (JSON) or the body (anything else) that holds it is withheld."""
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    async with AsyncAutocalls(token, base_url=f"{echo}/{mode}/api", rate_limit=None) as client:
        with pytest.raises(error) as caught:
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    exc = caught.value
    surfaces = {
        "str": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "message": exc.message,
        "body": json.dumps(exc.body, ensure_ascii=False),
        "headers": json.dumps(list(exc.headers.items())),
        "log": caplog.text,
    }
    assert not {where for where, text in surfaces.items() if _reveals(text, token)}
    assert shown in str(exc), str(exc)
    if mode == "twice":  # the other fields of the JSON body are kept
        assert exc.body == {"message": REDACTED, "hint": "check the token"}
    if mode == "header-name":
        assert f"X-Echo-{REDACTED}" in exc.headers or REDACTED in exc.headers


@pytest.mark.parametrize("mode", ["u00-ok", "utf16-ok"])
async def test_a_reply_that_echoes_a_disguised_token_keeps_it_masked(echo: str, mode: str) -> None:
    async with AsyncAutocalls(TOKEN, base_url=f"{echo}/{mode}/api", rate_limit=None) as client:
        reply = await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    assert reply.reply.startswith("you sent ") and reply.reply.endswith(REDACTED)
    assert not _reveals(reply.reply) and not _reveals(repr(reply))
    assert not _reveals(json.dumps(dict(reply.raw), ensure_ascii=False))


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


@pytest.mark.parametrize("mode", ["401", "u00", "utf16"])
async def test_the_cli_never_prints_an_echoed_token(echo: str, mode: str) -> None:
    env = child_env(
        AUTOCALLS_API_TOKEN=TOKEN,
        AUTOCALLS_BASE_URL=f"{echo}/{mode}/api",
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
    assert not _reveals(out.decode() + err.decode())


async def test_a_token_in_the_base_urls_path_is_masked_in_repr_logs_and_spans(
    echo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that routes on the token (user error, but the docs promise masking): yarl
    writes its '|' as '%7C' in the URL, the path has it raw; neither shows."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.SIGNALS.use(tracer_provider, meter_provider)
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    base_url = f"{echo}/gw/{PIPE_TOKEN}/ok/api"
    try:
        async with AsyncAutocalls(PIPE_TOKEN, base_url=base_url, rate_limit=None) as client:
            shown = repr(client)
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
        metrics = reader.get_metrics_data()
    finally:
        telemetry.SIGNALS.use()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    assert f"/gw/{REDACTED}/ok/api" in shown and not _reveals(shown, PIPE_TOKEN)
    assert f"POST /gw/{REDACTED}/ok/api/ai/generate-reply -> 200" in caplog.text
    assert not _reveals(caplog.text, PIPE_TOKEN)
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "POST"]
    assert span.attributes is not None
    assert span.attributes["url.full"] == f"{echo}/gw/{REDACTED}/ok/api/ai/generate-reply"
    recorded = [dict(s.attributes or {}) for s in exporter.get_finished_spans()]
    assert metrics is not None
    recorded += [
        dict(point.attributes or {})
        for resource in metrics.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    ]
    assert len(recorded) > 2
    assert not [a for a in recorded if _reveals(json.dumps(a, default=str), PIPE_TOKEN)]


def test_a_token_in_the_base_urls_path_is_masked_in_the_suggested_root() -> None:
    with pytest.raises(sdk.InvalidRequestError) as caught:
        AsyncAutocalls(
            PIPE_TOKEN, base_url=f"https://gw.example/{PIPE_TOKEN}/api/ai/generate-reply"
        )
    assert f"pass the API's root, 'https://gw.example/{REDACTED}/api'" in str(caught.value)
    assert not _reveals(str(caught.value), PIPE_TOKEN)
    with pytest.raises(sdk.InvalidRequestError) as caught:  # percent-encoded, lower case
        AsyncAutocalls(
            PIPE_TOKEN,
            base_url="https://gw.example/123%7ck3J9xQpL2mN8vB4cR7tY1wZ5aS6dF0gH/api/ai/generate-reply",
        )
    assert not _reveals(str(caught.value), PIPE_TOKEN) and REDACTED in str(caught.value)


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


@pytest.mark.parametrize(
    "form",
    [
        re.sub("%..", lambda m: m[0].lower(), quote(TOKEN, safe="")),  # lower-case hex
        quote(TOKEN),  # urllib's default keeps '/'
        "".join(f"%{ord(char):02X}" for char in TOKEN),  # every character
        "".join(f"\\u{ord(char):04x}" for char in TOKEN),  # JSON, every character
        TOKEN.replace("&", "\\u0026"),  # Gson's HTML-safe escaping
        TOKEN.replace("&", "\\u0026").replace("/", "\\/"),
        TOKEN.replace("&", "&#38;").replace("/", "&#x2F;"),  # HTML numeric entities
        TOKEN.replace("/", "&#47;").replace("+", "&#x002b;"),
        TOKEN.replace("&", "&amp;").replace("/", "&sol;"),  # HTML5 named entities
        TOKEN.replace("/", "%2f").replace("&", "&amp;").replace("+", "\\u002B"),  # mixed
    ],
)
def test_every_character_may_be_escaped_its_own_way(form: str) -> None:
    """Masked in place, so the rest of the text still says what happened."""
    redactor = Redactor(TOKEN)
    assert redactor.text(f"Bearer {form}.") == f"Bearer {REDACTED}."
    assert redactor.body(f'{{"m":"Bearer {form}"}}'.encode()) == b'{"m":"Bearer ***"}'
    assert redactor.body(f"<p>Bearer {form}</p>".encode("utf-16")) == b"<p>Bearer ***</p>"


def test_a_body_without_the_token_keeps_its_bytes() -> None:
    """Nothing is re-encoded when there is nothing to mask, escapes or not (the usual case)."""
    redactor = Redactor(TOKEN)
    for body in (
        b'{"success":true,"reply":"50% off & free: see https:\\/\\/x.example\\/a \\u00e9"}',
        b"<html><title>Bad Gateway &amp; more</title></html>",
        b"",
        b"100%252525252525 sure",  # nested escapes, and no token: decoded four times at most
    ):
        assert redactor.body(body) is body
    # a UTF-16 body without the token is handed on as UTF-8, which every reader reads
    assert redactor.body('{"a":"b"}'.encode("utf-16")) == b'{"a":"b"}'


def test_what_hides_the_token_deeper_is_withheld() -> None:
    """Escaped twice over: the JSON string that holds it becomes ***, a body that is not JSON
    is withheld, and so is a JSON body that would still show it (a number, here)."""
    redactor = Redactor(TOKEN)
    twice = quote(quote(TOKEN, safe=""), safe="")
    body = json.dumps({"message": f"Bearer {twice}", "n": [1, None, {"k": "v"}]}).encode()
    assert json.loads(redactor.body(body)) == {"message": REDACTED, "n": [1, None, {"k": "v"}]}
    assert redactor.body(f"Bearer {twice}".encode()) == WITHHELD.encode()
    assert redactor.text(f"Bearer {twice}") == REDACTED
    assert redactor.text(f"Bearer {twice}", "[withheld]") == "[withheld]"
    four = quote(quote(twice, safe=""), safe="")  # four layers still decode
    assert redactor.body(four.encode()) == WITHHELD.encode()
    nuls = "\x00".join(f"Bearer {TOKEN}").encode()  # NULs between the characters, not UTF-16
    assert redactor.body(b"x" + nuls) == WITHHELD.encode()
    digits = Redactor("12345678")  # a token the service never issues: only digits
    spelled = "".join(f"%25{ord(char):02x}" for char in "12345678")  # percent-encoded twice
    body = b'{"a":1.2345678e7,"b":"' + spelled.encode() + b'"}'
    assert digits.body(body) == WITHHELD.encode()
    assert "12345678" not in repr(digits)


@pytest.mark.parametrize(
    "escape",
    [
        "%25{:02x}",  # URL-encoded twice
        "&amp;#{:d};",  # an HTML entity, HTML-escaped
        "&#37;{:02X}",  # URL encoding whose '%' is an HTML entity
        "&percnt;{:02x}",
        "\\u0025{:02x}",  # URL encoding whose '%' is a JSON escape
        "%5Cu00{:02x}",  # a JSON escape whose '\\' is URL-encoded
    ],
)
def test_every_character_escaped_twice_is_found(escape: str) -> None:
    """Not one character as is: the shortcut for bodies that cannot hide the token must not
    skip these (each has an escape that stands for a letter, a digit or an escape's start)."""
    redactor = Redactor(PIPE_TOKEN)
    hidden = "".join(escape.format(ord(char)) for char in PIPE_TOKEN)
    assert redactor.body(f"Bearer {hidden}".encode()) == WITHHELD.encode()
    assert redactor.text(f"Bearer {hidden}") == REDACTED


def test_a_header_name_holding_the_token_is_masked() -> None:
    redactor = Redactor(PIPE_TOKEN)
    masked = redactor.headers({f"X-Echo-{PIPE_TOKEN}": "1", "X-Other": quote(PIPE_TOKEN)})
    assert dict(masked) == {f"X-Echo-{REDACTED}": "1", "X-Other": REDACTED}


def test_a_short_token_is_masked_only_after_bearer() -> None:
    """A test's token "t" must not turn every "t" into "***"; after "Bearer " it is masked."""
    redactor = Redactor("t")
    assert redactor.text("Unauthenticated: bearer t, Bearer t.") == (
        "Unauthenticated: bearer ***, Bearer ***."
    )
    assert redactor.text("Bearer token") == "Bearer token"
    # two spaces, a tab, a line break, escaped whitespace: still right after Bearer
    for gap in ("  ", "\t", "\n ", "%20", "\\t", "&#32;", "+"):
        assert redactor.text(f"Bearer{gap}t.") == f"Bearer{gap}{REDACTED}.", gap
    assert redactor.body(b'{"m":"Bearer\\tt"}') == b'{"m":"Bearer\\t***"}'
    assert redactor.body("Bearer t".encode("utf-16")) == b"Bearer ***"


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


# -- partial, reversed and encoded echoes -----------------------------------------------------


@pytest.mark.parametrize("form", list(ECHOES))
async def test_a_partial_or_encoded_echo_is_masked_everywhere(
    echo: str, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    base_url = f"{echo}/forms/{form}/api"
    async with AsyncAutocalls(LONG_TOKEN, base_url=base_url, rate_limit=None) as client:
        with pytest.raises(sdk.AuthenticationError) as caught:
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
    exc = caught.value
    surfaces = {
        "str": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "body": json.dumps(exc.body),
        "headers": json.dumps(dict(exc.headers)),
        "log": caplog.text,
    }
    assert not {where: _leaked(text) for where, text in surfaces.items() if _leaked(text)}
    # masked in place (what encodes "Bearer " or "Authorization: " may stay)
    assert re.search(r"Invalid credentials: [A-Za-z0-9]*\*\*\*\.", str(exc)), str(exc)
    assert exc.body["token"].endswith(REDACTED) and exc.headers["X-Echo"].endswith(REDACTED)


@pytest.mark.parametrize("form", ["less-last-3", "base64-bearer", "hex"])
async def test_the_cli_never_prints_a_partial_or_encoded_echo(echo: str, form: str) -> None:
    env = child_env(AUTOCALLS_API_TOKEN=LONG_TOKEN, AUTOCALLS_BASE_URL=f"{echo}/forms/{form}/api")
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
    assert re.search(r"Invalid credentials: [A-Za-z0-9]*\*\*\*", err.decode()), err.decode()
    assert not _leaked(out.decode() + err.decode())


def test_long_runs_are_masked_and_short_ones_kept() -> None:
    """16 characters of the token, or more, anywhere and as many times as they appear, are
    masked; 15 are not (they cannot be told from chance, and cannot rebuild the token); the
    rest of the text is kept."""
    redactor = Redactor(LONG_TOKEN)
    for start in range(len(LONG_TOKEN) - 15):
        run = LONG_TOKEN[start : start + 16]
        assert redactor.text(f"<{run}> and <{run}>") == f"<{REDACTED}> and <{REDACTED}>", run
    assert redactor.text(f"a {LONG_TOKEN[:15]} b") == f"a {LONG_TOKEN[:15]} b"
    # two runs side by side, overlapping forms: one mask each, nothing left between
    assert redactor.text(LONG_TOKEN[:20] + LONG_TOKEN[::-1][:20]) == REDACTED
    body = json.dumps({"m": f"key {LONG_TOKEN[4:]}", "other": "kept"}).encode()
    assert json.loads(redactor.body(body)) == {"m": f"key {REDACTED}", "other": "kept"}
    assert redactor.headers({"X": LONG_TOKEN[-20:]}) == {"X": REDACTED}


@pytest.mark.parametrize("shift", ["", "x", "xy", "Authorization: Bearer "])
def test_base64_and_hex_are_masked_at_any_offset(shift: str) -> None:
    """base64 depends on where the token starts in the encoded data (three alignments), in
    the standard and the URL-safe alphabets, padded or not; hex in either case."""
    redactor = Redactor(LONG_TOKEN)
    data = f"{shift}{LONG_TOKEN}"
    for encoded in (
        _b64(data),
        _b64(data, urlsafe=True),
        data.encode().hex(),
        data.encode().hex().upper(),
    ):
        shown = redactor.text(f"echo: {encoded}!")
        assert shown.startswith("echo: ") and shown.endswith("!") and REDACTED in shown
        assert not _leaked(shown) and encoded[-30:] not in shown


def test_a_body_that_only_looks_like_base64_keeps_its_bytes() -> None:
    redactor = Redactor(LONG_TOKEN)
    other = Redactor("99|" + "A" * 37)
    body = json.dumps(
        {"reply": "ok", "id": base64.b64encode(bytes(range(60))).decode(), "hex": "ab" * 40}
    ).encode()
    assert redactor.body(body) is body and other.body(body) is body


_TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@settings(max_examples=300, deadline=None)
@given(
    token=st.text(_TOKEN_CHARS, min_size=20, max_size=60),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    data=st.data(),
)
def test_the_quick_check_never_skips_a_long_run(
    token: str, before: str, after: str, data: st.DataObject
) -> None:
    """Whatever the token (any printable ASCII, '-', '_', '+', '/' included) and whatever
    surrounds it: a run of 16 of its characters, as is or reversed, or the base64 (either
    alphabet, any offset) or hex of the token, never survives ``text`` nor ``body``."""
    start = data.draw(st.integers(0, len(token) - 16))
    end = data.draw(st.integers(start + 16, len(token)))
    shift = data.draw(st.text(max_size=2))
    run = token[start:end]
    encoded = f"{shift}{token}".encode()
    forms = {
        "run": run,
        "reversed": run[::-1],
        "base64": base64.b64encode(encoded).decode(),
        "base64url": base64.urlsafe_b64encode(encoded).decode(),
        "hex": encoded.hex(),
        "HEX": encoded.hex().upper(),
    }
    name = data.draw(st.sampled_from(sorted(forms)))
    text = f"{before}{forms[name]}{after}"
    redactor = Redactor(token)
    # what must not survive: 16 characters of the token, or 22 of its encoded form's middle
    probe = run[:16] if name in ("run", "reversed") else forms[name][-40:-18]
    probe = probe[::-1] if name == "reversed" else probe
    for shown in (redactor.text(text), redactor.body(text.encode()).decode(errors="replace")):
        assert probe not in shown or probe in before + after, (name, shown)


@pytest.mark.timing
async def test_a_body_of_many_partial_echoes_is_withheld_quickly() -> None:
    """A hostile 10 MiB body of 16-character runs of the token (600,000 echoes) took 14 s of
    the event loop to mask echo by echo: past 1,000 echoes it is withheld whole."""
    body = (LONG_TOKEN[:16] + " ").encode() * (10 * 1024 * 1024 // 17)

    async def flood(_: web.Request) -> web.Response:
        return web.Response(body=body, status=500)

    app = web.Application()
    app.router.add_post("/api/ai/generate-reply", flood)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/api"
    loop = asyncio.get_running_loop()
    try:
        async with AsyncAutocalls(LONG_TOKEN, base_url=base_url, rate_limit=None) as client:
            began = loop.time()
            with pytest.raises(sdk.InternalServerError) as caught:
                await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
            took = loop.time() - began
    finally:
        await runner.cleanup()
    assert WITHHELD in str(caught.value) and not _leaked(str(caught.value))
    assert took < 5.0, f"{took:.1f}s"


# -- what the redactor costs: made in microseconds, prepared only for a suspicious text -------

_REPLY_BODY = json.dumps(
    {
        "success": True,
        "conversation_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "customer_identifier": "+14155551234",
        "reply": "Your table for Friday is booked: https://example.com/booking?id=42",
        "function_calls": [],
        "ai_disabled": False,
    }
).encode()


def test_a_reply_its_headers_and_the_url_need_nothing_prepared() -> None:
    """The token's forms and its pattern (milliseconds, for thousands of tokens) are worked
    out at the first text that may hold the token, never for the usual ones."""
    redactor = Redactor(LONG_TOKEN)
    assert redactor.body(_REPLY_BODY) is _REPLY_BODY
    headers = {"Date": "Mon, 07 Dec 2026 17:00:00 GMT", "X-Request-Id": str(uuid.uuid4())}
    assert redactor.headers(headers) is headers
    url = "https://app.autocalls.ai/api/ai/generate-reply"
    assert redactor.text(url) == url
    assert redactor._prepared is None
    # then a body that echoes part of the token: found, and the forms are kept for next time
    echo = f'{{"message":"bad token {LONG_TOKEN[3:25]}"}}'.encode()
    assert redactor.body(echo) == b'{"message":"bad token ***"}'
    assert redactor._prepared is not None


def test_a_uuid_is_searched_when_the_token_could_hide_in_one() -> None:
    """A UUID is passed over only when no form of the token can have a masked run in one: a
    token that itself holds a UUID-like stretch (hex digits and dashes, 16 or more with a
    dash) gets its UUIDs searched like any other text."""
    inner = "a1b2c3d4-e5f6-a7b8-c9d0-e1f2a3b4c5d6"
    redactor = Redactor(f"77|{inner}|andthelongestalphanumericrun")
    assert redactor.body(f'{{"conversation_id":"{inner}"}}'.encode()) == (
        f'{{"conversation_id":"{REDACTED}"}}'.encode()
    )
    # and a usual token passes over a UUID that merely shares a few of its characters
    plain = Redactor(LONG_TOKEN)
    body = f'{{"conversation_id":"{uuid.UUID(bytes=LONG_TOKEN[3:19].encode())}"}}'.encode()
    assert plain.body(body) is body


def test_tokens_of_one_alphabet_share_their_screens() -> None:
    """What every body is screened with depends on the token's alphabet only: 10,000 tokens
    of the service's shape share one set."""
    first = Redactor("1|" + "a" * 38)
    second = Redactor("2|" + "b" * 38)
    assert first._screens is second._screens
    assert Redactor("3-" + "c" * 38)._screens is not first._screens


#: What a response's headers and body are made of: the token's pieces, forms and neighbours.
_PIECES = st.sampled_from(
    [
        LONG_TOKEN,
        LONG_TOKEN[:16],
        LONG_TOKEN[-16:],
        LONG_TOKEN[3:18],
        LONG_TOKEN[::-1][:16],
        _b64(LONG_TOKEN),
        LONG_TOKEN.encode().hex()[:32],
        quote(LONG_TOKEN, safe=""),
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "Content-Type",
        "application/json",
        "Bearer ",
        "%41",
        "&amp;",
        "\\u0041",
        "|",
        "\n",
        " ",
        "x",
        "\x00",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=8), st.lists(_PIECES, max_size=8))
def test_headers_and_body_checked_together_are_each_clean(head: list[str], tail: list[str]) -> None:
    """The transport checks a reply's headers and body in one pass, joined by a line break:
    when that finds nothing, neither part on its own may show the token."""
    redactor = Redactor(LONG_TOKEN)
    headers, body = "".join(head).encode(), "".join(tail).encode()
    if redactor.clean(headers + b"\n" + body):
        assert redactor.clean(headers) and redactor.clean(body)
        assert not redactor._reveals(headers.decode()) and not redactor._reveals(body.decode())
