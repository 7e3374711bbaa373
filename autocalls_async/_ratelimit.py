"""Client-side rate limiting: per token, never more than N starts in any rolling period.

One algorithm (``_schedule``, where the rules and the proof are written down) over three stores
(``_stores``): ``LocalRateLimiter`` (this process), ``HostRateLimiter`` (every process of this
OS user on the host: the default) and ``RedisRateLimiter`` (every host). This module is what
runs in each process in front of the store:

* a queue per token and event loop, in two lanes (``Priority``), FIFO within a lane; a cancelled
  waiter leaves it in O(1);
* one dispatcher task per busy queue, which asks the store for a grant when one is due, on
  behalf of the queue's oldest callers, and hands it to the caller the store chose; the common
  case (nobody waiting) asks the store directly and needs no task at all;
* the grant (``Slot``): the transport checks ``may_send()`` synchronously just before it writes
  the request and calls ``sent()`` once written; the grant's lease is renewed while a slow
  connection is made, and a grant that was never used is given back;
* this process's own last start and pause, kept beside the store, so that a store that lost its
  state (a Redis restart or flush) never lets this process start sooner than they allow.

A ``max_wait`` is answered at once when the shared schedule, every process's queue included,
already says the wait is longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, Self, TypeVar, cast, runtime_checkable

from . import _schedule as schedule
from ._errors import (
    ClientClosedError,
    InvalidRequestError,
    LimiterUnavailableError,
    RateLimitTimeout,
)
from ._hoststore import boot_id, forget_schedule, note_schedules
from ._identity import token_id
from ._lifecycle import AsyncOnly
from ._log import logger
from ._models import Priority, RateLimit
from ._schedule import MAX_LEASE, Lane, RateConflict, Rules
from ._stores import NOTHING_SENT, PROCESS_STORE, URGENT, HostStore, MemoryStore, Store

__all__ = [
    "FifoGate",
    "HostRateLimiter",
    "Limiter",
    "LocalRateLimiter",
    "RateLimiter",
    "Slot",
    "default_limiter",
]

T = TypeVar("T")
DEFAULT_RATE_LIMIT = RateLimit(5, 60.0)
#: How long a grant stays valid without a renewal; renewed every third of it while connecting.
#: Long enough for a loop busy with a burst (100,000 calls gathered at once take ~4 s to
#: queue); a process that dies holding a grant costs the token at most this, once.
DEFAULT_LEASE = 10.0
#: Our clock and the store's may differ by this much over one lease: never write that close.
_LEASE_SAFETY = 0.05
_POLL_MIN = 0.004  # the holder reports within a couple of ms; polling faster only contends
#: How long a store's round trip may take past a caller's deadline before RateLimitTimeout.
_ROUND_TRIP_GRACE = 0.1
_POLL_MAX = 0.05
#: How long a limiter's note of where it keeps a token's schedule stands unless renewed.
_NOTE_TTL = 120.0
#: How often a limiter in use renews its note, and so sees a schedule noted elsewhere since.
_NOTE_RENEW = 5.0
_NOTED_MAX = 50_000
#: How soon notes the user's busy place could not take are written again.
_NOTE_RETRY = 0.05
#: Store operations of one event loop applied in one transaction, at most (a batch); on Redis,
#: tokens in one batch (a token's several operations there are one read and one write).
_BATCH_MAX = 512
#: Tokens a limiter remembers as refusing bursts; past it, forgotten (and relearned).
_EVEN_MAX = 100_000
#: Floors kept before the first sweep of those that no longer constrain anything.
_OWNS_MIN = 1024
#: A call that waits longer than this for its slot says so (INFO).
_SAY_WAIT = 1.0
#: The stores this process said were unavailable, until one of their limiters works again.
_DOWN: set[tuple[str, bool]] = set()
#: (token, one place, another place): warned once per process.
_WARNED: set[tuple[str, str, str]] = set()


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
        self,
        key: str,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
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


class _Waiter:
    __slots__ = ("arrival", "future", "order")

    def __init__(self, arrival: float, future: asyncio.Future[_Grant], order: int = 0) -> None:
        self.arrival = arrival  #: store clock
        self.future = future
        self.order = order  #: when it came, among this process's callers (FIFO)


#: The order callers come in, in this process (``_Waiter.order``): the store clock's offset is
#: re-estimated at each answer, so arrivals a fraction of a millisecond apart may not sort.
_ARRIVALS = itertools.count()


class _Queue:
    """One token's callers in one event loop, in two lanes, and this process's own floors."""

    __slots__ = (
        "asking",
        "dispatcher",
        "holding",
        "lanes",
        "next_free",
        "peeking",
        "stale",
        "waiting",
        "wake",
    )

    def __init__(self) -> None:
        self.lanes: tuple[deque[_Waiter], deque[_Waiter]] = (deque(), deque())
        self.waiting = [0, 0]  # live waiters per lane
        self.dispatcher: asyncio.Task[None] | None = None
        self.holding: _Grant | None = None
        self.asking = False  # a caller is asking the store directly (nobody else waited)
        self.wake: asyncio.Future[None] | None = None  # set to interrupt the dispatcher's sleep
        self.next_free = -float("inf")  # loop clock: the next grant, as last seen
        self.stale = False  # a waiter gave up: the store may still count it as waiting
        #: per lane, the store's answer to a newcomer's ``max_wait`` check, while one is asked:
        #: every newcomer meanwhile shares it (1,000 callers, one round trip)
        self.peeking: list[asyncio.Task[schedule.Peek] | None] = [None, None]

    def total(self) -> int:
        return self.waiting[0] + self.waiting[1]

    def quiet(self) -> bool:
        """Nobody waits, holds a grant or asks for one here."""
        return (
            not self.total()
            and self.holding is None
            and self.dispatcher is None
            and not self.asking
        )

    def idle(self, now: float) -> bool:
        return not self.total() and self.holding is None and self.dispatcher is None

    def summary(self, lane: int) -> Lane | None:
        waiters = self.lanes[lane]
        while waiters and waiters[0].future.done():
            waiters.popleft()
        if not waiters:
            return None
        head = waiters[0].arrival
        after = head
        for index, waiter in enumerate(waiters):
            if index and not waiter.future.done():
                after = waiter.arrival
                break
            if index > 64:  # a long run of cancelled waiters: an estimate will do
                break
        return Lane(self.waiting[lane], head, waiters[-1].arrival, after)

    def pop(self, lane: int) -> _Waiter | None:
        """The first live waiter of ``lane``, uncounted; None when none is left. A waiter
        whose future is done (cancelled) is dropped, but still counted: its caller uncounts it
        as it leaves, perhaps later in this same turn of the loop. (This set the count to 0
        when the lane was empty; the leaving caller then took it to -1, and the next caller,
        counted to 0, waited for a dispatcher that had ended: forever.)"""
        waiters = self.lanes[lane]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.future.done():
                self.waiting[lane] -= 1
                return waiter
        return None

    def interrupt(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


class _Front:
    """One limiter's presence in one event loop: its id in the store and its queues."""

    __slots__ = (
        "answered_at",
        "backlog",
        "busy",
        "loop",
        "noted",
        "noted_prune",
        "noting",
        "offset",
        "pending",
        "prune_at",
        "queues",
        "running",
        "starting",
        "tickets",
        "used",
        "used_prune",
        "where",
        "who",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        host = socket.gethostname()
        self.loop = loop
        # host:pid:pid namespace:boot:random. The pid is probed only by processes of the same
        # host, kernel and pid namespace: elsewhere the same number is another process.
        self.who = f"{host}:{os.getpid()}:{_PID_NAMESPACE}:{_BOOT}:{uuid.uuid4().hex[:12]}"
        self.where = f"pid {os.getpid()} on {host}"
        self.noted: dict[str, float] = {}  # key -> when its schedule's place was last noted
        self.noted_prune = _OWNS_MIN  # noted is pruned when it holds more than this
        self.noting: set[str] = set()  # keys whose note is due: written together, soon
        #: store operations asked for in this turn of the loop: applied together (a batch)
        self.pending: list[_Op] = []
        #: operations the store could not apply at once, in the order they were asked for: the
        #: next batch to go takes them all (``_run_batches``)
        self.backlog: deque[_Op] = deque()
        self.busy: set[str] = set()  # keys of the batches in flight: their next ones wait
        self.running = 0  # batches' tasks (``_run_batches``), at most the store's connections
        self.starting = False  # one of them is about to take the backlog
        self.queues: dict[str, _Queue] = {}
        self.prune_at = 64  # idle queues are pruned when there are more than this
        self.tickets = itertools.count(1)
        #: keys registered in the store -> when last used (loop clock), to unregister on close;
        #: a key unused for longer than its registration lasts is forgotten (amortised)
        self.used: dict[str, float] = {}
        self.used_prune = _OWNS_MIN
        self.offset = 0.0  # store clock minus loop clock, from the last store operation
        self.answered_at = 0.0  # loop clock: when the store read its clock for that operation

    def queue(self, key: str) -> _Queue:
        queue = self.queues.get(key)
        if queue is None:
            if len(self.queues) > self.prune_at:
                now = self.loop.time()
                for name, other in list(self.queues.items()):
                    if other.idle(now):
                        del self.queues[name]
                # Pruned again once as many more queues were made: each prune walks them all,
                # so 10,000 tokens in use at once cost a walk per 10,000 new queues, not one
                # per new queue (50 million checks).
                self.prune_at = max(64, 2 * len(self.queues))
            queue = self.queues[key] = _Queue()
        return queue


class _Grant:
    """One outstanding grant: the ``Slot`` a request is sent on."""

    __slots__ = (
        "_asked",
        "_done",
        "_front",
        "_key",
        "_lease_end",
        "_limiter",
        "_queue",
        "_renewal",
        "_report",
        "ticket",
    )

    def __init__(
        self, limiter: Limiter, front: _Front, queue: _Queue, key: str, ticket: str, asked: float
    ) -> None:
        self._limiter = limiter
        self._front = front
        self._queue = queue
        self._key = key
        self.ticket = ticket
        self._asked = asked  # loop clock: when the store was asked for this grant
        self._lease_end = asked + limiter.rules.lease - _LEASE_SAFETY  # loop clock
        self._done = False
        self._report: asyncio.Future[Any] | None = None
        self._renewal: asyncio.TimerHandle | None = front.loop.call_later(
            limiter.rules.lease / 3, self._renew
        )

    def may_send(self) -> bool:
        """True while the grant is valid: checked synchronously just before the write."""
        return not self._done and self._front.loop.time() < self._lease_end

    def sent(self) -> None:
        """The request was written: record the start (once; later calls do nothing)."""
        if self._done:
            return
        now = self._front.loop.time()
        self._limiter._own_started(self._key, now)
        self._close(
            functools.partial(
                schedule.sent,
                rules=self._limiter.rules,
                ticket=self.ticket,
                elapsed=now - self._asked,
            )
        )

    def give_back(self) -> None:
        """Nothing was written: the grant goes back unused."""
        if not self._done:
            rules = self._limiter.rules
            self._close(functools.partial(schedule.release, rules=rules, ticket=self.ticket))

    async def finish(self) -> None:
        """At the end of the ``slot()`` block: give back if unused, and wait for the report."""
        self.give_back()
        if self._report is not None:
            # Shielded: a second cancellation of the caller must not abandon the report. Its
            # failure is the store's, logged, and settled by the lease (a start at its end):
            # never the caller's, whose request was written (it must not read "not sent").
            with contextlib.suppress(Exception):
                await asyncio.shield(self._report)

    def _close(self, operation: Callable[[schedule.TokenState, float], None]) -> None:
        self._done = True
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        limiter = self._limiter
        if limiter._batched:
            # With this turn's other operations, in one transaction: a report needs no answer
            # but its commit, which finish() awaits.
            self._report = limiter._submit(self._front, self._key, operation)
            self._report.add_done_callback(self._batch_reported)
            # A token's operations are applied in the order they were asked for: the next
            # grant may be asked for now, behind this report (in its batch, when it is still to
            # go: a round trip sooner), and it sees the report, as if asked after its commit.
            self._reported()
            return
        try:
            done, _ = self._limiter.store.try_update(self._key, operation)
        except Exception as exc:  # never raise into the transport's write
            self._limiter._report_failed(exc)
            done = True
        if done:
            self._reported()
        else:
            self._report = self._limiter._spawn(self._report_later(operation))

    async def _report_later(self, operation: Callable[[schedule.TokenState, float], None]) -> None:
        URGENT.set(True)  # this task's own context: it frees the token for every waiter
        try:
            await self._limiter.store.update(self._key, operation)
        except Exception as exc:  # the lease then runs out: counted as a start at its end
            self._limiter._report_failed(exc)
        finally:
            self._reported()

    def _batch_reported(self, future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if isinstance(exc, Exception):  # the lease then runs out: a start at its end
            self._limiter._report_failed(exc)
        self._reported()

    def _reported(self) -> None:
        queue = self._queue
        if queue.holding is self:
            queue.holding = None
            queue.interrupt()

    def _renew(self) -> None:
        self._renewal = None
        if self._done:
            return
        loop = self._front.loop
        asked = loop.time()
        operation = functools.partial(schedule.renew, rules=self._limiter.rules, ticket=self.ticket)
        if self._limiter._batched:
            future = self._limiter._submit(self._front, self._key, operation)
            future.add_done_callback(functools.partial(self._batch_renewed, asked=asked))
            return
        try:
            done, kept = self._limiter.store.try_update(self._key, operation)
        except Exception as exc:
            self._limiter._report_failed(exc)
            return  # the lease runs out: may_send() will say so
        if done:
            self._renewed(bool(kept), asked)
        else:
            self._limiter._spawn(self._renew_later(operation, asked))

    async def _renew_later(
        self, operation: Callable[[schedule.TokenState, float], bool], asked: float
    ) -> None:
        URGENT.set(True)
        try:
            kept = await self._limiter.store.update(self._key, operation)
        except Exception as exc:
            self._limiter._report_failed(exc)
            return
        self._renewed(kept, asked)

    def _batch_renewed(self, future: asyncio.Future[Any], *, asked: float) -> None:
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, Exception):
                self._limiter._report_failed(exc)
            return  # the lease runs out: may_send() will say so
        self._renewed(bool(future.result()), asked)

    def _renewed(self, kept: bool, asked: float) -> None:
        if self._done:
            return
        if not kept:
            self._lease_end = -float("inf")  # lost: this grant must never be written on
            return
        rules = self._limiter.rules
        self._lease_end = asked + rules.lease - _LEASE_SAFETY
        self._renewal = self._front.loop.call_later(rules.lease / 3, self._renew)


class Limiter(AsyncOnly):
    """The schedule over one store, and this process's queue in front of it.

    ``LocalRateLimiter``, ``HostRateLimiter`` and ``RedisRateLimiter`` are this class over their
    stores. One limiter serves many clients and tokens, in any number of event loops (a queue
    per loop; the loops of one process then share the token through the store, like processes).
    """

    def __init__(
        self,
        store: Store,
        rate_limit: RateLimit = DEFAULT_RATE_LIMIT,
        *,
        lease: float = DEFAULT_LEASE,
        background_share: int = 5,
        background_headroom: int = 0,
        fallback: RateLimiter | None = None,
    ) -> None:
        if not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit(requests, period), got {rate_limit!r}")
        if (
            isinstance(lease, bool)
            or not isinstance(lease, int | float)
            or not 0.3 < lease <= MAX_LEASE
        ):
            raise ValueError(
                f"lease must be a number of seconds > 0.3 and <= {MAX_LEASE:g}, got {lease!r}"
            )
        if (
            isinstance(background_share, bool)
            or not isinstance(background_share, int)
            or background_share < 0
        ):
            raise ValueError(
                "background_share must be an int >= 0 (one slot in N for background work "
                f"while interactive calls wait; 0: none), got {background_share!r}"
            )
        if (
            isinstance(background_headroom, bool)
            or not isinstance(background_headroom, int)
            or background_headroom < 0
        ):
            raise ValueError(
                "background_headroom must be an int >= 0 (starts of each window that background "
                f"work leaves to interactive calls; 0: none), got {background_headroom!r}"
            )
        self.rate_limit = rate_limit
        self.rules = Rules.of(
            rate_limit, lease=float(lease), share=background_share, headroom=background_headroom
        )
        #: tokens whose server refused a burst: spaced evenly for the life of this limiter
        self._even: set[str] = set()
        self._owns: dict[str, schedule.TokenState] = {}
        self._owns_lock = threading.Lock()
        self._owns_prune = _OWNS_MIN
        self.store = store
        #: the store applies many operations in one transaction: each event loop's operations
        #: of one turn are applied together (``_submit``)
        self._batched = callable(getattr(store, "update_many", None))
        #: batches in flight at once per event loop: a connection each (Redis), else one
        self._batches_at_once = max(1, int(getattr(store, "max_connections", 1)))
        self.fallback = fallback
        self._fronts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Front] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down: LimiterUnavailableError | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store.kind} {self.rate_limit}>"

    @property
    def kind(self) -> str:
        """Where the schedule is shared: "process", "host" or "redis"."""
        return self.store.kind

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop serving: pending reports finish, this limiter stops counting as a user of its
        tokens (so another rate limit may be used for them), its store closes."""
        loop = asyncio.get_running_loop()
        front = self._fronts.get(loop)
        if front is not None:
            closed = ClientClosedError(
                "the rate limiter was closed while this call waited for a slot; nothing was sent"
            )
            for queue in front.queues.values():
                if queue.dispatcher is not None:
                    queue.dispatcher.cancel()
                # Its waiters hear it now: no dispatcher will ask for them any more.
                for lane in (0, 1):
                    while (waiter := queue.pop(lane)) is not None:
                        waiter.future.set_exception(closed)
            unregister = functools.partial(schedule.unregister, rules=self.rules, who=front.who)
            if self._batched:
                # Every token's in a few transactions (a batch each), not one per token.
                done = [self._submit(front, key, unregister) for key in front.used]
                await asyncio.gather(*done, return_exceptions=True)
            else:
                for key in list(front.used):
                    with contextlib.suppress(LimiterUnavailableError, OSError):
                        await self._apply(front, key, unregister)
            front.used.clear()
            self._write_notes(front, retry=False)
            if front.noted:
                forget_schedule(list(front.noted), front.who)
                front.noted.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.aclose()

    # ------------------------------------------------------------------ plumbing

    def _front(self) -> _Front:
        loop = asyncio.get_running_loop()
        front = self._fronts.get(loop)
        if front is None:
            front = self._fronts[loop] = _Front(loop)
        return front

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _report_failed(self, exc: Exception) -> None:
        # The store's error says "nothing was sent" of the call it failed: here the request
        # may well have been written (a report follows a send), so that part is left out.
        logger.warning(
            "rate limiter (%s): a grant could not be reported (%s); it counts as used until "
            "its lease ends",
            self.kind,
            str(exc).removesuffix("; nothing was sent"),
        )

    def _outage(self, exc: LimiterUnavailableError) -> None:
        # Said once per process and store, however many limiters use it (a client each).
        said = (self.place, self.fallback is not None)
        if self._down is None and said not in _DOWN:
            _DOWN.add(said)
            if self.fallback is None:  # the call fails with exc: nothing was sent
                logger.warning(
                    "rate limiter (%s) unavailable: %s",
                    self.kind,
                    exc,
                    extra={"autocalls_limiter_store": self.kind},
                )
            else:  # the call goes ahead, on the fallback: say what that means
                logger.warning(
                    "rate limiter (%s) unavailable: %s; until it works again, calls go ahead "
                    "with the limit %s kept by this process only (%s): other processes using "
                    "this token are not counted, and together they may exceed it",
                    self.kind,
                    str(exc).removesuffix(NOTHING_SENT),
                    self.fallback.rate_limit,
                    type(self.fallback).__name__,
                    extra={"autocalls_limiter_store": self.kind},
                )
        self._down = exc

    def _recovered(self) -> None:
        if self._down is not None:
            self._down = None
            said = (self.place, self.fallback is not None)
            if said not in _DOWN:
                return
            _DOWN.discard(said)
            logger.info(
                "rate limiter (%s) available again",
                self.kind,
                extra={"autocalls_limiter_store": self.kind},
            )

    async def _apply(
        self,
        front: _Front,
        key: str,
        operation: Callable[[schedule.TokenState, float], T],
        orphan: Callable[[Any], None] | None = None,
    ) -> T:
        """One atomic store operation; keeps our estimate of the store's clock. ``orphan``
        is given the result when the caller gave up while the store applied it."""
        loop = front.loop
        asked = loop.time()
        seen: list[float] = []
        step = self._step(operation, seen)
        result: Any
        try:
            if self._batched:
                future = self._submit(front, key, step, orphan)
                try:
                    result = await future
                except asyncio.CancelledError:
                    # Answered as we were cancelled: the answer is nobody's (a grant goes back).
                    answered = future.done() and not future.cancelled()
                    if answered and orphan is not None and future.exception() is None:
                        orphan(future.result())
                    raise
            else:
                done, result = self.store.try_update(key, step)
                if not done:
                    result = await self.store.update(key, step)
        except RateConflict as conflict:
            raise InvalidRequestError(_conflict(conflict, self.rate_limit)) from None
        self._answered(front, key, asked, seen)
        return cast(T, result)

    def _try_apply(
        self, front: _Front, key: str, operation: Callable[[schedule.TokenState, float], T]
    ) -> tuple[bool, T | None]:
        """``_apply`` when the store answers without waiting: (True, result), else (False,
        None) and nothing was done. Used for peeks, which predict and need no place in a
        batch: a newcomer's max_wait check on the host store is answered in its own turn, so
        nobody who comes later queues before it (FIFO)."""
        asked = front.loop.time()
        seen: list[float] = []
        try:
            done, result = self.store.try_update(key, self._step(operation, seen))
        except RateConflict as conflict:
            raise InvalidRequestError(_conflict(conflict, self.rate_limit)) from None
        if done:
            self._answered(front, key, asked, seen)
        return done, result

    @staticmethod
    def _step(
        operation: Callable[[schedule.TokenState, float], T], seen: list[float]
    ) -> Callable[[schedule.TokenState, float], T]:
        def step(state: schedule.TokenState, now: float) -> T:
            seen.append(now)
            _forget_the_dead(state)
            return operation(state, now)

        return step

    def _answered(self, front: _Front, key: str, asked: float, seen: list[float]) -> None:
        used = front.used
        now = front.loop.time()
        if key not in used and len(used) >= front.used_prune:
            # A registration unused for longer than it lasts has expired in the store: nothing
            # left to unregister. Amortised: the next sweep once as many more were added.
            horizon = now - self.rules.user_ttl - self.rules.lease
            for name in [name for name, last in used.items() if last < horizon]:
                del used[name]
            front.used_prune = max(_OWNS_MIN, 2 * len(used))
        used[key] = now
        self._note(front, key)
        if seen:
            # The store read its clock about halfway through the round trip: waits it answers
            # count from there, not from when the answer arrived.
            front.answered_at = (asked + front.loop.time()) / 2
            front.offset = seen[-1] - front.answered_at

    @property
    def place(self) -> str:
        """Where this limiter keeps its schedules, as warnings name it."""
        return str(getattr(self.store, "place", f"a {self.kind} store"))

    def _note(self, front: _Front, key: str) -> None:
        """Say where this limiter keeps ``key``'s schedule, in this user's one place on the host
        (whatever ``AUTOCALLS_LIMITER_DIR`` says), and warn once when another live limiter of
        this host keeps the same token's elsewhere: two schedules, each keeping the limit
        alone, together exceed it. Renewed every few seconds while the token is used, so each
        side sees the other."""
        if self.store.kind == "process" and self.store is not PROCESS_STORE:
            return  # a store of its own (a test's clock): its own schedule, by design
        now = front.loop.time()
        last = front.noted.get(key)
        if last is not None and now - last < _NOTE_RENEW:
            return
        noted = front.noted
        if last is None and len(noted) >= front.noted_prune:
            # A note older than its TTL has expired in the store: nothing left to renew or to
            # forget at close. Amortised, as ``used``: memory follows the tokens in use, not
            # every token ever seen (a platform's accounts come and go).
            horizon = now - _NOTE_TTL
            for name in [name for name, when in noted.items() if when < horizon]:
                del noted[name]
            if len(noted) > _NOTED_MAX:
                noted.clear()  # renewed as each token is used again
            front.noted_prune = max(_OWNS_MIN, 2 * len(noted))
        noted[key] = now
        # A token's first note is written with the others of this turn, at the next turn, in
        # one transaction (a platform's burst of new tokens). A renewal is written now, with
        # any still due: a warning of two schedules is said at the call that meets them,
        # before it returns. (Written at the next turn, a renewing call in CI's serial phase
        # came and went unwarned, twice, for a reason not found.)
        first = not front.noting
        front.noting.add(key)
        if last is not None:
            self._write_notes(front)
        elif first:
            front.loop.call_soon(self._write_notes, front)

    def _write_notes(self, front: _Front, *, retry: bool = True) -> None:
        """Write the notes due (``_note``), and warn of the schedules they meet elsewhere."""
        if not front.noting:
            return
        keys, front.noting = list(front.noting), set()
        mine = self.place
        found = note_schedules(keys, front.who, mine, _NOTE_TTL)
        if found is None:
            # The user's place was busy (another process noting at the same moment): nothing
            # was written, so nothing was read; again shortly, or a warning of two schedules
            # would wait for the next renewal (5 s) and miss the call it is due at.
            if retry:
                front.noting.update(keys)
                front.loop.call_later(_NOTE_RETRY, self._write_notes, front)
            return
        for key, other, theirs in found:
            if theirs == mine or not _alive(other) or (key, mine, theirs) in _WARNED:
                continue
            _WARNED.add((key, mine, theirs))
            _WARNED.add((key, theirs, mine))
            pid = other.split(":")[1] if other.count(":") == 4 else "?"
            logger.warning(
                "two rate-limit schedules for one API token (token_id=%s): %s keeps it in %s, "
                "and pid %s keeps it in %s. Each keeps the limit alone, so together they may "
                "exceed it. Give every client of a token one limiter: the default (the host "
                "store) in every process of this host, or Redis everywhere "
                "(AUTOCALLS_REDIS_URL, --redis-url)",
                token_id(key),
                front.where,
                mine,
                pid,
                theirs,
                extra={"autocalls_token_id": token_id(key)},
            )

    # ------------------------------------------------------------------ batches

    def _submit(
        self,
        front: _Front,
        key: str,
        operation: Callable[[schedule.TokenState, float], Any],
        orphan: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Apply ``operation`` with every other one asked for in this turn of the loop, in one
        store transaction (``_flush``, at the loop's next turn); its result, or its error."""
        future = front.loop.create_future()
        if not front.pending:
            front.loop.call_soon(self._flush, front)
        front.pending.append((key, operation, future, orphan))
        return future

    def _flush(self, front: _Front) -> None:
        # Operations whose caller gave up meanwhile are not applied (a grant nobody takes would
        # hold the token until its lease ran out).
        ops = [op for op in front.pending if not op[2].done()]
        front.pending = []
        if front.backlog or front.running:
            # Behind those already waiting or in flight: a token's operations are applied in the
            # order they were asked for (a report before the next grant it lets through).
            front.backlog.extend(ops)
            self._pump(front)
            return
        for start in range(0, len(ops), _BATCH_MAX):
            batch = ops[start : start + _BATCH_MAX]
            try:
                outcomes = self.store.try_update_many([(op[0], op[1]) for op in batch])  # type: ignore[attr-defined]
            except Exception as exc:
                _failed(batch, exc)
                continue
            if outcomes is None:  # the store is busy: this batch and the rest, in order, later
                front.backlog.extend(ops[start:])
                self._pump(front)
                return
            _deliver(batch, outcomes)

    def _pump(self, front: _Front) -> None:
        """Start one more batch while fewer than the store's connections are in flight; when
        all are, the backlog waits and the first batch to end takes it all (one more round
        trip for many operations, not one per turn of the loop)."""
        if not front.starting and front.running < self._batches_at_once:
            front.starting = True
            front.running += 1
            self._spawn(self._run_batches(front))

    async def _run_batches(self, front: _Front) -> None:
        URGENT.set(True)  # reports among them free tokens for every waiter
        took = False
        try:
            # One turn of the loop first: what this turn's operations wake (the next grant
            # asked for behind a report) joins them, and is applied after them.
            await asyncio.sleep(0)
            front.starting, took = False, True
            while batch := self._take(front):
                keys = {op[0] for op in batch}
                front.busy |= keys
                if front.backlog:
                    self._pump(front)  # what is left (other tokens): another batch at once
                try:
                    outcomes = await self.store.update_many(  # type: ignore[attr-defined]
                        [(op[0], op[1]) for op in batch],
                        keep=lambda i, b=batch: not b[i][2].done(),
                    )
                except Exception as exc:
                    _failed(batch, exc)
                    continue
                finally:
                    front.busy -= keys
                _deliver(batch, outcomes)
        finally:
            if not took:
                front.starting = False  # cancelled before it took anything
            front.running -= 1

    @staticmethod
    def _take(front: _Front) -> list[_Op]:
        """The next batch: the oldest operations of tokens with no batch in flight (a token's
        later ones wait for its batch to end: applied in order), at most ``_BATCH_MAX``."""
        backlog, busy = front.backlog, front.busy
        batch: list[_Op] = []
        keys: set[str] = set()
        left: deque[_Op] = deque()
        for op in backlog:
            if op[2].done():
                continue  # its caller gave up
            key = op[0]
            # A token's operations all join its batch: one read and one write however many.
            if key in keys or (key not in busy and len(keys) < _BATCH_MAX):
                keys.add(key)
                batch.append(op)
            else:
                left.append(op)
        front.backlog = left
        return batch

    def _timeout(self, wait: float | None, ahead: int = 0) -> RateLimitTimeout:
        """The caller's ``max_wait`` ran out. ``wait``: how far away the token's next slot is
        (None, or none left: the time went on the store, not on the token's window)."""
        if wait is None or wait <= 0.0:
            # The window had room: the store took the time (its connections busy, a far
            # Redis). Said so, or the token's own traffic or the service gets the blame.
            why = "another call holding the token's grant, or a busy event loop"
            if self.kind != "process":
                why = f"the {self.kind} store's connections busy or slow, or {why}"
            return RateLimitTimeout(
                f"no rate-limit slot within max_wait: the token's window had room, but the "
                f"grant did not come in time ({why}; limit {self.rate_limit}); nothing was sent"
            )
        detail = f": the next one is {wait:.1f}s away"
        if ahead:
            detail += f" ({ahead} calls ahead)"
        return RateLimitTimeout(
            f"no rate-limit slot within max_wait{detail} (limit {self.rate_limit}, "
            f"shared by {self.kind}); nothing was sent"
        )

    # ------------------------------------------------------------------ the protocol

    @asynccontextmanager
    async def slot(
        self,
        key: str,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[Slot]:
        """Wait for this token's next slot; see ``RateLimiter``."""
        try:
            grant = await self.acquire(key, deadline=deadline, priority=priority)
        except LimiterUnavailableError as exc:
            self._outage(exc)
            if self.fallback is None:
                raise
            # The fallback does not know this process's last start or pause: wait for them.
            await self._own_floor(key, deadline, int(priority))
            async with self.fallback.slot(key, deadline=deadline, priority=priority) as slot:
                yield slot
            # As if it was sent: the store will not know.
            self._own_started(key, self._front().loop.time())
            return
        self._recovered()
        try:
            yield grant
        finally:
            await grant.finish()

    # ------------------------------------------------------------------ this process's floor

    def _own(self, key: str) -> schedule.TokenState:
        """This process's own last starts, spacing and 429 pause of ``key`` (its floor), kept
        once per limiter and process, whatever the event loop: after a store forgot (a flush),
        the process alone still keeps the limit. On the monotonic clock every loop reads
        (``loop.time()``); call with ``_owns_lock`` held."""
        own = self._owns.get(key)
        if own is None:
            if len(self._owns) >= self._owns_prune:
                now = time.monotonic()
                for name in [name for name, state in self._owns.items() if state.latest() <= now]:
                    del self._owns[name]
                # Amortised: the next sweep once as many more were made (never per new token).
                self._owns_prune = max(_OWNS_MIN, 2 * len(self._owns))
            own = self._owns[key] = schedule.TokenState()
        return own

    def _own_started(self, key: str, at: float) -> None:
        with self._owns_lock:
            schedule.own_start(self._own(key), self.rules, at)

    def _own_paused(self, key: str, until: float) -> None:
        with self._owns_lock:
            own = self._own(key)
            own.pause = max(own.pause, until)

    def _own_free(self, key: str, lane: int) -> float:
        """When this process's own last starts and pause let ``lane`` start (loop clock)."""
        with self._owns_lock:
            own = self._owns.get(key)
            return -math.inf if own is None else schedule.own_free(own, self.rules, lane)

    async def _own_floor(self, key: str, deadline: float | None, lane: int) -> None:
        front = self._front()
        wait = self._own_free(key, lane) - front.loop.time()
        if wait > 0:
            if deadline is not None and front.loop.time() + wait > deadline:
                raise self._timeout(wait)
            await asyncio.sleep(wait)

    async def pause(self, key: str, seconds: float) -> None:
        """Pause this token everywhere it is shared: nobody starts until ``seconds`` passed.

        A pause (a 429) right after starts that went closer than an even spacing means that
        the server refuses bursts: the token is then spaced evenly (``burst=1``) by every
        limiter of the store, and by this one for the rest of its life, with one WARNING."""
        front = self._front()
        queue = front.queue(key)
        self._own_paused(key, front.loop.time() + seconds)
        switched = False
        try:
            _, switched = await self._apply(
                front, key, functools.partial(schedule.refused, rules=self.rules, seconds=seconds)
            )
        except LimiterUnavailableError as exc:
            self._outage(exc)
            if self.fallback is not None:
                await self.fallback.pause(key, seconds)
            # Otherwise this process's own pause still holds.
        if key in self._even or self.rules.burst <= 1:
            return
        # The store says so, or this process's own last starts went as a burst.
        with self._owns_lock:
            mine = self._own(key)
            own = schedule.refused(mine, front.loop.time(), self.rules, seconds=0.0)[1]
        if switched or own:
            self._learned(key, queue)

    def _learned(self, key: str, queue: _Queue) -> None:
        """The server refused a burst on ``key``: space it evenly from now on, and say so."""
        if len(self._even) >= _EVEN_MAX:
            self._even.clear()  # relearned at the cost of one more refused burst each
        self._even.add(key)
        with self._owns_lock:
            own = self._own(key)
            own.even = max(own.even, time.monotonic() + schedule.EVEN_KEEP)
        rate = self.rate_limit
        fix = RateLimit(rate.requests, rate.period, margin=rate.margin, burst=1)
        logger.warning(
            "the server refused a burst (429) although the rolling window had room "
            "(token_id=%s): it is stricter than a window of %s (a no-burst limiter, such as "
            "nginx limit_req, or a token bucket). This token's starts are evenly spaced from now "
            "on. To start that way, use rate_limit=%r (CLI: --burst 1)",
            token_id(key),
            rate,
            fix,
            extra={"autocalls_token_id": token_id(key)},
        )

    async def adopt(self, key: str, rate_limit: RateLimit) -> str | None:
        """Switch this limiter to ``rate_limit``, unless another live limiter uses ``key``.

        Returns None once switched, or where the other limiter runs (nothing changes: every
        limiter of a token must use one rate). For a limiter that serves one token, such as
        a client's own adopting the limit the server states (``RateLimit.from_server``). The
        next grant spaces itself from the token's last start at the new rate.
        """
        front = self._front()
        rules = Rules.of(
            rate_limit, lease=self.rules.lease, share=self.rules.share, headroom=self.rules.headroom
        )
        other = await self._apply(
            front,
            key,
            functools.partial(schedule.adopt, rules=rules, who=front.who, where=front.where),
        )
        if other is not None:
            return other
        self.rate_limit = rate_limit
        self.rules = rules
        fallback = self.fallback
        if isinstance(fallback, Limiter):
            # Switched without registering in its store (it may never be used): it serves
            # this limiter's tokens only while this store is down.
            fallback.rate_limit = rate_limit
            fallback.rules = Rules.of(
                rate_limit,
                lease=fallback.rules.lease,
                share=rules.share,
                headroom=fallback.rules.headroom,
            )
        return None

    async def acquire(
        self,
        key: str,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> _Grant:
        """Wait for a grant; the caller must ``sent()`` or ``give_back()`` it."""
        front = self._front()
        loop = front.loop
        queue = front.queue(key)
        lane = int(priority)
        # Its place in line, taken now: checking max_wait below may take a turn of the loop
        # (a store round trip), and callers who came meanwhile must not go first (FIFO).
        arrival = loop.time() + front.offset
        order = next(_ARRIVALS)
        direct = queue.quiet() and self._own_free(key, lane) <= loop.time()
        if deadline is not None and not direct:
            try:
                async with asyncio.timeout_at(_grace(deadline, loop)):
                    await self._check_deadline(front, queue, key, deadline, lane)
            except RateLimitTimeout:
                raise  # with its detail: how far away the next slot is
            except TimeoutError:
                raise self._timeout(None) from None
        now = loop.time()
        asked = False
        if direct and queue.quiet():
            asked = True
            # Nobody waits here: ask directly; no task is needed when the store answers now.
            # With a deadline, the same store operation first checks that the wait fits it.
            ticket = f"{front.who}#{next(front.tickets)}"
            queue.asking = True
            try:
                async with asyncio.timeout_at(_grace(deadline, loop)):
                    answer = await self._ask(
                        front, key, ticket, _alone(lane, arrival), deadline=deadline, lane=lane
                    )
            except RateLimitTimeout:
                raise  # with its detail
            except TimeoutError:
                self._left_asking(front, queue, key)
                raise self._timeout(None) from None
            except asyncio.CancelledError:
                self._left_asking(front, queue, key)
                raise
            finally:
                queue.asking = False
                queue.interrupt()
            if answer.granted:
                grant = _Grant(self, front, queue, key, ticket, now)
                queue.holding = grant
                return grant
            certain = not (answer.held or answer.behind)
            if certain and deadline is not None and now + answer.wait > deadline:
                raise self._timeout(answer.wait)
        waiter = _Waiter(arrival, loop.create_future(), order)
        ahead = queue.waiting[0] if lane == 0 else queue.total()
        waiters = queue.lanes[lane]
        if asked:  # first in: whoever queued while the store answered arrived later (FIFO)
            waiters.appendleft(waiter)
        elif waiters and waiters[-1].order > order:
            # Checking max_wait took a turn, and later callers queued meanwhile: its place is
            # by when it came, before theirs.
            index = len(waiters)
            while index and waiters[index - 1].order > order:
                index -= 1
            waiters.insert(index, waiter)
        else:
            waiters.append(waiter)
        queue.waiting[lane] += 1
        if queue.dispatcher is None:
            queue.dispatcher = loop.create_task(self._dispatch(front, queue, key))
        elif lane == 0 and queue.waiting[0] == 1:
            # The first interactive caller may be served before the background ones already
            # reported: let the dispatcher ask again now. Any other newcomer is reported at the
            # next ask, one slot away at most (asking per newcomer would cost a store round trip
            # per call: 100,000 of them for 100,000 queued calls).
            queue.interrupt()
        try:
            async with asyncio.timeout_at(deadline):
                grant = await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled():
                if future.exception() is None:
                    future.result().give_back()  # granted as we gave up: hand it back
            else:  # still queued (a cancelled task cancels the future it awaits, too)
                future.cancel()
                queue.waiting[lane] -= 1
                queue.stale = True
                if not queue.total():
                    queue.interrupt()  # the dispatcher ends: nobody is left to ask for
            if isinstance(exc, TimeoutError):
                raise self._timeout(queue.next_free - loop.time()) from None
            raise
        waited = loop.time() - now
        if waited > _SAY_WAIT:
            name = token_id(key)
            logger.info(
                "waited %.1fs for a rate-limit slot (token_id=%s, %s lane, calls ahead in "
                "this process: %d; limit %s, shared by %s)",
                waited,
                name,
                "background" if lane else "interactive",
                ahead,
                self.rate_limit,
                self.kind,
                extra={
                    "autocalls_token_id": name,
                    "autocalls_wait": waited,
                    "autocalls_lane": "background" if lane else "interactive",
                    "autocalls_ahead": ahead,
                },
            )
        return grant

    async def _ask(
        self,
        front: _Front,
        key: str,
        ticket: str,
        lanes: tuple[Lane | None, Lane | None],
        *,
        deadline: float | None = None,
        lane: int = 0,
    ) -> schedule.Grant:
        """Ask the store for the grant ``ticket``, reporting this queue's lanes.

        With a ``deadline`` (a newcomer to a quiet queue), the same operation first predicts
        the wait as ``_check_deadline`` does, and raises ``RateLimitTimeout`` instead of asking
        when it is longer: one round trip, not two.
        """
        ask = functools.partial(
            schedule.grant,
            rules=self.rules,
            who=front.who,
            where=front.where,
            ticket=ticket,
            lanes=lanes,
            even=key in self._even,
        )

        def orphan(answer: Any) -> None:
            """The caller gave up while the store granted: the grant goes back unused."""
            if isinstance(answer, tuple):
                answer = answer[1]
            if isinstance(answer, schedule.Grant) and answer.granted:
                release = functools.partial(schedule.release, rules=self.rules, ticket=ticket)
                self._submit(front, key, release).add_done_callback(_retrieved)

        if deadline is None:
            return await self._apply(front, key, ask, orphan)
        rules = self.rules
        asked = front.loop.time()

        def peek_then_ask(
            state: schedule.TokenState, now: float
        ) -> tuple[schedule.Peek, schedule.Grant | None]:
            seen = schedule.peek(state, now, rules, who=front.who, lane=lane)
            wait = seen.wait(seen.ahead)
            if wait > 0 and asked + wait > deadline:
                return seen, None
            return seen, ask(state, now)

        seen, answer = await self._apply(front, key, peek_then_ask, orphan)
        if answer is None:
            raise self._timeout(seen.wait(seen.ahead), seen.ahead)
        return answer

    def _left_asking(self, front: _Front, queue: _Queue, key: str) -> None:
        """A caller gave up while its direct ask was in the store: the ask may have reported it
        waiting there (a "not yet" answer nobody read). With nobody else waiting here, withdraw
        that report, or other processes' callers wait behind it until it expires (1 s past the
        free moment); a granted answer is given back by ``_ask`` itself."""
        if queue.total() or queue.dispatcher is not None:
            return  # the dispatcher's next ask reports this queue as it is
        withdraw = functools.partial(schedule.withdraw, rules=self.rules, who=front.who)
        self._spawn(self._withdraw(front, key, withdraw))

    async def _withdraw(
        self, front: _Front, key: str, withdraw: Callable[[schedule.TokenState, float], None]
    ) -> None:
        with contextlib.suppress(Exception):
            await self._apply(front, key, withdraw)

    async def _check_deadline(
        self, front: _Front, queue: _Queue, key: str, deadline: float, lane: int
    ) -> None:
        """Refuse at once when the shared schedule already says the wait is longer."""
        loop = front.loop
        now = loop.time()
        seen = await self._peek(front, queue, key, lane)
        # A grant already made is counted by the store: it spaces the next one.
        local = queue.waiting[0] if lane == 0 else queue.total()
        ahead = seen.ahead + local
        wait = max(seen.wait(ahead), self._own_free(key, lane) - now)
        if wait > 0 and now + wait > deadline:
            raise self._timeout(wait, ahead)

    async def _peek(self, front: _Front, queue: _Queue, key: str, lane: int) -> schedule.Peek:
        """What the store says to a newcomer of ``lane``: one question in flight per queue and
        lane, whose answer every newcomer that arrives meanwhile shares (it is a prediction)."""
        task = queue.peeking[lane]
        if task is None:
            operation = functools.partial(schedule.peek, rules=self.rules, who=front.who, lane=lane)
            done, seen = self._try_apply(front, key, operation)
            if done:
                return seen  # type: ignore[return-value]
            task = queue.peeking[lane] = self._spawn(self._apply(front, key, operation))

            def forget(task: asyncio.Task[schedule.Peek]) -> None:
                if queue.peeking[lane] is task:
                    queue.peeking[lane] = None
                if not task.cancelled():
                    task.exception()  # retrieved: whoever awaited it has seen it

            task.add_done_callback(forget)
        # Shielded: a newcomer that gives up must not cancel the answer the others wait for.
        return await asyncio.shield(task)

    async def _dispatch(self, front: _Front, queue: _Queue, key: str) -> None:
        """Ask for grants while callers wait; hand each to the caller the store chose."""
        loop = front.loop
        poll = _POLL_MIN
        try:
            while True:
                if not queue.total():
                    if not queue.stale:
                        break
                    # The last waiters gave up: withdraw this queue's report from the store,
                    # or it would hold other processes back until it expires.
                    queue.stale = False
                    with contextlib.suppress(Exception):
                        await self._apply(
                            front,
                            key,
                            functools.partial(schedule.withdraw, rules=self.rules, who=front.who),
                        )
                    continue
                if queue.holding is not None or queue.asking:
                    await self._sleep(queue, None)  # until the grant is reported
                    continue
                now = loop.time()
                lanes = (queue.summary(0), queue.summary(1))
                ticket = f"{front.who}#{next(front.tickets)}"
                answer = await self._ask(front, key, ticket, lanes)
                if answer.granted:
                    floor = self._own_free(key, answer.lane)
                    grant = _Grant(self, front, queue, key, ticket, now)
                    if floor > now:  # the store forgot our last start or pause (a flush)
                        grant.give_back()
                        queue.next_free = floor
                        await self._sleep(queue, floor - now)
                        continue
                    waiter = queue.pop(answer.lane)
                    if waiter is None:  # everyone in that lane left meanwhile
                        grant.give_back()
                        # Their callers uncount themselves as they leave: let them, before
                        # asking again (a store that answers at once would not yield).
                        await asyncio.sleep(0)
                        continue
                    queue.holding = grant
                    waiter.future.set_result(grant)
                    poll = _POLL_MIN
                    continue
                if answer.held or answer.behind:
                    # Someone else's turn: ask again soon (it reports in about a round trip).
                    wait = min(answer.wait, poll) if answer.held else poll
                    poll = min(poll * 2, _POLL_MAX)
                    queue.next_free = now + answer.wait
                else:
                    floor = min(
                        (self._own_free(key, lane) for lane in (0, 1) if queue.waiting[lane]),
                        default=now,
                    )
                    due = max(front.answered_at + answer.wait, floor)
                    wait = due - loop.time()
                    poll = _POLL_MIN
                    queue.next_free = due
                await self._sleep(queue, wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed: every waiter hears it
            for lane in (0, 1):
                while (waiter := queue.pop(lane)) is not None:
                    waiter.future.set_exception(exc)
        finally:
            if queue.dispatcher is asyncio.current_task():
                queue.dispatcher = None

    async def _sleep(self, queue: _Queue, seconds: float | None) -> None:
        wake = queue.wake = asyncio.get_running_loop().create_future()
        try:
            if seconds is None:
                await wake
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        await wake
        finally:
            queue.wake = None


#: One store operation waiting for its batch: key, operation, its answer, and what to do with
#: a result nobody waits for any more (a grant: give it back).
_Op = tuple[
    str,
    Callable[[schedule.TokenState, float], Any],
    "asyncio.Future[Any]",
    Callable[[Any], None] | None,
]


def _deliver(batch: list[_Op], outcomes: list[tuple[bool, Any]]) -> None:
    for (_, _, future, orphan), (applied, result) in zip(batch, outcomes, strict=True):
        if future.done():  # the caller gave up while the store applied it
            if applied and orphan is not None:
                orphan(result)
        elif applied:
            future.set_result(result)
        elif result is not None:
            future.set_exception(result)
        else:
            future.cancel()  # left out: nobody waits for it


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody waits for it: an error is the lease's to settle


def _failed(batch: list[_Op], exc: Exception) -> None:
    for op in batch:
        if not op[2].done():
            op[2].set_exception(exc)


_HOST = socket.gethostname()
_BOOT = (boot_id() or "")[:8]


def _namespace() -> str:
    try:
        link = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return "".join(c for c in link if c.isdigit())


_PID_NAMESPACE = _namespace()


def _grace(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    """A caller's deadline for a store round trip: that is not a wait for a slot, so even
    ``max_wait=0`` may ask once."""
    return None if deadline is None else max(deadline, loop.time() + _ROUND_TRIP_GRACE)


def _forget_the_dead(state: schedule.TokenState) -> None:
    """Drop what processes of this host that no longer exist left in the store (a crash)."""
    for table in (state.users, state.queued):
        for who in [who for who in table if not _alive(who)]:
            del table[who]


def _alive(who: str) -> bool:
    parts = who.split(":")
    if len(parts) != 5:
        return True  # not ours to judge: it expires on its own
    host, pid_text, namespace, boot, _ = parts
    if (host, namespace, boot) != (_HOST, _PID_NAMESPACE, _BOOT) or not pid_text.isdigit():
        return True  # another host's, kernel's or pid namespace's: it expires on its own
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def _alone(lane: int, arrival: float) -> tuple[Lane | None, Lane | None]:
    me = Lane(1, arrival, arrival, arrival)
    return (me, None) if lane == 0 else (None, me)


class LocalRateLimiter(Limiter):
    """The limit kept in this process only: every client, event loop and thread in it.

    Use it where processes cannot share a file (the host store is the default), with a limit
    that is this process's share of the token's. ``clock`` is for tests (a virtual clock).
    """

    def __init__(
        self,
        rate_limit: RateLimit = DEFAULT_RATE_LIMIT,
        *,
        lease: float = DEFAULT_LEASE,
        background_share: int = 5,
        background_headroom: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        store = PROCESS_STORE if clock is None else MemoryStore(clock)
        super().__init__(
            store,
            rate_limit,
            lease=lease,
            background_share=background_share,
            background_headroom=background_headroom,
        )


class HostRateLimiter(Limiter):
    """The limit kept by every process of this OS user on this host: the default limiter.

    ``uvicorn --workers 4``, threads, several event loops, cron jobs, systemd services and
    back-to-back command lines share one schedule per token through one SQLite database in
    ``path`` (default: ``default_host_directory()``, the same for every process of the user
    whatever its environment); no server to run. ``group`` shares it between OS users: a
    directory of that group, mode 2770 (``chgrp G DIR && chmod 2770 DIR``), whose members all
    pass the same ``path`` and ``group``. Containers share it only through a shared volume on
    a local file system (give its path); machines share a token through Redis. A ``path`` that
    cannot be used is a ``LimiterUnavailableError`` at the first call, unless ``fallback``
    names a limiter to use meanwhile (the default client falls back to ``LocalRateLimiter``,
    with a warning).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        rate_limit: RateLimit = DEFAULT_RATE_LIMIT,
        group: str | int | None = None,
        lease: float = DEFAULT_LEASE,
        background_share: int = 5,
        background_headroom: int = 0,
        fallback: RateLimiter | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if group is not None and path is None:
            raise ValueError(
                "group= shares a directory between OS users: give its path too "
                "(HostRateLimiter(path, group=...)); the default directory is one user's"
            )
        super().__init__(
            HostStore(path, clock=clock, group=group),
            rate_limit,
            lease=lease,
            background_share=background_share,
            background_headroom=background_headroom,
            fallback=fallback,
        )

    @property
    def path(self) -> str:
        """The directory holding the schedule's database."""
        store = self.store
        assert isinstance(store, HostStore)
        return str(store.directory)

    def __repr__(self) -> str:
        return f"<HostRateLimiter {self.path} {self.rate_limit}>"


def _conflict(conflict: RateConflict, mine: RateLimit) -> str:
    """Why ``mine`` may not be used beside another live limiter of the token: naming what
    differs, the rate, the burst or the margin, on both sides."""
    theirs = conflict.theirs
    margins = not math.isclose(theirs.margin, mine.margin)
    rates = not theirs.same_rate(mine) or (
        max(theirs.bursts, mine.bursts) > 1 and not math.isclose(theirs.period, mine.period)
    )
    bursts = theirs.bursts != mine.bursts

    def shown(rate_limit: RateLimit) -> str:
        return f"{rate_limit} with margin={rate_limit.margin:g}" if margins else str(rate_limit)

    if rates and margins:
        rule = "the same rate and the same margin"
    elif margins:
        rule = "the same margin too (it widens the window: two margins cannot share a schedule)"
    elif bursts and not rates:
        rule = "the same burst (a token is kept by one window, or evenly spaced)"
    elif theirs.same_rate(mine):
        rule = "the same rate and period (with bursts, 10/2s lets 10 start in one second)"
    else:
        rule = "the same rate (requests per second: evenly spaced, 5/60s and 1/12s are one)"
    return (
        f"this API token is already limited to {shown(theirs)} by another live client "
        f"({conflict.where}); every client using one token must use {rule}, got {shown(mine)}. "
        f"Close the other client first, or use its rate_limit, {theirs!r}."
    )


def default_limiter(rate_limit: RateLimit, *, redis_url: str | None = None) -> Limiter:
    """What ``AsyncAutocalls(limiter=None)`` uses: Redis when ``redis_url`` or
    ``AUTOCALLS_REDIS_URL`` is set (every host), else host-wide, falling back to this process
    with a warning."""
    url = redis_url or os.environ.get("AUTOCALLS_REDIS_URL")
    if url:
        return redis_limiter(url, rate_limit)
    return HostRateLimiter(rate_limit=rate_limit, fallback=LocalRateLimiter(rate_limit))


def redis_limiter(url: str, rate_limit: RateLimit) -> Limiter:
    """A ``RedisRateLimiter`` for ``url`` (``AUTOCALLS_REDIS_URL``, ``--redis-url``)."""
    try:
        from ._redis import RedisRateLimiter
    except ImportError:
        raise InvalidRequestError(
            "AUTOCALLS_REDIS_URL (or --redis-url) asks for the Redis rate limiter, which needs "
            "the redis extra: pip install 'autocalls-async[redis]'"
        ) from None
    return RedisRateLimiter(url, rate_limit=rate_limit)
