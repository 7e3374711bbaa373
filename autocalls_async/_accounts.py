"""``AutocallsAccounts``: a platform's entry point, one client per API token in one process.

A CRM, a helpdesk or an inbox calls the service for many accounts, each with its own token and
its own 5 requests a minute. ``accounts.client(token)`` returns that token's ``AsyncAutocalls``,
made in microseconds the first time and kept while it is used. Every token's client shares
what is worth sharing: the connection pool (or your ``session=``), the rate limiter (one queue
per token inside it), the conversation cache and store, the budget, the settings, and the
process's telemetry. A token whose client had no call for ``idle_after`` seconds is forgotten,
so memory holds the tokens in use, not every token ever seen.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Self

import aiohttp

from ._budget import Budget, Ledger, Usage
from ._client import (
    DEFAULT_MAX_RESPONSE_SIZE,
    DEFAULT_RATE_LIMIT,
    AsyncAutocalls,
    ClientStats,
    TelemetryAttributes,
    _check_attributes,
    _check_limiter_object,
    _Setup,
)
from ._conversations import ConversationStore, MemoryConversationStore
from ._errors import ClientClosedError, InvalidRequestError
from ._lifecycle import AsyncOnly
from ._log import configure_from_env
from ._models import Priority, RateLimit
from ._ordering import KeyedOrder
from ._pool import lease_pool, release_pool
from ._ratelimit import RateLimiter
from ._retry import RetryPolicy
from ._wire import DEFAULT_MAX_REQUEST_BYTES

__all__ = ["AutocallsAccounts"]

#: The counters of ``ClientStats`` that add up across clients.
_SUMMED = ("requests", "replies", "errors", "retries", "rate_limited", "limiter_wait")


class _Entry:
    __slots__ = ("client", "used")

    def __init__(self, client: AsyncAutocalls, used: float) -> None:
        self.client = client
        self.used = used  #: loop time of the last ``client(token)`` that returned it


class AutocallsAccounts(AsyncOnly):
    """Clients for many API tokens in one process, sharing one pool, limiter and caches.

    ``accounts.client(token)`` is that token's ``AsyncAutocalls``: call it for each request
    (a dictionary lookup once the client exists, microseconds the first time) and use the
    client as usual; don't close it, the accounts object does. Every argument but
    ``idle_after`` is ``AsyncAutocalls``' and applies to every token, with these differences:

    * ``limiter``: one limiter serves every token (each has its own queue and schedule in
      it); the default is the host store, or Redis with ``AUTOCALLS_REDIS_URL``.
      ``RateLimit.from_server()`` is refused: it would change the rate of every token.
    * ``budget``: one cap for every token together (``usage`` counts them all). Quotas per
      account belong in your database: they must outlive a restart and span processes.
    * ``conversation_cache_size``: one cache for every token, each token's conversations
      under its own key (a token never sees another's).
    * ``idle_after``: a token whose client was not asked for during that many seconds, and
      has no call waiting or in flight, is forgotten: the next ``client(token)`` makes a new
      client. Its counters stay in ``stats``.

    Use it with ``async with`` (or ``close()``): closing fails every token's waiting calls
    with ``ClientClosedError``, lets calls already sent finish, and closes the pool.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT,
        limiter: RateLimiter | None = None,
        priority: Priority = Priority.INTERACTIVE,
        max_retries: int = 2,
        timeout: float | None = 60.0,
        session: aiohttp.ClientSession | None = None,
        retry_unsafe: bool = False,
        max_wait: float | None = None,
        retry_policy: RetryPolicy | None = None,
        conversation_store: ConversationStore | None = None,
        conversation_cache_size: int = 100_000,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
        budget: Budget | None = None,
        normalize_identifier: Callable[[str], str] | None = None,
        idle_after: float = 300.0,
    ) -> None:
        configure_from_env()
        _check_limiter_object(limiter)
        setup = _Setup(
            None,
            base_url=base_url,
            rate_limit=rate_limit,
            limiter=limiter,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            session=session,
            retry_unsafe=retry_unsafe,
            max_wait=max_wait,
            retry_policy=retry_policy,
            conversation_store=conversation_store,
            conversation_cache_size=conversation_cache_size,
            max_response_size=max_response_size,
            max_request_bytes=max_request_bytes,
            budget=budget,
            normalize_identifier=normalize_identifier,
            telemetry_attributes=None,
        )
        if setup.follows_server:
            raise InvalidRequestError(
                "RateLimit.from_server() adopts one token's stated limit in its own limiter; "
                "AutocallsAccounts shares one limiter between every token: give the rate, "
                "e.g. rate_limit=RateLimit(5, 60.0)"
            )
        if (
            isinstance(idle_after, bool)
            or not isinstance(idle_after, int | float)
            or not idle_after >= 0
        ):
            raise InvalidRequestError(f"idle_after must be seconds >= 0, got {idle_after!r}")
        #: Seconds a token's client is kept without being asked for (and with nothing to do).
        self.idle_after = float(idle_after)
        setup.near = MemoryConversationStore(conversation_cache_size)
        setup.order = KeyedOrder()
        setup.parent_ledger = Ledger(
            budget, by_assistant=False, scope=" shared by every token of this AutocallsAccounts"
        )
        setup.own_limiter()  # last: a refused one leases nothing
        self._setup = setup
        self.base_url = setup.base_url
        self._clients: OrderedDict[str, _Entry] = OrderedDict()
        #: Every client made and still alive, forgotten or not: close() closes them all.
        self._made: weakref.WeakSet[AsyncAutocalls] = weakref.WeakSet()
        self._retired = ClientStats()  # the counters of forgotten clients
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AutocallsAccounts {self.base_url} tokens={len(self._clients)} {state}>"

    def __len__(self) -> int:
        """Tokens whose client is kept now."""
        return len(self._clients)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def client(
        self, api_token: str, *, telemetry_attributes: TelemetryAttributes | None = None
    ) -> AsyncAutocalls:
        """The client of ``api_token``, made now if this token has none (a bad token raises
        ``InvalidRequestError``, as ``AsyncAutocalls`` does). ``telemetry_attributes``, when
        given, replace the client's (see ``AsyncAutocalls``): per-token figures, opt-in."""
        if self._closed:
            raise ClientClosedError(
                "this AutocallsAccounts is closed; nothing was sent: keep it open for the "
                "app's lifetime (`async with AutocallsAccounts() as accounts:` in its lifespan)"
            )
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._bind(loop)
        now = loop.time()
        clients = self._clients
        entry = clients.get(api_token)
        if entry is None or entry.client.closed:
            try:
                client = AsyncAutocalls._of_account(self._setup, api_token, self)
            except InvalidRequestError as error:
                # No frame of the error's traceback may hold the token (an error reporter
                # that records frames' local variables would show it).
                del api_token
                error.__traceback__ = None
                error.__context__ = None
                raise
            self._made.add(client)
            entry = clients[api_token] = _Entry(client, now)
        else:
            entry.used = now
            clients.move_to_end(api_token)
        if telemetry_attributes is not None:
            entry.client.telemetry_attributes = _check_attributes(telemetry_attributes)
        self._forget_idle(now)
        return entry.client

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError(
                "this AutocallsAccounts was first used in another event loop; its connection "
                "pool and its clients belong to that loop: make one per event loop"
            )
        self._loop = loop
        setup = self._setup
        if setup.session is None:
            setup.pool = lease_pool(setup.endpoint, trust_env=setup.trust_env)

    def _forget_idle(self, now: float) -> None:
        clients = self._clients
        horizon = now - self.idle_after
        while clients:
            token, entry = next(iter(clients.items()))
            if entry.used > horizon:
                return
            stats = entry.client.stats
            if stats.waiting or stats.in_flight:  # busy: kept, as if just asked for
                entry.used = now
                clients.move_to_end(token)
                continue
            del clients[token]
            self._retire(stats)

    def _retire(self, stats: ClientStats) -> None:
        retired = self._retired
        for name in _SUMMED:
            setattr(retired, name, getattr(retired, name) + getattr(stats, name))
        if stats.server_limit is not None:
            retired.server_limit = stats.server_limit

    @property
    def stats(self) -> ClientStats:
        """Every token's counters added up, forgotten tokens' included (a new object each
        time); ``server_limit`` is the last limit a server stated to any of them."""
        total = ClientStats()
        total.server_limit = self._retired.server_limit
        for stats in [self._retired, *(entry.client.stats for entry in self._clients.values())]:
            for name in _SUMMED:
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            total.in_flight += stats.in_flight
            total.waiting += stats.waiting
            if stats.server_limit is not None:
                total.server_limit = stats.server_limit
        return total

    @property
    def usage(self) -> Usage:
        """Calls sent, billed, possibly billed and refused by every token together, and the
        shared ``budget`` (totals only: ``by_assistant`` is empty; a token's client has its
        own ``usage`` while it is kept)."""
        ledger = self._setup.parent_ledger
        assert ledger is not None
        return ledger.usage()

    @property
    def budget(self) -> Budget | None:
        return self._setup.budget

    async def close(self) -> None:
        """Close every token's client (waiting calls fail with ``ClientClosedError``, calls
        sent finish), then the pool and the default limiter. Safe to call more than once."""
        self._closed = True
        clients = list(self._made)
        self._clients.clear()
        if clients:
            await asyncio.gather(*(client.close() for client in clients))
        setup = self._setup
        pool, setup.pool = setup.pool, None
        if pool is not None:
            await release_pool(pool)
        await setup.release_limiter()
