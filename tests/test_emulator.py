"""The emulator (autocalls_async.testing), driven by raw aiohttp, as a curl user would."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy

import autocalls_async.testing
from autocalls_async.testing import Fault, MockAutocalls, run_server, token_hash
from autocalls_async.testing._laravel import Throttle, bearer_token, clean, wants_json

pytest_plugins = ["autocalls_async.testing.pytest_plugin", "pytester"]

TOKEN = "YOUR_API_TOKEN"
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Content-Type": "application/json",
    "Accept": "application/json",
}
DOC_BODY: dict[str, Any] = {
    "assistant_id": 123,
    "customer_identifier": "+14155551234",
    "message": "Hi",
    "variables": {"customer_name": "John"},
}

Answer = tuple[int, CIMultiDictProxy[str], bytes]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def server() -> AsyncIterator[MockAutocalls]:
    async with MockAutocalls(rate_limit=None) as emulator:
        yield emulator


async def post(
    session: aiohttp.ClientSession,
    server: MockAutocalls,
    body: Any = DOC_BODY,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    **changes: str,
) -> Answer:
    """POST like the documented curl example; ``changes`` override single headers."""
    data = raw if raw is not None else json.dumps(body).encode()
    sent = {**(HEADERS if headers is None else headers), **changes}
    async with session.post(server.url, data=data, headers=sent) as response:
        return response.status, response.headers, await response.read()


def body_of(raw: bytes) -> Any:
    return json.loads(raw)


def with_(**changes: Any) -> dict[str, Any]:
    return {**DOC_BODY, **changes}


# -- the documented request ------------------------------------------------------------------


async def test_documented_request_gets_documented_success(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """The README's curl request gets the documented success body."""
    status, headers, raw = await post(session, server)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    body = body_of(raw)
    assert set(body) == {
        "success",
        "conversation_id",
        "customer_identifier",
        "reply",
        "function_calls",
        "ai_disabled",
    }
    assert body["success"] is True
    assert body["customer_identifier"] == "+14155551234"
    assert body["reply"] == "Hi John! Thanks for your message: Hi"
    assert body["function_calls"] == []
    assert body["ai_disabled"] is False
    assert len(body["conversation_id"]) == 36
    assert server.replies_served == 1
    assert server.url == server.base_url + "/ai/generate-reply"
    assert server.base_url == f"http://127.0.0.1:{server.port}/api"


