"""Client-side rate limiting: the guarantee is "never more than N starts in any rolling period".

The local backend is aiolimiter's leaky bucket with a capacity of one request, draining one
request every ``period / requests`` seconds (plus a small margin). A plain
``AsyncLimiter(5, 60)`` would admit a burst of five and then one every twelve seconds: up to nine
starts in a rolling minute, which a strict server answers with 429.

Three things sit around the bucket:

* a FIFO gate, so waiters are served strictly first come, first served, one task woken per slot,
  and a cancelled waiter gives its place back at once (aiolimiter alone lets a newcomer take
  freed capacity ahead of a woken waiter);
* the late-send correction: the gate stays closed until the admitted request is actually written
  (``Slot.sent()``), and the next start is spaced from that moment, because the server counts a
  request when it arrives, not when we admitted it (a new TLS connection, a busy loop);
* a shared pause: a 429 stops every waiter on the token until its ``Retry-After`` has passed.

Buckets are shared per (event loop, token) across every client in the process.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, runtime_checkable

from aiolimiter import AsyncLimiter

from ._errors import InvalidRequestError, RateLimitTimeout
from ._models import RateLimit

__all__ = ["LocalRateLimiter", "RateLimiter", "Slot"]


@runtime_checkable
class Slot(Protocol):
    """Permission for one request to start; call ``sent()`` once the request is written."""

    def sent(self) -> None: ...


@runtime_checkable
class RateLimiter(Protocol):
    """What ``AsyncAutocalls(limiter=...)`` accepts: one limiter may serve many tokens.

    ``key`` identifies the token (a hash of it, never the token itself). ``deadline`` is an
    event-loop time (``loop.time()``) after which ``RateLimitTimeout`` is raised instead of
    waiting; None waits as long as needed.
    """

    rate_limit: RateLimit

    def slot(
        self, key: str, *, deadline: float | None = None
    ) -> AbstractAsyncContextManager[Slot]: ...

    async def pause(self, key: str, seconds: float) -> None: ...


class FifoGate:
    """A lock that is strictly first come, first served, with O(1) cancellation.

    ``asyncio.Lock`` removes a cancelled waiter from the middle of its deque (O(n)); cancelling
    100,000 queued calls in random order would then cost O(n²). Here a cancelled waiter's future
    simply stays in the deque, done, and is skipped when the gate is handed on.
    """

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        # Made on first contention: most gates (one per conversation being called) never see a
        # waiter, and an empty deque costs ~600 bytes, a sixth of a waiting call.
        self._waiters: deque[asyncio.Future[None]] | None = None

    def locked(self) -> bool:
        return self._locked

    def _live_waiters(self) -> bool:
        waiters = self._waiters
        if waiters is None:
            return False
        while waiters and waiters[0].done():
            waiters.popleft()
        return bool(waiters)

    async def acquire(self) -> None:
        if not self._locked and not self._live_waiters():
            self._locked = True
            return
        future = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the gate was handed to us as we were cancelled: pass it on
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)  # ownership passes straight to the next waiter
                return
        self._locked = False


class _TokenBucket:
    """The limiter state of one token in one event loop."""

    __slots__ = (
        "_bucket",
        "_gate",
        "_last_grant",
        "_loop",
        "_not_before",
        "_pause_until",
        "_queued",
        "interval",
        "rate_limit",
        "tolerance",
    )

    def __init__(self, rate_limit: RateLimit, loop: asyncio.AbstractEventLoop) -> None:
        self.rate_limit = rate_limit
        self.interval = rate_limit.interval
        # Lateness absorbed without moving the schedule: half the margin. Every gap between two
        # starts is then at least interval - tolerance, so N + 1 starts span at least
        # period * (1 + margin / 2): the other half of the margin is left for network jitter.
        self.tolerance = rate_limit.period / rate_limit.requests * rate_limit.margin / 2
        self._loop = loop
        self._bucket = AsyncLimiter(1, self.interval - self.tolerance)
        self._gate = FifoGate()
        self._not_before = -float("inf")  # the next start's scheduled time
        self._pause_until = -float("inf")  # a 429's Retry-After
        self._last_grant = -float("inf")
        self._queued = 0  # callers waiting for a slot, not yet granted

    def idle(self, now: float) -> bool:
        clear = max(self._not_before, self._pause_until, self._last_grant + self.interval)
        return not self._queued and not self._gate.locked() and clear <= now

    def _clear_at(self) -> float:
        return max(self._not_before, self._pause_until)

    def predicted_wait(self) -> float:
        """How long a newcomer would wait if nobody ahead of it cancels and nothing is late."""
        now = self._loop.time()
        base = max(now, self._clear_at(), self._last_grant + self.interval)
        return base + self._queued * self.interval - now

    async def _wait_until_clear(self, deadline: float | None) -> None:
        while (wait := self._clear_at() - self._loop.time()) > 0:
            if deadline is not None and self._loop.time() + wait > deadline:
                raise RateLimitTimeout(self._timeout_message(wait))
            await asyncio.sleep(wait)

    def _timeout_message(self, wait: float) -> str:
        return (
            f"no rate-limit slot within max_wait: the next one is {wait:.1f}s away "
            f"(limit {self.rate_limit})"
        )

    async def acquire(self, deadline: float | None) -> Slot:
        if deadline is not None:
            wait = self.predicted_wait()
            if wait > 0 and self._loop.time() + wait > deadline:
                raise RateLimitTimeout(self._timeout_message(wait))
        self._queued += 1
        try:
            async with asyncio.timeout_at(deadline):
                await self._gate.acquire()
            try:
                await self._wait_until_clear(deadline)
                async with asyncio.timeout_at(deadline):
                    await self._bucket.acquire()
                await self._wait_until_clear(deadline)  # a 429 may have paused us meanwhile
            except BaseException:
                self._gate.release()
                raise
        except TimeoutError:
            raise RateLimitTimeout(
                f"no rate-limit slot within max_wait (limit {self.rate_limit})"
            ) from None
        finally:
            self._queued -= 1
        now = self._last_grant = self._loop.time()
        # On schedule (give or take the tolerance, e.g. a timer that fired a little late), the
        # next start is one interval after this one was due, so small delays do not add up.
        due = self._clear_at()
        scheduled = due if now - self.tolerance <= due <= now else now
        self._not_before = scheduled + self.interval
        return _LocalSlot(self)

    def sent(self) -> None:
        # A request written late moves the schedule: the server counts it when it arrives.
        self._not_before = max(self._not_before, self._loop.time() + self.interval - self.tolerance)
        self._gate.release()

    def pause(self, seconds: float) -> None:
        self._pause_until = max(self._pause_until, self._loop.time() + seconds)


class _LocalSlot:
    __slots__ = ("_bucket",)

    def __init__(self, bucket: _TokenBucket) -> None:
        self._bucket: _TokenBucket | None = bucket

    def sent(self) -> None:
        bucket, self._bucket = self._bucket, None
        if bucket is not None:
            bucket.sent()


# (id(loop), key) -> bucket. Buckets outlive the clients that made them, so that closing a
# client and opening another cannot reset the spacing; idle ones are dropped when new ones come.
_buckets: dict[tuple[int, str], _TokenBucket] = {}
_PRUNE_ABOVE = 64


def _prune() -> None:
    for ident, bucket in list(_buckets.items()):
        loop = bucket._loop
        if loop.is_closed() or bucket.idle(loop.time()):
            del _buckets[ident]


def shared_bucket(key: str, rate_limit: RateLimit) -> _TokenBucket:
    loop = asyncio.get_running_loop()
    ident = (id(loop), key)
    bucket = _buckets.get(ident)
    if bucket is None or bucket._loop is not loop or loop.is_closed():
        if len(_buckets) > _PRUNE_ABOVE:
            _prune()
        bucket = _buckets[ident] = _TokenBucket(rate_limit, loop)
    elif bucket.rate_limit != rate_limit:
        raise InvalidRequestError(
            f"this API token is already limited to {bucket.rate_limit} in this process; "
            f"every client using one token must use the same rate_limit (got {rate_limit})"
        )
    return bucket


class LocalRateLimiter:
    """The default limiter: per token, shared by every client of this process and event loop."""

    def __init__(self, rate_limit: RateLimit) -> None:
        self.rate_limit = rate_limit

    def bucket(self, key: str) -> _TokenBucket:
        return shared_bucket(key, self.rate_limit)

    @asynccontextmanager
    async def slot(self, key: str, *, deadline: float | None = None) -> AsyncIterator[Slot]:
        slot = await self.bucket(key).acquire(deadline)
        try:
            yield slot
        finally:
            slot.sent()  # a request that never reported may still have been written

    async def pause(self, key: str, seconds: float) -> None:
        self.bucket(key).pause(seconds)
