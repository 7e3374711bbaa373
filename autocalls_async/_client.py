"""``AsyncAutocalls``: the pipeline, in the order a call goes through it.

validate (``_wire``) → per-conversation order (``_ordering``) → rate limiter (``_ratelimit``)
→ send (``_transport``) → parse (``_wire``) → retry (``_retry``) → remember (``_conversations``)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Hashable, Mapping
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, Self

import aiohttp
import attrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._budget import Budget, Ledger, Ticket, Usage
from ._conversations import ConversationStore, GuardedStore, MemoryConversationStore
from ._errors import (
    AutocallsError,
    BudgetExceededError,
    ClientClosedError,
    InvalidRequestError,
    LimiterUnavailableError,
    RateLimitError,
    RateLimitTimeout,
)
from ._identity import limiter_key, token_id
from ._lifecycle import AsyncOnly
from ._log import configure_from_env, logger
from ._models import Conversation, Priority, RateLimit, Reply
from ._ordering import KeyedOrder
from ._pool import Gate, LimiterKey, Pool, lease_limiter, release_limiter
from ._ratelimit import Limiter, RateLimiter, default_limiter
from ._retry import Decision, RetryPolicy, is_retry_safe
from ._telemetry import http_request, limiter_slot, traced
from ._transport import GrantExpiredError, SendGate, Transport
from ._wire import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_REQUEST_BYTES,
    Redactor,
    ReplyRequest,
    build_request,
    check_base_url,
    check_token,
    checked_base_url,
    endpoint,
    is_loopback,
    parse_reply,
    stated_limit,
    stated_limit_text,
    trim,
)

__all__ = ["AsyncAutocalls", "ClientStats"]

#: Called synchronously, in the calling task's context, just before each attempt of a
#: ``generate_reply`` is handed to the transport: the moment from which the service may
#: process it. ``BulkRunner`` sets it per row to record "may have been sent" before it is true.
on_send: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "autocalls_on_send", default=None
)

DEFAULT_RATE_LIMIT = RateLimit(5, 60.0)
#: The retries' jitter: one generator for every client (each of its own was 2.5 KB).
_RANDOM = random.Random()
DEFAULT_MAX_RESPONSE_SIZE = 10 * 1024 * 1024
_UNSET: Any = object()


@attrs.define
class ClientStats:
    """Counters for a web app to export (Prometheus, StatsD, logs)."""

    requests: int = 0  #: attempts sent to the server, retries included
    replies: int = 0  #: calls that returned a Reply
    #: calls that raised an SDK error (``AutocallsError``): after their retries, refused
    #: before sending (bad input, ``max_wait``, a closed client, the budget) or ended by
    #: ``close()``; not calls cancelled by their caller. ``replies + errors`` counts the
    #: calls that ended, but for those.
    errors: int = 0
    retries: int = 0
    rate_limited: int = 0  #: 429 responses received
    limiter_wait: float = 0.0  #: seconds spent waiting for rate-limit slots
    in_flight: int = 0  #: requests on the wire right now
    waiting: int = 0  #: calls waiting for their turn or a slot right now
    #: The limit the server last stated (``X-RateLimit-Limit``, per minute), once it did.
    server_limit: RateLimit | None = None


def _check_seconds(name: str, value: object, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidRequestError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


_P = ParamSpec("_P")


def _refused_without_frames(
    init: Callable[Concatenate[AsyncAutocalls, _P], None],
) -> Callable[Concatenate[AsyncAutocalls, _P], None]:
    """The constructor, whose refusals (``InvalidRequestError``) carry no traceback into it:
    its frame holds the token and the headers made from it, which an error reporter that
    records frames' local variables would show. The message says what to fix."""

    @functools.wraps(init)
    def construct(self: AsyncAutocalls, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except InvalidRequestError as error:
            del args, kwargs  # api_token among them
            error.__traceback__ = None
            error.__context__ = None  # what check_base_url hid (``from None``), with its frames
            raise

    return construct


class _Owner(Protocol):
    """What a client asks of the ``AutocallsAccounts`` that made it."""

    @property
    def closed(self) -> bool: ...


def _check_limiter_object(limiter: object) -> None:
    if isinstance(limiter, RateLimit) or (
        limiter is not None and not callable(getattr(limiter, "slot", None))
    ):
        raise InvalidRequestError(
            f"limiter must be a rate limiter object (e.g. RedisRateLimiter(...)), got "
            f"{type(limiter).__name__}; to set the rate, pass rate_limit=RateLimit(...)"
        )


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float | None) -> aiohttp.ClientTimeout:
    """One per value, for every client (each request names its client's)."""
    return aiohttp.ClientTimeout(total=seconds)


