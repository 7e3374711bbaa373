"""AsyncAutocalls against the emulator on a loopback port: every error, every retry case, with
the exact number of requests the server saw."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls, RateLimit, Reply, RetryPolicy
from autocalls_async.testing import Fault, MockAutocalls

Make = Callable[..., AsyncAutocalls]
CUSTOMER = "+14155551234"


async def ask(client: AsyncAutocalls, **overrides: Any) -> Reply:
    arguments: dict[str, Any] = {
        "assistant_id": 123,
        "customer_identifier": CUSTOMER,
        "message": "Hi",
        "variables": {"customer_name": "John"},
    }
    arguments.update(overrides)
    return await client.generate_reply(**arguments)


async def test_seed_request_and_reply(server: MockAutocalls, make_client: Make) -> None:
    """The seed's documented request gets the documented reply, typed, and is cached."""
    client = make_client(server.base_url)
    reply = await ask(client)
    assert reply.customer_identifier == CUSTOMER
    assert reply.reply == "Hi John! Thanks for your message: Hi"
    assert reply.function_calls == ()
    assert reply.ai_disabled is False
    assert client.conversation_id(123, CUSTOMER) == reply.conversation_id
    conversation = client.conversation(123, CUSTOMER)
    assert conversation is not None and conversation.ai_disabled is False
    assert client.conversation_id(123, "nobody") is None
    assert client.conversation_id(123, f" {CUSTOMER}\u200b") == reply.conversation_id  # trimmed
    (record,) = server.requests
    assert record.body == {
        "assistant_id": 123,
        "customer_identifier": CUSTOMER,
        "message": "Hi",
        "variables": {"customer_name": "John"},
    }
    again = await ask(client, message="Book an appointment please", variables={"x": 1})
    assert again.conversation_id == reply.conversation_id
    assert again.function_calls and again.function_calls[0].name == "book_appointment"
    assert server.conversations[(123, CUSTOMER)].variables == {"customer_name": "John", "x": 1}
    assert client.stats.requests == 2 and client.stats.replies == 2


async def test_headers_identify_the_sdk(make_client: Make) -> None:
    """Accept: application/json, the bearer token and a versioned User-Agent are sent."""
    seen: dict[str, str] = {}

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.update(request.headers)
        return aiohttp.web.json_response(
            {"success": True, "conversation_id": "c", "customer_identifier": CUSTOMER, "reply": "r"}
        )

    app = aiohttp.web.Application()
    app.router.add_post("/api/ai/generate-reply", handler)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = make_client(f"http://127.0.0.1:{port}/api/", api_token="sk-secret")
        await ask(client)
    finally:
        await runner.cleanup()
    assert seen["Accept"] == "application/json"
    assert seen["Authorization"] == "Bearer sk-secret"
    assert seen["User-Agent"].startswith(f"autocalls-async/{sdk.__version__} ")


# ---------------------------------------------------------------- errors: one request each


@pytest.mark.parametrize(
    ("fault", "error", "status", "code"),
    [
        (Fault.status(403), sdk.PermissionDeniedError, 403, None),
        (
            Fault.body(
                422,
                b'{"message":"The message field is required.","errors":{"message":["The message field is required."]}}',
                "application/json",
            ),
            sdk.UnprocessableEntityError,
            422,
            None,
        ),
        (Fault.status(500, processed=True), sdk.InternalServerError, 500, None),
        (Fault.status(502), sdk.InternalServerError, 502, None),
        (Fault.status(504), sdk.InternalServerError, 504, None),
        (Fault.html(502), sdk.InternalServerError, 502, None),
        (Fault.malformed_json(), sdk.APIResponseValidationError, 200, None),
        (
            Fault.body(
                200, b'{"success":false,"error":"Locked","error_code":"LOCKED"}', "application/json"
            ),
            sdk.APIError,
            200,
            "LOCKED",
        ),
        (
            Fault.body(302, b"", "text/html", headers={"Location": "https://elsewhere.example/x"}),
            sdk.APIError,
            302,
            None,
        ),
    ],
    ids=["403", "422", "500", "502", "504", "502-html", "bad-json", "success-false", "redirect"],
)
async def test_errors_that_are_not_retried(
    server: MockAutocalls,
    make_client: Make,
    fault: Fault,
    error: type[sdk.APIError],
    status: int,
    code: str | None,
) -> None:
    """Each answer maps to its typed error after exactly one request."""
    server.inject(fault, times=5)
    client = make_client(server.base_url)
    with pytest.raises(error) as caught:
        await ask(client)
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.error_code == code
    assert len(server.requests) == 1
    assert client.stats.requests == 1 and client.stats.errors == 1


