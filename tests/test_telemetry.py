"""OpenTelemetry: spans and metrics of real calls to the emulator, read back from the SDK.

opentelemetry-sdk's in-memory span exporter and metric reader see what an app's exporter would.
The providers are handed to the SDK through ``_telemetry.SIGNALS.use`` (the API lets a process
set its global providers only once); one test sets the global ones, in a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from opentelemetry import context, trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import autocalls_async as sdk
from autocalls_async import AsyncAutocalls, LocalRateLimiter, RateLimit
from autocalls_async import _telemetry as telemetry
from autocalls_async._ratelimit import Limiter
from autocalls_async._stores import MemoryStore
from autocalls_async.testing import Fault, MockAutocalls

Make = Callable[..., AsyncAutocalls]

CUSTOMER = "+14155550123"
EMAIL = "jane.doe@example.com"
MESSAGE = "my card number is 4111-1111"


class Recorded:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        return [s for s in spans if name is None or s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of one metric."""
        data = self.reader.get_metrics_data()
        found = []
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        found += [(dict(p.attributes or {}), p) for p in m.data.data_points]
        return found

    def metric_names(self) -> dict[str, str]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            m.name: m.unit or ""
            for r in data.resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
        }


@pytest.fixture
def otel() -> Iterator[Recorded]:
    recorded = Recorded()
    telemetry.SIGNALS.use(recorded.tracer_provider, recorded.meter_provider)
    yield recorded
    telemetry.SIGNALS.use()
    recorded.tracer_provider.shutdown()
    recorded.meter_provider.shutdown()


@pytest.fixture
async def limited(token: str) -> AsyncIterator[LocalRateLimiter]:
    async with LocalRateLimiter(rate_limit=RateLimit(50, 1.0)) as limiter:
        yield limiter


def ask(client: AsyncAutocalls, **overrides: Any) -> Any:
    arguments: dict[str, Any] = {
        "assistant_id": 123,
        "customer_identifier": CUSTOMER,
        "message": MESSAGE,
        "variables": {"email": EMAIL},
    }
    arguments.update(overrides)
    return client.generate_reply(**arguments)


