"""Shared backends on Redis: one token's rate limit across processes and hosts, and the
conversation cache every worker sees. Needs the ``redis`` extra (redis-py's asyncio client).

The limiter is a reservation schedule kept by one Lua script per slot, on Redis's clock:

* ``{prefix}rl:{key}:next`` holds the earliest start (Redis ``TIME``, microseconds) the next
  request may have. The script reads ``TIME``, computes ``start = max(now, next, pause)``, sets
  ``next = start + interval`` and answers the wait ``start - now``. Reservations are made one at
  a time on the server, so starts are ``interval`` apart whichever process or host made them,
  and no client's clock is ever read (they disagree; durations measured locally are fine).
* ``{prefix}rl:{key}:pause`` holds the end of a 429's ``Retry-After``: every process's next
  reservation starts after it, and a process that slept on an earlier reservation checks it
  again before sending.
* A caller with a deadline passes the longest wait it accepts; the script refuses rather than
  reserve a slot the caller would give up, so ``max_wait`` wastes nothing. A caller cancelled
  while sleeping on its reservation gives it back when it is still the last one (compare and
  set); otherwise that slot is wasted, which is under the limit, never over it.
* Late sends: the server counts a request when it arrives. A send later than a quarter of the
  margin after its reserved start reports its lateness, and the script pushes ``next`` (and so
  every later reservation) back by that much, as the local limiter spaces from the real send.
  Reservations other processes made before the report cannot move; the margin (2 % of the
  period) absorbs that one shortened gap.

In front of Redis, each process queues its waiters in a ``FifoGate`` per token, held from the
reservation until the request is written: round trips are per slot, never per waiter (one
reservation; after a wait, one read of the pause; a report only for a late send), waiters are
served first come first served, and a cancelled waiter leaves the queue in O(1).

Redis unreachable or failing: ``LimiterUnavailableError`` (nothing was sent) within about
twice ``timeout`` (one attempt and one retry on a fresh connection), and then at once, for
``timeout`` seconds, for every waiter queued behind it, so a queue never drains one timeout at a
time. A caller holding a reservation when Redis fails still sends on it: that is within the
limit. ``fallback=`` opts in to another limiter
(e.g. ``LocalRateLimiter`` with this process's share of the limit) during an outage, logged.
Keys expire once they no longer constrain anything, so nothing accumulates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._errors import LimiterUnavailableError, RateLimitTimeout
from ._lifecycle import AsyncClosing
from ._log import logger
from ._models import Conversation, RateLimit
from ._ratelimit import FifoGate, RateLimiter, Slot

__all__ = ["RedisConversationStore", "RedisRateLimiter"]

T = TypeVar("T")
_US = 1_000_000
DEFAULT_RATE_LIMIT = RateLimit(5, 60.0)
#: Keys live this long after the last moment they constrain anything.
_EXPIRY_SLACK_MS = 1_000
#: How long a Redis round trip may take past a caller's deadline before ``RateLimitTimeout``.
_ROUND_TRIP_GRACE = 0.1

# Redis < 5 refuses writes after TIME in a script unless it replicates effects, not the script
# (the default from Redis 5 on, where the call is a harmless no-op).
_REPLICATE = "if redis.replicate_commands then redis.replicate_commands() end\n"

# KEYS: next, pause. ARGV: interval (us), longest acceptable wait (us, -1: any), slack (ms).
# Returns {1, wait_us, start_us} when reserved, {0, wait_us} when the wait is too long.
_RESERVE = (
    _REPLICATE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = now
local nxt = tonumber(redis.call('GET', KEYS[1]))
if nxt and nxt > start then start = nxt end
local pause = tonumber(redis.call('GET', KEYS[2]))
if pause and pause > start then start = pause end
local wait = start - now
local max_wait = tonumber(ARGV[2])
if max_wait >= 0 and wait > max_wait then return {0, wait} end
local after = start + tonumber(ARGV[1])
local ttl = math.ceil((after - now) / 1000) + tonumber(ARGV[3])
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', ttl)
return {1, wait, start}
"""
)

