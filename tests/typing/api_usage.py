"""Checked by mypy --strict, never run: the public API as a user writes it.

If a signature or a return type changes in a way that breaks users, this file stops type-checking.
"""

from __future__ import annotations

import asyncio

import aiohttp

from autocalls_async import (
    APIError,
    AssistantUsage,
    AsyncAutocalls,
    AutocallsAccounts,
    AutocallsError,
    Budget,
    BudgetExceededError,
    ClientStats,
    Conversation,
    ConversationStore,
    FunctionCall,
    MemoryConversationStore,
    RateLimit,
    RateLimiter,
    RateLimitError,
    RateLimitTimeout,
    RedisConversationStore,
    RedisRateLimiter,
    Reply,
    RetryPolicy,
    UnprocessableEntityError,
    Usage,
)
from autocalls_async.identifiers import Normalizer, e164, email


async def web_handler(client: AsyncAutocalls, text: str) -> str:
    try:
        reply: Reply = await client.generate_reply(
            assistant_id=123,
            customer_identifier="+14155551234",
            message=text,
            variables={"customer_name": "John", "tags": ["vip"], "score": 1.5},
            max_wait=2.0,
        )
    except RateLimitTimeout:
        return "busy, try again"
    except RateLimitError as exc:
        retry: float | None = exc.retry_after
        return f"later ({retry})"
    except UnprocessableEntityError as exc:
        fields: dict[str, list[str]] = exc.errors
        return str(fields)
    except APIError as exc:
        status: int = exc.status
        code: str | None = exc.error_code
        return f"{status} {code}"
    except AutocallsError:
        return "failed"
    calls: tuple[FunctionCall, ...] = reply.function_calls
    names: list[str | None] = [call.name for call in calls]
    disabled: bool = reply.ai_disabled
    conversation_id: str = reply.conversation_id
    return f"{reply.reply} {names} {disabled} {conversation_id}"


async def bulk(messages: list[tuple[str, str]]) -> list[Reply | BaseException]:
    async with (
        aiohttp.ClientSession() as session,
        AsyncAutocalls(
            "token",
            base_url="https://app.autocalls.ai/api",
            rate_limit=RateLimit(5, 60.0),
            max_retries=2,
            timeout=60.0,
            session=session,
            retry_policy=RetryPolicy(max_retries=3, retry_unsafe=False),
            conversation_store=MemoryConversationStore(1000),
        ) as client,
    ):
        results = await asyncio.gather(
            *(
                client.generate_reply(assistant_id=1, customer_identifier=c, message=m)
                for c, m in messages
            ),
            return_exceptions=True,
        )
        cached: str | None = client.conversation_id(1, "c")
        seen: Conversation | None = client.conversation(1, "c")
        stats: ClientStats = client.stats
        waited: float = stats.limiter_wait
        del cached, seen, waited
    return list(results)


async def several_workers() -> None:
    async with (
        RedisRateLimiter("redis://localhost:6379/0", rate_limit=RateLimit(5, 60.0)) as limiter,
        RedisConversationStore("redis://localhost:6379/0") as store,
        AsyncAutocalls("token", limiter=limiter, conversation_store=store) as client,
    ):
        shared: RateLimiter = limiter
        conversations: ConversationStore = store
        found: Conversation | None = await client.lookup_conversation(1, "c")
        del shared, conversations, found


def no_limiter() -> AsyncAutocalls:
    return AsyncAutocalls("token", rate_limit=None, timeout=None)


def bigger_requests() -> int | None:
    client = AsyncAutocalls("token", max_request_bytes=8 * 1024 * 1024)
    unchecked = AsyncAutocalls("token", max_request_bytes=None)
    del unchecked
    return client.max_request_bytes


def a_plain_with_is_reported(client: AsyncAutocalls) -> None:
    # The client is async-only: a type checker must keep reporting a plain `with` (were this
    # ignore unused, mypy --strict would fail on it).
    with client:  # type: ignore[attr-defined]
        pass


async def cost_control() -> int:
    normalize: Normalizer = e164("US")
    by_mail: Normalizer = email()
    async with AsyncAutocalls(
        "token", budget=Budget(replies=100), normalize_identifier=normalize
    ) as client:
        try:
            await client.generate_reply(
                assistant_id=1, customer_identifier="415-555-1234", message="m"
            )
        except BudgetExceededError as exc:
            print(exc)
        usage: Usage = client.usage
        left: int | None = usage.remaining
        per: dict[int, AssistantUsage] = usage.by_assistant
        spelled: str = client.normalize("(415) 555-1234")
        budget: Budget | None = client.budget
        del left, per, spelled, budget, by_mail
        return usage.sent + usage.billed + usage.possibly_billed + usage.refused + usage.charged


async def a_platform(tokens: dict[str, str]) -> int:
    async with AutocallsAccounts(
        rate_limit=RateLimit(5, 60.0), max_wait=10.0, budget=Budget(replies=10_000), idle_after=600
    ) as accounts:
        for tenant, token in tokens.items():
            client: AsyncAutocalls = accounts.client(
                token, telemetry_attributes={"tenant.id": tenant}
            )
            reply: Reply = await client.generate_reply(
                assistant_id=1, customer_identifier="+14155551234", message="m"
            )
            del reply
        totals: ClientStats = accounts.stats
        usage: Usage = accounts.usage
        kept: int = len(accounts)
        budget: Budget | None = accounts.budget
        closed: bool = accounts.closed
        del usage, kept, budget, closed
        return totals.replies


def per_client_labels() -> AsyncAutocalls:
    return AsyncAutocalls("token", telemetry_attributes={"tenant.id": "acme", "tier": 2})