async def test_documented_errors_of_the_service(server: MockAutocalls, make_client: Make) -> None:
    """401, 404 ASSISTANT_NOT_FOUND and 402 INSUFFICIENT_BALANCE, one request each."""
    async with MockAutocalls(rate_limit=None, tokens={"good"}, balance=1) as strict:
        bad = make_client(strict.base_url, api_token="bad")
        with pytest.raises(sdk.AuthenticationError, match="Unauthenticated"):
            await ask(bad)
        good = make_client(strict.base_url, api_token="good")
        with pytest.raises(sdk.AssistantNotFoundError) as caught:
            await ask(good, assistant_id=999)
        assert isinstance(caught.value, sdk.NotFoundError)
        assert caught.value.error_code == "ASSISTANT_NOT_FOUND"
        await ask(good)
        with pytest.raises(sdk.InsufficientBalanceError) as no_money:
            await ask(good)
        assert no_money.value.status == 402
        assert len(strict.requests) == 4


async def test_ai_disabled_conversation(server: MockAutocalls, make_client: Make) -> None:
    """A human took over: ai_disabled is true, the reply is empty, the cache remembers it."""
    client = make_client(server.base_url)
    await ask(client)
    server.disable_ai(123, CUSTOMER)
    reply = await ask(client, message="Still there?")
    assert reply.ai_disabled is True and reply.reply == ""
    conversation = client.conversation(123, CUSTOMER)
    assert conversation is not None and conversation.ai_disabled is True


# ---------------------------------------------------------------- retries: exact counts


async def test_503_is_retried_then_succeeds(server: MockAutocalls, make_client: Make) -> None:
    """A 503 before processing is safe: retried, answered once."""
    server.inject(Fault.status(503), times=2)
    client = make_client(server.base_url)
    await ask(client)
    assert len(server.requests) == 3
    assert len(server.conversations[(123, CUSTOMER)].messages) == 1
    assert client.stats.retries == 2


async def test_503_exhausts_retries(server: MockAutocalls, make_client: Make) -> None:
    """max_retries=2 means three requests, then the 503 is raised."""
    server.inject(Fault.status(503, headers={"Retry-After": "0"}), times=3)
    client = make_client(server.base_url)
    with pytest.raises(sdk.InternalServerError) as caught:
        await ask(client)
    assert caught.value.status == 503
    assert len(server.requests) == 3


@pytest.mark.timing
async def test_429_is_retried_after_retry_after_and_pauses_everyone(
    server: MockAutocalls, make_client: Make
) -> None:
    """A 429 pauses every call on the token for Retry-After, then the call is retried."""
    server.inject(Fault.rate_limited(retry_after=1))
    client = make_client(server.base_url, rate_limit=RateLimit(50, 1.0))
    first = asyncio.create_task(ask(client))
    await asyncio.sleep(0.05)
    others = [ask(client, customer_identifier=f"other-{i}") for i in range(3)]
    await asyncio.gather(first, *others)
    assert client.stats.rate_limited == 1 and client.stats.retries == 1
    (limited,) = [r for r in server.requests if r.status == 429]
    after = [r.time for r in server.requests if r.time > limited.time]
    assert len(after) == 4
    assert min(after) - limited.time >= 0.95  # nobody went before Retry-After had passed


async def test_429_after_retries_raises_rate_limit_error(
    server: MockAutocalls, make_client: Make
) -> None:
    """Three 429s: three requests, RateLimitError with retry_after."""
    server.inject(Fault.rate_limited(retry_after=1), times=3)
    client = make_client(server.base_url, retry_policy=RetryPolicy(max_retries=2))
    with pytest.raises(sdk.RateLimitError) as caught:
        await ask(client, max_wait=None)
    assert caught.value.retry_after == 1.0
    assert len(server.requests) == 3
    assert client.stats.rate_limited == 3