def children(recorded: Recorded, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    found = [s for s in recorded.spans() if s.parent and s.parent.span_id == parent.context.span_id]
    return sorted(found, key=lambda s: s.start_time or 0)


@pytest.mark.timing
async def test_a_run_with_a_retry_a_429_and_a_404_is_traced_and_measured(
    server: MockAutocalls,
    make_client: Make,
    token: str,
    otel: Recorded,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Success, 503 retry, 429 pause, 404: every span and metric, nothing personal anywhere."""
    caplog.set_level(logging.DEBUG, logger="autocalls_async")
    client = make_client(server.base_url, rate_limit=RateLimit(50, 1.0))
    handler = trace.get_tracer("app", tracer_provider=otel.tracer_provider)
    replies = []
    with handler.start_as_current_span("GET /chat") as root:
        replies.append(await ask(client))  # 1: success
        server.inject(Fault.status(503, headers={"Retry-After": "0"}))
        replies.append(await ask(client))  # 2: 503, then success
        server.inject(Fault.rate_limited(retry_after=1))
        replies.append(await ask(client))  # 3: 429, a paused token, then success
        with pytest.raises(sdk.NotFoundError):
            await ask(client, assistant_id=999)  # 4: 404, not retried
    assert client.stats.retries == 2 and client.stats.rate_limited == 1

    calls = children(otel, otel.spans("GET /chat")[0])
    assert [s.name for s in calls] == ["autocalls generate_reply"] * 4
    assert all(s.kind is trace.SpanKind.INTERNAL for s in calls)
    assert root.get_span_context().trace_id == calls[0].context.trace_id  # type: ignore[union-attr]
    expected_calls = [
        ({"autocalls.assistant_id": 123, "autocalls.outcome": "reply", "autocalls.attempts": 1}),
        ({"autocalls.assistant_id": 123, "autocalls.outcome": "reply", "autocalls.attempts": 2}),
        ({"autocalls.assistant_id": 123, "autocalls.outcome": "reply", "autocalls.attempts": 2}),
        (
            {
                "autocalls.assistant_id": 999,
                "autocalls.outcome": "error",
                "error.type": "AssistantNotFoundError",
                "autocalls.attempts": 1,
            }
        ),
    ]
    for span, expected in zip(calls, expected_calls, strict=True):
        assert dict(span.attributes or {}) == {**expected, "autocalls.priority": "interactive"}
    assert [s.status.status_code for s in calls] == [trace.StatusCode.UNSET] * 3 + [
        trace.StatusCode.ERROR
    ]

    # Under each call: wait, POST for each attempt, in order.
    statuses: list[list[tuple[str, Any]]] = []
    for call in calls:
        steps = children(otel, call)
        statuses.append(
            [(s.name, (s.attributes or {}).get("http.response.status_code")) for s in steps]
        )
        for wait in (s for s in steps if s.name == "autocalls rate_limit.wait"):
            assert wait.kind is trace.SpanKind.INTERNAL
            assert dict(wait.attributes or {}) == {
                "autocalls.rate_limit.store": "host",
                "autocalls.priority": "interactive",
                "autocalls.rate_limit.result": "acquired",
            }
    wait, post = "autocalls rate_limit.wait", "POST"
    assert statuses == [
        [(wait, None), (post, 200)],
        [(wait, None), (post, 503), (wait, None), (post, 200)],
        [(wait, None), (post, 429), (wait, None), (post, 200)],
        [(wait, None), (post, 404)],
    ]
    # The 429 paused the token: the retry's wait span holds the pause.
    paused = children(otel, calls[2])[2]
    assert paused.end_time and paused.start_time
    assert (paused.end_time - paused.start_time) / 1e9 >= 0.9

    posts = otel.spans("POST")
    assert len(posts) == 6 and all(s.kind is trace.SpanKind.CLIENT for s in posts)
    url = server.base_url.rstrip("/") + "/ai/generate-reply"
    port = int(server.base_url.split(":")[-1].split("/")[0])
    base = {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": port,
        "url.full": url,
    }
    by_call = [[s for s in children(otel, call) if s.name == "POST"] for call in calls]
    assert dict(by_call[0][0].attributes or {}) == {**base, "http.response.status_code": 200}
    assert dict(by_call[1][0].attributes or {}) == {
        **base,
        "http.response.status_code": 503,
        "error.type": "503",
    }
    assert dict(by_call[1][1].attributes or {}) == {
        **base,
        "http.response.status_code": 200,
        "http.request.resend_count": 1,
    }
    assert dict(by_call[2][0].attributes or {})["error.type"] == "429"
    assert dict(by_call[2][1].attributes or {})["http.request.resend_count"] == 1
    assert dict(by_call[3][0].attributes or {}) == {
        **base,
        "http.response.status_code": 404,
        "error.type": "404",
    }
    assert [s.status.status_code for s in posts].count(trace.StatusCode.ERROR) == 3
    assert all(not s.events for s in otel.spans())  # no exception events: their messages

    # Metrics: names and units, then the points.
    names = otel.metric_names()
    assert {
        "http.client.request.duration": "s",
        "autocalls.rate_limit.wait.duration": "s",
        "autocalls.rate_limit.queued": "{call}",
        "autocalls.rate_limit.exceeded": "{response}",
        "autocalls.calls": "{call}",
    }.items() <= names.items()
    durations = {
        (a["http.response.status_code"], a.get("error.type")): p.count
        for a, p in otel.points("http.client.request.duration")
    }
    assert durations == {(200, None): 3, (503, "503"): 1, (429, "429"): 1, (404, "404"): 1}
    for attributes, _ in otel.points("http.client.request.duration"):
        assert {
            k: attributes[k] for k in ("http.request.method", "server.address", "server.port")
        } == {
            "http.request.method": "POST",
            "server.address": "127.0.0.1",
            "server.port": port,
        }
    ((attributes, waits),) = otel.points("autocalls.rate_limit.wait.duration")
    assert attributes == {
        "autocalls.rate_limit.store": "host",
        "autocalls.priority": "interactive",
        "autocalls.rate_limit.result": "acquired",
    }
    assert waits.count == 6 and waits.max >= 0.9
    ((attributes, queued),) = otel.points("autocalls.rate_limit.queued")
    assert queued.value == 0  # every wait that began ended
    ((attributes, exceeded),) = otel.points("autocalls.rate_limit.exceeded")
    assert exceeded.value == 1
    assert attributes == {
        "server.address": "127.0.0.1",
        "autocalls.rate_limit.store": "host",
        "autocalls.priority": "interactive",
    }
    outcomes = {
        (a["autocalls.outcome"], a.get("error.type")): p.value
        for a, p in otel.points("autocalls.calls")
    }
    assert outcomes == {("reply", None): 3, ("error", "AssistantNotFoundError"): 1}

    # The operator's log line for the 429, with the token's id and never the token.
    (warning,) = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "429 from the server" in r.getMessage()
    ]
    assert "429" in warning.getMessage()
    assert warning.autocalls_token_id == client.token_id  # type: ignore[attr-defined]

    # Nothing personal in any span, metric or log line.
    personal = [token, CUSTOMER, CUSTOMER[1:], EMAIL, MESSAGE, *(r.reply for r in replies)]
    personal += [r.conversation_id for r in replies]
    recorded_text = [caplog.text, repr([vars(r) for r in caplog.records])]
    for span in otel.spans():
        recorded_text.append(span.to_json())
    data = otel.reader.get_metrics_data()
    assert data is not None
    recorded_text.append(data.to_json())
    for text in recorded_text:
        for secret in personal:
            assert secret not in text


async def test_a_wait_that_times_out_or_is_cancelled_is_recorded(
    server: MockAutocalls, make_client: Make, otel: Recorded
) -> None:
    """max_wait passed: the wait span says timeout; a cancelled call is not an error."""
    async with LocalRateLimiter(rate_limit=RateLimit(1, 60.0)) as limiter:
        client = make_client(server.base_url, limiter=limiter)
        await ask(client)
        with pytest.raises(sdk.RateLimitTimeout):
            await ask(client, customer_identifier="other", max_wait=0.05)
        task = asyncio.create_task(ask(client, customer_identifier="third"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    waits = otel.spans("autocalls rate_limit.wait")
    results = [(s.attributes or {})["autocalls.rate_limit.result"] for s in waits]
    assert results == ["acquired", "timeout", "cancelled"]
    assert (waits[1].attributes or {})["error.type"] == "RateLimitTimeout"
    assert (waits[1].attributes or {})["autocalls.rate_limit.store"] == "process"
    outcomes = [(s.attributes or {})["autocalls.outcome"] for s in otel.spans(telemetry.CALL_SPAN)]
    assert outcomes == ["reply", "error", "cancelled"]
    ((attributes, queued),) = otel.points("autocalls.rate_limit.queued")
    assert queued.value == 0
    results = sorted(
        a["autocalls.rate_limit.result"]
        for a, _ in otel.points("autocalls.rate_limit.wait.duration")
    )
    assert results == ["acquired", "cancelled", "timeout"]


class FlakyStore(MemoryStore):
    """A process store that can be switched off, like a Redis going away and coming back."""

    kind = "flaky"

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def try_update(self, key: str, update: Any) -> tuple[bool, Any]:
        if self.down:
            raise sdk.LimiterUnavailableError("the store is down; nothing was sent")
        return super().try_update(key, update)


async def test_a_store_outage_is_logged_once_and_its_end_too(
    server: MockAutocalls, make_client: Make, otel: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    """No fallback: the calls fail, one WARNING for the outage, one INFO when it is over, with
    the store's kind for JSON handlers; the wait spans say "unavailable"."""
    caplog.set_level(logging.INFO, logger="autocalls_async")
    store = FlakyStore()
    client = make_client(server.base_url, limiter=Limiter(store, RateLimit(100, 1.0)))
    await ask(client)
    store.down = True
    for _ in range(3):
        with pytest.raises(sdk.LimiterUnavailableError):
            await ask(client)
    store.down = False
    await ask(client)
    await ask(client)
    logged = [(r.levelname, r.getMessage(), r.autocalls_limiter_store) for r in caplog.records]  # type: ignore[attr-defined]
    assert logged == [
        (
            "WARNING",
            "rate limiter (flaky) unavailable: the store is down; nothing was sent",
            "flaky",
        ),
        ("INFO", "rate limiter (flaky) available again", "flaky"),
    ]
    results = [
        (s.attributes or {})["autocalls.rate_limit.result"]
        for s in otel.spans("autocalls rate_limit.wait")
    ]
    assert results == ["acquired", *["unavailable"] * 3, "acquired", "acquired"]
    errors = [(s.attributes or {}).get("error.type") for s in otel.spans(telemetry.CALL_SPAN)]
    assert errors == [None, *["LimiterUnavailableError"] * 3, None, None]


async def test_a_failed_attempt_is_named_by_its_error(
    server: MockAutocalls, make_client: Make, otel: Recorded, unused_tcp_port: int
) -> None:
    """No response: error.type is the exception's class; a body too large keeps its status."""
    client = make_client(
        f"http://127.0.0.1:{unused_tcp_port}/api", retry_policy=sdk.RetryPolicy(max_retries=0)
    )
    with pytest.raises(sdk.APIConnectionError):
        await ask(client, priority=sdk.Priority.BACKGROUND)
    server.inject(Fault.body(200, b"x" * 4096, "application/json"))
    client = make_client(
        server.base_url, max_response_size=1024, retry_policy=sdk.RetryPolicy(max_retries=0)
    )
    with pytest.raises(sdk.APIResponseValidationError):
        await ask(client)
    refused, too_large = otel.spans("POST")
    assert (refused.attributes or {})["error.type"] == "APIConnectionError"
    assert "http.response.status_code" not in (refused.attributes or {})
    assert (too_large.attributes or {})["error.type"] == "APIResponseValidationError"
    assert (too_large.attributes or {})["http.response.status_code"] == 200
    call = otel.spans(telemetry.CALL_SPAN)[0]
    assert (call.attributes or {})["autocalls.priority"] == "background"
    assert "autocalls.rate_limit.wait" not in {s.name for s in otel.spans()}  # no limiter


async def test_an_invalid_call_is_traced_without_its_arguments(
    server: MockAutocalls, make_client: Make, otel: Recorded
) -> None:
    """A call refused before sending: one span, the error's class, no bad value recorded."""
    client = make_client(server.base_url)
    with pytest.raises(sdk.InvalidRequestError):
        await ask(client, assistant_id="123", priority="urgent")
    (span,) = otel.spans()
    assert dict(span.attributes or {}) == {
        "autocalls.outcome": "error",
        "error.type": "InvalidRequestError",
        "autocalls.attempts": 0,
    }


async def test_aiohttp_instrumentation_is_told_to_stay_out(
    server: MockAutocalls, token: str, otel: Recorded
) -> None:
    """Our CLIENT span is current and HTTP instrumentation suppressed while aiohttp sends.

    ``opentelemetry-instrumentation-aiohttp-client`` checks this key in its on_request_start
    and then records neither a span nor a duration: no duplicates, even on a caller's session.
    """
    seen: list[tuple[object, str]] = []

    async def on_request_start(*_: object) -> None:
        seen.append(
            (
                context.get_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY),
                getattr(trace.get_current_span(), "name", ""),
            )
        )

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    async with (
        aiohttp.ClientSession(trace_configs=[config]) as session,
        AsyncAutocalls(token, base_url=server.base_url, rate_limit=None, session=session) as client,
    ):
        await ask(client)
    assert seen == [(True, "POST")]
    assert context.get_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY) is None  # restored


