"""What the clients of one process share: a connection pool per event loop and origin, and a
default rate limiter per rate.

aiohttp's advice is one ``ClientSession`` for an application: a session is a connection pool
(a ``TCPConnector``: keep-alive, at most 100 connections). A client made without ``session=``
leases the pool of its base URL's origin in its event loop at its first request, and gives it
back when it closes; the last one to close closes the pool. The pool's session holds no token:
each client sends its own ``Authorization`` header, and its own timeout, with each request.

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

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from ._decoding import ACCEPT_ENCODING
from ._models import RateLimit
from ._ratelimit import Limiter, default_limiter
from ._wire import COMMON_HEADERS

__all__ = ["LimiterKey", "Pool", "lease_limiter", "lease_pool", "release_limiter", "release_pool"]

_LOCK = threading.Lock()  # event loops in several threads lease pools and limiters


class Pool:
    """One origin's connections in one event loop: a ``ClientSession`` without a token."""

    __slots__ = ("_session", "key", "loop", "proxy", "proxy_auth", "users")

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

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session, made at the first request (in the loop: aiohttp needs it running)."""
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
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
    if pool is None or pool.closed:
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