@pytest.mark.timing
async def test_429_longer_than_max_wait_is_raised_at_once(
    server: MockAutocalls, make_client: Make
) -> None:
    """With max_wait shorter than Retry-After, the 429 is raised without waiting."""
    server.inject(Fault.rate_limited(retry_after=30))
    client = make_client(server.base_url)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(sdk.RateLimitError):
        await ask(client, max_wait=2)
    assert loop.time() - began < 1.5
    assert len(server.requests) == 1


@pytest.mark.parametrize("fault", [Fault.status(500, processed=True), Fault.drop(processed=True)])
async def test_unsafe_failures_are_retried_only_on_opt_in(
    server: MockAutocalls, make_client: Make, fault: Fault
) -> None:
    """retry_unsafe=True retries a 500 or a dropped connection; the message is then sent twice."""
    server.inject(fault)
    client = make_client(
        server.base_url, retry_policy=RetryPolicy(retry_unsafe=True, backoff_base=0.01)
    )
    await ask(client)
    assert len(server.requests) == 2
    assert server.conversations[(123, CUSTOMER)].messages == ["Hi", "Hi"]


async def test_dropped_connection_is_not_retried(server: MockAutocalls, make_client: Make) -> None:
    """A connection dropped after the request was written may have been processed."""
    server.inject(Fault.drop(processed=True))
    client = make_client(server.base_url)
    with pytest.raises(sdk.APIConnectionError) as caught:
        await ask(client)
    assert caught.value.sent is True
    assert not isinstance(caught.value, sdk.APITimeoutError)
    assert len(server.requests) == 1
    assert caught.value.__cause__ is None  # aiohttp's exception is named, not kept
    assert "ServerDisconnectedError" in str(caught.value)


async def test_read_timeout_is_not_retried(server: MockAutocalls, make_client: Make) -> None:
    """A reply slower than `timeout` raises APITimeoutError (also a TimeoutError), sent once."""
    server.inject(Fault.slow(1.0))
    client = make_client(server.base_url, timeout=0.2)
    with pytest.raises(sdk.APITimeoutError) as caught:
        await ask(client)
    assert isinstance(caught.value, TimeoutError) and caught.value.sent
    assert len(server.requests) == 1


async def test_connection_refused_is_retried(make_client: Make) -> None:
    """Nothing listening: nothing was sent, so every attempt is made, then APIConnectionError."""
    async with MockAutocalls(rate_limit=None) as gone:
        url = gone.base_url
    client = make_client(url)
    with pytest.raises(sdk.APIConnectionError) as caught:
        await ask(client)
    assert caught.value.sent is False
    assert client.stats.requests == 3 and client.stats.retries == 2


async def test_oversized_body_is_refused_unread(server: MockAutocalls, make_client: Make) -> None:
    """A body past max_response_size is refused, declared or streamed."""
    server.inject(Fault.body(200, b"x" * 50_000, "application/json"))
    client = make_client(server.base_url, max_response_size=10_000)
    with pytest.raises(sdk.APIResponseValidationError, match="max_response_size"):
        await ask(client)


# ---------------------------------------------------------------- input and security


BAD_CALLS: list[dict[str, Any]] = [
    {"assistant_id": "123"},
    {"assistant_id": True},
    {"assistant_id": 0},
    {"assistant_id": -1},
    {"customer_identifier": ""},
    {"customer_identifier": "x" * 256},
    {"customer_identifier": None},
    {"message": ""},
    {"message": "   "},
    {"message": None},
    {"variables": ["not", "an", "object"]},
    {"variables": {"score": float("nan")}},
    {"variables": {"when": object()}},
]


@pytest.mark.parametrize("change", BAD_CALLS)
async def test_bad_input_sends_nothing(
    server: MockAutocalls, make_client: Make, change: dict[str, Any]
) -> None:
    """Invalid arguments raise InvalidRequestError before anything is sent."""
    client = make_client(server.base_url)
    with pytest.raises(sdk.InvalidRequestError):
        await ask(client, **change)
    assert server.requests == []
    assert client.stats.requests == 0


