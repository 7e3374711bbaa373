"""Shared backends on Redis: one token's rate limit across processes and hosts, and the
conversation cache every worker sees. Needs the ``redis`` extra (redis-py's asyncio client).

The limiter is the same algorithm as the local and host ones (``_schedule``: the rules and why
they keep the limit are written there), kept in one Redis key per token: a small JSON state,
read together with Redis's ``TIME`` (``lua/read.lua``) and written back only if nobody wrote it
meanwhile (``lua/cas.lua``, compare and set; a lost race reads again). Every process and host
therefore applies one schedule, on one clock (Redis's; client clocks disagree). Each operation
costs two round trips; a slot costs one grant and one report, and waiting costs nothing but a
poll when another process's grant is outstanding.

A Redis restart or ``FLUSHALL`` loses the schedule: other processes' recent starts are
forgotten (each process still keeps its own last start and pause, so none starts sooner than
those allow; across processes, at most one period may then see up to twice the limit). Keys
expire once they no longer constrain anything.

Redis unreachable or failing: ``LimiterUnavailableError`` (nothing was sent) within about
twice ``timeout`` (one attempt and one retry on a fresh connection), and then at once, for
``timeout`` seconds, for every waiter queued behind it, so a queue never drains one timeout at a
time; a WARNING is logged once per outage and an INFO when Redis answers again. A caller
holding a grant when Redis fails still sends on it: that is within the limit. ``fallback=``
opts in to another limiter (e.g. ``LocalRateLimiter`` with this process's share of the limit)
during an outage.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._errors import LimiterUnavailableError
from ._lifecycle import AsyncClosing
from ._log import logger
from ._models import Conversation, RateLimit
from ._ratelimit import DEFAULT_LEASE, Limiter, RateLimiter
from ._schedule import TokenState

__all__ = ["RedisConversationStore", "RedisRateLimiter", "RedisStore"]

T = TypeVar("T")
DEFAULT_RATE_LIMIT = RateLimit(5, 60.0)
#: Keys live this long after the last moment they constrain anything.
_EXPIRY_SLACK_MS = 1_000
#: Compare-and-set attempts before contention counts as an outage (never seen in practice:
#: each attempt loses only to a write made between our read and our write).
_CAS_ATTEMPTS = 50


def _script(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


def redact_url(url: str) -> str:
    """The URL without its password, for messages and ``repr()``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        netloc = f"{user}:***@{host}{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<redis url>"


def _connect(url: str | Redis, timeout: float) -> tuple[Redis, bool, str]:
    """(client, whether we own it, where it points, password hidden)."""
    if isinstance(url, Redis):
        kwargs = url.connection_pool.connection_kwargs
        where = f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        return url, False, where
    if not isinstance(url, str):
        raise TypeError(f"url must be a redis:// URL or a redis.asyncio.Redis, not {url!r}")
    client = Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One quick retry covers a pooled connection that went stale (a Redis restart); more
        # would only delay the clear error users need.
        retry=Retry(NoBackoff(), 1),
    )
    return client, True, redact_url(url)


