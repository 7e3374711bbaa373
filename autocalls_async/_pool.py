"""What the clients of one process share: a connection pool per event loop and origin, and a
default rate limiter per rate.

aiohttp's advice is one ``ClientSession`` for an application: a session is a connection pool
(a ``TCPConnector``: keep-alive, at most 100 connections). A client made without ``session=``
leases the pool of its base URL's origin in its event loop at its first request, and gives it
back when it closes; the last one to close closes the pool. The pool's session holds no token:
each client sends its own ``Authorization`` header, and its own timeout, with each request.

A pool has at most ``POOL_LIMIT`` connections (aiohttp's default). Calls take a place at its
``Gate`` before they ask the rate limiter for a slot, and keep it until their response is
read: a call holds a rate-limit grant only once a connection is there for it. Without the gate,
10,000 tokens' granted calls would queue inside aiohttp for 100 connections, their grants
running out while they wait (and each one lost closing a connection). A caller's own
``session=`` gets a gate of its connector's limit, shared by every client that uses it.

A client made without ``limiter=`` leases the process's default limiter for its rate (the host
store, or Redis when ``AUTOCALLS_REDIS_URL`` is set), closed with the last client that leased
it: a limiter keeps a queue per token, so one serves every token of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections import deque

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from ._decoding import ACCEPT_ENCODING
from ._models import RateLimit
from ._ratelimit import Limiter, default_limiter
from ._wire import COMMON_HEADERS

__all__ = [
    "POOL_LIMIT",
    "Gate",
    "LimiterKey",
    "Pool",
    "gate_of",
    "lease_limiter",
    "lease_pool",
    "release_limiter",
    "release_pool",
]

#: Connections per pool: aiohttp's default ``TCPConnector(limit=100)``, said out loud.
POOL_LIMIT = 100

_LOCK = threading.Lock()  # event loops in several threads lease pools and limiters


class Gate:
    """At most ``size`` calls at once between a rate-limit slot and their response; two lanes
    (``Priority``: interactive first), first come first served in each; a cancelled waiter
    leaves in O(1) (its future stays in the deque, done, and is skipped)."""

    __slots__ = ("_lanes", "free")

    def __init__(self, size: int) -> None:
        self.free = size
        self._lanes: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),
            deque(),
        )

    def _nobody_waits(self) -> bool:
        for lane in self._lanes:
            while lane and lane[0].done():
                lane.popleft()
            if lane:
                return False
        return True

    def try_take(self) -> bool:
        """A place now, if one is free and nobody waits for one (the usual case)."""
        if self.free > 0:
            interactive, background = self._lanes
            if (not interactive and not background) or self._nobody_waits():
                self.free -= 1
                return True
        return False

    async def take(self, lane: int) -> None:
        """Wait for a place in ``lane`` (0: interactive, 1: background)."""
        if self.try_take():
            return
        future = asyncio.get_running_loop().create_future()
        self._lanes[lane].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.give()  # handed to us as we were cancelled: pass it on
            raise

    def give(self) -> None:
        """Give a place back: to the next waiter, interactive first, else to the free ones."""
        interactive, background = self._lanes
        if interactive or background:
            for lane in self._lanes:
                while lane:
                    future = lane.popleft()
                    if not future.done():
                        future.set_result(None)  # the place passes straight to it
                        return
        self.free += 1


class Pool:
    """One origin's connections in one event loop: a ``ClientSession`` without a token."""

    __slots__ = ("_session", "gate", "key", "loop", "proxy", "proxy_auth", "users")

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: URL, *, trust_env: bool) -> None:
        self.loop = loop
        self.key = (origin.scheme, origin.host, origin.port, trust_env)
        self.users = 0  #: clients holding a lease (an ``AutocallsAccounts`` holds one for all)
        self.proxy: URL | None = None
        self.proxy_auth: aiohttp.BasicAuth | None = None
        if trust_env:
            # The environment's proxy (HTTPS_PROXY, NO_PROXY, ~/.netrc) is looked up once here:
            # aiohttp's trust_env would look it up in a worker thread on every request, which
            # costs more than the rest of a call. Never for a loopback base URL, where a
            # plain-http proxy would see the token.
            with contextlib.suppress(LookupError):  # no proxy for this URL
                self.proxy, self.proxy_auth = get_env_proxy_for_url(origin)
        self._session: aiohttp.ClientSession | None = None
        self.gate = Gate(POOL_LIMIT)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session, made at the first request (in the loop: aiohttp needs it running)."""
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=POOL_LIMIT),
                # What every token sends alike; each request adds its token and timeout.
                headers={**COMMON_HEADERS, "Accept-Encoding": ACCEPT_ENCODING},
                trust_env=False,
                # The API is stateless; a cookie jar would only grow.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return session

    @property
    def closed(self) -> bool:
        return self._session is not None and self._session.closed

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[object, Pool]] = (
    weakref.WeakKeyDictionary()
)
#: The gates of callers' sessions (``session=``), one per session, shared by its clients.
_SESSION_GATES: weakref.WeakKeyDictionary[aiohttp.ClientSession, Gate] = weakref.WeakKeyDictionary()


def gate_of(session: aiohttp.ClientSession) -> Gate | None:
    """The gate of a caller's session, sized by its connector's limit (None: no limit)."""
    gate = _SESSION_GATES.get(session)
    if gate is None:
        connector = session.connector
        limit = connector.limit if connector is not None else 0
        if not limit:
            return None
        gate = _SESSION_GATES[session] = Gate(limit)
    return gate


def lease_pool(url: URL, *, trust_env: bool) -> Pool:
    """This loop's pool for ``url``'s origin, one lease more: give it back with
    ``release_pool``."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        pools = _POOLS.get(loop)
        if pools is None:
            pools = _POOLS[loop] = {}
    key = (url.scheme, url.host, url.port, trust_env)
    pool = pools.get(key)  # this loop's own: only its thread reaches it from here on
    if pool is None:  # a pool leaves the registry before it closes
        pool = pools[key] = Pool(loop, url.origin(), trust_env=trust_env)
    pool.users += 1
    return pool