async def test_token_never_shows(
    server: MockAutocalls, make_client: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """The token is absent from repr, exceptions and DEBUG logs."""
    secret = "sk-live-SUPERSECRET-0123456789"
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    client = make_client(server.base_url, api_token=secret)
    await ask(client)
    server.inject(Fault.status(503), times=1)
    server.inject(Fault.status(500, processed=True))
    errors: list[BaseException] = []
    try:
        await ask(client)
    except sdk.APIError as exc:
        errors.append(exc)
    with pytest.raises(sdk.InvalidRequestError) as bad:
        AsyncAutocalls(secret + "\n\nX: y", base_url=server.base_url)
    errors.append(bad.value)
    assert len(errors) == 2
    texts = [repr(client), caplog.text] + [f"{e!s} {e!r} {e.__dict__}" for e in errors]
    assert "retrying" in caplog.text and "POST /api/ai/generate-reply -> 200" in caplog.text
    for text in texts:
        assert secret not in text
        assert "SUPERSECRET" not in text


def test_http_to_a_remote_host_is_refused() -> None:
    """The token would travel in clear text: refused at construction."""
    with pytest.raises(sdk.InvalidRequestError, match="https"):
        AsyncAutocalls("t", base_url="http://app.autocalls.ai/api")


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token and base URL come from the environment; a missing token is a clear error."""
    with pytest.raises(sdk.InvalidRequestError, match="AUTOCALLS_API_TOKEN"):
        AsyncAutocalls()
    monkeypatch.setenv("AUTOCALLS_API_TOKEN", "env-token")
    monkeypatch.setenv("AUTOCALLS_BASE_URL", "http://127.0.0.1:9/api")
    client = AsyncAutocalls()
    assert str(client.base_url) == "http://127.0.0.1:9/api"
    assert "env-token" not in repr(client)
    assert str(AsyncAutocalls("t").base_url) == "http://127.0.0.1:9/api"
    monkeypatch.delenv("AUTOCALLS_BASE_URL")
    assert str(AsyncAutocalls("t").base_url) == "https://app.autocalls.ai/api"


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"rate_limit": (5, 60)}, "RateLimit"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"max_wait": -1}, "max_wait"),
        ({"session": object()}, "ClientSession"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], pattern: str) -> None:
    """Constructor options are checked at once, with the option named."""
    with pytest.raises(sdk.InvalidRequestError, match=pattern):
        AsyncAutocalls("t", **options)


def test_env_log_switch_adds_one_stderr_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTOCALLS_LOG=debug turns on a stderr handler, once."""
    logger = logging.getLogger("autocalls_async")
    before = list(logger.handlers)
    monkeypatch.setenv("AUTOCALLS_LOG", "debug")
    try:
        AsyncAutocalls("t")
        AsyncAutocalls("t")
        added = [h for h in logger.handlers if h not in before]
        assert len(added) == 1 and logger.level == logging.DEBUG
    finally:
        for handler in logger.handlers[:]:
            if handler not in before:
                logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


# ---------------------------------------------------------------- lifecycle


async def test_close_fails_waiters_and_lets_in_flight_calls_finish(
    server: MockAutocalls, make_client: Make
) -> None:
    """Graceful close: the sent call returns, the waiting ones raise ClientClosedError."""
    server.reply_delay = 0.3
    client = make_client(server.base_url, rate_limit=RateLimit(1, 5.0))
    calls = [asyncio.create_task(ask(client, customer_identifier=f"c{i}")) for i in range(4)]
    await asyncio.sleep(0.1)
    assert client.stats.in_flight == 1 and client.stats.waiting == 3
    await client.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], Reply)
    assert all(isinstance(r, sdk.ClientClosedError) for r in results[1:])
    assert len(server.requests) == 1
    # Every call that raised an SDK error counts in errors, those ended by close() too.
    assert client.stats.replies == 1 and client.stats.errors == 3
    with pytest.raises(sdk.ClientClosedError):
        await ask(client)
    assert client.stats.errors == 4
    await client.close()  # idempotent
    assert client.closed and client.stats.waiting == 0