@functools.lru_cache(maxsize=32)
def _policy(max_retries: int, retry_unsafe: bool) -> RetryPolicy:
    return RetryPolicy(max_retries=max_retries, retry_unsafe=retry_unsafe)


TelemetryAttributes = Mapping[str, str | bool | int | float]


def _check_attributes(attributes: object) -> dict[str, str | bool | int | float] | None:
    if attributes is None:
        return None
    if not isinstance(attributes, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str | bool | int | float)
        for key, value in attributes.items()
    ):
        raise InvalidRequestError(
            "telemetry_attributes must map attribute names (str) to str, bool, int or float "
            f"values, e.g. {{'tenant.id': 'acme'}}, got {attributes!r}"
        )
    return dict(attributes) or None


class _Setup:
    """What a client is made of besides its token, checked: one per client, or one for every
    client of an ``AutocallsAccounts``, which also shares its limiter, pool, stores and budget.
    """

    __slots__ = (
        "base_url",
        "budget",
        "cache_size",
        "endpoint",
        "follows_server",
        "limiter",
        "limiter_lease",
        "max_request_bytes",
        "max_response_size",
        "max_wait",
        "near",
        "normalize_identifier",
        "order",
        "parent_ledger",
        "pool",
        "priority",
        "rate_limit",
        "retry_policy",
        "session",
        "store",
        "telemetry_attributes",
        "timeout",
        "trust_env",
    )

    def __init__(
        self,
        redactor: Redactor | None,
        *,
        base_url: str | None,
        rate_limit: RateLimit | None,
        limiter: RateLimiter | None,
        priority: Priority,
        max_retries: int,
        timeout: float | None,
        session: aiohttp.ClientSession | None,
        retry_unsafe: bool,
        max_wait: float | None,
        retry_policy: RetryPolicy | None,
        conversation_store: ConversationStore | None,
        conversation_cache_size: int,
        max_response_size: int,
        max_request_bytes: int | None,
        budget: Budget | None,
        normalize_identifier: Callable[[str], str] | None,
        telemetry_attributes: TelemetryAttributes | None,
    ) -> None:
        base = base_url or os.environ.get("AUTOCALLS_BASE_URL") or DEFAULT_BASE_URL
        url: URL | None = None
        if isinstance(base, str):
            with contextlib.suppress(InvalidRequestError):
                url = checked_base_url(base)
        #: Refused, or not a str: checked again, for a message that masks the token.
        self.base_url = url if url is not None else check_base_url(base, redactor)
        self.endpoint = endpoint(self.base_url)
        self.trust_env = not is_loopback(self.base_url.host or "")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise InvalidRequestError(
                f"rate_limit must be a RateLimit(requests, period) or None, got {rate_limit!r}"
            )
        if limiter is not None and not (
            callable(getattr(limiter, "slot", None)) and callable(getattr(limiter, "pause", None))
        ):
            raise InvalidRequestError(
                f"limiter must be a rate limiter such as HostRateLimiter(rate_limit=...) or "
                f"RedisRateLimiter(...), got {limiter!r}; to set the limit, pass rate_limit="
            )
        self.rate_limit = rate_limit
        self.limiter = limiter  # None with a rate_limit: the default, made by ``own_limiter``
        self.limiter_lease: LimiterKey | None = None
        self.priority = _check_priority(priority)
        #: Adopt the limit the server states (``RateLimit.from_server``): own limiter only.
        self.follows_server = rate_limit is not None and rate_limit.follows_server
        if self.follows_server and limiter is not None:
            raise InvalidRequestError(
                "RateLimit.from_server() adopts the server's limit in the client's own limiter: "
                "pass it as rate_limit= without limiter= (a limiter you pass keeps its rate)"
            )
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequestError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.retry_policy = retry_policy or _policy(max_retries, bool(retry_unsafe))
        self.max_wait = _check_seconds("max_wait", max_wait)
        seconds = _check_seconds("timeout", timeout)
        if seconds == 0:
            raise InvalidRequestError("timeout must be > 0 seconds (or None for no limit)")
        self.timeout = _timeout(seconds)
        if (
            isinstance(max_response_size, bool)
            or not isinstance(max_response_size, int)
            or max_response_size < 1
        ):
            raise InvalidRequestError(
                f"max_response_size must be a positive int (bytes), got {max_response_size!r}"
            )
        self.max_response_size = max_response_size
        if max_request_bytes is not None and (
            isinstance(max_request_bytes, bool)
            or not isinstance(max_request_bytes, int)
            or max_request_bytes < 1
        ):
            raise InvalidRequestError(
                "max_request_bytes must be a positive int (bytes) or None (no limit), got "
                f"{max_request_bytes!r}"
            )
        self.max_request_bytes = max_request_bytes
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise InvalidRequestError("session must be an aiohttp.ClientSession")
        self.session = session
        self.pool: Pool | None = None  # an AutocallsAccounts' lease, shared by its clients
        if budget is not None and not isinstance(budget, Budget):
            raise InvalidRequestError(f"budget must be a Budget(replies=N) or None, got {budget!r}")
        self.budget = budget
        self.parent_ledger: Ledger | None = None
        if normalize_identifier is not None and not callable(normalize_identifier):
            raise InvalidRequestError(
                "normalize_identifier must be a callable str -> str (e.g. "
                f"autocalls_async.identifiers.e164('US')), got {normalize_identifier!r}"
            )
        self.normalize_identifier = normalize_identifier
        if (
            isinstance(conversation_cache_size, bool)
            or not isinstance(conversation_cache_size, int)
            or conversation_cache_size < 1
        ):
            MemoryConversationStore(conversation_cache_size)  # says why (a ValueError)
        self.cache_size = conversation_cache_size
        self.near: MemoryConversationStore | None = None  # shared: an AutocallsAccounts'
        #: Every read and write bounded, a failure a miss: never a hang or a lost reply.
        self.store = None if conversation_store is None else GuardedStore(conversation_store)
        self.order: KeyedOrder | None = None  # shared: an AutocallsAccounts'
        self.telemetry_attributes = _check_attributes(telemetry_attributes)

    def own_limiter(self) -> None:
        """Lease the process's default limiter for this rate (``_pool``), or make a limiter
        of its own for a client that adopts the server's limit (it changes its rate)."""
        if self.limiter is not None or self.rate_limit is None:
            return
        if self.follows_server:
            self.limiter = default_limiter(self.rate_limit)
        else:
            self.limiter, self.limiter_lease = lease_limiter(self.rate_limit)

    async def release_limiter(self) -> None:
        lease, self.limiter_lease = self.limiter_lease, None
        limiter = self.limiter
        if lease is not None and isinstance(limiter, Limiter):
            await release_limiter(lease, limiter)
        elif self.follows_server and isinstance(limiter, Limiter):
            # Its own: it stops counting as a user of the token, so that another client may
            # then use another rate limit for it.
            self.follows_server = False
            await limiter.aclose()


