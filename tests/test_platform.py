"""Many clients and many tokens in one process: one connection pool, one limiter, cheap clients.

Real calls to the emulator on a loopback port; with warnings as errors, a session left open
(aiohttp's "Unclosed client session") fails the test that leaked it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import traceback
from typing import Any

import aiohttp
import pytest

from autocalls_async import (
    AsyncAutocalls,
    AutocallsAccounts,
    Budget,
    BudgetExceededError,
    ClientClosedError,
    InvalidRequestError,
    RateLimit,
    RateLimitTimeout,
)
from autocalls_async import _pool as pool
from autocalls_async.testing import MockAutocalls


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ask(client: AsyncAutocalls, customer: str = "+14155550100", **options: Any) -> Any:
    options.setdefault("message", "Hi")
    return client.generate_reply(assistant_id=123, customer_identifier=customer, **options)


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


# -- AutocallsAccounts: a platform's entry point ---------------------------------------------


async def test_accounts_serve_several_tokens_on_one_pool(server: MockAutocalls) -> None:
    """Each token's client is made once and kept; all share one pool (the accounts' lease),
    one limiter and one conversation cache, where no token sees another's conversations."""
    async with AutocallsAccounts(
        base_url=server.base_url, rate_limit=RateLimit(100, 1.0)
    ) as accounts:
        a, b = accounts.client("tenant-a"), accounts.client("tenant-b")
        assert accounts.client("tenant-a") is a and len(accounts) == 2
        replies = await asyncio.gather(ask(a), ask(b))
        assert {r.token_hash for r in server.requests} == {_hash("tenant-a"), _hash("tenant-b")}
        assert a._transport._pool is b._transport._pool and a._transport._pool is not None
        assert a._transport._pool.users == 1  # the accounts' lease, not one per token
        assert a._limiter is b._limiter
        assert a.conversation_id(123, "+14155550100") == replies[0].conversation_id
        assert b.conversation_id(123, "+14155550100") == replies[1].conversation_id
        # a third token that never talked to this customer sees nothing of theirs
        assert accounts.client("tenant-c").conversation_id(123, "+14155550100") is None
        assert accounts.stats.replies == 2 and accounts.usage.billed == 2
        session = a._transport._pool.session
    assert session.closed and a.closed and b.closed


async def test_idle_tokens_are_forgotten_and_busy_ones_kept(server: MockAutocalls) -> None:
    """A token not asked for during ``idle_after`` with nothing waiting or in flight is
    forgotten (its counters stay in ``stats``); a busy one is kept."""
    server.reply_delay = 2.0  # still in flight when looked at, however late this task runs
    async with AutocallsAccounts(
        base_url=server.base_url, rate_limit=None, idle_after=0.05
    ) as accounts:
        idle = accounts.client("idle")
        await ask(idle)
        busy = accounts.client("busy")
        call = asyncio.create_task(ask(busy))
        await asyncio.sleep(0.1)
        accounts.client("third")
        # "idle" was forgotten, "busy" (in flight) kept; a new client for "idle" on demand
        assert "idle" not in accounts._clients and "busy" in accounts._clients
        assert accounts.client("idle") is not idle
        assert (await call).reply
        assert accounts.stats.replies == 2  # the forgotten client's reply still counted
        assert len(accounts) <= 3


async def test_closing_fails_waiting_calls_and_lets_sent_ones_finish(
    server: MockAutocalls,
) -> None:
    server.reply_delay = 0.3
    accounts = AutocallsAccounts(base_url=server.base_url, rate_limit=RateLimit(1, 30.0))
    client = accounts.client("tok")
    sent = asyncio.create_task(ask(client))
    await asyncio.sleep(0.1)  # the first call is on the wire; the second waits 30 s for a slot
    waiting = asyncio.create_task(ask(client, "+14155550111"))
    await asyncio.sleep(0.05)
    await accounts.close()
    assert (await sent).reply
    with pytest.raises(ClientClosedError):
        await waiting
    with pytest.raises(ClientClosedError):
        accounts.client("tok")
    with pytest.raises(ClientClosedError):  # a client held past the close
        await ask(client)