def _check_timeout(timeout: float) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class RedisStore:
    """One token's schedule in one Redis key, updated by compare-and-set on Redis's clock."""

    kind = "redis"

    def __init__(self, url: str | Redis, *, prefix: str, timeout: float) -> None:
        self.prefix = prefix
        self.timeout = _check_timeout(timeout)
        self.redis, self.owned, self.where = _connect(url, self.timeout)
        self._read = self.redis.register_script(_script("read.lua"))
        self._cas = self.redis.register_script(_script("cas.lua"))
        self._down_until = -math.inf
        self._down_error: LimiterUnavailableError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def place(self) -> str:
        """Where the schedules are, as warnings name it."""
        return f"Redis at {self.where} (prefix {self.prefix!r})"

    def redis_key(self, key: str) -> str:
        """The key name; the braces keep a token's keys on one Redis Cluster slot."""
        return f"{self.prefix}rl:{{{key}}}"

    async def aclose(self) -> None:
        if self.owned:
            await self.redis.aclose()

    def try_update(
        self, key: str, update: Callable[[TokenState, float], T]
    ) -> tuple[bool, T | None]:
        return False, None  # always a round trip

    async def update(self, key: str, update: Callable[[TokenState, float], T]) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "this RedisRateLimiter was first used in another event loop; its connections "
                "belong to one loop: create one limiter per event loop"
            )
        name = self.redis_key(key)
        for _ in range(_CAS_ATTEMPTS):
            seconds, micros, raw = await self._call(
                "reading the schedule", functools.partial(self._read, [name])
            )
            now = int(seconds) + int(micros) / 1_000_000
            text = raw.decode() if isinstance(raw, bytes) else (raw or "")
            state = _decode(text)
            result = update(state, now)
            latest = state.latest()
            if state.holder is None and latest <= now:
                new = ""  # nothing left to remember
            else:
                new = json.dumps(state.to_json(), separators=(",", ":"))
            if new == text:
                return result
            ttl = max(1, math.ceil((latest - now) * 1000)) + _EXPIRY_SLACK_MS if new else 0
            written = await self._call(
                "updating the schedule", functools.partial(self._cas, [name], [text, new, ttl])
            )
            if int(written):
                return result
        raise LimiterUnavailableError(
            f"the Redis rate limiter at {self.where} is too contended: {_CAS_ATTEMPTS} "
            "attempts to update the schedule lost to other writers; nothing was sent"
        )

    async def _call(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis operation; any failure becomes ``LimiterUnavailableError``."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until and self._down_error is not None:
            raise LimiterUnavailableError(str(self._down_error))
        try:
            # The socket timeouts bound each attempt; this bounds the attempts together.
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                return await operation()
        except (RedisError, OSError) as exc:
            error = LimiterUnavailableError(
                f"the Redis rate limiter at {self.where} is unavailable while {what} "
                f"({type(exc).__name__}: {_short(exc)}); nothing was sent"
            )
            # Waiters queued behind this one fail at once for a while instead of each waiting
            # for its own timeout.
            self._down_until, self._down_error = loop.time() + self.timeout, error
            raise error from exc


def _decode(text: str) -> TokenState:
    if not text:
        return TokenState()
    try:
        return TokenState.from_json(json.loads(text))
    except (ValueError, TypeError, KeyError, IndexError):
        logger.warning("Redis rate limiter: an unreadable schedule was started afresh")
        return TokenState()


class RedisRateLimiter(Limiter):
    """A rate limiter shared through Redis by every process and host using the same token.

    Same algorithm and guarantee as the host limiter: per token, never more than
    ``rate_limit.requests`` starts in any rolling ``rate_limit.period``, now across hosts. Pass
    it as ``AsyncAutocalls(limiter=...)``; one limiter serves many clients and tokens, and
    clients never close it: use ``async with RedisRateLimiter(...)`` or ``await
    limiter.aclose()``. Every process sharing a token must use the same ``rate_limit`` (a
    different one is refused while another live limiter uses the token).

    ``url`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL (or a ``redis.asyncio.Redis``
    of yours, used and never closed). ``timeout`` bounds each Redis attempt; past it (or when
    Redis refuses the connection) a call raises ``LimiterUnavailableError`` and sends nothing,
    unless ``fallback`` names a limiter to use meanwhile (give it this process's share of the
    limit: a per-process limiter at the full rate would multiply it by the process count).
    """

    def __init__(
        self,
        url: str | Redis,
        *,
        rate_limit: RateLimit = DEFAULT_RATE_LIMIT,
        prefix: str = "autocalls:",
        timeout: float = 1.0,
        fallback: RateLimiter | None = None,
        lease: float = DEFAULT_LEASE,
        background_share: int = 5,
    ) -> None:
        if not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit(requests, period), got {rate_limit!r}")
        self.redis_store = RedisStore(url, prefix=prefix, timeout=timeout)
        super().__init__(
            self.redis_store,
            rate_limit,
            lease=lease,
            background_share=background_share,
            fallback=fallback,
        )
        self.prefix = prefix
        self.timeout = self.redis_store.timeout

    def __repr__(self) -> str:
        return (
            f"<RedisRateLimiter {self.redis_store.where} {self.rate_limit} prefix={self.prefix!r}>"
        )

    def redis_key(self, key: str) -> str:
        """The Redis key holding this token's schedule."""
        return self.redis_store.redis_key(key)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------- conversations


class RedisConversationStore(AsyncClosing):
    """The conversation cache in Redis, so every worker and host sees the same ids.

    Entries expire ``ttl`` seconds after they were last written (default 30 days), which
    bounds the memory used. Keys hold a hash of the customer identifier (phone numbers and
    e-mail addresses stay out of key names and ``KEYS``/``SCAN`` output). The cache is best
    effort: a Redis failure is logged and reads as a miss, and a write that fails never turns a
    reply the service already processed into an error.
    """

    def __init__(
        self,
        url: str | Redis,
        *,
        ttl: float = 30 * 24 * 3600.0,
        prefix: str = "autocalls:",
        timeout: float = 1.0,
    ) -> None:
        self.ttl = _check_timeout(ttl)
        self.prefix = prefix
        self.timeout = _check_timeout(timeout)
        self._redis, self._owned, self._where = _connect(url, self.timeout)

    def __repr__(self) -> str:
        return f"<RedisConversationStore {self._where} ttl={self.ttl:g}s prefix={self.prefix!r}>"

    async def aclose(self) -> None:
        """Close the connection pool (if ours)."""
        if self._owned:
            await self._redis.aclose()

    def redis_key(self, assistant_id: int, customer_identifier: str) -> str:
        digest = hashlib.sha256(customer_identifier.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}conv:{assistant_id}:{digest[:32]}"

    async def get(self, assistant_id: int, customer_identifier: str) -> Conversation | None:
        """The conversation any worker last stored, or None (also when Redis fails)."""
        key = self.redis_key(assistant_id, customer_identifier)
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                raw: Any = await self._redis.get(key)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("conversation store at %s: read failed: %s", self._where, _short(exc))
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            conversation = Conversation(
                int(data["assistant_id"]),
                str(data["customer_identifier"]),
                str(data["conversation_id"]),
                bool(data["ai_disabled"]),
                float(data["last_seen"]),
            )
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("conversation store: ignoring a malformed entry %s: %s", key, exc)
            return None
        if (conversation.assistant_id, conversation.customer_identifier) != (
            assistant_id,
            customer_identifier,
        ):
            return None  # a hash collision, however unlikely, must not leak another customer
        return conversation

    async def set(self, conversation: Conversation) -> None:
        """Remember the conversation for ``ttl`` seconds; failures are logged, not raised."""
        key = self.redis_key(conversation.assistant_id, conversation.customer_identifier)
        value = json.dumps(
            {
                "assistant_id": conversation.assistant_id,
                "customer_identifier": conversation.customer_identifier,
                "conversation_id": conversation.conversation_id,
                "ai_disabled": conversation.ai_disabled,
                "last_seen": conversation.last_seen,
            },
            separators=(",", ":"),
        )
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                await self._redis.set(key, value, px=max(1, round(self.ttl * 1000)))
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("conversation store at %s: write failed: %s", self._where, _short(exc))
