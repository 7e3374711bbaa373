"""Bulk runs: stream many requests through one client at the full rate its limiter allows.

::

    from autocalls_async import AsyncAutocalls
    from autocalls_async.bulk import BulkRunner

    async with AsyncAutocalls() as client:
        async with BulkRunner(client, rows) as run:     # rows: an (async) iterable
            async for result in run:                    # in completion order
                print(result.id, result.reply.reply if result.ok else result.error)

``rows`` yields ``BulkRequest`` objects or plain mappings with ``assistant_id``,
``customer_identifier``, ``message``, optional ``variables`` and optional ``id`` (default: the
1-based position). The runner pulls a row only when one of its ``concurrency`` tasks is free,
so a million-row generator never becomes a million tasks; calls for one customer keep their
input order (the client serialises each conversation in call order, and the runner starts
calls in input order). Each row yields exactly one ``BulkResult``: a reply or a typed error.

``run.stop()`` stops gracefully: no new row is pulled, the client is closed so that calls still
waiting for a slot fail at once with ``ClientClosedError`` (nothing was sent: run them again
later), and calls already sent finish and are yielded. Cancelling the task that iterates stops
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Final

import attrs

from ._client import AsyncAutocalls, on_send
from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    AuthenticationError,
    AutocallsError,
    ClientClosedError,
    InternalServerError,
    InvalidRequestError,
    LimiterUnavailableError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RateLimitTimeout,
    UnprocessableEntityError,
)
from ._lifecycle import AsyncClosing
from ._models import Reply
from ._wire import build_request

__all__ = [
    "DEFAULT_CONCURRENCY",
    "BulkRequest",
    "BulkResult",
    "BulkRunner",
    "RowId",
    "error_code",
    "generated_requests",
]

#: A row's id: the input's ``id`` (str or int), or its 1-based row number.
RowId = int | str

#: Tasks in the runner's window. A task waiting for a rate-limit slot costs a few KB, and the
#: window must cover ``rate x reply latency`` calls in flight plus a queue for the limiter to
#: draw from at once; 32 covers 5 requests/s with 5 s replies, far more than the documented limit
#: needs, while keeping memory flat and a graceful stop quick.
DEFAULT_CONCURRENCY: Final = 32

_REQUIRED: Final = ("assistant_id", "customer_identifier", "message")
_END: Final = object()


@attrs.frozen
class BulkRequest:
    """One row of a bulk run.

    ``problem`` is set by a reader that could not make a request of the row (a missing field,
    ``assistant_id`` that is not a number, ``variables`` that is not a JSON object): the runner
    sends nothing and yields the row as failed with ``InvalidRequestError(problem)``.
    """

    id: RowId
    assistant_id: int
    customer_identifier: str
    message: str
    variables: Mapping[str, Any] | None = None
    row: int | None = None  #: 1-based position in the input, when known
    problem: str | None = None

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], row: int, *, extra_as_variables: bool = False
    ) -> BulkRequest:
        """Build a request from a JSON-like mapping (a JSONL line, a dict), never raising.

        ``customer_identifier`` is stripped as the service does (it trims strings), so that
        ``" A"`` and ``"A"`` share one conversation order. With ``extra_as_variables``, keys
        other than the request's own become variables (``variables`` wins on a clash).
        """
        raw_id = data.get("id")
        row_id: RowId = row
        problems: list[str] = []
        if isinstance(raw_id, str) and raw_id.strip():
            row_id = raw_id.strip()
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            row_id = raw_id
        elif raw_id is not None and raw_id != "":
            problems.append(f"id must be a string or an integer, got {_kind(raw_id)}")
        missing = [name for name in _REQUIRED if data.get(name) in (None, "")]
        if missing:
            problems.append("missing " + ", ".join(missing))
        assistant_id = data.get("assistant_id")
        if "assistant_id" not in missing and (
            isinstance(assistant_id, bool) or not isinstance(assistant_id, int)
        ):
            problems.append(f"assistant_id must be an integer, got {_kind(assistant_id)}")
            assistant_id = 0
        customer = data.get("customer_identifier")
        if isinstance(customer, str):
            customer = customer.strip()
        elif "customer_identifier" not in missing:
            problems.append(f"customer_identifier must be a string, got {_kind(customer)}")
        message = data.get("message")
        if "message" not in missing and not isinstance(message, str):
            problems.append(f"message must be a string, got {_kind(message)}")
        variables = data.get("variables")
        if variables is not None and not isinstance(variables, Mapping):
            problems.append(f"variables must be a JSON object, got {_kind(variables)}")
            variables = None
        if extra_as_variables:
            known = {"id", "variables", *_REQUIRED}
            extra = {key: value for key, value in data.items() if key not in known}
            if extra:
                variables = {**extra, **(variables or {})}
        return cls(
            row_id,
            assistant_id if isinstance(assistant_id, int) else 0,
            customer if isinstance(customer, str) else "",
            message if isinstance(message, str) else "",
            variables,
            row,
            "; ".join(problems) or None,
        )


#: What ``BulkRunner`` accepts: requests or JSON-like mappings, sync or async.
Rows = Iterable[BulkRequest | Mapping[str, Any]] | AsyncIterable[BulkRequest | Mapping[str, Any]]


def _kind(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:39] + '…'}"


@attrs.frozen
class BulkResult:
    """What became of one row: ``reply`` when ``ok``, else ``error`` (never both)."""

    request: BulkRequest
    reply: Reply | None = None
    error: AutocallsError | None = None

    @property
    def id(self) -> RowId:
        return self.request.id

    @property
    def ok(self) -> bool:
        return self.reply is not None

    @property
    def sent(self) -> bool:
        """False when the error proves nothing reached the server (safe to send again)."""
        if self.error is None:
            return True
        if isinstance(self.error, APIConnectionError):
            return self.error.sent
        return not isinstance(
            self.error,
            InvalidRequestError | ClientClosedError | RateLimitTimeout | LimiterUnavailableError,
        )

    @property
    def maybe_processed(self) -> bool:
        """True unless the row certainly was not processed (message appended, call billed).

        An answer was processed; a refusal by the service (4xx, a 429, a 503) or an error
        before sending was not; a 5xx, a bad 2xx body, a timeout or a connection lost after
        the request was written may have been. The bulk command does not send such rows again
        unless asked (``--retry-unsafe-failed``).
        """
        error = self.error
        if error is None:
            return True
        if not self.sent:
            return False
        if isinstance(error, APIError) and not isinstance(error, APIResponseValidationError):
            return error.status >= 500 and error.status != 503
        return True

    def to_json(self) -> dict[str, Any]:
        """The row's line in a bulk run's JSONL output."""
        request = self.request
        line: dict[str, Any] = {"id": request.id, "ok": self.ok}
        if request.row is not None:
            line["row"] = request.row
        if request.problem is None:
            line["assistant_id"] = request.assistant_id
            line["customer_identifier"] = request.customer_identifier
        if self.reply is not None:
            line["conversation_id"] = self.reply.conversation_id
            line["reply"] = self.reply.reply
            line["function_calls"] = [call.data for call in self.reply.function_calls]
            line["ai_disabled"] = self.reply.ai_disabled
            return line
        error = self.error
        assert error is not None
        text = error.message if isinstance(error, APIError) else str(error)
        line["error"] = " ".join(text.split())
        invalid = isinstance(error, InvalidRequestError)
        line["error_code"] = "INVALID_ROW" if invalid else error_code(error)
        line["error_type"] = type(error).__name__
        line["status"] = error.status if isinstance(error, APIError) else None
        line["sent"] = self.sent
        line["maybe_processed"] = self.maybe_processed
        return line


_CODES: Final[tuple[tuple[type[AutocallsError], str], ...]] = (
    (InvalidRequestError, "INVALID_REQUEST"),
    (RateLimitTimeout, "RATE_LIMIT_TIMEOUT"),
    (ClientClosedError, "NOT_SENT"),
    (LimiterUnavailableError, "LIMITER_UNAVAILABLE"),
    (APITimeoutError, "TIMEOUT"),
    (APIConnectionError, "CONNECTION_ERROR"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (PermissionDeniedError, "FORBIDDEN"),
    (NotFoundError, "NOT_FOUND"),
    (UnprocessableEntityError, "VALIDATION_FAILED"),
    (RateLimitError, "RATE_LIMITED"),
    (APIResponseValidationError, "INVALID_RESPONSE"),
    (InternalServerError, "SERVER_ERROR"),
)


def error_code(error: AutocallsError) -> str:
    """The service's ``error_code`` when it sent one, else a stable code naming the class."""
    if isinstance(error, APIError) and error.error_code:
        return error.error_code
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return f"HTTP_{error.status}" if isinstance(error, APIError) else "ERROR"