# KEYS: next. ARGV: our start (us), interval (us), slack (ms). Gives our reservation back if no
# one reserved after it (and no late send moved it). Returns 1 if given back.
_RELEASE = (
    _REPLICATE
    + """
local after = tonumber(ARGV[1]) + tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[1])) ~= after then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = tonumber(ARGV[1])
if start <= now then redis.call('DEL', KEYS[1]) return 1 end
local ttl = math.ceil((start - now) / 1000) + tonumber(ARGV[3])
redis.call('SET', KEYS[1], string.format('%.0f', start), 'PX', ttl)
return 1
"""
)

# KEYS: next. ARGV: lateness (us), interval (us), slack (ms). A send was late: move the schedule.
_LATE = (
    _REPLICATE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nxt = tonumber(redis.call('GET', KEYS[1]))
local after
if nxt then after = nxt + tonumber(ARGV[1]) else after = now + tonumber(ARGV[2]) end
if after <= now then return 0 end
local ttl = math.ceil((after - now) / 1000) + tonumber(ARGV[3])
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', ttl)
return 1
"""
)

# KEYS: pause. ARGV: pause length (us; 0 only reads), slack (ms). Returns the pause left (us).
_PAUSE = (
    _REPLICATE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = tonumber(redis.call('GET', KEYS[1])) or 0
local length = tonumber(ARGV[1])
if length > 0 and now + length > untl then
  untl = now + length
  local ttl = math.ceil(length / 1000) + tonumber(ARGV[2])
  redis.call('SET', KEYS[1], string.format('%.0f', untl), 'PX', ttl)
end
if untl > now then return untl - now end
return 0
"""
)


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


class _KeyState:
    """One token's queue in this process, in front of Redis."""

    __slots__ = ("gate", "queued")

    def __init__(self) -> None:
        self.gate = FifoGate()
        self.queued = 0  # callers waiting for the gate

    def idle(self) -> bool:
        return not self.queued and not self.gate.locked()