async def test_conversation_persists_and_merges_variables(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """Same (assistant, customer) keeps its id, merges variables, keeps message order."""
    server.assistants.add(456)
    first = body_of((await post(session, server))[2])
    second_body = with_(message="  Again  ", variables={"customer_name": "Jane", "city": "Oslo"})
    second = body_of((await post(session, server, second_body))[2])
    third = body_of((await post(session, server, with_(variables=None, message="Third")))[2])
    other = body_of((await post(session, server, with_(customer_identifier="+1999")))[2])
    other_assistant = body_of((await post(session, server, with_(assistant_id=456)))[2])
    assert first["conversation_id"] == second["conversation_id"] == third["conversation_id"]
    assert other["conversation_id"] != first["conversation_id"]
    assert other_assistant["conversation_id"] not in (
        first["conversation_id"],
        other["conversation_id"],
    )
    assert second["reply"] == "Hi Jane! Thanks for your message: Again"
    assert third["reply"] == "Hi Jane! Thanks for your message: Third"
    conversation = server.conversations[(123, "+14155551234")]
    assert conversation is server.conversation(123, "+14155551234")
    assert conversation.variables == {"customer_name": "Jane", "city": "Oslo"}
    assert conversation.messages == ["Hi", "Again", "Third"]
    assert conversation.replies == [first["reply"], second["reply"], third["reply"]]
    assert server.conversation(123, "nobody") is None


async def test_customer_identifier_is_trimmed(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """TrimStrings: padded identifiers hit the same conversation and come back trimmed."""
    first = body_of((await post(session, server))[2])
    padded = body_of(
        (await post(session, server, with_(customer_identifier=" +14155551234\u200b")))[2]
    )
    assert padded["customer_identifier"] == "+14155551234"
    assert padded["conversation_id"] == first["conversation_id"]


async def test_booking_message_gets_a_function_call(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """A booking request yields a book_appointment call using the variables."""
    body = with_(message="Can I book an appointment?", variables={"appointment_date": "2030-01-02"})
    reply = body_of((await post(session, server, body))[2])
    assert reply["function_calls"] == [
        {
            "name": "book_appointment",
            "arguments": {"date": "2030-01-02", "customer_identifier": "+14155551234"},
        }
    ]
    assert "2030-01-02" in reply["reply"]
    anonymous = with_(customer_identifier="+1000", message="schedule please", variables=None)
    reply = body_of((await post(session, server, anonymous))[2])
    assert reply["reply"].startswith("Hi there!")
    assert len(reply["function_calls"][0]["arguments"]["date"]) == 10


async def test_custom_responder_and_json_escaping(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """A responder scripts replies; JSON is PHP-encoded (escaped slashes, ASCII)."""
    server.responder = lambda conversation, message: (f"é/{message}", [{"name": "x", "id": 1}])
    _, _, raw = await post(session, server)
    assert b'"reply":"\\u00e9\\/Hi"' in raw
    assert body_of(raw)["function_calls"] == [{"name": "x", "id": 1}]


async def test_disable_ai_records_message_without_reply(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """A human-handled conversation answers ai_disabled with a null reply and no charge."""
    server.balance = 1
    server.disable_ai(123, "+14155551234")
    body = body_of((await post(session, server))[2])
    assert body["ai_disabled"] is True
    assert body["reply"] is None
    assert server.replies_served == 0
    assert server.balance_remaining == 1
    server.enable_ai(123, "+14155551234")
    body = body_of((await post(session, server))[2])
    assert body["ai_disabled"] is False
    assert server.conversations[(123, "+14155551234")].replies == [None, body["reply"]]
    assert server.balance_remaining == 0


@pytest.mark.timing
async def test_reply_delay_is_observed(session: aiohttp.ClientSession) -> None:
    """reply_delay makes a successful reply take that long."""
    async with MockAutocalls(rate_limit=None, reply_delay=0.2) as server:
        started = time.monotonic()
        status, _, _ = await post(session, server)
        assert status == 200
        assert time.monotonic() - started >= 0.19


# -- auth, 404, 402 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz", "Token abc", "bearer"],
)
async def test_missing_or_malformed_token_is_401(
    server: MockAutocalls, session: aiohttp.ClientSession, authorization: str | None
) -> None:
    """No usable bearer token: 401 Unauthenticated, not counted, nothing processed."""
    headers = {k: v for k, v in HEADERS.items() if k != "Authorization"}
    if authorization is not None:
        headers["Authorization"] = authorization
    status, _, raw = await post(session, server, headers=headers)
    assert status == 401
    assert body_of(raw) == {"message": "Unauthenticated."}
    assert server.requests[-1].token_hash is None
    assert server.conversations == {}


async def test_wrong_token_is_401_when_tokens_are_given(session: aiohttp.ClientSession) -> None:
    """With `tokens`, only those tokens are accepted; only hashes are kept."""
    async with MockAutocalls(tokens={"good-token"}) as server:
        status, headers, raw = await post(session, server, Authorization="Bearer bad-token")
        assert (status, body_of(raw)) == (401, {"message": "Unauthenticated."})
        assert "X-RateLimit-Limit" not in headers
        status, _, _ = await post(session, server, Authorization="Bearer good-token")
        assert status == 200
        assert server.requests[-1].token_hash == token_hash("good-token")
        assert "good-token" not in repr(server.requests)
        assert "good-token" not in repr(vars(server))


def test_tokens_must_be_a_collection() -> None:
    """tokens="abc" is a mistake (a set of characters), refused early."""
    with pytest.raises(TypeError):
        MockAutocalls(tokens="abc")
    with pytest.raises(ValueError, match="window"):
        MockAutocalls(window="sliding")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc,def", "abc"),
        ("Basic x, Bearer abc", "abc"),
        ("Bearer ", None),
        ("", None),
        ("Basic abc", None),
    ],
)
def test_bearer_token_parsing_is_laravels(header: str, expected: str | None) -> None:
    """Request::bearerToken(): last case-insensitive 'Bearer ', cut at a comma."""
    assert bearer_token(header) == expected


async def test_unknown_assistant_is_404_json_always(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """Unknown assistant: the app's own JSON 404, even when HTML would be preferred."""
    for accept in ("application/json", "text/html"):
        status, headers, raw = await post(session, server, with_(assistant_id=999), Accept=accept)
        assert status == 404
        assert headers["Content-Type"] == "application/json"
        assert body_of(raw) == {
            "success": False,
            "error": "Assistant not found",
            "error_code": "ASSISTANT_NOT_FOUND",
        }
    assert server.count(404) == 2
    assert server.count(processed=True) == 0


async def test_balance_runs_out_with_402(session: aiohttp.ClientSession) -> None:
    """After `balance` replies, further requests get 402 INSUFFICIENT_BALANCE."""
    async with MockAutocalls(rate_limit=None, balance=2) as server:
        statuses = [(await post(session, server))[0] for _ in range(3)]
        assert statuses == [200, 200, 402]
        status, _, raw = await post(session, server)
        assert body_of(raw) == {
            "success": False,
            "error": "Insufficient balance",
            "error_code": "INSUFFICIENT_BALANCE",
        }
        assert (server.replies_served, server.balance_remaining) == (2, 0)
        assert server.conversations[(123, "+14155551234")].messages == ["Hi", "Hi"]
        server.balance = None
        assert server.balance_remaining is None
        assert (await post(session, server))[0] == 200


# -- validation ------------------------------------------------------------------------------

REQUIRED_ALL = {
    "assistant_id": ["The assistant id field is required."],
    "customer_identifier": ["The customer identifier field is required."],
    "message": ["The message field is required."],
}


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, REQUIRED_ALL),
        ([1, 2], REQUIRED_ALL),
        ("text", REQUIRED_ALL),
        (
            {"assistant_id": None, "customer_identifier": "  ", "message": [], "variables": ""},
            REQUIRED_ALL,
        ),
        (
            with_(assistant_id="123"),
            {"assistant_id": ["The assistant id field must be an integer."]},
        ),
        (
            with_(assistant_id=True),
            {"assistant_id": ["The assistant id field must be an integer."]},
        ),
        (with_(assistant_id=1.0), {"assistant_id": ["The assistant id field must be an integer."]}),
        (with_(assistant_id=0), {"assistant_id": ["The assistant id field must be at least 1."]}),
        (with_(assistant_id=-7), {"assistant_id": ["The assistant id field must be at least 1."]}),
        (
            with_(assistant_id=-1.5),
            {
                "assistant_id": [
                    "The assistant id field must be an integer.",
                    "The assistant id field must be at least 1.",
                ]
            },
        ),
        (
            with_(customer_identifier=14155551234),
            {"customer_identifier": ["The customer identifier field must be a string."]},
        ),
        (
            with_(customer_identifier="x" * 256),
            {
                "customer_identifier": [
                    "The customer identifier field must not be greater than 255 characters."
                ]
            },
        ),
        (
            with_(customer_identifier=["x"] * 300),
            {
                "customer_identifier": [
                    "The customer identifier field must be a string.",
                    "The customer identifier field must not be greater than 255 characters.",
                ]
            },
        ),
        (with_(message=" \t\n"), {"message": ["The message field is required."]}),
        (with_(message=42), {"message": ["The message field must be a string."]}),
        (with_(variables=["a"]), {"variables": ["The variables field must be an array."]}),
        (with_(variables="x"), {"variables": ["The variables field must be an array."]}),
    ],
)
async def test_validation_errors_are_laravels(
    server: MockAutocalls, session: aiohttp.ClientSession, body: Any, errors: dict[str, list[str]]
) -> None:
    """Each invalid input gets 422 with Laravel's errors bag and summary message."""
    status, headers, raw = await post(session, server, body)
    assert status == 422
    assert headers["Content-Type"] == "application/json"
    answer = body_of(raw)
    assert answer["errors"] == errors
    messages = [message for field in errors.values() for message in field]
    expected = messages[0]
    if len(messages) == 2:
        expected += " (and 1 more error)"
    elif len(messages) > 2:
        expected += f" (and {len(messages) - 1} more errors)"
    assert answer["message"] == expected
    assert set(answer) == {"message", "errors"}
    assert server.count(processed=True) == 0


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b'{"assistant_id": NaN}', "application/json"),
        (b"\xff\xfe", "application/json"),
        (json.dumps(DOC_BODY).encode(), "text/plain"),
    ],
)
async def test_unreadable_bodies_are_empty_input(
    server: MockAutocalls, session: aiohttp.ClientSession, raw: bytes, content_type: str
) -> None:
    """Invalid JSON or a non-JSON content type is an empty input: 422 'required' errors."""
    status, _, answer = await post(
        session, server, raw=raw, headers={**HEADERS, "Content-Type": content_type}
    )
    assert status == 422
    assert body_of(answer)["message"] == "The assistant id field is required. (and 2 more errors)"
    assert server.requests[-1].body is None