def generated_requests(
    count: int, *, customers: int = 1000, assistant_id: int = 123
) -> Iterator[BulkRequest]:
    """Yield ``count`` synthetic rows over ``customers`` customers, lazily (benchmarks, tests)."""
    for row in range(1, count + 1):
        customer = f"+1555{row % customers:07d}"
        yield BulkRequest(row, assistant_id, customer, f"Message {row}", None, row)


class BulkRunner(AsyncClosing):
    """Run rows through ``client``; iterate (once) to get each ``BulkResult`` as it completes.

    At most ``concurrency`` rows are in the runner at a time (sent, or waiting in the client
    for their conversation's turn or a rate-limit slot); the next row is pulled when one ends.
    Use ``async with`` so that an early exit cancels what is left.
    """

    def __init__(
        self,
        client: AsyncAutocalls,
        rows: Rows,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_send: Callable[[BulkRequest], None] | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidRequestError(f"concurrency must be an int >= 1, got {concurrency!r}")
        self.client = client
        self.concurrency = concurrency
        #: Called once per row, synchronously, just before its first attempt is handed to the
        #: transport (after its rate-limit slot): a journal can record "may have been sent"
        #: before it is true. If it raises, the row is not sent and the run stops with it.
        self.on_send = on_send
        self._rows = rows
        self._pending: set[asyncio.Task[BulkResult]] = set()
        self._stopping = False
        self._closer: asyncio.Task[None] | None = None
        self._iterator: AsyncGenerator[BulkResult, None] | None = None
        self.pulled = 0  #: rows taken from the input so far

    @property
    def active(self) -> int:
        """Rows sent or waiting in the client right now."""
        return len(self._pending)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self, *, close_client: bool = True) -> None:
        """Pull no new row; let calls in flight finish. Safe to call from a signal handler.

        With ``close_client`` (the default) the client is closed, so calls still waiting for a
        slot end at once with ``ClientClosedError`` (nothing sent); without it every row
        already pulled is still sent.
        """
        self._stopping = True
        if close_client and self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self.client.close())

    def __aiter__(self) -> AsyncIterator[BulkResult]:
        if self._iterator is not None:
            raise RuntimeError("a BulkRunner can be iterated only once")
        self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        """Cancel the rows still running (their results are lost) and wait for them."""
        if self._iterator is not None:
            await self._iterator.aclose()
        await self._cancel_pending()
        if self._closer is not None:
            await self._closer

    async def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, set()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> AsyncGenerator[BulkResult, None]:
        rows = _pull(self._rows)
        exhausted = False
        failure: Exception | None = None
        try:
            while True:
                while not (exhausted or self._stopping) and len(self._pending) < self.concurrency:
                    try:
                        item = await anext(rows, _END)
                    except Exception as exc:  # the input broke: finish what was sent, then raise
                        failure, exhausted = exc, True
                        break
                    if item is _END:
                        exhausted = True
                        break
                    self.pulled += 1
                    request = _as_request(item, self.pulled)
                    invalid = _check(request)
                    if invalid is not None:
                        yield BulkResult(request, error=invalid)
                    else:
                        self._pending.add(asyncio.create_task(self._call(request)))
                if not self._pending:
                    break  # exhausted or stopping, and nothing left in flight
                done, self._pending = await asyncio.wait(
                    self._pending, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    result = task.result()
                    if isinstance(result.error, ClientClosedError):
                        self._stopping = True  # closed under us: pulling more would only fail
                    yield result
        finally:
            await self._cancel_pending()
            await rows.aclose()
        if failure is not None:
            raise failure

    async def _call(self, request: BulkRequest) -> BulkResult:
        sent = False
        hook_error: BaseException | None = None

        def sending() -> None:
            nonlocal sent, hook_error
            if not sent and self.on_send is not None:
                try:
                    self.on_send(request)
                except BaseException as exc:  # the row is not sent; remembered to re-raise
                    hook_error = exc
                    raise
            sent = True

        on_send.set(sending)  # this task's own context: other rows are not affected
        try:
            reply = await self.client.generate_reply(
                assistant_id=request.assistant_id,
                customer_identifier=request.customer_identifier,
                message=request.message,
                variables=request.variables,
            )
        except AutocallsError as exc:
            return BulkResult(request, error=exc)
        except Exception as exc:
            if exc is hook_error:
                raise  # the journal failed: the run cannot keep its promise, stop it
            # Anything else is this row's failure, never the run's death; say whether it
            # may have been sent.
            text = f"row {_name(request)}: unexpected {type(exc).__name__}: {exc}"
            if not sent:
                return BulkResult(request, error=InvalidRequestError(f"{text}; nothing was sent"))
            return BulkResult(
                request, error=APIConnectionError(f"{text}; it may have been sent", sent=True)
            )
        return BulkResult(request, reply=reply)


async def _pull(rows: Rows) -> AsyncGenerator[object, None]:
    """One async view of a sync or async input, closed when the run ends early."""
    if isinstance(rows, AsyncIterable):
        iterator = aiter(rows)
        try:
            async for item in iterator:
                yield item
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()
    else:
        iterator_sync = iter(rows)
        try:
            for item in iterator_sync:
                yield item
        finally:
            close_sync = getattr(iterator_sync, "close", None)
            if close_sync is not None:
                with contextlib.suppress(Exception):
                    close_sync()


def _as_request(item: object, position: int) -> BulkRequest:
    try:
        return _to_request(item, position)
    except Exception as exc:  # a Mapping whose get() fails, a str subclass that breaks...
        return BulkRequest(
            position,
            0,
            "",
            "",
            row=position,
            problem=f"the row could not be read ({type(exc).__name__}: {exc})",
        )


def _to_request(item: object, position: int) -> BulkRequest:
    if isinstance(item, BulkRequest):
        return item if item.row is not None else attrs.evolve(item, row=position)
    if isinstance(item, Mapping):
        return BulkRequest.from_mapping(item, position)
    return BulkRequest(
        position, 0, "", "", row=position, problem=f"a row must be a mapping, got {_kind(item)}"
    )


def _check(request: BulkRequest) -> InvalidRequestError | None:
    """The core's own validation, so a bad row fails alone, named, before anything is sent."""
    if request.problem is not None:
        return InvalidRequestError(f"row {_name(request)}: {request.problem}")
    try:
        build_request(
            request.assistant_id,
            request.customer_identifier,
            request.message,
            request.variables,
        )
    except InvalidRequestError as exc:
        return InvalidRequestError(f"row {_name(request)}: {exc}")
    except Exception as exc:  # a BulkRequest built by hand with fields of the wrong type
        return InvalidRequestError(f"row {_name(request)}: {type(exc).__name__}: {exc}")
    return None


def _name(request: BulkRequest) -> str:
    if request.row is None or request.id == request.row:
        return str(request.id)
    return f"{request.row} (id {request.id!r})"