class AsyncAutocalls(AsyncOnly):
    """An async client for ``POST /ai/generate-reply``; share one per process and event loop.

    Use it with ``async with`` (or call ``close()``). Every call first waits for its
    conversation's earlier calls, then for a rate-limit slot shared by every client using the
    same token, then is sent; only failures the server cannot have processed are retried.

    Clients are cheap (microseconds, about a kilobyte): clients made without ``session=`` in
    one event loop share one connection pool per base URL, and clients made without
    ``limiter=`` share the process's default limiter for their rate. For many tokens in one
    process, ``AutocallsAccounts`` makes them for you.

    ``max_request_bytes`` (default 1 MiB, nginx's default ``client_max_body_size``) bounds the
    encoded JSON body of a call: a bigger one raises ``InvalidRequestError`` before anything
    is sent, instead of travelling only to be refused with a 413. Raise it if the server you
    talk to accepts more; None removes the check.

    ``telemetry_attributes`` (e.g. ``{"tenant.id": "acme"}``) are added to every span and
    metric point of this client's calls: per-token figures, when you want them (each value
    is a time series more in your metrics backend).
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_conversations",
        "_drained",
        "_interrupted",
        "_ledger",
        "_limiter",
        "_limiter_key",
        "_loop",
        "_order",
        "_owner",
        "_scope",
        "_setup",
        "_stated",
        "_store",
        "_token_id",
        "_transport",
        "_waiting",
        "base_url",
        "max_request_bytes",
        "max_wait",
        "normalize_identifier",
        "priority",
        "retry_policy",
        "stats",
        "telemetry_attributes",
    )

    @_refused_without_frames
    def __init__(
        self,
        api_token: str | None = None,
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
        telemetry_attributes: TelemetryAttributes | None = None,
    ) -> None:
        configure_from_env()
        _check_limiter_object(limiter)
        token = check_token(
            api_token if api_token is not None else os.environ.get("AUTOCALLS_API_TOKEN")
        )
        redactor = Redactor(token)  # kept to mask the token in whatever comes back
        setup = _Setup(
            redactor,
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
            telemetry_attributes=telemetry_attributes,
        )
        setup.own_limiter()  # last: a refused client leases nothing
        self._start(setup, token, redactor, owner=None)

    @classmethod
    def _of_account(cls, setup: _Setup, token: str, owner: _Owner) -> AsyncAutocalls:
        """A client of ``AutocallsAccounts``: its token, and everything else shared."""
        client = cls.__new__(cls)
        token = check_token(token)
        client._start(setup, token, Redactor(token), owner=owner)
        return client

    def _start(
        self, setup: _Setup, token: str, redactor: Redactor, *, owner: _Owner | None
    ) -> None:
        #: The token's name for limiters: the same on every host, shown nowhere.
        self._limiter_key = limiter_key(token)
        self._token_id: str | None = None
        self._setup = setup
        self._owner = owner  # an AutocallsAccounts, whose resources these are; None: ours
        self.base_url = setup.base_url
        self._limiter = setup.limiter
        self.priority = setup.priority
        self._stated: str | None = None  # the last X-RateLimit-Limit acted on, as received
        self.retry_policy = setup.retry_policy
        self.max_wait = setup.max_wait
        #: The largest request body sent, in bytes (None: no limit): a bigger one is refused
        #: with ``InvalidRequestError`` before anything is sent.
        self.max_request_bytes = setup.max_request_bytes
        self._transport = Transport(
            setup.session,
            url=setup.endpoint,
            token=token,  # kept there, in the headers, and in the redactor, to mask it
            timeout=setup.timeout,
            max_response_size=setup.max_response_size,
            trust_env=setup.trust_env,
            redactor=redactor,
            pool=setup.pool,
        )
        self._ledger = Ledger(setup.budget if owner is None else None, parent=setup.parent_ledger)
        #: Applied to every customer identifier before anything else (see ``normalize``).
        self.normalize_identifier = setup.normalize_identifier
        #: Conversations this client saw: its own cache, made at the first reply, or one its
        #: ``AutocallsAccounts`` shares, where its entries are under its token's key.
        self._conversations = setup.near
        self._scope = None if owner is None else self._limiter_key
        self._store = setup.store
        self._order = setup.order if setup.order is not None else KeyedOrder()
        self.telemetry_attributes = setup.telemetry_attributes
        self.stats = ClientStats()  #: counters for your metrics: see ``ClientStats``
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._waiting: set[asyncio.Task[Any]] | None = None  # made at the first call
        self._interrupted: set[asyncio.Task[Any]] | None = None  # made by close()
        self._drained: asyncio.Event | None = None  # made by close(), if it must wait

    @property
    def token_id(self) -> str:
        """A stable name for the token in logs and ``repr()``: a keyed hash that cannot be used
        to check a guess of the token without this user's host store (see ``_identity``)."""
        if self._token_id is None:
            self._token_id = token_id(self._limiter_key)
        return self._token_id

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        shown = self._transport.shown_text(self.base_url)
        return f"<AsyncAutocalls {shown} token_id={self.token_id} {state}>"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._bind_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once ``close()`` has started: new calls fail with ``ClientClosedError``."""
        return self._closed

    async def close(self) -> None:
        """Close gracefully: waiting calls fail now, calls already sent finish and return.

        Safe to call more than once and from several tasks; each waits for the end. Await it
        in the event loop the client was used in (or any loop, once that one has closed): from
        another loop it raises ``RuntimeError`` and changes nothing, so the client stays usable
        and closable from its own loop.
        """
        loop = self._loop
        if loop is not None and not loop.is_closed() and loop is not asyncio.get_running_loop():
            raise RuntimeError(
                "close() was awaited in another event loop than the one this AsyncAutocalls "
                "was used in, which is still open (running in another thread?): its connections "
                "and waiting calls belong to that loop. Nothing was closed: close it there, "
                "e.g. asyncio.run_coroutine_threadsafe(client.close(), its_loop).result() "
                "from this thread, or `async with` around its use in that loop"
            )
        if not self._closed:
            self._closed = True
            if self._waiting:
                self._interrupted = set(self._waiting)
                for task in self._interrupted:
                    task.cancel()
        if self.stats.in_flight:
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()
        await self._transport.close()  # gives its pool back, if it leased one
        if self._owner is None:
            await self._setup.release_limiter()

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            if self._loop.is_closed():
                raise RuntimeError(
                    "this AsyncAutocalls was used in an event loop that has since closed (an "
                    "earlier asyncio.run()?), and its connections closed with it: create the "
                    "client inside the loop that uses it (`async with AsyncAutocalls() as "
                    "client:` in the coroutine that asyncio.run() runs, or in the app's "
                    "lifespan), or keep one loop for the app's lifetime"
                )
            raise RuntimeError(
                "this AsyncAutocalls was first used in another event loop; aiohttp sessions and "
                "the rate limiter belong to one loop: create one client per event loop (one "
                "per thread that runs a loop)"
            )
        return loop

    def _check_open(self) -> None:
        owner = self._owner
        if owner is not None and owner.closed and not self._closed:
            raise ClientClosedError(
                "the AutocallsAccounts this client belongs to is closed; nothing was sent. Keep "
                "it open for the app's lifetime (`async with AutocallsAccounts() as accounts:` "
                "in its lifespan)"
            )
        if self._closed:
            raise ClientClosedError(
                "the client is closed; nothing was sent. A closed client stays closed: create "
                "a new AsyncAutocalls, or keep one open for the app's lifetime (`async with "
                "AsyncAutocalls() as client:` around the app's work, or in its lifespan)"
            )

    # ------------------------------------------------------------------ cost

    @property
    def usage(self) -> Usage:
        """Calls sent, billed, possibly billed and refused, in total and per assistant."""
        return self._ledger.usage()

    @property
    def budget(self) -> Budget | None:
        """The ``Budget`` this client was given, or None."""
        return self._ledger.budget

    # ------------------------------------------------------------------ conversations

    def normalize(self, customer_identifier: str) -> str:
        """The identifier as this client sends it: ``normalize_identifier`` applied.

        Raises ``InvalidRequestError`` when the normaliser refuses it; any other exception of
        the normaliser becomes one, with the original as ``__cause__``.
        """
        normalizer = self.normalize_identifier
        if normalizer is None or not isinstance(customer_identifier, str):
            return customer_identifier  # build_request explains a wrong type
        try:
            normalized = normalizer(customer_identifier)
        except InvalidRequestError:
            raise
        except Exception as exc:
            raise InvalidRequestError(
                f"normalize_identifier {getattr(normalizer, '__name__', normalizer)!s} failed "
                f"on a customer_identifier: {type(exc).__name__}: {exc}; nothing was sent"
            ) from exc
        if not isinstance(normalized, str):
            raise InvalidRequestError(
                f"normalize_identifier returned {type(normalized).__name__}, not str; "
                "nothing was sent"
            )
        return normalized

    def conversation(self, assistant_id: int, customer_identifier: str) -> Conversation | None:
        """What this client last saw of the conversation, from its in-memory cache."""
        customer_identifier = self.normalize(customer_identifier)
        near = self._conversations
        if near is None:
            return None
        if self._scope is None:
            return near.peek(assistant_id, trim(customer_identifier))
        return near.peek_key((self._scope, assistant_id, trim(customer_identifier)))

    def conversation_id(self, assistant_id: int, customer_identifier: str) -> str | None:
        """The conversation's id, from the cache, or None if this client has not seen it."""
        conversation = self.conversation(assistant_id, customer_identifier)
        return conversation.conversation_id if conversation else None

    async def lookup_conversation(
        self, assistant_id: int, customer_identifier: str
    ) -> Conversation | None:
        """The conversation from this client's cache, else from the shared ``conversation_store``
        (what another worker saw), which then fills the cache. The store is asked for
        ``max_wait`` seconds at most (and for its own ``timeout``): past it, or when it fails,
        the answer is a miss (None)."""
        customer_identifier = self.normalize(customer_identifier)
        conversation = self.conversation(assistant_id, customer_identifier)
        if conversation is None and self._store is not None:
            conversation = await self._store.get(
                assistant_id, trim(customer_identifier), self.max_wait
            )
            if conversation is not None:
                self._keep(conversation)
        return conversation

    def _keep(self, conversation: Conversation) -> None:
        near = self._conversations
        if near is None:
            near = self._conversations = MemoryConversationStore(self._setup.cache_size)
        if self._scope is None:
            near.put(conversation)
        else:
            key = (self._scope, conversation.assistant_id, conversation.customer_identifier)
            near.put_key(key, conversation)

    def _remember(self, request: ReplyRequest, reply: Reply) -> Conversation:
        key = request.conversation_key
        conversation = Conversation(
            key[0], key[1], reply.conversation_id, reply.ai_disabled, time.time()
        )
        near = self._conversations
        if near is not None and self._scope is None:
            near.put_key(key, conversation)  # ``_keep``, as ``put`` would key it
        else:
            self._keep(conversation)
        return conversation

    async def _save(self, conversation: Conversation) -> None:
        """Into the shared ``conversation_store``, for the other workers: within the store's
        bound, else skipped (``GuardedStore``), so the reply is never held back for long."""
        assert self._store is not None
        await self._store.set(conversation)

    # ------------------------------------------------------------------ the call

    @traced  # OpenTelemetry, when the app has set a provider (_telemetry)
    async def generate_reply(
        self,
        *,
        assistant_id: int,
        customer_identifier: str,
        message: str,
        variables: Mapping[str, Any] | None = None,
        max_wait: float | None = _UNSET,
        priority: Priority | None = None,
    ) -> Reply:
        """Send one customer message and return the assistant's reply.

        ``priority`` (default: the client's, ``Priority.INTERACTIVE`` unless set) is the lane
        this call waits in for its rate-limit slot: ``Priority.BACKGROUND`` for bulk work, which
        then never delays an interactive call of any process sharing the token.

        ``max_wait`` (default: the client's) bounds the seconds spent waiting for earlier
        messages of this conversation and for a rate-limit slot: past it, ``RateLimitTimeout``
        is raised and nothing is sent.
        """
        try:
            if self.normalize_identifier is not None:
                customer_identifier = self.normalize(customer_identifier)
            request = build_request(
                assistant_id,
                customer_identifier,
                message,
                variables,
                max_bytes=self.max_request_bytes,
            )
            if max_wait is not _UNSET:
                max_wait = _check_seconds("max_wait", max_wait)
            lane = self.priority if priority is None else _check_priority(priority)
            if self._closed or self._owner is not None:
                self._check_open()
            ledger = self._ledger
            if ledger.budget is not None or ledger.parent is not None:
                ledger.check()
        except AutocallsError:
            self.stats.errors += 1
            raise
        if max_wait is _UNSET:
            max_wait = self.max_wait
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind_loop()
        deadline = None if max_wait is None else loop.time() + max_wait
        task = asyncio.current_task()
        assert task is not None  # a coroutine awaited in asyncio always runs in a task
        self._enter_waiting(task)
        try:
            key: Hashable = request.conversation_key
            if self._scope is not None:
                key = (self._scope, key)
            try:
                if self._order.try_acquire(key):
                    pass  # nobody else is calling for this conversation: the usual case
                elif deadline is None:
                    await self._order.acquire(key)
                else:
                    async with asyncio.timeout_at(deadline):
                        await self._order.acquire(key)
            except TimeoutError:
                raise RateLimitTimeout(
                    "max_wait passed while earlier messages of this conversation were "
                    "still being answered; nothing was sent"
                ) from None
            try:
                reply = await self._attempts(request, task, deadline, lane)
                conversation = self._remember(request, reply)
                if self._store is not None:  # in order, like the calls themselves
                    await self._save(conversation)
            finally:
                self._order.release(key)
        except asyncio.CancelledError:
            if self._take_interruption(task):
                self.stats.errors += 1
                raise ClientClosedError(
                    "the client was closed while this call waited; nothing was sent"
                ) from None
            raise  # cancelled by its caller: neither a reply nor an error
        except AutocallsError:
            self.stats.errors += 1
            raise
        finally:
            if self._waiting and task in self._waiting:  # usually left at the send
                self._leave_waiting(task)
        self.stats.replies += 1
        return reply

    def _enter_waiting(self, task: asyncio.Task[Any]) -> None:
        waiting = self._waiting
        if waiting is None:
            waiting = self._waiting = set()
        if task not in waiting:
            waiting.add(task)
            self.stats.waiting += 1

    def _leave_waiting(self, task: asyncio.Task[Any]) -> None:
        waiting = self._waiting
        if waiting is not None and task in waiting:
            waiting.discard(task)
            self.stats.waiting -= 1

    def _take_interruption(self, task: asyncio.Task[Any]) -> bool:
        """True if close() cancelled this task and nobody else did."""
        if self._interrupted is None or task not in self._interrupted:
            return False
        self._interrupted.discard(task)
        return task.uncancel() == 0

    async def _attempts(
        self,
        request: ReplyRequest,
        task: asyncio.Task[Any],
        deadline: float | None,
        priority: Priority,
    ) -> Reply:
        retries = 0
        error: AutocallsError | None = None
        #: The last attempt's error when that attempt may have been processed (a 500 with
        #: retry_unsafe): whatever ends the retries later, the call raises it, so that the
        #: caller never reads "nothing was sent" about a message the service may have billed.
        processed: AutocallsError | None = None
        delay = 0.0
        pause = False
        while True:
            try:
                if error is not None:
                    await self._wait_before_retry(delay, pause=pause)
                return await self._attempt(request, task, deadline, retries + 1, priority)
            except GrantExpiredError:
                # The loop was too busy to write before the grant ran out (100,000 calls made
                # ready at once): nothing was sent, so this is no retry; queue again.
                error = None
                continue
            except asyncio.CancelledError:
                # Closed while waiting to retry: if an attempt may have been processed, its
                # error says what really happened; otherwise nothing was processed.
                if processed is not None and self._take_interruption(task):
                    raise _ended_by(processed, "the client was closed") from None
                raise
            except AutocallsError as exc:
                decision = None
                if not isinstance(exc, ClientClosedError | RateLimitTimeout | BudgetExceededError):
                    decision = self.retry_policy.decide(exc, retries, _RANDOM.random)
                if isinstance(exc, RateLimitError):
                    # Every 429 pauses the token for every process sharing it, retried or not.
                    await self._pause_limiter(exc, decision)
                if decision is None or (
                    deadline is not None
                    and asyncio.get_running_loop().time() + decision.delay > deadline
                ):
                    if processed is not None and _proves_unprocessed(exc):
                        raise _ended_by(processed, f"{type(exc).__name__}: {exc}") from exc
                    raise
                error, delay, pause = exc, decision.delay, decision.pause_limiter
                if not is_retry_safe(exc):
                    processed = exc
                retries += 1
                self.stats.retries += 1
                logger.info(
                    "retrying after %s in %.2fs (retry %d of %d)",
                    _short(exc),
                    delay,
                    retries,
                    self.retry_policy.max_retries,
                )
                self._enter_waiting(task)

    async def _pause_limiter(self, error: RateLimitError, decision: Decision | None) -> None:
        if self._limiter is None:
            return
        if error.retry_after is not None:
            # Capped: a proxy saying "a day" must not freeze every process of the host for a
            # day (the error still carries the full Retry-After); each further 429 pauses again.
            seconds = min(error.retry_after, self.retry_policy.max_retry_after)
        elif decision is not None:
            seconds = decision.delay
        else:
            seconds = self._limiter.rate_limit.interval
        logger.warning(
            "429 from the server despite the client-side limiter (token_id=%s); pausing the "
            "token for %.1fs",
            self.token_id,
            seconds,
            extra={"autocalls_token_id": self.token_id, "autocalls_retry_after": seconds},
        )
        await self._limiter.pause(self._limiter_key, seconds)

    async def _server_states(self, text: str, headers: Mapping[str, str]) -> None:
        """The server stated its limit, for the first time or a new one: expose it; adopt
        it (``RateLimit.from_server``) or warn once when it differs from ours."""
        limiter = self._limiter
        ours = None if limiter is None else limiter.rate_limit
        stated = stated_limit(
            text,
            margin=0.02 if ours is None else ours.margin,
            policy=headers.get("RateLimit-Policy"),
        )
        self._stated = text
        if stated is None:
            return
        self.stats.server_limit = stated
        if limiter is None or ours is None:
            return
        # The server states a count per period; the burst stays ours (never above the count).
        burst = None if ours.burst is None else min(ours.burst, stated.requests)
        stated = attrs.evolve(stated, burst=burst)
        if ours.same_rate(stated) and _keeps(ours, stated):
            return
        extra = {"autocalls_token_id": self.token_id, "autocalls_server_limit": str(stated)}
        if self._setup.follows_server and isinstance(limiter, Limiter):
            try:
                other = await limiter.adopt(self._limiter_key, stated)
            except (InvalidRequestError, LimiterUnavailableError) as exc:
                self._stated = None  # try again on the next response
                logger.warning(
                    "the server states a limit of %s, but it could not be adopted now (%s); "
                    "keeping %s",
                    stated,
                    exc,
                    ours,
                    extra=extra,
                )
                return
            if other is None:
                logger.info(
                    "adopted the limit the server states: %s (was %s; token_id=%s)",
                    stated,
                    ours,
                    self.token_id,
                    extra=extra,
                )
                return
            logger.warning(
                "the server states a limit of %s but rate_limit %s is kept: another live "
                "client uses this token at that rate (%s); every client of a token must use "
                "one rate (token_id=%s)",
                stated,
                ours,
                other,
                self.token_id,
                extra=extra,
            )
            return
        logger.warning(
            "the server states a limit of %s but this client's rate_limit is %s "
            "(token_id=%s); set rate_limit=RateLimit(%s, %g) to match it, or "
            "RateLimit.from_server() to adopt it",
            stated,
            ours,
            self.token_id,
            stated.requests,
            stated.period,
            extra=extra,
        )

    async def _wait_before_retry(self, delay: float, *, pause: bool) -> None:
        if pause and self._limiter is not None:
            return  # the 429 paused the token: the next attempt waits for its slot after it
        await asyncio.sleep(delay)

    async def _attempt(
        self,
        request: ReplyRequest,
        task: asyncio.Task[Any],
        deadline: float | None,
        attempt: int,
        priority: Priority,
    ) -> Reply:
        loop = asyncio.get_running_loop()
        if self._closed or self._owner is not None:
            self._check_open()
        # The budget is reserved before queueing for a slot: a call that cannot be paid for
        # fails at once and never takes a slot from the others.
        ticket = self._ledger.reserve(request.assistant_id)
        connections = self._transport.gate()
        taken = False
        try:
            if connections is not None:
                # A connection first, then the slot: a grant never waits for a connection.
                if not connections.try_take():
                    await self._wait_for_connection(connections, deadline, priority)
                taken = True
            waited_from = loop.time()
            if self._limiter is None:
                reply = await self._send(request, task, attempt, 0.0, _BilledOpen(ticket))
            else:
                async with limiter_slot(
                    self._limiter, self._limiter_key, deadline=deadline, priority=priority
                ) as slot:
                    waited = loop.time() - waited_from
                    self.stats.limiter_wait += waited
                    gate = _Billed(slot, ticket)
                    try:
                        reply = await self._send(request, task, attempt, waited, gate)
                    finally:
                        if taken:
                            # The exchange is over: its place goes to the next call now, not
                            # once the grant's report is stored (a round trip to Redis).
                            assert connections is not None
                            taken = False
                            connections.give()
        except BaseException as exc:
            self._ledger.settle(ticket, exc)
            raise
        finally:
            if taken:
                assert connections is not None
                connections.give()
        self._ledger.settle(ticket, None)
        return reply

    async def _wait_for_connection(
        self, gate: Gate, deadline: float | None, priority: Priority
    ) -> None:
        try:
            if deadline is None:
                await gate.take(priority)
            else:
                async with asyncio.timeout_at(deadline):
                    await gate.take(priority)
        except TimeoutError:
            raise RateLimitTimeout(
                "max_wait passed while every connection of the pool was in use by other calls "
                "(at most 100 at once); nothing was sent"
            ) from None

    async def _send(
        self,
        request: ReplyRequest,
        task: asyncio.Task[Any],
        attempt: int,
        waited: float,
        gate: SendGate,
    ) -> Reply:
        if self._closed or self._owner is not None:
            self._check_open()
        hook = on_send.get()
        if hook is not None:
            hook()
        self._leave_waiting(task)  # from here on, close() lets this call finish
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.stats.requests += 1
        self.stats.in_flight += 1
        status: int | str = "error"
        try:
            post = self._transport.post(request.body, gate)
            status, headers, body = await http_request(self._transport.shown, attempt, post)
            if status == 429:
                self.stats.rate_limited += 1
            stated = headers.get("X-RateLimit-Limit")
            if stated is None and not isinstance(headers, CIMultiDictProxy | CIMultiDict):
                stated = stated_limit_text(headers)  # pragma: no cover (the transport's are)
            if stated is not None and stated != self._stated:
                await self._server_states(stated, headers)
            return parse_reply(
                status,
                headers,
                body,
                customer_identifier=request.customer_identifier,
                now=time.time(),
            )
        except GrantExpiredError:
            self.stats.requests -= 1  # nothing was written: not an attempt the server saw
            raise
        finally:
            self.stats.in_flight -= 1
            if not self.stats.in_flight and self._drained is not None:
                self._drained.set()  # close() waits for it
            if logger.isEnabledFor(logging.DEBUG):  # the hot path pays nothing when off
                logger.debug(
                    "POST %s -> %s attempt=%d waited=%.3fs latency=%.3fs",
                    self._transport.shown.path,
                    status,
                    attempt,
                    waited,
                    loop.time() - started,
                )