async def test_stats_errors_counts_every_call_that_raised_an_sdk_error(
    server: MockAutocalls, make_client: Make
) -> None:
    """Refused input, max_wait and 404s count; a call its caller cancelled does not."""
    client = make_client(server.base_url, rate_limit=RateLimit(1, 10.0))
    await ask(client)
    with pytest.raises(sdk.InvalidRequestError):
        await ask(client, message=" ")
    with pytest.raises(sdk.InvalidRequestError):
        await client.generate_reply(
            assistant_id=123, customer_identifier="c", message="m", max_wait=-1
        )
    with pytest.raises(sdk.RateLimitTimeout):
        await ask(client, max_wait=0.1)
    assert client.stats.errors == 3
    waiting = asyncio.create_task(ask(client, customer_identifier="other"))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert client.stats.errors == 3 and client.stats.replies == 1


async def test_close_from_another_event_loop_changes_nothing(server: MockAutocalls) -> None:
    """close() awaited in another loop than the client's, which still runs in its thread: a
    clear RuntimeError, and the client stays open, usable and closable from its own loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def in_its_loop(coroutine: Any) -> Any:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))

    try:
        client = AsyncAutocalls("t", base_url=server.base_url, rate_limit=None)
        await in_its_loop(ask(client))
        with pytest.raises(RuntimeError, match="another event loop") as caught:
            await client.close()
        assert "run_coroutine_threadsafe(client.close()" in str(caught.value)
        assert not client.closed
        assert (await in_its_loop(ask(client, message="still open"))).reply
        await in_its_loop(client.close())
        assert client.closed and client._transport._pool is None  # its pool given back
        with pytest.raises(sdk.ClientClosedError):
            await in_its_loop(ask(client))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def test_caller_session_is_used_and_not_closed(
    server: MockAutocalls, make_client: Make
) -> None:
    """A caller's aiohttp session is borrowed, never closed by the client."""
    async with aiohttp.ClientSession() as session:
        async with AsyncAutocalls(
            "t", base_url=server.base_url, session=session, rate_limit=None
        ) as c:
            await ask(c)
        assert not session.closed
        async with session.post(server.url, json={}, headers={"Accept": "application/json"}) as r:
            assert r.status == 401
    client = make_client(server.base_url, session=session)
    with pytest.raises(sdk.APIConnectionError, match="closed"):
        await ask(client)


