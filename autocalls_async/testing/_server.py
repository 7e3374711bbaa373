"""The aiohttp application emulating ``POST /api/ai/generate-reply``, and its lifecycle.

Pipeline of one request, in the service's order: body-size check (nginx) -> Sanctum auth ->
injected fault (see ``_faults``) -> throttle (counts the request) -> read, trim and validate
the body -> assistant lookup (404) -> balance (402) -> conversation: merge the variables,
append the message, charge, wait ``reply_delay``, reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Self, TypedDict, Unpack

import attrs
from aiohttp import web

from .._lifecycle import AsyncOnly
from ._faults import Fault
from ._laravel import (
    WINDOWS,
    Throttle,
    Window,
    bearer_token,
    clean,
    encode_json,
    laravel_error_page,
    nginx_error_page,
    parse_input,
    reason_phrase,
    summarize,
    validate,
    wants_json,
)
from ._state import Conversation, RequestRecord, Responder, Turn, default_responder

ENDPOINT: Final = "/api/ai/generate-reply"
#: Not part of the service: the emulator's own state (GET) and balance top-up (POST), so that
#: a test or a person driving ``autocalls-async mock-server`` from a shell can read and change it.
ADMIN_STATE: Final = "/_emulator/state"
ADMIN_TOP_UP: Final = "/_emulator/top-up"
#: nginx's default ``client_max_body_size`` (1 MiB): bigger bodies get nginx's 413 page.
MAX_BODY: Final = 1024 * 1024
#: The service's documented limit, reported by ``Fault.rate_limited`` when no throttle is set.
DOCUMENTED_LIMIT: Final = 5


class ServerOptions(TypedDict, total=False):
    """The keyword options of ``MockAutocalls`` besides host and port (for ``run_server``)."""

    rate_limit: tuple[int, float] | None
    window: Window
    burst: int | None
    assistants: Iterable[int]
    tokens: Collection[str] | None
    balance: int | None
    reply_delay: float
    clock: Callable[[], float]
    responder: Responder
    seed: int | None
    shutdown_timeout: float
    on_request: Callable[[AccessRecord], object] | None


def token_hash(token: str) -> str:
    """Return the SHA-256 hex digest the emulator keeps instead of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@attrs.frozen
class AccessRecord:
    """One request the emulator answered (any route), for a request log: never the token."""

    time: float  #: when it arrived (``time.time()``)
    method: str
    path: str
    status: int | None  #: None: the connection was dropped (a ``Fault.drop``)
    #: The first 8 hex digits of the token's SHA-256, to tell the emulator's tokens apart in
    #: its log (the SDK's ``token_id`` is a keyed hash: they differ), or None without one.
    token_id: str | None
    latency: float  #: seconds from arrival to the response