class RedisRateLimiter(AsyncClosing):
    """A rate limiter shared through Redis by every process and host using the same token.

    Same guarantee as the local limiter: per token, never more than ``rate_limit.requests``
    starts in any rolling ``rate_limit.period``, now across processes and hosts. Pass it as
    ``AsyncAutocalls(limiter=...)``; one limiter serves many clients and tokens, and clients
    never close it: use ``async with RedisRateLimiter(...)`` or ``await limiter.aclose()``.
    Every process sharing a token must use the same ``rate_limit``.

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
    ) -> None:
        if not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit(requests, period), got {rate_limit!r}")
        self.rate_limit = rate_limit
        self.prefix = prefix
        self.timeout = _check_timeout(timeout)
        self.fallback = fallback
        self._redis, self._owned, self._where = _connect(url, self.timeout)
        self._interval_us = round(rate_limit.interval * _US)
        # A send this much later than its reserved start is reported so the schedule moves;
        # smaller delays are absorbed by the margin, four times over, without a round trip.
        self.late_tolerance = rate_limit.margin * rate_limit.period / 4
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
        self._late = self._redis.register_script(_LATE)
        self._pause = self._redis.register_script(_PAUSE)
        self._keys: dict[str, _KeyState] = {}
        self._reports: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = -math.inf
        self._down_error: LimiterUnavailableError | None = None

    def __repr__(self) -> str:
        return f"<RedisRateLimiter {self._where} {self.rate_limit} prefix={self.prefix!r}>"

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Finish pending late-send reports and close the connection pool (if ours)."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)
        if self._owned:
            await self._redis.aclose()

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "this RedisRateLimiter was first used in another event loop; its connections "
                "and queues belong to one loop: create one limiter per event loop"
            )
        return loop

    # ------------------------------------------------------------------ Redis calls

    def redis_keys(self, key: str) -> tuple[str, str]:
        """(next, pause) key names; the braces keep both on one Redis Cluster slot."""
        base = f"{self.prefix}rl:{{{key}}}"
        return f"{base}:next", f"{base}:pause"

    async def _call(
        self,
        what: str,
        operation: Callable[[], Awaitable[T]],
        deadline: float | None = None,
    ) -> T:
        """Run one Redis operation; any failure becomes ``LimiterUnavailableError``.

        A caller's ``deadline`` (``max_wait``) earlier than the operation's own bound turns a
        slow Redis into ``RateLimitTimeout`` at that deadline, as the local limiter would.
        """
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until and self._down_error is not None:
            raise LimiterUnavailableError(str(self._down_error))
        # The socket timeouts bound each attempt; this bounds the attempts together.
        bound = loop.time() + self.timeout * 2 + 0.5
        if deadline is not None:
            # The round trip itself is not waiting for a slot: max_wait=0 still gets a free one.
            deadline = max(deadline, loop.time() + min(_ROUND_TRIP_GRACE, self.timeout))
        caller_first = deadline is not None and deadline < bound
        try:
            async with asyncio.timeout_at(deadline if caller_first else bound):
                return await operation()
        except (RedisError, OSError) as exc:
            if caller_first and isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
                raise self._timeout() from None
            error = LimiterUnavailableError(
                f"the Redis rate limiter at {self._where} is unavailable while {what} "
                f"({type(exc).__name__}: {_short(exc)}); nothing was sent"
            )
            # Waiters queued behind this one fail at once for a while instead of each waiting
            # for its own timeout.
            self._down_until, self._down_error = loop.time() + self.timeout, error
            raise error from exc

    async def _script_reserve(
        self, key: str, max_wait_us: int, deadline: float | None = None
    ) -> list[int]:
        keys = self.redis_keys(key)
        args = [self._interval_us, max_wait_us, _EXPIRY_SLACK_MS]
        reserve = self._reserve
        result = await self._call("reserving a slot", lambda: reserve(keys, args), deadline)
        return [int(value) for value in result]

    async def paused_for(self, key: str, deadline: float | None = None) -> float:
        """Seconds left of a pause (a 429's ``Retry-After``) on this token, from Redis."""
        _, pause_key = self.redis_keys(key)
        args = [0, _EXPIRY_SLACK_MS]
        pause = self._pause
        left = await self._call("reading the pause", lambda: pause([pause_key], args), deadline)
        return int(left) / _US

    # ------------------------------------------------------------------ the protocol

    @asynccontextmanager
    async def slot(self, key: str, *, deadline: float | None = None) -> AsyncIterator[Slot]:
        """Wait for this token's next slot; see ``RateLimiter``."""
        try:
            slot = await self._acquire(key, deadline)
        except LimiterUnavailableError as exc:
            if self.fallback is None:
                raise
            logger.warning("%s; using the fallback limiter %r", exc, self.fallback)
            async with self.fallback.slot(key, deadline=deadline) as fallback_slot:
                yield fallback_slot
            return
        try:
            yield slot
        finally:
            await slot.finish()

    async def pause(self, key: str, seconds: float) -> None:
        """Pause this token for every process: nobody starts until ``seconds`` have passed."""
        self._bind_loop()
        _, pause_key = self.redis_keys(key)
        args = [max(0, math.ceil(seconds * _US)), _EXPIRY_SLACK_MS]
        try:
            await self._call("pausing after a 429", lambda: self._pause([pause_key], args))
        except LimiterUnavailableError as exc:
            if self.fallback is None:
                raise
            logger.warning("%s; pausing the fallback limiter", exc)
            await self.fallback.pause(key, seconds)

    # ------------------------------------------------------------------ acquiring

    def _state(self, key: str) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) > 64:
                for name, other in list(self._keys.items()):
                    if other.idle():
                        del self._keys[name]
            state = self._keys[key] = _KeyState()
        return state

    def _timeout(self, wait: float | None = None) -> RateLimitTimeout:
        away = "" if wait is None else f": the next one is {wait:.1f}s away"
        return RateLimitTimeout(
            f"no rate-limit slot within max_wait{away} (limit {self.rate_limit})"
        )

    async def _acquire(self, key: str, deadline: float | None) -> _RedisSlot:
        loop = self._bind_loop()
        state = self._state(key)
        interval = self._interval_us / _US
        if (
            deadline is not None
            and state.queued
            and loop.time() + state.queued * interval > deadline
        ):
            # Those queued ahead of us need at least one interval each, whatever Redis says.
            raise self._timeout(state.queued * interval)
        state.queued += 1
        try:
            async with asyncio.timeout_at(deadline):
                await state.gate.acquire()
        except TimeoutError:
            raise self._timeout() from None
        finally:
            state.queued -= 1
        try:
            return await self._reserve_slot(key, state, deadline, loop)
        except BaseException:
            state.gate.release()
            raise

    async def _reserve_slot(
        self,
        key: str,
        state: _KeyState,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> _RedisSlot:
        while True:
            if deadline is None:
                max_wait_us = -1
            else:  # the script refuses to reserve a start later than the deadline
                max_wait_us = max(0, math.floor((deadline - loop.time()) * _US))
            granted, wait_us, *rest = await self._script_reserve(key, max_wait_us, deadline)
            wait = wait_us / _US
            if not granted:
                raise self._timeout(wait)
            start_us = rest[0]
            planned = loop.time() + wait
            if wait <= 0:
                return _RedisSlot(self, key, state, planned)
            try:
                await asyncio.sleep(wait)
                # A 429 seen by another process while we slept pauses us too.
                paused = await self.paused_for(key, deadline)
            except asyncio.CancelledError:
                await self._give_back(key, start_us)
                raise
            except LimiterUnavailableError as exc:
                # The reservation itself is valid: sending on it keeps the limit.
                logger.warning("%s; sending on the slot already reserved", exc)
                paused = 0.0
            if paused <= 0:
                return _RedisSlot(self, key, state, planned)
            await self._give_back(key, start_us)  # and queue again behind the pause

    async def _give_back(self, key: str, start_us: int) -> None:
        """Return our unused reservation if it is still the last one; best effort, bounded."""
        next_key, _ = self.redis_keys(key)
        args = [start_us, self._interval_us, _EXPIRY_SLACK_MS]
        try:
            await self._call("giving a slot back", lambda: self._release([next_key], args))
        except LimiterUnavailableError as exc:
            logger.debug("%s; the unused slot stays reserved (under the limit)", exc)

    def _report_late(self, key: str, state: _KeyState, lateness: float) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._move_schedule(key, state, lateness))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        return task

    async def _move_schedule(self, key: str, state: _KeyState, lateness: float) -> None:
        next_key, _ = self.redis_keys(key)
        args = [math.ceil(lateness * _US), self._interval_us, _EXPIRY_SLACK_MS]
        try:
            await self._call("reporting a late send", lambda: self._late([next_key], args))
        except LimiterUnavailableError as exc:
            logger.warning("%s; a send %.3fs late could not be reported", exc, lateness)
        finally:
            # Only now may this process reserve again, so its next slot sees the moved schedule.
            state.gate.release()


class _RedisSlot:
    __slots__ = ("_key", "_limiter", "_planned", "_report", "_state")

    def __init__(
        self, limiter: RedisRateLimiter, key: str, state: _KeyState, planned: float
    ) -> None:
        self._limiter = limiter
        self._key = key
        self._state: _KeyState | None = state
        self._planned = planned  # loop time of the reserved start
        self._report: asyncio.Task[None] | None = None

    def sent(self) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        lateness = asyncio.get_running_loop().time() - self._planned
        if lateness > self._limiter.late_tolerance:
            self._report = self._limiter._report_late(self._key, state, lateness)
        else:
            state.gate.release()

    async def finish(self) -> None:
        self.sent()  # a request that never reported may still have been written
        if self._report is not None:
            # Shielded: a second cancellation of the caller must not abandon the report.
            await asyncio.shield(self._report)


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