async def test_caller_timeout_cancels_cleanly(server: MockAutocalls, make_client: Make) -> None:
    """asyncio.timeout() around a call cancels it and leaves no per-conversation state."""
    server.reply_delay = 5.0
    client = make_client(server.base_url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await ask(client)
    assert len(client._order) == 0
    server.reply_delay = 0.0
    assert (await ask(client, message="again")).reply


def test_one_client_one_event_loop() -> None:
    """Using a client from a second event loop is a clear error."""
    client = AsyncAutocalls("t", base_url="http://127.0.0.1:9/api", rate_limit=None)

    async def bind() -> None:
        await client.__aenter__()  # binds the client to this loop; no session is made yet

    async def use() -> None:
        await ask(client)

    asyncio.run(bind())
    with pytest.raises(RuntimeError, match="event loop that has since closed"):
        asyncio.run(use())


async def test_max_wait_raises_rate_limit_timeout(server: MockAutocalls, make_client: Make) -> None:
    """With the token's slot taken for 10 s, max_wait=0.2 fails fast and sends nothing more."""
    client = make_client(server.base_url, rate_limit=RateLimit(1, 10.0))
    await ask(client)
    with pytest.raises(sdk.RateLimitTimeout) as caught:
        await ask(client, customer_identifier="other", max_wait=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert len(server.requests) == 1


async def test_conversation_cache_is_bounded(server: MockAutocalls, make_client: Make) -> None:
    """The LRU keeps the most recent conversations up to conversation_cache_size."""
    client = make_client(server.base_url, conversation_cache_size=2)
    for name in ("a", "b", "c"):
        await ask(client, customer_identifier=name)
    assert client.conversation_id(123, "a") is None
    assert client.conversation_id(123, "b") and client.conversation_id(123, "c")


async def test_shared_conversation_store_is_written(
    server: MockAutocalls, make_client: Make
) -> None:
    """A ConversationStore passed in receives every conversation seen."""
    store = sdk.MemoryConversationStore()
    client = make_client(server.base_url, conversation_store=store)
    reply = await ask(client)
    stored = await store.get(123, CUSTOMER)
    assert stored is not None and stored.conversation_id == reply.conversation_id
    assert isinstance(store, sdk.ConversationStore)
    other_worker = make_client(server.base_url, conversation_store=store)
    assert other_worker.conversation_id(123, CUSTOMER) is None  # its own cache is empty
    found = await other_worker.lookup_conversation(123, CUSTOMER)
    assert found is not None and found.conversation_id == reply.conversation_id
    assert other_worker.conversation_id(123, CUSTOMER) == reply.conversation_id
    assert await other_worker.lookup_conversation(123, "nobody") is None
    assert await make_client(server.base_url).lookup_conversation(123, CUSTOMER) is None


def test_errors_pickle() -> None:
    """API errors survive pickling (multiprocessing, task queues)."""
    import pickle

    error = sdk.RateLimitError("slow down", status=429, retry_after=3.0, body={"message": "x"})
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is sdk.RateLimitError
    assert (again.status, again.retry_after, str(again)) == (429, 3.0, str(error))


def test_body_is_json_bytes() -> None:
    """The module's own JSON helper output is what the server parses (sanity for the wire)."""
    assert json.loads(sdk._wire.build_request(1, "c", "m").body)["assistant_id"] == 1


async def test_failing_store_never_loses_a_reply(
    server: MockAutocalls, make_client: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply was paid for: a conversation store that fails is logged, not raised."""

    class BrokenStore:
        async def get(self, assistant_id: int, customer_identifier: str) -> None:
            return None

        async def set(self, conversation: sdk.Conversation) -> None:
            raise ConnectionError("store down")

    client = make_client(server.base_url, conversation_store=BrokenStore())
    reply = await ask(client)
    assert reply.reply
    assert client.conversation_id(123, CUSTOMER) == reply.conversation_id
    assert "could not save the conversation" in caplog.text


@pytest.mark.timing
async def test_a_hung_store_never_holds_back_a_reply(
    server: MockAutocalls, make_client: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that never answers: every reply is returned within the store's bound (its
    ``timeout`` plus a margin; 1 s without one), a lookup is a miss within ``max_wait``, one
    WARNING for the outage and an INFO when the store answers again."""
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    loop = asyncio.get_running_loop()

    class HungStore:
        timeout = 0.3
        hung = True

        def __init__(self) -> None:
            self.saved: list[sdk.Conversation] = []

        async def get(self, assistant_id: int, customer_identifier: str) -> None:
            await asyncio.Event().wait()

        async def set(self, conversation: sdk.Conversation) -> None:
            if self.hung:
                await asyncio.Event().wait()
            self.saved.append(conversation)

    store = HungStore()
    client = make_client(server.base_url, conversation_store=store, max_wait=0.2)

    async def timed(customer: str) -> tuple[float, Reply]:
        started = loop.time()
        reply = await ask(client, customer_identifier=customer)
        return loop.time() - started, reply

    results = await asyncio.gather(*(timed(f"c{i}") for i in range(50)))
    assert all(reply.reply for _, reply in results)
    assert all(client.conversation_id(123, f"c{i}") for i in range(50))
    slowest = max(elapsed for elapsed, _ in results)
    assert slowest < 0.3 + 0.5 + 1.0, slowest  # the bound, and a loaded machine's slack
    started = loop.time()
    assert await client.lookup_conversation(123, "nobody") is None  # within max_wait
    assert loop.time() - started < 0.2 + 0.5
    del HungStore.timeout  # no timeout of its own: the client's default bound (1 s)
    client2 = make_client(server.base_url, conversation_store=store)
    started = loop.time()
    await ask(client2, customer_identifier="d")
    assert loop.time() - started < 1.0 + 1.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # One per outage and client (client2 has its own view of the store).
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert "could not save the conversation" in warnings[0].getMessage()
    store.hung = False
    await ask(client, customer_identifier="c0", message="again")
    assert [c.customer_identifier for c in store.saved] == ["c0"]
    assert "answers again" in caplog.text