async def release_pool(pool: Pool) -> None:
    """Give a lease back; the last one closes the pool."""
    pool.users -= 1
    if pool.users > 0:
        return
    pools = _POOLS.get(pool.loop)
    if pools is not None and pools.get(pool.key) is pool:
        del pools[pool.key]  # a client leasing from now on gets a new pool
    await pool.aclose()


class _Shared:
    __slots__ = ("leases", "limiter")

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.leases = 0


LimiterKey = tuple[RateLimit, str, str]
#: (rate, AUTOCALLS_REDIS_URL, AUTOCALLS_LIMITER_DIR) -> the limiter and its leases
_LIMITERS: dict[LimiterKey, _Shared] = {}


def lease_limiter(rate_limit: RateLimit) -> tuple[Limiter, LimiterKey]:
    """The default limiter for ``rate_limit`` in this process and environment, one lease more:
    give it back with ``release_limiter(key, limiter)``."""
    env = os.environ
    key = (rate_limit, env.get("AUTOCALLS_REDIS_URL") or "", env.get("AUTOCALLS_LIMITER_DIR") or "")
    with _LOCK:
        shared = _LIMITERS.get(key)
        if shared is None:
            shared = _LIMITERS[key] = _Shared(default_limiter(rate_limit))
        shared.leases += 1
        return shared.limiter, key


async def release_limiter(key: LimiterKey, limiter: Limiter) -> None:
    """Give a lease back; the last one closes the limiter (its tokens are then free to be
    used at another rate)."""
    with _LOCK:
        shared = _LIMITERS.get(key)
        if shared is None or shared.limiter is not limiter:
            return  # pragma: no cover (a client gives its lease back once)
        shared.leases -= 1
        if shared.leases:
            return
        del _LIMITERS[key]
    await limiter.aclose()
