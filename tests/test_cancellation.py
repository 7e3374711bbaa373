"""Cancellation at every await: a call cancelled after any number of event-loop steps leaves
the client healthy: no per-conversation state, the limiter in order, nothing leaked, and the
conversation cache consistent with the server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from autocalls_async import AsyncAutocalls, ClientClosedError, RateLimit, Reply
from autocalls_async.testing import Fault, MockAutocalls

Make = Callable[..., AsyncAutocalls]
CUSTOMER = "+14155551234"
FAST_429 = Fault.body(
    429, b'{"message":"Too Many Attempts."}', "application/json", headers={"Retry-After": "0.01"}
)
FAST_503 = Fault.status(503, headers={"Retry-After": "0.01"})
# Cancel points: after N bare event-loop steps (validation, queueing, the first awaits), then
# after N milliseconds (sending, reading, backing off, waiting out a pause: real I/O).
POINTS = [("steps", n) for n in range(100)] + [("ms", n) for n in range(45)]


@pytest.mark.parametrize("phase", ["plain", "backoff-503", "pause-429", "slow-reply", "queued"])
async def test_cancel_after_every_step(make_client: Make, phase: str) -> None:
    """Cancel after 0, 1, 2, ... loop steps, through validation, ordering, the limiter, sending,
    reading and backing off; after each, check the invariants and that the next call works."""
    async with MockAutocalls(
        rate_limit=None, reply_delay=0.004 if phase == "slow-reply" else 0
    ) as server:
        client = make_client(server.base_url, rate_limit=RateLimit(200, 1.0, margin=0.0))
        outcomes: set[str] = set()
        for unit, amount in POINTS:
            if phase == "backoff-503":
                server.inject(FAST_503)
            elif phase == "pause-429":
                server.inject(FAST_429)
            blocker = None
            if phase == "queued":  # an earlier call of the same conversation is running
                blocker = asyncio.create_task(
                    client.generate_reply(
                        assistant_id=123, customer_identifier=CUSTOMER, message="first"
                    )
                )
            task = asyncio.create_task(
                client.generate_reply(
                    assistant_id=123, customer_identifier=CUSTOMER, message=f"m{unit}{amount}"
                )
            )
            if unit == "steps":
                for _ in range(amount):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(amount / 1000)
            finished_first = task.done()
            task.cancel()
            (result,) = await asyncio.gather(task, return_exceptions=True)
            if blocker is not None:
                await blocker
            outcomes.add("reply" if isinstance(result, Reply) else type(result).__name__)
            assert isinstance(result, Reply | asyncio.CancelledError), result
            # Invariants.
            assert len(client._order) == 0
            assert client.stats.waiting == 0
            assert client.stats.in_flight == 0
            cached = client.conversation_id(123, CUSTOMER)
            known = server.conversations.get((123, CUSTOMER))
            assert cached is None or (known is not None and cached == known.conversation_id)
            # The limiter and the transport still work: the next call goes through promptly.
            async with asyncio.timeout(5):
                probe = await client.generate_reply(
                    assistant_id=123, customer_identifier="probe", message="after"
                )
            assert probe.reply
            if finished_first:
                break
        assert "CancelledError" in outcomes
        assert finished_first, "the steps never reached the end of a call: raise STEPS"
        # Nothing was processed twice, whatever was cancelled where.
        processed = [r.body["message"] for r in server.requests if r.processed and r.body]
        mine = [m for m in processed if m.startswith("m")]
        assert len(mine) == len(set(mine))


async def test_concurrent_closes_while_calls_run(make_client: Make) -> None:
    """Two close() calls at once while calls are queued and in flight behave like one."""
    async with MockAutocalls(rate_limit=None, reply_delay=0.2) as server:
        client = make_client(server.base_url, rate_limit=RateLimit(2, 1.0))
        calls = [
            asyncio.create_task(
                client.generate_reply(assistant_id=123, customer_identifier=f"c{i}", message="m")
            )
            for i in range(6)
        ]
        await asyncio.sleep(0.05)
        await asyncio.gather(client.close(), client.close())
        results = await asyncio.gather(*calls, return_exceptions=True)
    replies = [r for r in results if isinstance(r, Reply)]
    closed = [r for r in results if isinstance(r, ClientClosedError)]
    # The window's two were granted at once; each was in flight (answered) or not yet sent
    # (closed) when close() came, as a loaded machine decides; never a third.
    assert 1 <= len(replies) <= 2
    assert len(closed) == 6 - len(replies)
    assert len(server.requests) == len(replies)
    assert client.stats.in_flight == 0
    assert client.stats.waiting == 0


async def test_close_during_unsafe_retry_reports_the_real_error(make_client: Make) -> None:
    """Closed while backing off after a 500 (retry_unsafe): the 500 is raised, not
    ClientClosedError, because the message may have been processed."""
    from autocalls_async import InternalServerError, RetryPolicy

    async with MockAutocalls(rate_limit=None) as server:
        server.inject(Fault.status(500, processed=True))
        client = make_client(
            server.base_url,
            retry_policy=RetryPolicy(retry_unsafe=True, backoff_base=2.0, backoff_max=2.0),
        )
        task = asyncio.create_task(
            client.generate_reply(assistant_id=123, customer_identifier="c", message="m")
        )
        while not server.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(InternalServerError):
            await task
    assert len(server.requests) == 1


async def test_close_during_safe_retry_is_client_closed(make_client: Make) -> None:
    """Closed while backing off after a 503: nothing was processed, ClientClosedError."""
    async with MockAutocalls(rate_limit=None) as server:
        server.inject(Fault.status(503, headers={"Retry-After": "5"}))
        client = make_client(server.base_url)
        task = asyncio.create_task(
            client.generate_reply(assistant_id=123, customer_identifier="c", message="m")
        )
        while not server.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(ClientClosedError):
            await task