def _raw(
    status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    merged = {"Content-Type": content_type, "Cache-Control": "no-cache, private"}
    merged.update(headers or {})
    return web.Response(status=status, body=body, headers=merged)


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return _raw(status, encode_json(payload), "application/json", headers)


def _html(status: int, page: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _raw(status, page.encode(), "text/html; charset=UTF-8", headers)


def _framework_error(
    status: int,
    message: str,
    json_wanted: bool,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """Render an error the way Laravel's exception handler does: JSON or an HTML page."""
    if json_wanted:
        return _json(status, {"message": message, **(extra or {})}, headers)
    return _html(status, laravel_error_page(status), headers)


def _error(status: int, error: str, error_code: str) -> web.Response:
    """Render one of the application's own errors: always JSON, whatever the Accept header."""
    return _json(status, {"success": False, "error": error, "error_code": error_code})


@web.middleware
async def _route_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Answer unknown routes and wrong methods with Laravel's messages, not aiohttp's text."""
    path = request.path.strip("/") or "/"
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = (
            f"The {request.method} method is not supported for route {path}. "
            f"Supported methods: {allowed}."
        )
        return _framework_error(405, message, wants_json(request.headers), {"Allow": allowed})
    except web.HTTPNotFound:
        message = f"The route {path} could not be found."
        return _framework_error(404, message, wants_json(request.headers))
    return response


async def _read(request: web.Request) -> bytes | None:
    """Return the body, or None when it is over ``MAX_BODY`` (a chunked upload, say)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None


class MockAutocalls(AsyncOnly):
    """A local, faithful emulator of the Autocalls "generate AI reply" service.

    See the package docstring for the behaviour; the attributes tests read are ``requests``
    (a ``RequestRecord`` per request), ``conversations`` (keyed by (assistant_id,
    customer_identifier)) and ``replies_served``. ``assistants``, ``balance``,
    ``reply_delay`` and ``responder`` may be changed at any time.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: tuple[int, float] | None = (DOCUMENTED_LIMIT, 60.0),
        window: Window = "rolling",
        burst: int | None = None,
        assistants: Iterable[int] = (123,),
        tokens: Collection[str] | None = None,
        balance: int | None = None,
        reply_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        responder: Responder = default_responder,
        seed: int | None = None,
        shutdown_timeout: float = 1.0,
        on_request: Callable[[AccessRecord], object] | None = None,
    ) -> None:
        if isinstance(tokens, str):
            raise TypeError("tokens must be a collection of tokens, not one string")
        if window not in WINDOWS:
            raise ValueError(f"window must be 'rolling', 'fixed' or 'no-burst', not {window!r}")
        self.host, self._port = host, port
        self.assistants: set[int] = set(assistants)
        self.balance = balance
        self.reply_delay = reply_delay
        self.responder = responder
        self._clock = clock
        self._throttle = None if rate_limit is None else Throttle(*rate_limit, window, clock, burst)
        self._token_hashes = None if tokens is None else frozenset(map(token_hash, tokens))
        self._rng = random.Random(seed)
        self._fault_rates: dict[Fault, float] = {}
        self._faults: deque[Fault] = deque()
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self.requests: list[RequestRecord] = []
        self.conversations: dict[tuple[int, str], Conversation] = {}
        self.replies_served = 0
        self._charged = 0
        #: Called once per request answered, on any route (``autocalls-async mock-server``
        #: prints its request log with it); may be set at any time.
        self.on_request = on_request
        self.app = web.Application(
            client_max_size=MAX_BODY, middlewares=[self._access, _route_errors]
        )
        self.app.router.add_post(ENDPOINT, self._handle)
        self.app.router.add_get(ADMIN_STATE, self._state)
        self.app.router.add_post(ADMIN_TOP_UP, self._top_up)

    @web.middleware
    async def _access(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        arrived, started = time.time(), time.perf_counter()
        response: web.StreamResponse = await handler(request)
        if self.on_request is not None:
            token = bearer_token(request.headers.get("Authorization", ""))
            dropped = request.transport is None or request.transport.is_closing()
            self.on_request(
                AccessRecord(
                    time=arrived,
                    method=request.method,
                    path=request.path,
                    status=None if dropped else response.status,
                    token_id=None if token is None else token_hash(token)[:8],
                    latency=time.perf_counter() - started,
                )
            )
        return response

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve; with ``port=0`` the OS picks a free port (see ``port``)."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def close(self) -> None:
        """Stop serving; requests still running get ``shutdown_timeout`` seconds to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The port bound (the requested one until started)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/api``: what the SDK's ``base_url`` expects."""
        if self._runner is None:
            raise RuntimeError("the emulator is not running: use `async with` or start()")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}/api"

    @property
    def url(self) -> str:
        """The full endpoint URL."""
        return self.base_url + ENDPOINT.removeprefix("/api")

    @property
    def rate_limit(self) -> tuple[int, float] | None:
        """(requests, period) of the throttle, or None when unlimited."""
        if self._throttle is None:
            return None
        return self._throttle.requests, self._throttle.period

    @property
    def balance_remaining(self) -> int | None:
        """Replies the balance still pays for (None: unlimited)."""
        return None if self.balance is None else max(0, self.balance - self._charged)

    # -- state and inspection ----------------------------------------------------------------

    def conversation(self, assistant_id: int, customer_identifier: str) -> Conversation | None:
        """Return the conversation for this pair, if the service has one."""
        return self.conversations.get((assistant_id, customer_identifier))

    def _conversation(self, assistant_id: int, customer_identifier: str) -> Conversation:
        key = (assistant_id, customer_identifier)
        if key not in self.conversations:
            conversation_id = str(uuid.uuid4())
            self.conversations[key] = Conversation(assistant_id, key[1], conversation_id)
        return self.conversations[key]

    def disable_ai(self, assistant_id: int, customer_identifier: str) -> Conversation:
        """A human takes the conversation over: replies become ``ai_disabled`` with no text."""
        conversation = self._conversation(assistant_id, customer_identifier)
        conversation.ai_disabled = True
        return conversation

    def enable_ai(self, assistant_id: int, customer_identifier: str) -> Conversation:
        """Hand the conversation back to the AI."""
        conversation = self._conversation(assistant_id, customer_identifier)
        conversation.ai_disabled = False
        return conversation

    def count(self, status: int | None = None, *, processed: bool | None = None) -> int:
        """Count recorded requests, optionally only those with this status / processed flag."""
        return sum(
            1
            for record in self.requests
            if (status is None or record.status == status)
            and (processed is None or record.processed == processed)
        )

    def top_up(self, replies: int) -> int:
        """Pay for ``replies`` more replies (the account was topped up); return the balance left.

        With an unlimited balance (``balance=None``) there is nothing to top up: ValueError.
        """
        if isinstance(replies, bool) or not isinstance(replies, int) or replies < 1:
            raise ValueError(f"replies must be an int >= 1, got {replies!r}")
        if self.balance is None:
            raise ValueError("the balance is unlimited (balance=None): nothing to top up")
        self.balance = max(self.balance, self._charged) + replies
        remaining = self.balance_remaining
        assert remaining is not None
        return remaining

    def state(self) -> dict[str, Any]:
        """Counters for a test or a shell: what ``GET /_emulator/state`` answers."""
        return {
            "requests": len(self.requests),
            "processed": self.count(processed=True),
            "replies_served": self.replies_served,
            "balance": self.balance,
            "balance_remaining": self.balance_remaining,
            "conversations": len(self.conversations),
            "by_status": {
                str(status): self.count(status)
                for status in sorted({r.status for r in self.requests if r.status is not None})
            },
        }

    async def _state(self, request: web.Request) -> web.Response:
        return _json(200, self.state())

    async def _top_up(self, request: web.Request) -> web.Response:
        data, _ = parse_input(await request.read(), request.content_type)
        try:
            self.top_up(data.get("replies"))  # type: ignore[arg-type]  # checked there
        except ValueError as exc:
            return _json(422, {"message": str(exc)})
        return _json(200, self.state())

    def reset(self) -> None:
        """Forget requests, conversations, throttle history, charges and faults (queued and
        random); keep the configuration (assistants, tokens, balance, limits)."""
        self.requests.clear()
        self.conversations.clear()
        self.replies_served = self._charged = 0
        self._faults.clear()
        self._fault_rates = {}
        if self._throttle is not None:
            self._throttle.reset()

    # -- faults ------------------------------------------------------------------------------

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` authenticated requests (FIFO, before any
        random fault)."""
        if times < 0:
            raise ValueError("times must be >= 0")
        self._faults.extend([fault] * times)

    def set_random_faults(self, rates: Mapping[Fault, float], *, seed: int | None = None) -> None:
        """Hit each authenticated request with a fault at these probabilities (one draw of a
        seeded ``random.Random`` per request, so a run is reproducible); ``{}`` stops it."""
        total = sum(rates.values())
        if any(not 0.0 <= rate <= 1.0 for rate in rates.values()) or total > 1.0 + 1e-9:
            raise ValueError("fault rates must be probabilities adding up to at most 1")
        if seed is not None:
            self._rng.seed(seed)
        self._fault_rates = dict(rates)

    @property
    def pending_faults(self) -> tuple[Fault, ...]:
        """The injected faults not consumed yet, next first."""
        return tuple(self._faults)

    @property
    def fault_rates(self) -> dict[Fault, float]:
        """The random faults' probabilities (a copy; assign to change them)."""
        return dict(self._fault_rates)

    @fault_rates.setter
    def fault_rates(self, rates: Mapping[Fault, float]) -> None:
        self.set_random_faults(rates)

    def _next_fault(self) -> Fault | None:
        if self._faults:
            return self._faults.popleft()
        if not self._fault_rates:
            return None
        draw = self._rng.random()
        for fault, rate in self._fault_rates.items():
            if draw < rate:
                return fault
            draw -= rate
        return None

    # -- request handling --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(time=self._clock())
        self.requests.append(record)
        response = await self._respond(request, record, wants_json(request.headers))
        if response is None:  # drop the connection without a response
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never sent: the transport is closed
        record.status = response.status
        return response

    async def _respond(
        self, request: web.Request, record: RequestRecord, json_wanted: bool
    ) -> web.Response | None:
        if (request.content_length or 0) > MAX_BODY:
            return _html(413, nginx_error_page(413))
        token = bearer_token(request.headers.get("Authorization", ""))
        key = None if token is None else token_hash(token)
        if key is None or (self._token_hashes is not None and key not in self._token_hashes):
            return _framework_error(401, "Unauthenticated.", json_wanted)
        record.token_hash = key
        fault = record.fault = self._next_fault()
        if fault is not None and not fault.processed:
            raw = await _read(request)
            record.body = parse_input(raw or b"", request.content_type)[1]
            return self._fault_response(fault, json_wanted)
        response = await self._application(request, record, key, json_wanted)
        if fault is None:
            return response
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            return response
        return self._fault_response(fault, json_wanted)

    def _fault_response(self, fault: Fault, json_wanted: bool) -> web.Response | None:
        code, headers = fault.code or 500, dict(fault.headers)
        if fault.kind == "drop":
            return None
        if fault.kind == "rate_limited":
            limit = self._throttle.requests if self._throttle else DOCUMENTED_LIMIT
            return self._too_many(limit, fault.delay, json_wanted)
        if fault.kind == "html" or (fault.payload is None and code in (502, 504)):
            return _html(code, nginx_error_page(code), headers)
        if fault.payload is None:  # a "status" fault with the framework's own body
            message = {500: "Server Error"}.get(code, reason_phrase(code))
            return _framework_error(code, message, json_wanted, headers)
        return _raw(code, fault.payload, fault.content_type or "application/json", headers)

    def _policy(self) -> dict[str, str]:
        """At a scaled period, the window too (``RateLimit-Policy``, the IETF draft's form):
        the service throttles per minute and says only how many (``X-RateLimit-Limit``)."""
        throttle = self._throttle
        if throttle is None or throttle.period == 60.0:
            return {}
        return {"RateLimit-Policy": f"{throttle.requests};w={throttle.period:g}"}

    def _too_many(self, limit: int, retry_after: float, json_wanted: bool) -> web.Response:
        seconds = max(1, math.ceil(retry_after))
        headers = {
            "Retry-After": str(seconds),
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time()) + seconds),
            **self._policy(),
        }
        return _framework_error(429, "Too Many Attempts.", json_wanted, headers)

    async def _application(
        self, request: web.Request, record: RequestRecord, key: str, json_wanted: bool
    ) -> web.Response:
        """The throttle middleware around the controller."""
        headers: dict[str, str] = {}
        if self._throttle is not None:
            decision = self._throttle.hit(key)
            if not decision.allowed:
                return self._too_many(decision.limit, decision.retry_after, json_wanted)
            record.counted = True
            headers["X-RateLimit-Limit"] = str(decision.limit)
            headers["X-RateLimit-Remaining"] = str(decision.remaining)
            headers.update(self._policy())
        response = await self._controller(request, record, json_wanted)
        response.headers.update(headers)
        return response

    async def _controller(
        self, request: web.Request, record: RequestRecord, json_wanted: bool
    ) -> web.Response:
        raw = await _read(request)
        if raw is None:
            return _html(413, nginx_error_page(413))
        data, record.body = parse_input(raw, request.content_type)
        data = clean(data)
        errors = validate(data)
        if errors:
            return _framework_error(422, summarize(errors), json_wanted, extra={"errors": errors})
        assistant_id, customer = data["assistant_id"], data["customer_identifier"]
        if assistant_id not in self.assistants:
            return _error(404, "Assistant not found", "ASSISTANT_NOT_FOUND")
        if self.balance is not None and self._charged >= self.balance:
            return _error(402, "Insufficient balance", "INSUFFICIENT_BALANCE")
        conversation = self._conversation(assistant_id, customer)
        conversation.variables.update(data.get("variables") or {})
        turn = Turn(data["message"], ai_disabled=conversation.ai_disabled)
        conversation.turns.append(turn)
        record.processed, record.conversation_id = True, conversation.conversation_id
        if not turn.ai_disabled:  # a human answers: no AI reply, nothing charged
            self._charged += 1
            if self.reply_delay > 0:
                await asyncio.sleep(self.reply_delay)
            turn.reply, turn.function_calls = self.responder(conversation, turn.message)
            self.replies_served += 1
        return _json(
            200,
            {
                "success": True,
                "conversation_id": conversation.conversation_id,
                "customer_identifier": customer,
                "reply": turn.reply,
                "function_calls": turn.function_calls,
                "ai_disabled": turn.ai_disabled,
            },
        )


async def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ready: Callable[[MockAutocalls], object] | None = None,
    **options: Unpack[ServerOptions],
) -> None:
    """Serve the emulator until cancelled (Ctrl-C in ``asyncio.run``), then close it.

    ``ready`` is called once the port is bound (useful with ``port=0``), e.g. for the CLI to
    print ``server.base_url``; nothing is printed here.
    """
    async with MockAutocalls(host=host, port=port, **options) as server:
        if ready is not None:
            ready(server)
        await asyncio.Event().wait()