async def test_null_variables_and_json_suffix_content_type_are_accepted(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """variables is nullable; a +json content type is JSON; empty strings inside become null."""
    body = with_(variables={"customer_name": "  ", "a": [" b "]})
    headers = {**HEADERS, "Content-Type": "application/vnd+json"}
    status, _, _ = await post(session, server, body, headers=headers)
    assert status == 200
    assert server.conversations[(123, "+14155551234")].variables == {
        "customer_name": None,
        "a": ["b"],
    }
    assert (await post(session, server, with_(variables=None)))[0] == 200
    assert clean({"x": ["", " y "], "n": 1}) == {"x": [None, "y"], "n": 1}


async def test_body_over_one_mebibyte_gets_nginx_413(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """A body over nginx's default limit is refused by the 'proxy' before auth."""
    big = io.BytesIO(json.dumps(with_(message="x" * (1024 * 1024 + 1))).encode())
    async with session.post(server.url, data=big, headers=HEADERS) as response:
        status, headers, raw = response.status, response.headers, await response.read()
    assert status == 413
    assert headers["Content-Type"].startswith("text/html")
    assert b"413 Request Entity Too Large" in raw

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (512 * 1024)

    async with session.post(server.url, data=chunks(), headers=HEADERS) as response:
        assert response.status == 413


# -- content negotiation and routes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "xhr", "expected"),
    [
        ("application/json", False, True),
        ("application/problem+json", False, True),
        ("*/*", False, False),
        ("", False, False),
        ("text/html, application/json", False, False),
        ("text/html;q=0.5, application/json", False, True),
        ("text/html;q=bad, application/json", False, True),
        ("application/json; charset=utf-8", False, True),
        ("*/*", True, True),
        ("", True, True),
        ("text/html", True, False),
    ],
)
def test_wants_json_is_laravels(accept: str, xhr: bool, expected: bool) -> None:
    """Only the most preferred Accept type decides; an XHR accepting anything gets JSON."""
    headers = {"Accept": accept}
    if xhr:
        headers["X-Requested-With"] = "XMLHttpRequest"
    assert wants_json(headers) is expected


async def test_framework_errors_are_html_without_accept_json(
    session: aiohttp.ClientSession,
) -> None:
    """401, 422 and 429 are HTML pages when the client does not ask for JSON."""
    async with MockAutocalls(rate_limit=(1, 60.0)) as server:
        cases = [
            (401, "Unauthorized", {"Authorization": ""}),
            (422, "Unprocessable", {}),
            (429, "Too Many Requests", {}),
        ]
        for expected, title, changes in cases:
            sent = {**HEADERS, "Accept": "*/*", **changes}
            status, headers, raw = await post(session, server, {"message": "x"}, headers=sent)
            assert status == expected
            assert headers["Content-Type"] == "text/html; charset=UTF-8"
            assert f"<title>{title}".encode() in raw
            assert f"{expected} | ".encode() in raw
        assert headers["Retry-After"].isdigit()


async def test_unknown_route_and_wrong_method_get_laravel_messages(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """Unknown routes: 404 'could not be found'; GET on the endpoint: 405 naming POST."""
    async with session.get(server.url, headers=HEADERS) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert await response.json() == {
            "message": "The GET method is not supported for route api/ai/generate-reply. "
            "Supported methods: POST."
        }
    async with session.post(server.base_url + "/nope", headers=HEADERS) as response:
        assert response.status == 404
        assert await response.json() == {"message": "The route api/nope could not be found."}
    async with session.get(server.base_url + "/nope") as response:
        assert response.status == 404
        assert response.content_type == "text/html"
    assert server.requests == []


# -- throttle --------------------------------------------------------------------------------


@pytest.mark.timing
async def test_rolling_limit_in_real_time(session: aiohttp.ClientSession) -> None:
    """5 per 1.5 s (scaled): the 6th gets a full 429; once the window rolls on it passes."""
    async with MockAutocalls(rate_limit=(5, 1.5)) as server:
        remaining = []
        for _ in range(5):
            status, headers, _ = await post(session, server)
            assert status == 200
            assert headers["X-RateLimit-Limit"] == "5"
            remaining.append(headers["X-RateLimit-Remaining"])
        assert remaining == ["4", "3", "2", "1", "0"]
        before = int(time.time())
        status, headers, raw = await post(session, server)
        assert status == 429
        assert body_of(raw) == {"message": "Too Many Attempts."}
        assert headers["Retry-After"] in ("1", "2")
        assert headers["X-RateLimit-Limit"] == "5"
        assert headers["X-RateLimit-Remaining"] == "0"
        assert before + 1 <= int(headers["X-RateLimit-Reset"]) <= int(time.time()) + 2
        assert server.requests[-1].counted is False
        await asyncio.sleep(server.requests[0].time + 1.5 - time.monotonic() + 0.05)
        assert (await post(session, server))[0] == 200


async def test_rolling_window_boundaries(session: aiohttp.ClientSession) -> None:
    """Rolling: at most N arrivals in (now - period, now]; Retry-After counts to the oldest."""
    clock = FakeClock()
    async with MockAutocalls(rate_limit=(2, 10.0), clock=clock) as server:
        timeline = [(0.0, 200), (5.0, 200), (9.0, 429), (10.0, 200), (12.0, 429), (15.0, 200)]
        for at, expected in timeline:
            clock.now = 1000.0 + at
            status, headers, _ = await post(session, server)
            assert (at, status) == (at, expected)
        clock.now = 1016.0
        status, headers, _ = await post(session, server)
        assert status == 429
        assert headers["Retry-After"] == "4"  # the arrival at 10 frees at 20
        assert server.requests[0].time == 1000.0


@pytest.mark.timing
async def test_fixed_window_is_laravels(session: aiohttp.ClientSession) -> None:
    """Fixed: a window opens at the first hit; a burst at a window edge is allowed."""
    clock = FakeClock()
    async with MockAutocalls(rate_limit=(2, 10.0), window="fixed", clock=clock) as server:
        timeline = [(0.0, 200), (5.0, 200), (9.0, 429), (10.0, 200), (11.0, 200), (12.0, 429)]
        for at, expected in timeline:
            clock.now = 1000.0 + at
            status, headers, _ = await post(session, server)
            assert (at, status) == (at, expected)
        assert headers["Retry-After"] == "8"
        assert int(headers["X-RateLimit-Reset"]) >= int(time.time()) + 7
        assert server.rate_limit == (2, 10.0)


async def test_throttle_counts_failed_requests_per_token(session: aiohttp.ClientSession) -> None:
    """422 and 404 count, 401 does not, and each token has its own window."""
    clock = FakeClock()
    async with MockAutocalls(rate_limit=(2, 10.0), clock=clock) as server:
        status, headers, _ = await post(session, server, {})
        assert (status, headers["X-RateLimit-Remaining"]) == (422, "1")
        status, headers, _ = await post(session, server, with_(assistant_id=5))
        assert (status, headers["X-RateLimit-Remaining"]) == (404, "0")
        assert (await post(session, server, Authorization="Basic x"))[0] == 401
        assert (await post(session, server))[0] == 429
        assert (await post(session, server, Authorization="Bearer other"))[0] == 200
        assert [r.counted for r in server.requests] == [True, True, False, False, True]


def test_throttle_rejects_bad_settings() -> None:
    """A zero rate or period is a configuration error."""
    with pytest.raises(ValueError):
        Throttle(0, 1.0, "rolling", time.monotonic)
    with pytest.raises(ValueError):
        Throttle(1, 0.0, "fixed", time.monotonic)
    with pytest.raises(ValueError):
        Throttle(1, 1.0, "sliding", time.monotonic)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
# Found in CI: floating point put a wait 1e-13 s past the period ((a + 5) - now).
@example(
    1,
    [
        1.2729669251351705,
        2.5,
        2.035975201539121,
        *[2.7464877763771574] * 3,
        2.99999,
        2.3681280795888564,
        0.0,
    ],
    "rolling",
)
@given(
    st.integers(1, 5),
    st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=40),
    st.sampled_from(["rolling", "fixed"]),
)
def test_throttle_never_allows_more_than_rate(
    requests: int, gaps: list[float], window: Any
) -> None:
    """Rolling: never more than N allowed in any period; fixed: never more than 2N."""
    clock = FakeClock()
    throttle = Throttle(requests, 5.0, window, clock)
    allowed: list[float] = []
    for gap in gaps:
        clock.now += gap
        decision = throttle.hit("key")
        if decision.allowed:
            allowed.append(clock.now)
        else:
            assert 0.0 < decision.retry_after <= 5.0
    bound = requests if window == "rolling" else 2 * requests
    for start in allowed:
        assert sum(1 for t in allowed if start <= t < start + 5.0) <= bound


# -- faults ----------------------------------------------------------------------------------


async def test_status_fault_before_processing(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """A 503 (maintenance) answers before the app: not counted, not processed; FIFO."""
    async with MockAutocalls() as limited:
        limited.inject(Fault.status(503, headers={"Retry-After": "7"}))
        status, headers, raw = await post(session, limited)
        assert (status, body_of(raw)) == (503, {"message": "Service Unavailable"})
        assert headers["Retry-After"] == "7"
        assert "X-RateLimit-Remaining" not in headers
        record = limited.requests[0]
        assert (record.counted, record.processed) == (False, False)
        assert record.fault == Fault.status(503, headers={"Retry-After": "7"})
        assert record.body == DOC_BODY
        assert limited.conversations == {}
        status, headers, _ = await post(session, limited)
        assert (status, headers["X-RateLimit-Remaining"]) == (200, "4")


async def test_status_fault_after_processing(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """A processed 500 appended the message and charged, then failed: unsafe to retry."""
    server.balance = 5
    server.inject(Fault.status(500, processed=True))
    status, _, raw = await post(session, server)
    assert (status, body_of(raw)) == (500, {"message": "Server Error"})
    assert server.conversations[(123, "+14155551234")].messages == ["Hi"]
    assert server.replies_served == 1
    assert server.balance_remaining == 4
    record = server.requests[0]
    assert (record.status, record.processed, record.fault) == (
        500,
        True,
        Fault.status(500, processed=True),
    )
    server.inject(Fault.status(500, processed=True))
    status, _, _ = await post(session, server, {})
    assert status == 500
    assert server.requests[-1].processed is False  # the request was invalid: nothing done


async def test_status_fault_bodies(server: MockAutocalls, session: aiohttp.ClientSession) -> None:
    """502/504 default to nginx pages, 500 follows Accept, custom bodies are JSON."""
    server.inject(Fault.status(502))
    server.inject(Fault.status(504))
    server.inject(Fault.status(500))
    server.inject(Fault.status(200, body={"success": False, "error": "x", "error_code": "NEW"}))
    server.inject(Fault.status(599))
    status, headers, raw = await post(session, server)
    assert (status, headers["Content-Type"]) == (502, "text/html; charset=UTF-8")
    assert b"<center><h1>502 Bad Gateway</h1></center>" in raw
    status, _, raw = await post(session, server)
    assert (status, b"504 Gateway Time-out" in raw) == (504, True)
    status, headers, raw = await post(session, server, Accept="text/html")
    assert (status, headers["Content-Type"]) == (500, "text/html; charset=UTF-8")
    assert b"<title>Server Error</title>" in raw
    status, _, raw = await post(session, server)
    assert (status, body_of(raw)["error_code"]) == (200, "NEW")
    status, _, raw = await post(session, server)
    assert (status, body_of(raw)) == (599, {"message": "Error"})
    with pytest.raises(ValueError):
        Fault.status(101)


@pytest.mark.timing
async def test_rate_limited_fault_looks_like_the_throttle(
    session: aiohttp.ClientSession,
) -> None:
    """Fault.rate_limited gives the throttle's 429 headers and body, and is not counted."""
    async with MockAutocalls(rate_limit=(3, 60.0)) as server:
        server.inject(Fault.rate_limited(retry_after=3))
        status, headers, raw = await post(session, server)
        assert (status, body_of(raw)) == (429, {"message": "Too Many Attempts."})
        assert headers["Retry-After"] == "3"
        assert headers["X-RateLimit-Limit"] == "3"
        assert headers["X-RateLimit-Remaining"] == "0"
        assert int(headers["X-RateLimit-Reset"]) >= int(time.time()) + 2
        status, headers, _ = await post(session, server)
        assert (status, headers["X-RateLimit-Remaining"]) == (200, "2")
    async with MockAutocalls(rate_limit=None) as server:
        server.inject(Fault.rate_limited(retry_after=0))
        status, headers, _ = await post(session, server)
        assert (status, headers["Retry-After"], headers["X-RateLimit-Limit"]) == (429, "1", "5")
    with pytest.raises(ValueError):
        Fault.rate_limited(-1)


async def test_html_fault(server: MockAutocalls, session: aiohttp.ClientSession) -> None:
    """Fault.html is a proxy's page with text/html, even to a JSON client."""
    server.inject(Fault.html())
    server.inject(Fault.html(504, processed=True))
    status, headers, raw = await post(session, server)
    assert (status, headers["Content-Type"]) == (502, "text/html; charset=UTF-8")
    assert raw.startswith(b"<html>\r\n<head><title>502 Bad Gateway</title>")
    assert server.count(processed=True) == 0
    status, _, raw = await post(session, server)
    assert status == 504
    assert server.count(processed=True) == 1


async def test_malformed_json_fault(server: MockAutocalls, session: aiohttp.ClientSession) -> None:
    """A truncated JSON body labelled application/json; a 2xx one was processed."""
    server.inject(Fault.malformed_json())
    server.inject(Fault.malformed_json(500))
    for expected_status, expected_processed in ((200, True), (500, False)):
        status, headers, raw = await post(session, server)
        assert status == expected_status
        assert headers["Content-Type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw)
        assert server.requests[-1].processed is expected_processed


@pytest.mark.timing
async def test_slow_fault_is_processed_before_the_delay(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """Fault.slow: the message is handled at once, the answer comes late (timeouts unsafe)."""
    server.inject(Fault.slow(0.3))
    started = time.monotonic()
    status, _, raw = await post(session, server)
    assert status == 200
    assert time.monotonic() - started >= 0.29
    assert body_of(raw)["reply"] == "Hi John! Thanks for your message: Hi"
    server.inject(Fault.slow(0.5))
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            server.url, json=DOC_BODY, headers=HEADERS, timeout=aiohttp.ClientTimeout(total=0.1)
        ):
            pass
    assert server.conversations[(123, "+14155551234")].messages == ["Hi", "Hi"]
    assert server.requests[-1].processed is True
    with pytest.raises(ValueError):
        Fault.slow(-1)


@pytest.mark.parametrize("processed", [False, True])
async def test_drop_fault_disconnects(
    server: MockAutocalls,
    session: aiohttp.ClientSession,
    processed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fault.drop closes the connection with no response, before or after processing."""
    await post(session, server)  # a kept-alive connection, reused for the dropped request
    server.inject(Fault.drop(processed=processed))
    with (
        caplog.at_level(logging.DEBUG, logger="aiohttp"),
        pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)),
    ):
        await post(session, server)
    record = server.requests[-1]
    assert (record.status, record.processed, record.counted) == (None, processed, False)
    assert len(server.conversations[(123, "+14155551234")].messages) == 1 + processed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (await post(session, server))[0] == 200


async def test_body_fault_and_queue_order(
    server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """Fault.body sends anything; faults queue FIFO, `times` repeats, 401s consume none."""
    server.inject(
        Fault.body(418, b"<teapot/>", "application/xml", headers={"X-Test": "1"}), times=2
    )
    server.inject(Fault.status(503))
    assert (await post(session, server, Authorization=""))[0] == 401
    assert len(server.pending_faults) == 3
    statuses = []
    for _ in range(4):
        status, headers, raw = await post(session, server)
        statuses.append(status)
    assert statuses == [418, 418, 503, 200]
    assert [r.fault is not None for r in server.requests] == [False, True, True, True, False]
    server.inject(Fault.body(418, b"x", "text/plain"))
    status, headers, raw = await post(session, server)
    assert (status, headers["Content-Type"], raw) == (418, "text/plain", b"x")
    with pytest.raises(ValueError):
        server.inject(Fault.drop(), times=-1)


async def test_random_faults_are_reproducible_with_a_seed(session: aiohttp.ClientSession) -> None:
    """Same seed, same requests: the same faults; {} stops them."""
    rates = {Fault.status(503): 0.3, Fault.status(500, processed=True): 0.2}
    runs = []
    for _ in range(2):
        async with MockAutocalls(rate_limit=None) as server:
            server.set_random_faults(rates, seed=1234)
            assert server.fault_rates == rates
            runs.append([(await post(session, server))[0] for _ in range(25)])
            server.fault_rates = {}
            assert {(await post(session, server))[0] for _ in range(5)} == {200}
    assert runs[0] == runs[1]
    assert {200, 500, 503} <= set(runs[0])
    assert server.count(status=500) == runs[0].count(500)
    with pytest.raises(ValueError):
        server.set_random_faults({Fault.drop(): 0.7, Fault.html(): 0.5})
    with pytest.raises(ValueError):
        server.fault_rates = {Fault.drop(): -0.1}
    server.fault_rates = {Fault.drop(): 0.1, Fault.html(): 0.2, Fault.slow(1): 0.7}


def test_faults_are_hashable_values() -> None:
    """Equal faults hash equal, so they can key fault_rates."""
    assert hash(Fault.status(503, headers={"A": "1"})) == hash(
        Fault.status(503, headers={"A": "1"})
    )
    assert Fault.drop() != Fault.drop(processed=True)
    assert len({Fault.html(), Fault.html(), Fault.slow(1)}) == 2


# -- lifecycle, inspection, fixture ----------------------------------------------------------


async def test_count_and_reset(session: aiohttp.ClientSession) -> None:
    """count() filters records; reset() forgets everything but the configuration."""
    async with MockAutocalls(rate_limit=(2, 60.0)) as server:
        await post(session, server)
        await post(session, server, {})
        assert (await post(session, server))[0] == 429
        server.inject(Fault.drop())
        server.set_random_faults({Fault.status(503): 0.5}, seed=1)
        counts = (
            server.count(),
            server.count(200),
            server.count(422),
            server.count(processed=True),
        )
        assert counts == (3, 1, 1, 1)
        server.reset()
        assert (server.requests, server.conversations, server.replies_served) == ([], {}, 0)
        assert server.fault_rates == {}
        assert (await post(session, server))[0] == 200
        assert server.rate_limit == (2, 60.0)


async def test_lifecycle_without_async_with(session: aiohttp.ClientSession) -> None:
    """start()/close() work without `async with`; misuse is reported clearly."""
    server = MockAutocalls()
    assert server.port == 0
    with pytest.raises(RuntimeError):
        _ = server.base_url
    assert isinstance(server.app, web.Application)
    await server.start()
    try:
        with pytest.raises(RuntimeError):
            await server.start()
        assert server.port > 0
        assert (await post(session, server))[0] == 200
    finally:
        await server.close()
    await server.close()
    taken = MockAutocalls(port=server.port)
    async with MockAutocalls() as busy:
        with pytest.raises(OSError):
            await MockAutocalls(port=busy.port).start()
    assert taken.port == server.port


async def test_ipv6_base_url(session: aiohttp.ClientSession) -> None:
    """An IPv6 host is bracketed in base_url."""
    try:
        server = MockAutocalls(host="::1")
        await server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.base_url == f"http://[::1]:{server.port}/api"
        assert (await post(session, server))[0] == 200
    finally:
        await server.close()


async def test_run_server_serves_until_cancelled(session: aiohttp.ClientSession) -> None:
    """run_server reports the bound server, serves, and closes on cancellation."""
    ready: asyncio.Future[MockAutocalls] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_server("127.0.0.1", 0, ready=ready.set_result, balance=1))
    server = await asyncio.wait_for(ready, 5)
    assert (await post(session, server))[0] == 200
    assert (await post(session, server))[0] == 402
    url = server.url
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        await session.post(url, json=DOC_BODY, headers=HEADERS)


async def test_pytest_fixture(
    autocalls_server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """The plugin's fixture yields a started, unlimited emulator."""
    assert autocalls_server.rate_limit is None
    for _ in range(8):
        assert (await post(session, autocalls_server))[0] == 200


@pytest.mark.parametrize(
    "autocalls_server", [{"rate_limit": (1, 60.0), "assistants": (7,)}], indirect=True
)
async def test_pytest_fixture_indirect_options(
    autocalls_server: MockAutocalls, session: aiohttp.ClientSession
) -> None:
    """Indirect parametrization passes options to the fixture."""
    assert (await post(session, autocalls_server, with_(assistant_id=7)))[0] == 200
    assert (await post(session, autocalls_server, with_(assistant_id=7)))[0] == 429


async def test_pytest_fixture_reads_the_marker(request: pytest.FixtureRequest) -> None:
    """The fixture's options: defaults, then the marker's, then an indirect parameter."""
    from autocalls_async.testing.pytest_plugin import server_options

    request.node.add_marker(pytest.mark.autocalls_server(balance=3, rate_limit=(1, 1.0)))
    assert server_options(request) == {"rate_limit": (1, 1.0), "balance": 3}


def test_pytest_plugin_from_a_conftest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded from a user's conftest.py, the plugin's fixture and marker work."""
    monkeypatch.setenv("PYTHONPATH", str(Path(autocalls_async.testing.__file__).parents[2]))
    pytester.makeconftest('pytest_plugins = ["autocalls_async.testing.pytest_plugin"]')
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.autocalls_server(balance=0)
        async def test_marker(autocalls_server):
            assert autocalls_server.balance == 0
            assert autocalls_server.rate_limit is None
            assert autocalls_server.base_url.startswith("http://127.0.0.1:")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--strict-markers",
        "-W",
        "error",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=1)