async def test_one_budget_for_every_token(server: MockAutocalls) -> None:
    async with AutocallsAccounts(
        base_url=server.base_url, rate_limit=None, budget=Budget(replies=3)
    ) as accounts:
        results = await asyncio.gather(
            *(ask(accounts.client(f"t{i}"), f"+1415555{i:04d}") for i in range(5)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, BudgetExceededError) for r in results) == 2
        usage = accounts.usage
        assert usage.billed == 3 and usage.budget == Budget(replies=3) and not usage.by_assistant
        assert "shared by every token" in str(
            next(r for r in results if isinstance(r, BudgetExceededError))
        )


@pytest.mark.timing
async def test_two_spellings_of_one_token_keep_one_conversation_in_order(
    server: MockAutocalls,
) -> None:
    """Ordering and the conversation cache are keyed by the token, not by the client: two
    clients of one token (its spelling with spaces, or a forgotten client still held) send
    one conversation's messages one at a time, in order."""
    server.reply_delay = 0.1
    async with AutocallsAccounts(base_url=server.base_url, rate_limit=None) as accounts:
        one, other = accounts.client("tok"), accounts.client(" tok ")
        assert one is not other
        await asyncio.gather(*(ask(c, message=f"m{i}") for i, c in enumerate([one, other] * 2)))
        messages = [r.body["message"] for r in server.requests]
        assert messages == ["m0", "m1", "m2", "m3"]
        arrivals = [r.time for r in server.requests]  # each after the previous was answered
        assert all(b - a >= 0.09 for a, b in zip(arrivals, arrivals[1:], strict=False))
        assert other.conversation_id(123, "+14155550100") == one.conversation_id(
            123, "+14155550100"
        )


async def test_refusals(server: MockAutocalls) -> None:
    with pytest.raises(InvalidRequestError, match="from_server"):
        AutocallsAccounts(base_url=server.base_url, rate_limit=RateLimit.from_server())
    with pytest.raises(InvalidRequestError, match="idle_after"):
        AutocallsAccounts(base_url=server.base_url, idle_after=-1)
    async with AutocallsAccounts(base_url=server.base_url) as accounts:
        secret = "bad\ntoken-with-a-line-break"
        with pytest.raises(InvalidRequestError) as caught:
            accounts.client(secret)
        frames = traceback.extract_tb(caught.value.__traceback__)
        assert all(
            secret not in repr(frame.f_locals)
            for frame, _ in traceback.walk_tb(caught.value.__traceback__)
        ), frames
        with pytest.raises(InvalidRequestError, match="telemetry_attributes"):
            accounts.client("fine", telemetry_attributes={"tenant": ["not", "a", "value"]})  # type: ignore[dict-item]


@pytest.mark.slow
@pytest.mark.timing
def test_five_thousand_tokens_at_ulimit_1024() -> None:
    """5,000 tokens in one process whose descriptor limit is 1024, against the emulator in
    another process with a strict window per token (1 per second): each token sends 2
    messages, so its second waits for its window. Every call is answered, no 429, no WARNING,
    and descriptors stay a few hundred (one pool of at most 100 connections, one database).
    The SDK keeps a 10 % margin (100 ms) against the emulator's window: on a loaded 2-core
    machine its process may read a request tens of milliseconds late (the default 2 % is
    for a real network's jitter, at the real period of a minute: 1.2 s)."""
    from benchmarks._common import emulator_process
    from benchmarks.tenants import run_child

    with emulator_process("1/1", "rolling") as base_url:
        result = run_child("sdk", base_url, 5_000, 2, requests=1, period=1.0, margin=0.1)
    assert result["calls"] == 10_000
    assert result["failed"] == 0, result
    assert result["rate_limited"] == 0, result
    assert result["warnings"] == 0, result
    assert result["fds_peak"] < 400, result


async def test_a_closed_client_is_replaced_and_the_accounts_belong_to_one_loop(
    server: MockAutocalls,
) -> None:
    async with AutocallsAccounts(
        base_url=server.base_url, rate_limit=None, budget=Budget(replies=10)
    ) as accounts:
        first = accounts.client("tok")
        await first.close()
        second = accounts.client("tok")
        assert second is not first and not second.closed
        assert (await ask(second)).reply
        assert "tokens=1 open" in repr(accounts) and "tok" not in repr(accounts).split("tokens")[1]
        assert accounts.budget == Budget(replies=10) and len(accounts) == 1

        def elsewhere() -> str:
            async def use() -> str:
                try:
                    accounts.client("tok")
                except RuntimeError as exc:
                    return str(exc)
                return "no error"

            return asyncio.run(use())

        assert "another event loop" in await asyncio.to_thread(elsewhere)
    assert "closed" in repr(accounts)


