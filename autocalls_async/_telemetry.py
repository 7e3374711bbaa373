"""OpenTelemetry: a span per call, with its rate-limit wait and each HTTP attempt, and metrics.

Optional (the ``otel`` extra installs opentelemetry-api only) and free when unused: nothing of
OpenTelemetry is imported until the app has imported it itself, and nothing is recorded while the
API's default providers (the proxy, or a no-op) are in place. A call then costs ~0.3 µs (a dict
lookup, a wrapper, a context variable read per step), or ~2 µs once OpenTelemetry is imported
(the API reads ``os.environ`` for each of its two providers). An app that sets an SDK
``TracerProvider`` or ``MeterProvider``, at start-up or later, gets each signal from its next
call.

The client reaches this module through three hooks, each a no-op when telemetry is off:
``traced`` around ``generate_reply``, ``limiter_slot`` for the rate-limit wait, ``http_request``
around the transport's POST. The call's state travels in a context variable, so the hooks need
nothing else from the client.

Nothing personal is recorded: no token, customer identifier, message, reply or variables, and no
exception message (the service's error messages may echo a request) or stack trace: errors are
named by ``error.type`` (the exception's class, or the HTTP status) only.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from ._errors import LimiterUnavailableError, RateLimitTimeout
from ._models import Priority
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider, UpDownCounter
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from yarl import URL

    from ._ratelimit import RateLimiter, Slot
    from ._transport import Response

__all__ = ["http_request", "limiter_slot", "traced"]

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

SCOPE = "autocalls_async"
#: The semantic conventions followed (stable HTTP spans and metrics).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
CALL_SPAN = "autocalls generate_reply"
WAIT_SPAN = "autocalls rate_limit.wait"
#: The semantic conventions' advice for ``http.client.request.duration``.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: A slot can be minutes away at the default RateLimit(5, 60) behind a queue.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


Attributes = dict[str, str | bool | int | float]


class _Client(Protocol):
    priority: Priority

    @property
    def telemetry_attributes(self) -> Mapping[str, str | bool | int | float] | None: ...


C = TypeVar("C", bound=_Client)


class _Meters:
    """The instruments, made once from the app's meter provider."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter(SCOPE, __version__, schema_url=SCHEMA_URL)
        self.meter = meter
        self.request_duration: Histogram = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=HTTP_BUCKETS,
        )
        self.wait_duration: Histogram = meter.create_histogram(
            "autocalls.rate_limit.wait.duration",
            unit="s",
            description="Time a call waited for its rate-limit slot.",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )
        self.queued: UpDownCounter = meter.create_up_down_counter(
            "autocalls.rate_limit.queued",
            unit="{call}",
            description="Calls waiting for a rate-limit slot right now.",
        )
        self.exceeded: Counter = meter.create_counter(
            "autocalls.rate_limit.exceeded",
            unit="{response}",
            description="429 Too Many Requests answers received, despite the limiter.",
        )
        self.calls: Counter = meter.create_counter(
            "autocalls.calls",
            unit="{call}",
            description="generate_reply calls that ended, by outcome.",
        )


