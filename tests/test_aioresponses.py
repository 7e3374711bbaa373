"""The SDK inside a user's suite that mocks aiohttp with ``aioresponses``.

Many aiohttp applications test with aioresponses, which patches ``ClientSession._request`` and
answers without a connection. What a mocked call means for the SDK (see the testing how-to):
the reply or the typed error comes back as from a server; nothing is written, so no rate-limit
slot is used (the limiter is not exercised at all), while a mocked reply counts against a
``Budget`` like a real one. aioresponses builds aiohttp's own ``ClientResponse``, so it works
only with the aiohttp versions it knows: where it cannot (aioresponses 0.7.9 on aiohttp 3.14),
these tests are skipped, saying why.
"""

from __future__ import annotations

import copy
import gc
import json
import re
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import aiohttp
import pytest

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls, Budget, RateLimit
from autocalls_async.testing import MockAutocalls

aioresponses_module = pytest.importorskip("aioresponses")
aioresponses = aioresponses_module.aioresponses

BASE_URL = "https://autocalls.test/api"
ENDPOINT = re.compile(r"^https://autocalls\.test/api/ai/generate-reply$")
REPLY = {
    "success": True,
    "conversation_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "customer_identifier": "+14155551234",
    "reply": "Hello John",
    "function_calls": [],
    "ai_disabled": False,
}


async def _unsupported() -> str | None:
    """Why aioresponses cannot mock the installed aiohttp, or None when it can."""
    with aioresponses() as mocked:
        mocked.get("https://probe.test/", payload={})
        try:
            async with aiohttp.ClientSession() as session, session.get("https://probe.test/"):
                pass
        except TypeError as exc:  # aioresponses builds a ClientResponse the old way
            return (
                f"aioresponses {version('aioresponses')} cannot mock aiohttp "
                f"{aiohttp.__version__}: {exc}"
            )
    return None


@pytest.fixture
async def mocked() -> AsyncIterator[Any]:
    why = await _unsupported()
    if why is not None:
        pytest.skip(why)
    with aioresponses() as mock:
        yield mock


async def test_a_mocked_reply_comes_back_as_a_reply(mocked: Any) -> None:
    mocked.post(ENDPOINT, payload=REPLY)
    async with AsyncAutocalls("test-token", base_url=BASE_URL) as client:
        reply = await client.generate_reply(
            assistant_id=123, customer_identifier="+14155551234", message="Hi"
        )
    assert reply.reply == "Hello John"
    assert client.conversation_id(123, "+14155551234") == REPLY["conversation_id"]


async def test_a_mocked_call_uses_no_rate_limit_slot(mocked: Any) -> None:
    """One request a minute, two calls at once: a real server would see the second a minute
    later; mocked, nothing is written, so neither takes a slot and both answer now."""
    mocked.post(ENDPOINT, payload=REPLY, repeat=True)
    async with AsyncAutocalls(
        "test-token", base_url=BASE_URL, rate_limit=RateLimit(1, 60.0), max_wait=1.0
    ) as client:
        for _ in range(3):
            await client.generate_reply(assistant_id=123, customer_identifier="c", message="m")
    assert client.stats.replies == 3


async def test_a_mocked_reply_counts_against_the_budget(mocked: Any) -> None:
    mocked.post(ENDPOINT, payload=REPLY, repeat=True)
    async with AsyncAutocalls(
        "test-token", base_url=BASE_URL, rate_limit=None, budget=Budget(replies=1)
    ) as client:
        await client.generate_reply(assistant_id=123, customer_identifier="c", message="m")
        with pytest.raises(sdk.BudgetExceededError):
            await client.generate_reply(assistant_id=123, customer_identifier="c", message="m")


async def test_mocked_errors_are_typed_errors(mocked: Any) -> None:
    mocked.post(
        ENDPOINT,
        status=404,
        payload={"success": False, "error": "no", "error_code": "ASSISTANT_NOT_FOUND"},
    )
    mocked.post(ENDPOINT, exception=aiohttp.ClientConnectionError("mocked"))
    async with AsyncAutocalls("test-token", base_url=BASE_URL, rate_limit=None) as client:
        with pytest.raises(sdk.AssistantNotFoundError):
            await client.generate_reply(assistant_id=1, customer_identifier="c", message="m")
        with pytest.raises(sdk.APIConnectionError) as caught:
            await client.generate_reply(
                assistant_id=123, customer_identifier="c", message="m", max_wait=1.0
            )
    assert caught.value.sent is False  # nothing was written: it was retried, and failed again
    assert "mocked" in str(caught.value) or "Connection refused" in str(caught.value)


async def test_a_recorder_that_copies_each_call_gets_the_body(server: MockAutocalls) -> None:
    """aioresponses deep-copies every call's arguments to record them; so may any recorder
    patched onto a session. The SDK's body was a live rate-limit grant, and its copy a
    half-made event loop that failed in ``__del__`` (an unraisable error, which fails a suite
    run with warnings as errors). Runs on every aiohttp: a real server, a recorder like
    aioresponses' own."""
    calls: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        original = session._request

        async def recording(method: str, url: Any, **kwargs: Any) -> aiohttp.ClientResponse:
            calls.append(copy.deepcopy(kwargs))
            return await original(method, url, **kwargs)

        session._request = recording  # type: ignore[method-assign]
        async with AsyncAutocalls(
            "test-token", base_url=server.base_url, session=session, rate_limit=RateLimit(5, 1.0)
        ) as client:
            await client.generate_reply(assistant_id=123, customer_identifier="c", message="Hi")
    gc.collect()  # a half-made copy of an event loop would fail here
    (call,) = calls
    assert json.loads(call["data"]._value)["message"] == "Hi"
