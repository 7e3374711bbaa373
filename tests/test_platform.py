"""Many clients and many tokens in one process: one connection pool, one limiter, cheap clients.

Real calls to the emulator on a loopback port; with warnings as errors, a session left open
(aiohttp's "Unclosed client session") fails the test that leaked it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any

import pytest

from autocalls_async import AsyncAutocalls, RateLimit
from autocalls_async import _pool as pool
from autocalls_async.testing import MockAutocalls


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ask(client: AsyncAutocalls, customer: str = "+14155550100", **options: Any) -> Any:
    return client.generate_reply(
        assistant_id=123, customer_identifier=customer, message="Hi", **options
    )


async def test_clients_without_session_share_one_pool_until_the_last_closes(
    server: MockAutocalls,
) -> None:
    """One aiohttp session per event loop and origin, whatever the number of clients and
    tokens; closing a client gives its lease back, the last one closes the session."""
    first = AsyncAutocalls("token-one", base_url=server.base_url, rate_limit=None)
    second = AsyncAutocalls("token-two", base_url=server.base_url + "/", rate_limit=None)
    await asyncio.gather(ask(first), ask(second, "+14155550101"))
    shared = first._transport._pool
    assert shared is not None and shared is second._transport._pool and shared.users == 2
    session = shared.session
    assert len(server.requests) == 2
    # each request carried its own client's token, on the one session that holds none
    assert {r.token_hash for r in server.requests} == {_hash("token-one"), _hash("token-two")}
    assert "Authorization" not in session.headers
    await first.close()
    assert not session.closed and shared.users == 1
    assert (await ask(second, "+14155550102")).reply  # still serving the other client
    await second.close()
    assert session.closed
    # a client made afterwards gets a new pool, never the closed one
    async with AsyncAutocalls("token-three", base_url=server.base_url, rate_limit=None) as third:
        await ask(third)
        assert third._transport._pool is not shared
        assert third._transport._pool is not None and not third._transport._pool.closed


async def test_a_pool_per_origin_and_per_event_loop(server: MockAutocalls) -> None:
    """Another origin (here: localhost for 127.0.0.1) or another event loop: another pool."""
    other_origin = server.base_url.replace("127.0.0.1", "localhost")
    async with (
        AsyncAutocalls("t1", base_url=server.base_url, rate_limit=None) as one,
        AsyncAutocalls("t2", base_url=other_origin, rate_limit=None) as two,
    ):
        await asyncio.gather(ask(one), ask(two, "+14155550101"))
        assert one._transport._pool is not two._transport._pool

        found: list[object] = []

        def in_another_loop() -> None:
            async def run() -> None:
                async with AsyncAutocalls("t3", base_url=server.base_url, rate_limit=None) as c:
                    await ask(c, "+14155550102")
                    found.append(c._transport._pool)

            asyncio.run(run())

        thread = threading.Thread(target=in_another_loop)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert found and found[0] is not one._transport._pool


async def test_default_limiters_are_shared_per_rate_and_closed_with_the_last_client(
    server: MockAutocalls,
) -> None:
    """Clients without ``limiter=`` share the process's default limiter for their rate: one
    queue per token in one limiter, not a limiter per client."""
    fast, other = RateLimit(100, 1.0), RateLimit(50, 1.0)
    a = AsyncAutocalls("ta", base_url=server.base_url, rate_limit=fast)
    b = AsyncAutocalls("tb", base_url=server.base_url, rate_limit=fast)
    c = AsyncAutocalls("tc", base_url=server.base_url, rate_limit=other)
    assert a._limiter is b._limiter and a._limiter is not c._limiter
    await asyncio.gather(ask(a), ask(b, "+14155550101"), ask(c, "+14155550102"))
    shared = a._limiter
    await a.close()
    assert shared in [s.limiter for s in pool._LIMITERS.values()]
    await b.close()
    assert shared not in [s.limiter for s in pool._LIMITERS.values()]
    await c.close()
    # closed with its last client: a new client for the same token may use another rate
    async with AsyncAutocalls("ta", base_url=server.base_url, rate_limit=other) as again:
        assert (await ask(again)).reply


async def test_a_refused_client_leases_nothing(server: MockAutocalls) -> None:
    before = {key: shared.leases for key, shared in pool._LIMITERS.items()}
    with pytest.raises(Exception, match="max_retries"):
        AsyncAutocalls("t", base_url=server.base_url, max_retries=-1)
    assert {key: shared.leases for key, shared in pool._LIMITERS.items()} == before
