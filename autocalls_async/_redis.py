"""Shared backends on Redis: one token's rate limit across processes and hosts, and the
conversation cache every worker sees. Needs the ``redis`` extra (redis-py's asyncio client).

The limiter is the same algorithm as the local and host ones (``_schedule``: the rules and why
they keep the limit are written there), kept in one Redis key per token, a hash: field ``s``
holds a small JSON state, read together with Redis's ``TIME`` (``lua/read.lua``) and written
back only if nobody changed it meanwhile (``lua/cas.lua``, compare and set; a lost race answers
the new state at once, and a retry whose first write had committed sees its own value); fields
``q:<limiter>`` hold each limiter's report of its queue, written without comparison
(``lua/report.lua``), so that reports never make a grant or a start lose. Every process and
host therefore applies one schedule, on one clock (Redis's; client clocks disagree). An
operation costs one round trip when it changes nothing (a poll) and two when it writes; a slot
costs one grant and one report. Every script touches that one key, whose hash tag keeps it on
one slot of a Redis Cluster.

At most ``max_connections`` operations run at once per limiter, whatever the number of tokens
and waiting calls; the others wait for their turn (a grant's reports first), bounded by their
caller's ``max_wait`` and never failed for it. The first operation reads Redis's eviction
policy and warns when eviction can reach the limiter's keys.

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
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError, ResponseError

from ._errors import LimiterUnavailableError
from ._lifecycle import AsyncClosing
from ._log import logger
from ._models import Conversation, RateLimit
from ._ratelimit import DEFAULT_LEASE, Limiter, RateLimiter
from ._schedule import RateConflict, TokenState
from ._stores import URGENT

__all__ = ["RedisConversationStore", "RedisRateLimiter", "RedisStore"]

T = TypeVar("T")
#: A standalone Redis or a Redis Cluster (one script always touches one key: one slot).
AnyRedis: TypeAlias = "Redis | RedisCluster"
DEFAULT_RATE_LIMIT = RateLimit(5, 60.0)
#: Store operations in flight at once, per limiter (or conversation store) and event loop: the
#: connections it needs. More callers wait for one of these, within their own ``max_wait``.
DEFAULT_MAX_CONNECTIONS = 8
#: Keys live this long after the last moment they constrain anything.
_EXPIRY_SLACK_MS = 1_000
#: Seconds of compare-and-set lost to other writers before it counts as an outage. Each loss
#: means another writer made progress, and polls do not write: never seen in practice.
_CONTENDED_FOR = 30.0
#: URL schemes of a Redis Cluster (any node's address; the client finds the others).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def _script(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


#: Query arguments whose value a URL's redacted form shows: those redis-py reads as a number or
#: a switch (``URL_QUERY_ARGUMENT_PARSERS``), when the value is one. Every other argument it
#: passes on as text, ``password``, ``username`` and ``ssl_password`` among them: shown as
#: ``***``, and an argument it does not know is not named at all.
_SHOWN_ARGUMENTS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_read_size",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "health_check_interval",
        "ssl_check_hostname",
        "ssl_validate_ocsp",
        "ssl_validate_ocsp_stapled",
        "ssl_min_version",
        "timeout",
        "protocol",
        "legacy_responses",
    }
)
_NAMED_ARGUMENTS = _SHOWN_ARGUMENTS | {
    "password",
    "username",
    "ssl_password",
    "client_name",
    "lib_name",
    "lib_version",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_ca_data",
    "ssl_include_verify_flags",
    "ssl_exclude_verify_flags",
    "retry_on_error",
    "encoding",
    "encoding_errors",
    "decode_responses",
    "path",
}
_PLAIN_VALUE = re.compile(r"(?i)[0-9.+-]{0,32}|true|false|yes|no|on|off|y|n")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}")
_UNREADABLE = "<redis url>"


def redact_url(url: str) -> str:
    """The URL with every credential hidden, for messages and ``repr()``.

    Hidden: the userinfo's password (``user:***@``; a user part alone, often a password
    written without its colon, shows as ``***@``) and every query value redis-py reads as
    text (``password=***``, ``username=***``, ``ssl_password=***``, ...); only the numbers and
    switches it parses (``db``, timeouts, ...) are shown, and arguments it does not know are
    left out. A URL that does not read plainly (an unencoded ``@``, ``/``, ``?`` or ``#`` in a
    password cuts it short, and its rest then reads as a path or a port) shows as
    ``<redis url>``.
    """
    try:
        scheme, sep, _ = url.partition("://")
        if not sep or not _SCHEME.fullmatch(scheme):
            return _UNREADABLE
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a port that is no number: the URL was cut short)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        rest = url[len(scheme) + 3 + len(parts.netloc) :]
        if "@" in rest:  # an '@' past the host: a password was cut short
            return _UNREADABLE
        netloc = hostport
        if at:
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        query: list[str] = []
        unnamed = False
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _SHOWN_ARGUMENTS and _PLAIN_VALUE.fullmatch(value):
                query.append(f"{name}={value}")
            elif name in _NAMED_ARGUMENTS:
                query.append(f"{name}=***")
            else:
                unnamed = True
        if unnamed:
            query.append("***")
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{'&'.join(query)}" if query else "")
    except ValueError:
        return _UNREADABLE


def _from_url(make: Callable[..., T], url: str, shown: str, **options: Any) -> T:
    """``make(url, **options)`` (redis-py's ``from_url``); a URL it refuses raises an error that
    names the URL redacted, never redis-py's message (which may quote a piece of the password,
    e.g. one cut short by an unencoded '/')."""
    refused: Exception | None = None
    try:
        return make(url, **options)
    except (ValueError, TypeError) as exc:
        refused = type(exc)(
            f"redis-py cannot use the Redis URL {shown} ({type(exc).__name__}): check its form, "
            "and percent-encode any '@', ':', '/', '?', '#', '&' or '%' in a password or "
            "user name (urllib.parse.quote(password, safe=''))"
        )
    raise refused  # outside the except block: the original is not chained


def _connect(
    url: str | AnyRedis, timeout: float, max_connections: int
) -> tuple[AnyRedis, bool, str]:
    """(client, whether we own it, where it points, password hidden)."""
    if isinstance(url, Redis):
        kwargs = url.connection_pool.connection_kwargs
        if "path" in kwargs:
            return url, False, f"unix://{kwargs['path']}"
        return url, False, f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    if isinstance(url, RedisCluster):
        nodes = url.get_nodes()
        first = f"{nodes[0].host}:{nodes[0].port}" if nodes else "?"
        return url, False, f"redis+cluster://{first}"
    if not isinstance(url, str):
        raise TypeError(
            "url must be a redis:// or redis+cluster:// URL, a redis.asyncio.Redis or a "
            f"redis.asyncio.cluster.RedisCluster, not {url!r}"
        )
    where = redact_url(url)
    scheme, _, rest = url.partition("://")
    if scheme.lower() in CLUSTER_SCHEMES:
        cluster = _from_url(
            RedisCluster.from_url,
            f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}",
            where,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
        )
        return cluster, True, where
    client = _from_url(
        Redis.from_url,
        url,
        where,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One quick retry covers a pooled connection that went stale (a Redis restart); more
        # would only delay the clear error users need.
        retry=Retry(NoBackoff(), 1),
        # Never more than our gate lets through at once: the pool never refuses one of ours.
        max_connections=max_connections,
    )
    return client, True, where


def _check_max_connections(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_connections must be an int >= 1, got {value!r}")
    return value


class _Gate:
    """At most ``size`` Redis operations in flight; the others wait here, bounded only by their
    caller's deadline (never by the Redis timeout: a busy gate is not an outage). Urgent ones
    (``URGENT``: a grant's report, which frees the token for every waiter) go first, the others
    first come first served. A borrowed client whose pool is busy with its owner's own commands
    (``MaxConnectionsError``) is waited for the same way."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),
            deque(),
        )

    async def _acquire(self) -> None:
        urgent, normal = self._waiting
        for waiters in self._waiting:
            while waiters and waiters[0].done():
                waiters.popleft()  # gave up while waiting
        if self._free > 0 and not urgent and not normal:
            self._free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        (urgent if URGENT.get() else normal).append(future)
        try:
            await future  # the slot is handed over with the result
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed to us as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        for waiters in self._waiting:
            while waiters:
                future = waiters.popleft()
                if not future.done():
                    future.set_result(None)
                    return
        self._free += 1

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """One of the ``size`` places, for as long as the block runs."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def run(self, operation: Callable[[], Awaitable[T]], bound: float) -> T:
        """``operation`` through the gate; ``bound`` (seconds) limits the operation, not the
        wait for a place."""
        async with self.held():
            return await attempt(operation, bound)


async def attempt(operation: Callable[[], Awaitable[T]], bound: float) -> T:
    """``operation`` within ``bound`` seconds; a pool that is full of its owner's own commands
    (``MaxConnectionsError``) is waited for, not failed."""
    pause = 0.002
    while True:
        try:
            async with asyncio.timeout(bound):
                return await operation()
        except MaxConnectionsError:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


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

    def __init__(
        self,
        url: str | AnyRedis,
        *,
        prefix: str,
        timeout: float,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.prefix = prefix
        self.timeout = _check_timeout(timeout)
        self.max_connections = _check_max_connections(max_connections)
        self.redis, self.owned, self.where = _connect(url, self.timeout, self.max_connections)
        self._read = self.redis.register_script(_script("read.lua"))
        self._cas = self.redis.register_script(_script("cas.lua"))
        self._report = self.redis.register_script(_script("report.lua"))
        self._gate = _Gate(self.max_connections)
        self._down_until = -math.inf
        self._down_error: LimiterUnavailableError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checked = False  # Redis's eviction policy, read once
        #: operations so far: reads, writes (compare-and-set that wrote), lost (that did not)
        self.counts = {"reads": 0, "writes": 0, "lost": 0}

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

    def _our_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "this RedisRateLimiter was first used in another event loop; its connections "
                "belong to one loop: create one limiter per event loop"
            )
        return loop

    async def _check_once(self) -> None:
        if not self._checked:
            self._checked = True
            try:
                await self._call(
                    "reading its eviction policy",
                    functools.partial(check_eviction, self.redis, self.where),
                )
            except LimiterUnavailableError:
                self._checked = False  # again once Redis answers
                raise

    async def update(self, key: str, update: Callable[[TokenState, float], T]) -> T:
        loop = self._our_loop()
        # One place at the gate for the whole update (its read, compare-and-set and retries):
        # an update under way never queues again behind newcomers.
        async with self._gate.held():
            await self._check_once()
            return await self._update(loop, key, update)

    def try_update_many(
        self, items: Sequence[tuple[str, Callable[[TokenState, float], Any]]]
    ) -> list[tuple[bool, Any]] | None:
        return None  # always a round trip

    def _too_contended(self) -> LimiterUnavailableError:
        return LimiterUnavailableError(
            f"the Redis rate limiter at {self.where} is too contended: every attempt to update "
            f"the schedule for {_CONTENDED_FOR:g}s lost to other writers; nothing was sent"
        )

    async def update_many(
        self,
        items: Sequence[tuple[str, Callable[[TokenState, float], Any]]],
        keep: Callable[[int], bool] | None = None,
    ) -> list[tuple[bool, Any]]:
        """Apply many updates in two round trips in all (one pipeline of reads, one of
        compare-and-sets) rather than two each. A token's several updates are applied in order
        to one read of its state and written by one compare-and-set, so together they are as
        atomic as one (each sees the state the one before left, as ``HostStore.update_many``);
        a compare-and-set that lost to another writer is done again, alone, on what that writer
        left. Outcomes as ``HostStore.update_many``'s (on a Redis Cluster, each token's updates
        are one ``update`` of their own)."""
        loop = self._our_loop()
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(items)
        async with self._gate.held():
            await self._check_once()
            groups: dict[str, list[int]] = {}
            for i in range(len(items)):
                if keep is None or keep(i):
                    groups.setdefault(items[i][0], []).append(i)
            merged = [
                (key, functools.partial(_in_order, [items[i][1] for i in chosen]))
                for key, chosen in groups.items()
            ]
            if isinstance(self.redis, RedisCluster) or len(merged) == 1:
                done = [(True, await self._update(loop, key, update)) for key, update in merged]
            else:
                done = await self._batch(merged, loop)
            for chosen, (_, results) in zip(groups.values(), done, strict=True):
                for i, outcome in zip(chosen, results, strict=True):
                    outcomes[i] = outcome
        return outcomes

    async def _batch(
        self,
        items: Sequence[tuple[str, Callable[[TokenState, float], Any]]],
        loop: asyncio.AbstractEventLoop,
    ) -> list[tuple[bool, Any]]:
        """One pipeline of reads, then one of writes; the writes that lost to another writer
        are prepared again on what it wrote (the script answers it) and pipelined again
        together, as ``_update`` does for one."""
        names = [self.redis_key(key) for key, _ in items]
        counts = self.counts
        counts["reads"] += len(items)
        replies = await self._pipeline(
            "reading the schedule", [(self._read, [name], []) for name in names]
        )
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(items)
        todo = list(enumerate(replies))  # (item, the state to apply it to)
        started = loop.time()
        lost = 0
        while True:
            writes: list[tuple[Any, list[str], list[Any]]] = []
            written: list[int] = []
            for index, reply in todo:
                try:
                    result, write = self._prepare(names[index], reply, items[index][1])
                except RateConflict as conflict:
                    outcomes[index] = (False, conflict)
                    continue
                outcomes[index] = (True, result)
                if write is not None:
                    writes.append(write)
                    written.append(index)
            if not writes:
                return outcomes
            answers = await self._pipeline("updating the schedule", writes)
            todo = []
            for index, answer in zip(written, answers, strict=True):
                if isinstance(answer, list):
                    # Another process wrote first: the script read its value and the clock.
                    counts["lost"] += 1
                    todo.append((index, answer))
                else:
                    counts["writes"] += 1
            if not todo:
                return outcomes
            lost += 1
            if loop.time() - started > _CONTENDED_FOR:
                raise self._too_contended()
            if lost >= 3:
                # Writers in lockstep: step out of it at random, then read afresh.
                await asyncio.sleep(random.uniform(0.0, min(0.05, 0.001 * 2**lost)))
                counts["reads"] += len(todo)
                again = await self._pipeline(
                    "reading the schedule", [(self._read, [names[i]], []) for i, _ in todo]
                )
                todo = [(i, reply) for (i, _), reply in zip(todo, again, strict=True)]

    async def _pipeline(
        self, what: str, calls: list[tuple[Any, list[str], list[Any]]]
    ) -> list[Any]:
        """Run these scripts (script, keys, args) in one round trip (their SHA1s: loaded again
        if Redis forgot them, a restart)."""

        async def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            answers: list[Any] = await pipe.execute(raise_on_error=False)
            if any(isinstance(a, NoScriptError) for a in answers):
                for script in (self._read, self._cas, self._report):
                    await self.redis.script_load(script.script)
                again = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
                pipe = self.redis.pipeline(transaction=False)
                for i in again:
                    script, keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                for i, answer in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                    answers[i] = answer
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
            return answers

        return await self._call(what, run)  # type: ignore[no-any-return]

    async def _update(
        self,
        loop: asyncio.AbstractEventLoop,
        key: str,
        update: Callable[[TokenState, float], T],
        reply: Any = None,
    ) -> T:
        name = self.redis_key(key)
        counts = self.counts
        if reply is None:
            counts["reads"] += 1
            reply = await self._call("reading the schedule", functools.partial(self._read, [name]))
        started = loop.time()
        lost = 0
        while True:
            result, write = self._prepare(name, reply, update)
            if write is None:
                return result  # nothing changed (a poll): nothing to write
            script, keys, args = write
            what = "reporting the queue" if script is self._report else "updating the schedule"
            answer = await self._call(what, functools.partial(script, keys, args))
            if not isinstance(answer, list):
                counts["writes"] += 1
                return result  # written (by this attempt, or by one whose answer was lost)
            counts["lost"] += 1
            # Another process wrote first: the script read its value and the clock for us.
            reply = answer
            lost += 1
            if loop.time() - started > _CONTENDED_FOR:
                raise self._too_contended()
            if lost >= 3:
                # Writers in lockstep: step out of it at random, then read afresh.
                await asyncio.sleep(random.uniform(0.0, min(0.05, 0.001 * 2**lost)))
                counts["reads"] += 1
                reply = await self._call(
                    "reading the schedule", functools.partial(self._read, [name])
                )

    def _prepare(
        self, name: str, reply: Any, update: Callable[[TokenState, float], T]
    ) -> tuple[T, tuple[Any, list[str], list[Any]] | None]:
        """Apply ``update`` to the state ``reply`` (read.lua's) holds: its result, and the
        write it needs (script, keys, args), None when nothing changed."""
        seconds, micros, raw = reply
        now = int(seconds) + int(micros) / 1_000_000
        fields = _fields(raw)
        text = fields.pop("s", "")
        state = _decode(text, fields)
        result = update(state, now)
        latest = state.latest()
        data = state.to_json()
        queued: dict[str, Any] = data.pop("queued")
        if state.holder is None and latest <= now:
            new = ""  # nothing left to remember
        else:
            new = json.dumps(data, separators=(",", ":"))
        reports: list[str] = []  # the queue reports that changed: field, value ('' deletes)
        for who, entry in queued.items():
            value = json.dumps(entry, separators=(",", ":"))
            if fields.get(f"q:{who}") != value:
                reports += [f"q:{who}", value]
        for field in fields:
            if field[2:] not in queued:
                reports += [field, ""]
        if new == text and not reports:
            return result, None
        ttl = max(1, math.ceil((latest - now) * 1000)) + _EXPIRY_SLACK_MS
        if new == text:
            # Only queue reports changed: written as they are, never compared.
            return result, (self._report, [name], [ttl, *reports])
        return result, (self._cas, [name], [text, new, ttl, *reports])

    async def _call(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis operation; any failure becomes ``LimiterUnavailableError``.

        At most ``max_connections`` run at once; the others wait for their turn (their
        caller's deadline bounds that wait); the timeout bounds the operation itself.
        """
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until and self._down_error is not None:
            raise LimiterUnavailableError(str(self._down_error))
        try:
            # The socket timeouts bound each attempt; this bounds the attempts together.
            return await attempt(operation, self.timeout * 2 + 0.5)
        except (RedisError, OSError) as exc:
            error = LimiterUnavailableError(
                f"the Redis rate limiter at {self.where} is unavailable while {what} "
                f"({type(exc).__name__}: {_short(exc)}); nothing was sent"
            )
            # Waiters queued behind this one fail at once for a while instead of each waiting
            # for its own timeout.
            self._down_until, self._down_error = loop.time() + self.timeout, error
            raise error from exc


async def check_eviction(redis: AnyRedis, where: str) -> str | None:
    """Read Redis's eviction policy; WARN when eviction can drop the limiter's keys.

    Returns the warning (None when there is nothing to say, or when ``INFO`` is refused: an
    ACL). A Redis that may evict (``maxmemory`` set and a policy other than ``noeviction``)
    drops keys under memory pressure: the limiter's keys carry a TTL (they expire once idle), so
    the ``volatile-*`` policies may evict them as well as the ``allkeys-*`` ones. An evicted
    schedule is a flush: other processes' recent starts are forgotten, and the API may answer
    429. Other Redis errors are raised.
    """
    try:
        if isinstance(redis, RedisCluster):  # every node's own: one may evict
            info: Any = await redis.info("memory", target_nodes=RedisCluster.ALL_NODES)
        else:
            info = await redis.info("memory")
    except ResponseError as exc:  # refused (NOPERM): nothing to check
        logger.debug("Redis rate limiter: cannot read INFO memory: %s", _short(exc))
        return None
    nodes = (
        [info] if "maxmemory_policy" in info else [v for v in info.values() if isinstance(v, dict)]
    )
    risky = sorted(
        {
            (str(node.get("maxmemory_policy")), int(node.get("maxmemory") or 0))
            for node in nodes
            if node.get("maxmemory_policy") not in (None, "noeviction")
            and int(node.get("maxmemory") or 0) != 0
        }
    )
    if not risky:
        return None
    policy, maxmemory = risky[0]
    message = (
        f"the Redis at {where} may evict the rate limiter's keys (maxmemory-policy {policy}, "
        f"maxmemory {maxmemory} bytes): its keys carry a TTL, so volatile-* policies evict them "
        "too, and an evicted schedule forgets other processes' recent starts (the API may then "
        "answer 429). Use a Redis with maxmemory-policy noeviction for the limiter"
    )
    logger.warning("%s", message)
    return message


def _in_order(
    updates: Sequence[Callable[[TokenState, float], Any]], state: TokenState, now: float
) -> list[tuple[bool, Any]]:
    """One token's updates of a batch, applied in order to one state: each one's outcome,
    ``(True, result)`` or ``(False, RateConflict)`` (raised once the state was settled: that is
    kept, as the host store keeps it)."""
    outcomes: list[tuple[bool, Any]] = []
    for update in updates:
        try:
            outcomes.append((True, update(state, now)))
        except RateConflict as conflict:
            outcomes.append((False, conflict))
    return outcomes


def _fields(raw: Any) -> dict[str, str]:
    """A hash as HGETALL returns it through a script (a flat list), as text."""
    items = [item.decode() if isinstance(item, bytes) else str(item) for item in raw or ()]
    return dict(zip(items[::2], items[1::2], strict=True))


def _decode(text: str, reports: dict[str, str]) -> TokenState:
    """The state (field ``s``) with every limiter's queue report (fields ``q:<limiter>``)."""
    try:
        data = json.loads(text) if text else {}
        data["queued"] = {
            field[2:]: json.loads(value)
            for field, value in reports.items()
            if field.startswith("q:")
        }
        return TokenState.from_json(data)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        # Never a fresh start: nobody knows how many starts the window already holds.
        logger.warning(
            "Redis rate limiter: a token's schedule could not be read; waiting one period "
            "before that token's next start, to be safe"
        )
        return TokenState(suspect=True)


class RedisRateLimiter(Limiter):
    """A rate limiter shared through Redis by every process and host using the same token.

    Same algorithm and guarantee as the host limiter: per token, never more than
    ``rate_limit.requests`` starts in any rolling ``rate_limit.period``, now across hosts. Pass
    it as ``AsyncAutocalls(limiter=...)``; one limiter serves many clients and tokens, and
    clients never close it: use ``async with RedisRateLimiter(...)`` or ``await
    limiter.aclose()``. Every process sharing a token must use the same ``rate_limit`` (a
    different one is refused while another live limiter uses the token).

    ``url`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL, a Redis Cluster's
    ``redis+cluster://`` / ``rediss+cluster://`` URL (any node), or a ``redis.asyncio.Redis``
    or ``redis.asyncio.cluster.RedisCluster`` of yours (used and never closed). ``timeout``
    bounds each Redis attempt; past it (or when Redis refuses the connection) a call raises
    ``LimiterUnavailableError`` and sends nothing, unless ``fallback`` names a limiter to use
    meanwhile (give it this process's share of the limit: a per-process limiter at the full
    rate would multiply it by the process count).

    ``max_connections`` bounds the Redis operations in flight at once (and so the connections
    used), whatever the number of tokens and waiting calls: callers beyond it wait for their
    turn, within their ``max_wait``, and never fail for it. The first operation reads Redis's
    eviction policy and logs a WARNING when eviction can drop the limiter's keys.
    """

    def __init__(
        self,
        url: str | AnyRedis,
        *,
        rate_limit: RateLimit = DEFAULT_RATE_LIMIT,
        prefix: str = "autocalls:",
        timeout: float = 1.0,
        fallback: RateLimiter | None = None,
        lease: float = DEFAULT_LEASE,
        background_share: int = 5,
        background_headroom: int = 0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit(requests, period), got {rate_limit!r}")
        self.redis_store = RedisStore(
            url, prefix=prefix, timeout=timeout, max_connections=max_connections
        )
        super().__init__(
            self.redis_store,
            rate_limit,
            lease=lease,
            background_share=background_share,
            background_headroom=background_headroom,
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
    effort: a read or write gets ``timeout`` seconds in all (its wait for a connection
    included); a Redis failure or a store that has not answered by then reads as a miss (a
    write is skipped), so a reply the service already processed is never turned into an error
    nor held back for longer than that. A WARNING is logged once per outage (an INFO when
    Redis answers again); meanwhile one operation at a time tries Redis, and the others are
    a miss at once. ``url`` is as for ``RedisRateLimiter`` (a Redis Cluster too); at most
    ``max_connections`` reads and writes run at once, the others wait for their turn.
    """

    def __init__(
        self,
        url: str | AnyRedis,
        *,
        ttl: float = 30 * 24 * 3600.0,
        prefix: str = "autocalls:",
        timeout: float = 1.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.ttl = _check_timeout(ttl)
        self.prefix = prefix
        self.timeout = _check_timeout(timeout)
        self.max_connections = _check_max_connections(max_connections)
        self._redis, self._owned, self._where = _connect(url, self.timeout, self.max_connections)
        self._gate = _Gate(self.max_connections)
        self._failing = False  # an outage was logged and Redis has not answered since
        self._down_until = -math.inf  # a miss at once until then: the last failure's time + timeout
        self._probing = False  # during an outage, one operation at a time tries Redis
        self._tasks: set[asyncio.Task[Any]] = set()  # operations under way

    def __repr__(self) -> str:
        return f"<RedisConversationStore {self._where} ttl={self.ttl:g}s prefix={self.prefix!r}>"

    async def _run(self, what: str, operation: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """(True, Redis's answer), or (False, None): Redis failed, or did not answer within
        ``timeout`` (the wait for a connection included), or is in an outage."""
        loop = asyncio.get_running_loop()
        if self._failing and (self._probing or loop.time() < self._down_until):
            return False, None  # an outage: only one operation at a time tries Redis again
        probe = self._failing
        if probe:
            self._probing = True
        # One bound for the wait for a connection and the attempts: a stalled Redis holds every
        # caller for ``timeout`` at most, never a queue of timeouts. The operation runs in a
        # task of its own, so that the caller leaves on time even when a cancellation is lost
        # inside redis-py (nested timeouts on Python 3.11); ``aclose`` ends the stragglers.
        task = loop.create_task(self._gate.run(operation, self.timeout))
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await asyncio.shield(task)
        except (RedisError, OSError, TimeoutError) as exc:
            task.cancel()
            self._down_until = loop.time() + self.timeout
            if self._failing:
                logger.debug(
                    "conversation store at %s: %s failed: %s", self._where, what, _short(exc)
                )
            else:
                self._failing = True
                reason = (
                    f"no answer within {self.timeout:g}s"
                    if isinstance(exc, TimeoutError) and not str(exc)
                    else f"{type(exc).__name__}: {_short(exc)}"
                )
                logger.warning(
                    "conversation store at %s is unavailable (%s while %s): conversations are "
                    "a miss and are not saved there until it answers again (replies are not "
                    "affected)",
                    self._where,
                    reason,
                    what,
                )
            return False, None
        except BaseException:
            task.cancel()  # the caller was cancelled: so is its operation
            raise
        finally:
            if probe:
                self._probing = False
        if self._failing:
            self._failing = False
            logger.info("conversation store at %s answers again", self._where)
        return True, answer

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved (its caller may have left): never "never retrieved"

    async def aclose(self) -> None:
        """End the operations still under way (their callers have left), then close the
        connection pool (if ours)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout)
        if self._owned:
            await self._redis.aclose()

    def redis_key(self, assistant_id: int, customer_identifier: str) -> str:
        digest = hashlib.sha256(customer_identifier.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}conv:{assistant_id}:{digest[:32]}"

    async def get(self, assistant_id: int, customer_identifier: str) -> Conversation | None:
        """The conversation any worker last stored, or None (also when Redis fails or has not
        answered within ``timeout``)."""
        key = self.redis_key(assistant_id, customer_identifier)
        answered, raw = await self._run("reading", functools.partial(self._redis.get, key))
        if not answered or raw is None:
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
        """Remember the conversation for ``ttl`` seconds, within ``timeout`` at most; failures
        are logged (once per outage), not raised."""
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
        await self._run(
            "writing",
            functools.partial(self._redis.set, key, value, px=max(1, round(self.ttl * 1000))),
        )