class _Signals:
    """What the app enabled: a tracer, meters, both or neither; resolved until both are on.

    Global providers are set once per process (the API refuses a second one), so a tracer or
    meters, once found, are kept; until then each call asks the API, which costs a dict lookup.
    """

    def __init__(self) -> None:
        self.tracer: Tracer | None = None
        self.meters: _Meters | None = None
        self.unavailable = False
        self.api: tuple[Any, Any, tuple[type, ...], tuple[type, ...]] | None = None
        #: The tests' seam: providers to use instead of the global ones.
        self.providers: tuple[TracerProvider | None, MeterProvider | None] | None = None

    def resolve(self) -> None:
        api = self.api
        if api is None:
            try:
                from opentelemetry import metrics, trace
                from opentelemetry.metrics._internal import _ProxyMeterProvider
            except ImportError:  # another package's "opentelemetry", or a very old API
                self.unavailable = True
                return
            # The API exports no name for its default (proxy) meter provider.
            api = self.api = (
                trace,
                metrics,
                (trace.ProxyTracerProvider, trace.NoOpTracerProvider),
                (_ProxyMeterProvider, metrics.NoOpMeterProvider),
            )
        trace, metrics, default_tracers, default_meters = api
        tracer_provider, meter_provider = self.providers or (None, None)
        if self.tracer is None:
            tracer_provider = tracer_provider or trace.get_tracer_provider()
            if not isinstance(tracer_provider, default_tracers):
                tracer = tracer_provider.get_tracer(SCOPE, __version__, schema_url=SCHEMA_URL)
                if not isinstance(tracer, trace.NoOpTracer):  # e.g. OTEL_SDK_DISABLED=true
                    self.tracer = tracer
        if self.meters is None:
            meter_provider = meter_provider or metrics.get_meter_provider()
            if not isinstance(meter_provider, default_meters):
                meters = _Meters(meter_provider)
                if not isinstance(meters.meter, metrics.NoOpMeter):
                    self.meters = meters

    def use(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        """Record with these providers instead of the global ones (None: back to the globals)."""
        self.providers = (
            None
            if tracer_provider is None and meter_provider is None
            else (tracer_provider, meter_provider)
        )
        self.tracer = None
        self.meters = None


SIGNALS = _Signals()
_modules = sys.modules


def _signals() -> _Signals | None:
    signals = SIGNALS
    if signals.tracer is None or signals.meters is None:
        if signals.unavailable or "opentelemetry" not in sys.modules:
            return None  # the app has not imported OpenTelemetry: it cannot have set a provider
        signals.resolve()
        if signals.tracer is None and signals.meters is None:
            return None
    return signals


class _Call:
    """One ``generate_reply`` being recorded: what its steps add to."""

    __slots__ = ("attempts", "extra", "lane", "meters", "store", "tracer")

    def __init__(
        self,
        signals: _Signals,
        priority: object,
        extra: Mapping[str, str | bool | int | float] | None = None,
    ) -> None:
        self.tracer = signals.tracer
        self.meters = signals.meters
        #: The client's ``telemetry_attributes`` (opt-in, e.g. a tenant's id): on every span
        #: and metric point of the call, under the SDK's own (which they never replace).
        self.extra: Attributes = dict(extra) if extra else {}
        #: ``autocalls.priority``, unless the call named none that is valid (it then fails)
        self.lane: Attributes = {**self.extra}
        if isinstance(priority, Priority):
            self.lane["autocalls.priority"] = priority.name.lower()
        self.store = "none"
        self.attempts = 0


_CALL: ContextVar[_Call | None] = ContextVar("autocalls_telemetry_call", default=None)


# ---------------------------------------------------------------------- hook 1: the call


def traced(
    method: Callable[Concatenate[C, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[C, P], Coroutine[Any, Any, R]]:
    """Wrap ``generate_reply``: an INTERNAL span and the ``autocalls.calls`` counter.

    Not a coroutine itself: without a provider it returns ``generate_reply``'s own coroutine,
    so a call (and each of 100,000 waiting calls) carries no extra frame.
    """

    @functools.wraps(method)
    def generate_reply(self: C, /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        if "opentelemetry" not in _modules and (SIGNALS.tracer is None or SIGNALS.meters is None):
            return method(self, *args, **kwargs)  # what _signals() says, without its frame
        signals = _signals()
        if signals is None:
            return method(self, *args, **kwargs)
        return _traced_call(signals, method, self, args, kwargs)

    return _as_coroutine_function(generate_reply)


def _as_coroutine_function(function: F) -> F:
    """Still an ``async def`` to introspection (``inspect``, ``asyncio``, ``unittest.mock``'s
    autospec, which then makes an ``AsyncMock``)."""
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:  # Python 3.12+
        return mark(function)  # type: ignore[no-any-return]
    function._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return function


async def _traced_call(
    signals: _Signals,
    method: Callable[..., Awaitable[R]],
    client: _Client,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    from opentelemetry import context, trace

    priority = kwargs.get("priority")
    extra = getattr(client, "telemetry_attributes", None)
    call = _Call(signals, client.priority if priority is None else priority, extra)
    attributes: Attributes = {**call.lane}
    assistant_id = kwargs.get("assistant_id")
    if type(assistant_id) is int:  # what was asked for, valid or not; never anything else
        attributes["autocalls.assistant_id"] = assistant_id
    span = None
    if call.tracer is not None:
        span = call.tracer.start_span(
            CALL_SPAN,
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
    attached = context.attach(trace.set_span_in_context(span)) if span is not None else None
    reset = _CALL.set(call)
    outcome, error_type = "reply", None
    try:
        return await method(client, *args, **kwargs)
    except asyncio.CancelledError:
        outcome = "cancelled"  # the caller gave up (a client disconnected): not a failure
        raise
    except BaseException as exc:
        outcome, error_type = "error", type(exc).__qualname__
        raise
    finally:
        _CALL.reset(reset)
        if attached is not None:
            context.detach(attached)
        ended: Attributes = {"autocalls.outcome": outcome}
        if error_type is not None:
            ended["error.type"] = error_type
        if span is not None:
            span.set_attributes(ended)
            span.set_attribute("autocalls.attempts", call.attempts)
            if error_type is not None:
                span.set_status(trace.StatusCode.ERROR)
            span.end()
        if call.meters is not None:
            call.meters.calls.add(1, {**call.lane, **ended})


# ---------------------------------------------------------------------- hook 2: the wait


def limiter_slot(
    limiter: RateLimiter,
    key: str,
    *,
    deadline: float | None,
    priority: Priority,
) -> AbstractAsyncContextManager[Slot]:
    """``limiter.slot(...)``, and when recording, its wait: a span, a histogram, a gauge."""
    slot = limiter.slot(key, deadline=deadline, priority=priority)
    call = _CALL.get()
    if call is None:
        return slot
    call.store = store_kind(limiter)
    attributes: Attributes = {**call.lane, "autocalls.rate_limit.store": call.store}
    return _ObservedWait(call, slot, attributes)


def store_kind(limiter: object) -> str:
    """ "process", "host" or "redis" for the SDK's limiters; a custom one's class name."""
    kind = getattr(limiter, "kind", None)
    return kind if isinstance(kind, str) else type(limiter).__name__


class _ObservedWait(AbstractAsyncContextManager["Slot"]):
    """The limiter's slot, its wait recorded; the slot's release is the attempt's business."""

    __slots__ = ("_attributes", "_call", "_slot")

    def __init__(
        self, call: _Call, slot: AbstractAsyncContextManager[Slot], attributes: Attributes
    ) -> None:
        self._call = call
        self._slot = slot
        self._attributes = attributes

    async def __aenter__(self) -> Slot:
        from opentelemetry import context, trace

        call, attributes = self._call, self._attributes
        span = attached = None
        if call.tracer is not None:
            span = call.tracer.start_span(
                WAIT_SPAN,
                kind=trace.SpanKind.INTERNAL,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            )
            # A Redis instrumentation's spans of the store's round trips go under it.
            attached = context.attach(trace.set_span_in_context(span))
        meters = call.meters
        if meters is not None:
            meters.queued.add(1, attributes)
        loop = asyncio.get_running_loop()
        began = loop.time()
        result, error_type = "acquired", None
        try:
            return await self._slot.__aenter__()
        except BaseException as exc:
            result, error_type = _wait_result(exc), type(exc).__qualname__
            raise
        finally:
            waited = loop.time() - began
            if attached is not None:
                context.detach(attached)
            if span is not None:
                span.set_attribute("autocalls.rate_limit.result", result)
                if error_type is not None:
                    span.set_attribute("error.type", error_type)
                    span.set_status(trace.StatusCode.ERROR)
                span.end()
            if meters is not None:
                meters.queued.add(-1, attributes)
                meters.wait_duration.record(
                    waited, {**attributes, "autocalls.rate_limit.result": result}
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._slot.__aexit__(exc_type, exc, tb)


def _wait_result(exc: BaseException) -> str:
    """Like ASP.NET Core's ``aspnetcore.rate_limiting.result``: why a wait ended."""
    if isinstance(exc, RateLimitTimeout):
        return "timeout"
    if isinstance(exc, LimiterUnavailableError):
        return "unavailable"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


# ---------------------------------------------------------------------- hook 3: the attempt


def http_request(
    url: URL, attempt: int, post: Coroutine[Any, Any, Response]
) -> Awaitable[Response]:
    """The transport's ``post(...)``, and when recording, an HTTP CLIENT span and its duration.

    ``attempt`` counts from 1; ``http.request.resend_count`` is set from the second.
    """
    call = _CALL.get()
    if call is None:
        return post  # awaited by the caller as is: no frame is added
    return _observed_request(call, url, attempt, post)


async def _observed_request(
    call: _Call, url: URL, attempt: int, post: Coroutine[Any, Any, Response]
) -> Response:
    from opentelemetry import context, trace
    from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY

    call.attempts += 1
    common: Attributes = {
        **call.extra,
        "http.request.method": "POST",
        "server.address": url.host or "",
        "server.port": url.port or 0,
    }
    span: Span | None = None
    ctx = context.get_current()
    if call.tracer is not None:
        attributes = {
            **common,
            "url.full": str(url.with_user(None).with_query(None).with_fragment(None)),
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        span = call.tracer.start_span(
            "POST",
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        ctx = trace.set_span_in_context(span, ctx)
    # This request is already one CLIENT span: opentelemetry-instrumentation-aiohttp-client (and
    # any HTTP instrumentation honouring the key) records neither a second span nor a duration.
    attached = context.attach(context.set_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, ctx))
    loop = asyncio.get_running_loop()
    began = loop.time()
    ended: dict[str, str | int] = {}
    try:
        status, headers, body = await post
    except BaseException as exc:
        ended["error.type"] = type(exc).__qualname__
        code = getattr(exc, "status", None)  # a response too large to read still had a status
        if isinstance(code, int):
            ended["http.response.status_code"] = code
        raise
    else:
        ended["http.response.status_code"] = status
        if status >= 400:
            ended["error.type"] = str(status)
        if status == 429 and call.meters is not None:
            exceeded = {
                **call.lane,
                "server.address": common["server.address"],
                "autocalls.rate_limit.store": call.store,
            }
            call.meters.exceeded.add(1, exceeded)
        return status, headers, body
    finally:
        elapsed = loop.time() - began
        context.detach(attached)
        if span is not None:
            span.set_attributes(ended)
            if "error.type" in ended:
                span.set_status(trace.StatusCode.ERROR)
            span.end()
        if call.meters is not None:
            call.meters.request_duration.record(elapsed, {**common, **ended})