class _BilledOpen:
    """No rate limit, and the budget: a request written is a request that may be billed."""

    __slots__ = ("_ticket",)

    def __init__(self, ticket: Ticket) -> None:
        self._ticket = ticket

    def sent(self) -> None:
        self._ticket.sent = True


class _Billed:
    """The send gate, and the budget: a request written is a request that may be billed."""

    __slots__ = ("_gate", "_ticket")

    def __init__(self, gate: SendGate, ticket: Ticket) -> None:
        self._gate = gate
        self._ticket = ticket

    def may_send(self) -> bool:
        check = getattr(self._gate, "may_send", None)
        return True if check is None else bool(check())

    def sent(self) -> None:
        self._ticket.mark_sent()
        self._gate.sent()

    def give_back(self) -> None:
        give_back = getattr(self._gate, "give_back", None)
        if give_back is not None:
            give_back()


def _check_priority(priority: object) -> Priority:
    if not isinstance(priority, Priority):
        raise InvalidRequestError(
            f"priority must be Priority.INTERACTIVE or Priority.BACKGROUND, got {priority!r}"
        )
    return priority


def _proves_unprocessed(error: AutocallsError) -> bool:
    """True for errors that say this attempt, at least, was not processed."""
    return is_retry_safe(error) or isinstance(
        error,
        ClientClosedError | RateLimitTimeout | LimiterUnavailableError | BudgetExceededError,
    )


def _ended_by(processed: AutocallsError, reason: str) -> AutocallsError:
    processed.add_note(
        f"(retrying it ended with {reason}; the attempt above may have been processed)"
    )
    return processed


def _short(error: AutocallsError) -> str:
    return f"{type(error).__name__}({error})"


def _keeps(ours: RateLimit, stated: RateLimit) -> bool:
    """True when every schedule ``ours`` allows keeps ``stated`` too: at most
    ``stated.requests`` starts in any ``stated.period`` (5/1s keeps 300/60s; with bursts,
    300/60s does not keep 5/1s)."""
    period = stated.period * (1 - 1e-9)
    if ours.bursts == 1:
        most = math.floor(period / ours.interval) + 1
    else:
        most = math.ceil(period / ours.window) * ours.requests
    return most <= stated.requests