async def test_nothing_is_recorded_without_a_provider(
    server: MockAutocalls, make_client: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's default providers: no span, no call state; without OpenTelemetry imported,
    it is not even looked up."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert telemetry._signals() is None
    client = make_client(server.base_url, rate_limit=RateLimit(50, 1.0))
    await ask(client)
    assert telemetry._CALL.get() is None
    with monkeypatch.context() as patched:
        patched.delitem(sys.modules, "opentelemetry")
        assert telemetry._signals() is None
    with monkeypatch.context() as patched:
        patched.setattr(telemetry.SIGNALS, "api", None)
        patched.setattr(telemetry.SIGNALS, "unavailable", False)
        patched.setitem(sys.modules, "opentelemetry.metrics._internal", None)  # ImportError
        assert telemetry._signals() is None
        assert telemetry.SIGNALS.unavailable
        assert telemetry._signals() is None  # not asked again


def test_a_disabled_sdk_is_no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SDK_DISABLED=true: the SDK's providers hand out no-op tracers and meters."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry.SIGNALS.use(TracerProvider(), MeterProvider())
    try:
        assert telemetry._signals() is None
    finally:
        telemetry.SIGNALS.use()


async def test_traces_only_and_metrics_only(
    server: MockAutocalls, make_client: Make, otel: Recorded
) -> None:
    """Each signal on its own (an app may export one): the other stays off, calls still work."""
    client = make_client(server.base_url, rate_limit=RateLimit(50, 1.0))
    telemetry.SIGNALS.use(tracer_provider=otel.tracer_provider)
    for _ in range(2):
        server.inject(Fault.rate_limited(retry_after=0))
        await ask(client)
    signals = telemetry._signals()
    assert signals is not None and signals.tracer is not None and signals.meters is None
    assert len(otel.spans(telemetry.CALL_SPAN)) == 2
    telemetry.SIGNALS.use(meter_provider=otel.meter_provider)
    for _ in range(2):
        server.inject(Fault.rate_limited(retry_after=0))
        await ask(client)
    signals = telemetry._signals()
    assert signals is not None and signals.tracer is None and signals.meters is not None
    assert len(otel.spans(telemetry.CALL_SPAN)) == 2
    ((_, calls),) = otel.points("autocalls.calls")
    ((_, exceeded),) = otel.points("autocalls.rate_limit.exceeded")
    assert (calls.value, exceeded.value) == (2, 2)


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (sdk.RateLimitTimeout("late"), "timeout"),
        (sdk.LimiterUnavailableError("down"), "unavailable"),
        (asyncio.CancelledError(), "cancelled"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_wait_results(error: BaseException, result: str) -> None:
    """Why a wait ended, as ASP.NET Core's rate-limiting metrics name it."""
    assert telemetry._wait_result(error) == result


def test_store_kind_of_a_custom_limiter() -> None:
    """A limiter of the caller's own: its class name."""

    class Mine:
        kind = 3

    assert telemetry.store_kind(Mine()) == "Mine"


@pytest.mark.slow
def test_the_global_providers_are_used(tmp_path: Any) -> None:
    """An app that sets the global providers after creating the client gets spans from then on."""
    script = textwrap.dedent(
        """
        import asyncio
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from autocalls_async import AsyncAutocalls
        from autocalls_async.testing import MockAutocalls

        async def main():
            async with MockAutocalls(rate_limit=None) as server:
                async with AsyncAutocalls("t", base_url=server.base_url, rate_limit=None) as c:
                    ask = dict(assistant_id=123, customer_identifier="c", message="m")
                    await c.generate_reply(**ask)  # before: nothing
                    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
                    provider = TracerProvider()
                    provider.add_span_processor(SimpleSpanProcessor(exporter))
                    trace.set_tracer_provider(provider)
                    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
                    await c.generate_reply(**ask)
            print(sorted(s.name for s in exporter.get_finished_spans()))
            data = reader.get_metrics_data()
            print(sorted(m.name for r in data.resource_metrics for s in r.scope_metrics
                         for m in s.metrics))

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    spans, metric_names = done.stdout.splitlines()
    assert spans == "['POST', 'autocalls generate_reply']"
    assert metric_names == "['autocalls.calls', 'http.client.request.duration']"


def test_generate_reply_is_still_a_coroutine_function_to_mocks() -> None:
    """The telemetry wrapper adds no frame per call, yet generate_reply is still async to
    introspection: unittest.mock's autospec makes it an AsyncMock, as users' tests expect."""
    import asyncio as _asyncio
    from unittest import mock

    from autocalls_async import AsyncAutocalls

    assert _asyncio.iscoroutinefunction(AsyncAutocalls.generate_reply)
    fake = mock.create_autospec(AsyncAutocalls, instance=True)
    assert isinstance(fake.generate_reply, mock.AsyncMock)


def _series(recorded: Recorded) -> dict[str, int]:
    """How many time series (distinct attribute sets) each metric has."""
    return {
        name: len({tuple(sorted(attributes.items())) for attributes, _ in recorded.points(name)})
        for name in recorded.metric_names()
    }


async def _platform_run(
    server: MockAutocalls,
    tokens: int,
    customers: int,
    labels: Callable[[int], dict[str, str]] | None = None,
) -> None:
    async with sdk.AutocallsAccounts(
        base_url=server.base_url, rate_limit=RateLimit(100, 1.0)
    ) as accounts:
        await asyncio.gather(
            *(
                ask(
                    accounts.client(
                        f"{t}|tenant-token-{t:04d}",
                        telemetry_attributes=None if labels is None else labels(t),
                    ),
                    customer_identifier=f"+1415555{t:02d}{c:02d}",
                )
                for t in range(tokens)
                for c in range(customers)
            )
        )


async def test_metrics_do_not_grow_with_tokens_or_customers(server: MockAutocalls) -> None:
    """By default no metric attribute names a token or a customer: 20 tokens with 3
    customers each make exactly the series one token with one customer makes."""
    one = Recorded()
    telemetry.SIGNALS.use(one.tracer_provider, one.meter_provider)
    try:
        await _platform_run(server, tokens=1, customers=1)
        many = Recorded()
        telemetry.SIGNALS.use(many.tracer_provider, many.meter_provider)
        await _platform_run(server, tokens=20, customers=3)
    finally:
        telemetry.SIGNALS.use()
    assert _series(many) == _series(one)
    assert _series(many)["autocalls.calls"] == 1
    for name in many.metric_names():
        for attributes, _ in many.points(name):
            assert not any("tenant-token" in str(value) for value in attributes.values())
            assert not any(str(value).startswith("+1415555") for value in attributes.values())


async def test_per_token_figures_are_an_opt_in(server: MockAutocalls, otel: Recorded) -> None:
    """``telemetry_attributes`` (here one per tenant) label every metric point and span of
    that client's calls: one series per tenant, when asked for; the SDK's own attributes are
    never replaced by them."""
    await _platform_run(
        server,
        tokens=3,
        customers=2,
        labels=lambda t: {"tenant.id": f"tenant-{t}", "autocalls.outcome": "x"},
    )
    calls = otel.points("autocalls.calls")
    assert sorted(a["tenant.id"] for a, _ in calls) == ["tenant-0", "tenant-1", "tenant-2"]
    assert {a["autocalls.outcome"] for a, _ in calls} == {"reply"}
    assert all(p.value == 2 for _, p in calls)
    durations = otel.points("http.client.request.duration")
    assert {a["tenant.id"] for a, _ in durations} == {"tenant-0", "tenant-1", "tenant-2"}
    for span in otel.spans():
        assert span.attributes is not None and str(span.attributes["tenant.id"]).startswith(
            "tenant-"
        )