async def test_the_server_limit_is_in_the_totals() -> None:
    """``accounts.stats.server_limit``: what a server last stated to any token."""
    async with (
        MockAutocalls(rate_limit=(100, 60.0)) as limited,
        AutocallsAccounts(base_url=limited.base_url, rate_limit=RateLimit(100, 60.0)) as accounts,
    ):
        await ask(accounts.client("tok"))
        assert accounts.stats.server_limit == RateLimit(100, 60.0)


async def test_a_call_takes_a_connection_before_its_slot(server: MockAutocalls) -> None:
    """A pool of 2 connections (your session's), 4 tokens calling at once, replies taking
    0.5 s: two calls are sent, the other two wait for a connection, not holding a rate-limit
    grant meanwhile; past their max_wait they fail with RateLimitTimeout, nothing sent."""
    server.reply_delay = 0.5
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session,
        AutocallsAccounts(
            base_url=server.base_url, rate_limit=RateLimit(100, 1.0), session=session
        ) as accounts,
    ):
        results = await asyncio.gather(
            *(ask(accounts.client(f"t{i}"), max_wait=0.2) for i in range(4)),
            return_exceptions=True,
        )
        timeouts = [r for r in results if isinstance(r, RateLimitTimeout)]
        assert len(timeouts) == 2 and "every connection of the pool" in str(timeouts[0])
        assert len(server.requests) == 2
        # without max_wait, the others go as connections come back
        more = await asyncio.gather(*(ask(accounts.client(f"u{i}")) for i in range(4)))
        assert len(more) == 4 and len(server.requests) == 6


async def test_the_gate_serves_interactive_calls_first_and_skips_the_cancelled() -> None:
    gate = pool.Gate(1)
    assert gate.try_take() and not gate.try_take()
    order: list[str] = []

    async def wait(name: str, lane: int) -> None:
        await gate.take(lane)
        order.append(name)

    background = asyncio.create_task(wait("background", 1))
    gone = asyncio.create_task(wait("cancelled", 0))
    interactive = asyncio.create_task(wait("interactive", 0))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    gate.give()  # to the first live interactive waiter
    await asyncio.sleep(0)
    assert order == ["interactive"]
    gate.give()
    await asyncio.sleep(0)
    assert order == ["interactive", "background"]
    gate.give()
    assert gate.free == 1 and await asyncio.gather(background, interactive) == [None, None]


async def test_the_gate_passes_a_place_handed_to_a_cancelled_waiter_on() -> None:
    gate = pool.Gate(1)
    await gate.take(0)  # free: taken at once
    first = asyncio.create_task(gate.take(0))
    second = asyncio.create_task(gate.take(1))
    await asyncio.sleep(0)
    assert not gate.try_take()  # somebody waits
    gate.give()  # handed to the first waiter...
    first.cancel()  # ...cancelled before it ran: the place goes on to the next one
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    gate.give()
    assert gate.free == 1 and gate.try_take()


async def test_a_pool_looks_its_proxy_up_once_and_never_for_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The environment's proxy is read when the pool is made (aiohttp's trust_env would read
    it in a worker thread on every request); a loopback base URL never uses one."""
    from yarl import URL

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    loop = asyncio.get_running_loop()
    remote = pool.Pool(loop, URL("https://app.autocalls.ai"), trust_env=True)
    assert remote.proxy == URL("http://proxy.example:3128")
    assert pool.Pool(loop, URL("https://app.autocalls.ai"), trust_env=False).proxy is None
    monkeypatch.setenv("NO_PROXY", "app.autocalls.ai")
    assert pool.Pool(loop, URL("https://app.autocalls.ai"), trust_env=True).proxy is None


async def test_a_session_without_a_connection_limit_has_no_gate(server: MockAutocalls) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        AsyncAutocalls("t", base_url=server.base_url, rate_limit=None, session=session) as c,
    ):
        assert pool.gate_of(session) is None
        assert (await ask(c)).reply


async def test_a_conversations_turn_can_be_waited_for_directly() -> None:
    from autocalls_async._ordering import KeyedOrder

    order = KeyedOrder()
    await order.acquire("k")  # nobody had it: taken at once
    assert not order.try_acquire("k") and len(order) == 1
    order.release("k")
    assert len(order) == 0
