"""Issue 14 in the library: identifier normalisers, ``Budget`` and ``client.usage``, against the
emulator on a loopback port, with the exact requests the server saw."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import attrs
import pytest

from autocalls_async import (
    APIConnectionError,
    AssistantNotFoundError,
    AssistantUsage,
    AsyncAutocalls,
    Budget,
    BudgetExceededError,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    RateLimit,
    RetryPolicy,
)
from autocalls_async.identifiers import e164, email
from autocalls_async.testing import Fault, MockAutocalls

Make = Callable[..., AsyncAutocalls]
SPELLINGS = ("+1 (415) 555-1234", "415-555-1234", "+14155551234")


# -- the normalisers, pure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "raw", "expected"),
    [
        ("US", "+1 (415) 555-1234", "+14155551234"),
        ("US", "415-555-1234", "+14155551234"),
        ("US", "  (415) 555 1234\u200b", "+14155551234"),
        (None, "+14155551234", "+14155551234"),
        (None, "tel:+1-415-555-1234", "+14155551234"),
        ("gb", "020 7946 0018", "+442079460018"),
        ("GB", "+1 415 555 1234", "+14155551234"),  # a + wins over the default region
        (None, "+15555550100", "+15555550100"),  # fictional but possible: accepted
    ],
)
def test_e164_normalises_any_parseable_spelling(
    region: str | None, raw: str, expected: str
) -> None:
    """Every spelling of one number becomes its one E.164 form (and E.164 is a fixed point)."""
    normalize = e164(region)
    assert normalize(raw) == expected
    assert normalize(expected) == expected


@pytest.mark.parametrize(
    ("region", "raw", "says"),
    [
        (None, "415-555-1234", "has no country code: write it with a leading +"),
        ("US", "+1 415", "is not a possible phone number"),
        ("US", "not a number", "is not a phone number"),
        ("US", "+1 415 555 1234 ext. 5", "has an extension"),
    ],
)
def test_e164_refuses_with_what_and_how(region: str | None, raw: str, says: str) -> None:
    """A refused number names the identifier, the reason and the fix; it is a ValueError too."""
    with pytest.raises(InvalidRequestError, match=says) as caught:
        e164(region)(raw)
    assert repr(raw) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_e164_strict_and_bad_regions() -> None:
    """strict refuses unassigned ranges; an unknown region is refused when the normaliser is
    made, not at the first call."""
    assert e164("US", strict=True)("415-555-1234") == "+14155551234"
    with pytest.raises(InvalidRequestError, match="not a valid phone number"):
        e164(None, strict=True)("+15555550100")
    with pytest.raises(InvalidRequestError, match="'XX' is not a region"):
        e164("XX")
    with pytest.raises(InvalidRequestError, match="must be a region code"):
        e164(1)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="must be a str"):
        e164("US")(14155551234)  # type: ignore[arg-type]
    assert e164("US").__name__ == "e164('US')"
    assert e164("US", strict=True).__name__ == "e164('US', strict=True)"


def test_email_lowercases_the_domain_only() -> None:
    """The local part is case-sensitive (RFC 5321); the domain is not."""
    normalize = email()
    assert normalize("  John.Doe@Example.COM ") == "John.Doe@example.com"
    assert normalize('"a@b"@Example.com') == '"a@b"@example.com'
    for bad in ("john", "@example.com", "john@", "jo hn@example.com"):
        with pytest.raises(InvalidRequestError, match="is not an e-mail address"):
            normalize(bad)
    with pytest.raises(InvalidRequestError, match="must be a str"):
        normalize(None)  # type: ignore[arg-type]


# -- normalize_identifier in the client ---------------------------------------------------------


async def test_three_spellings_are_one_conversation(
    server: MockAutocalls, make_client: Make
) -> None:
    """Done when: three spellings of one number are one conversation on the service, in the
    cache, and in lookups with yet another spelling."""
    client = make_client(server.base_url, normalize_identifier=e164("US"))
    replies = [
        await client.generate_reply(assistant_id=123, customer_identifier=s, message=f"m{i}")
        for i, s in enumerate(SPELLINGS)
    ]
    assert {reply.conversation_id for reply in replies} == {replies[0].conversation_id}
    assert list(server.conversations) == [(123, "+14155551234")]
    assert server.conversations[(123, "+14155551234")].messages == ["m0", "m1", "m2"]
    assert [r.body["customer_identifier"] for r in server.requests] == ["+14155551234"] * 3
    assert client.conversation_id(123, "(415) 555.1234") == replies[0].conversation_id
    assert client.budget is None and client.usage.remaining is None
    assert client.usage.billed == 3
    found = await client.lookup_conversation(123, "1-415-555-1234")
    assert found is not None and found.conversation_id == replies[0].conversation_id


async def test_concurrent_spellings_keep_call_order(
    server: MockAutocalls, make_client: Make
) -> None:
    """The order key is the normalised identifier: concurrent calls with different spellings
    reach the service one at a time, in call order."""
    server.reply_delay = 0.02
    client = make_client(server.base_url, normalize_identifier=e164("US"))
    await asyncio.gather(
        *(
            client.generate_reply(assistant_id=123, customer_identifier=s, message=f"m{i}")
            for i, s in enumerate(SPELLINGS * 3)
        )
    )
    assert server.conversations[(123, "+14155551234")].messages == [f"m{i}" for i in range(9)]


async def test_an_invalid_number_is_refused_with_nothing_sent(
    server: MockAutocalls, make_client: Make
) -> None:
    """Done when: an invalid number is refused, the emulator sees no request."""
    client = make_client(server.base_url, normalize_identifier=e164("US"))
    with pytest.raises(InvalidRequestError, match="is not a possible phone number"):
        await client.generate_reply(assistant_id=123, customer_identifier="555-12", message="Hi")
    with pytest.raises(InvalidRequestError, match="is not a possible phone number"):
        client.conversation_id(123, "555-12")
    assert server.requests == []
    assert client.stats.requests == 0 and client.usage.sent == 0


async def test_a_broken_normaliser_becomes_invalid_request(
    server: MockAutocalls, make_client: Make
) -> None:
    """Any other exception of a normaliser is an InvalidRequestError with the cause chained;
    a non-str result is refused; a non-callable is refused at construction."""

    def broken(value: str) -> str:
        raise KeyError(value)

    client = make_client(server.base_url, normalize_identifier=broken)
    with pytest.raises(InvalidRequestError, match="broken failed on a customer_identifier") as e:
        await client.generate_reply(assistant_id=123, customer_identifier="x", message="Hi")
    assert isinstance(e.value.__cause__, KeyError)
    client = make_client(server.base_url, normalize_identifier=lambda value: None)
    with pytest.raises(InvalidRequestError, match="returned NoneType, not str"):
        await client.generate_reply(assistant_id=123, customer_identifier="x", message="Hi")
    with pytest.raises(InvalidRequestError, match="customer_identifier must be a str"):
        await client.generate_reply(assistant_id=123, customer_identifier=1, message="Hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="must be a callable"):
        make_client(server.base_url, normalize_identifier="US")
    assert server.requests == []


async def test_email_normaliser_in_the_client(server: MockAutocalls, make_client: Make) -> None:
    """Two spellings of one domain are one conversation; two local parts stay two."""
    client = make_client(server.base_url, normalize_identifier=email())
    for customer in ("ann@Example.com", " ann@EXAMPLE.com", "Ann@example.com"):
        await client.generate_reply(assistant_id=123, customer_identifier=customer, message="x")
    assert sorted(server.conversations) == [(123, "Ann@example.com"), (123, "ann@example.com")]


# -- Budget and usage ---------------------------------------------------------------------------


def test_budget_is_a_frozen_attrs_value() -> None:
    """Budget(replies=N) validates N and is immutable; a client refuses anything else."""
    assert Budget(replies=0).replies == 0
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="replies must be an int >= 0"):
            Budget(replies=bad)  # type: ignore[arg-type]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Budget(3).replies = 4  # type: ignore[misc]
    with pytest.raises(InvalidRequestError, match="budget must be a Budget"):
        AsyncAutocalls("t", budget=3)  # type: ignore[arg-type]


async def test_budget_of_3_under_a_gather_of_10_sends_exactly_3(
    server: MockAutocalls, make_client: Make
) -> None:
    """Done when: in-flight calls count, so exactly 3 reach the service and 7 fail at once
    with BudgetExceededError, nothing sent."""
    server.reply_delay = 0.1
    client = make_client(server.base_url, budget=Budget(replies=3))
    results = await asyncio.gather(
        *(
            client.generate_reply(
                assistant_id=123, customer_identifier=f"+1555000{i:04d}", message="x"
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 7 and all(isinstance(e, BudgetExceededError) for e in errors)
    assert "budget of 3 replies is used up" in str(errors[0])
    assert "nothing was sent" in str(errors[0])
    assert len(server.requests) == 3 and server.replies_served == 3
    usage = client.usage
    assert (usage.sent, usage.billed, usage.possibly_billed, usage.in_flight) == (3, 3, 0, 0)
    assert usage.remaining == 0 and usage.charged == 3
    assert usage.by_assistant == {123: AssistantUsage(sent=3, billed=3)}
    with pytest.raises(BudgetExceededError):
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="x")
    assert len(server.requests) == 3


async def test_refused_calls_give_the_budget_back(server: MockAutocalls, make_client: Make) -> None:
    """429, 503, 404 and a refused connection were certainly not processed: they do not count;
    a 500 may have been processed: it counts as possibly billed."""
    client = make_client(server.base_url, budget=Budget(replies=2))
    server.inject(Fault.status(503))
    server.inject(Fault.rate_limited(retry_after=0))
    await client.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
    with pytest.raises(AssistantNotFoundError):
        await client.generate_reply(assistant_id=999, customer_identifier="+1", message="b")
    server.inject(Fault.status(500, processed=True))
    with pytest.raises(InternalServerError):
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="c")
    usage = client.usage
    assert (usage.sent, usage.billed, usage.possibly_billed, usage.refused) == (5, 1, 1, 3)
    assert usage.by_assistant[999] == AssistantUsage(sent=1, refused=1)
    assert usage.remaining == 0
    with pytest.raises(BudgetExceededError):
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="d")
    assert len(server.requests) == 5

    refused = make_client("http://127.0.0.1:9/api", budget=Budget(replies=1))
    with pytest.raises(APIConnectionError):
        await refused.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
    assert refused.usage.sent == 0 and refused.usage.remaining == 1


@pytest.mark.timing
async def test_budget_waiters_do_not_take_slots(make_client: Make) -> None:
    """Over budget, a call fails at once instead of waiting for a rate-limit slot first."""
    async with MockAutocalls(rate_limit=None) as server:
        client = make_client(
            server.base_url, budget=Budget(replies=1), rate_limit=RateLimit(1, 5.0)
        )
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BudgetExceededError):
            await client.generate_reply(assistant_id=123, customer_identifier="+2", message="b")
        assert loop.time() - started < 1.0  # the next slot is 5 s away


async def test_a_retry_that_exceeds_the_budget_raises_the_unsafe_error(
    server: MockAutocalls, make_client: Make
) -> None:
    """With retry_unsafe, a 500 that may have been processed is what the caller sees when the
    budget then forbids the retry (it counts as possibly billed)."""
    client = make_client(
        server.base_url,
        budget=Budget(replies=1),
        retry_policy=RetryPolicy(retry_unsafe=True, backoff_base=0.01, backoff_max=0.02),
    )
    server.inject(Fault.status(500, processed=True))
    with pytest.raises(InternalServerError):
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
    assert len(server.requests) == 1 and client.usage.possibly_billed == 1


async def test_cancelled_in_flight_counts_as_possibly_billed(
    server: MockAutocalls, make_client: Make
) -> None:
    """A call cancelled after its bytes left may be processed; one cancelled while queued was
    not sent."""
    server.reply_delay = 5.0
    client = make_client(server.base_url, budget=Budget(replies=5))
    task = asyncio.create_task(
        client.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
    )
    while not server.requests:
        await asyncio.sleep(0.01)
    assert client.usage.in_flight == 1 and client.usage.remaining == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.usage.possibly_billed == 1 and client.usage.in_flight == 0


async def test_balance_exhausted_and_top_up(make_client: Make) -> None:
    """The emulator's balance: 402 when used up (not billed, budget given back), top_up() and
    the admin endpoints for shells and subprocess tests."""
    async with MockAutocalls(rate_limit=None, balance=1) as server:
        client = make_client(server.base_url, budget=Budget(replies=5))
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
        with pytest.raises(InsufficientBalanceError):
            await client.generate_reply(assistant_id=123, customer_identifier="+1", message="b")
        assert client.usage.refused == 1 and client.usage.remaining == 4
        async with aiohttp.ClientSession() as http:
            state_url = server.base_url.removesuffix("/api") + "/_emulator/state"
            top_up_url = server.base_url.removesuffix("/api") + "/_emulator/top-up"
            async with http.get(state_url) as response:
                state = await response.json()
            assert state["requests"] == 2 and state["balance_remaining"] == 0
            assert state["by_status"] == {"200": 1, "402": 1}
            async with http.post(top_up_url, json={"replies": 2}) as response:
                assert response.status == 200
                assert (await response.json())["balance_remaining"] == 2
            async with http.post(top_up_url, json={"replies": 0}) as response:
                assert response.status == 422
                assert "replies must be an int >= 1" in (await response.json())["message"]
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="c")
        assert server.top_up(3) == 4
    with pytest.raises(ValueError, match="unlimited"):
        MockAutocalls().top_up(1)


async def test_a_dropped_connection_after_sending_counts(
    server: MockAutocalls, make_client: Make
) -> None:
    """A connection dropped after the request was written may have been processed: it is sent
    and possibly billed, and it uses the budget."""
    client = make_client(server.base_url, budget=Budget(replies=1))
    server.inject(Fault.drop(processed=True))
    with pytest.raises(APIConnectionError):
        await client.generate_reply(assistant_id=123, customer_identifier="+1", message="a")
    usage = client.usage
    assert (usage.sent, usage.possibly_billed, usage.remaining) == (1, 1, 0)
    assert server.count(processed=True) == 1
