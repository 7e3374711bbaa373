"""Bulk runs: stream many requests through one client at the full rate its limiter allows.

```python
from autocalls_async import AsyncAutocalls
from autocalls_async.bulk import BulkRunner

async with AsyncAutocalls() as client:
    async with BulkRunner(client, rows) as run:     # rows: an (async) iterable
        async for result in run:                    # in completion order
            print(result.id, result.reply.reply if result.ok else result.error)
```

``rows`` yields ``BulkRequest`` objects or plain mappings with ``assistant_id``,
``customer_identifier``, ``message``, optional ``variables`` and optional ``id`` (default: the
1-based position). The runner pulls a row only when one of its ``concurrency`` tasks is free,
so a million-row generator never becomes a million tasks; calls for one customer keep their
input order (the client serialises each conversation in call order, and the runner starts
calls in input order). Each row yields exactly one ``BulkResult``: a reply or a typed error.

Rows that would only pay to learn the same failure are not sent (see ``BulkRunner``): the run
stops at the first ``INSUFFICIENT_BALANCE``, 401 or ``BudgetExceededError`` (``stop_on``), and
after an ``ASSISTANT_NOT_FOUND`` the remaining rows of that assistant fail as
``SkippedAssistantError`` without being sent (``skip_unknown_assistants``).

``run.stop()`` stops gracefully: no new row is pulled, the client is closed so that calls still
waiting for a slot fail at once with ``ClientClosedError`` (nothing was sent: run them again
later), and calls already sent finish and are yielded. Cancelling the task that iterates stops
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from ._client import AsyncAutocalls, on_send
from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    AssistantNotFoundError,
    AuthenticationError,
    AutocallsError,
    BudgetExceededError,
    ClientClosedError,
    InsufficientBalanceError,
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
from ._models import Priority, Reply
from ._wire import DEFAULT_MAX_REQUEST_BYTES, build_request

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_STOP_ON",
    "BulkRequest",
    "BulkResult",
    "BulkRunner",
    "RowId",
    "SkippedAssistantError",
    "error_code",
    "generated_requests",
    "read_results",
]

#: A row's id: the input's ``id`` (str or int), or its 1-based row number.
RowId = int | str

#: Tasks in the runner's window. A task waiting for a rate-limit slot costs a few KB, and the
#: window must cover ``rate x reply latency`` calls in flight plus a queue for the limiter to
#: draw from at once; 32 covers 5 requests/s with 5 s replies, far more than the documented limit
#: needs, while keeping memory flat and a graceful stop quick.
DEFAULT_CONCURRENCY: Final = 32

#: Errors after which every following row would fail the same way: the run stops sending.
DEFAULT_STOP_ON: Final[tuple[type[AutocallsError], ...]] = (
    InsufficientBalanceError,
    AuthenticationError,
    BudgetExceededError,
)

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
    #: The row as a spreadsheet numbers it, for messages: the number of the CSV record where
    #: it starts (the header is 1; blank records count, a record with line breaks in a cell
    #: counts once), a JSONL input's line number; None: not read from a file (``row`` then).
    #: Never part of the row's identity (``id``, ``row`` and OUT's keys stay as they were).
    sheet_row: int | None = None

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        row: int,
        *,
        extra_as_variables: bool = False,
        sheet_row: int | None = None,
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
            sheet_row,
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
        if isinstance(self.error, SkippedAssistantError | BudgetExceededError):
            return False
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


class SkippedAssistantError(AutocallsError):
    """Not sent: this run already learned that the row's assistant does not exist.

    ``BulkRunner(skip_unknown_assistants=True)`` fails the remaining rows of an assistant that
    answered ``ASSISTANT_NOT_FOUND`` with this error (``error_code``
    ``SKIPPED_ASSISTANT_NOT_FOUND``) instead of paying a rate-limit slot per row to learn it
    again. ``cause`` is the id of the row that got the answer.
    """

    def __init__(self, assistant_id: int, cause: RowId, *, row: str | None = None) -> None:
        # row: how messages name the cause's row (its spreadsheet row), if not by its id
        super().__init__(
            f"not sent: assistant {assistant_id} answered ASSISTANT_NOT_FOUND for row "
            f"{cause if row is None else row} "
            "of this run; fix the assistant id (or create the assistant), then send the rows "
            "again (bulk --retry-failed)"
        )
        self.assistant_id = assistant_id
        self.cause = cause


_CODES: Final[tuple[tuple[type[AutocallsError], str], ...]] = (
    (SkippedAssistantError, "SKIPPED_ASSISTANT_NOT_FOUND"),
    (BudgetExceededError, "BUDGET_EXCEEDED"),
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


def read_results(
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: Literal["csv", "jsonl"] | None = None,
    delimiter: str | None = None,
    extra_as_variables: bool = False,
) -> Iterator[dict[str, Any]]:
    """A bulk run's results aligned with its input: one dict per input row, in input order,
    the row's own fields plus ``status`` (``answered``, ``failed``, ``invalid``,
    ``maybe_processed``, ``not_sent``), ``reply``, ``conversation_id``, ``error_code`` and
    ``error``, joined by content as a run matches rows (never by row number, which shifts
    when rows are inserted or deleted). Pass the options the run was given (``--format``,
    ``--delimiter``, ``--vars-from-columns``). The ``results`` command writes the same rows
    as CSV or JSONL."""
    from ._results import read_results as read

    return read(
        Path(input),
        Path(out),
        format=format,
        delimiter=delimiter,
        extra_as_variables=extra_as_variables,
    )


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

    Stopping early, so as not to pay for failures known in advance:

    * ``stop_on`` (default ``DEFAULT_STOP_ON``: ``InsufficientBalanceError``,
      ``AuthenticationError``, ``BudgetExceededError``): the first row failing with one of these
      stops the run as ``stop()`` does: no new row is pulled, calls already sent finish and are
      yielded, calls still waiting for a slot end with ``ClientClosedError`` (nothing sent). A
      ``BudgetExceededError`` does not close the client: calls already holding budget still go.
      ``stopped_by`` is then the result that stopped the run. ``stop_on=()`` sends every row.
    * ``skip_unknown_assistants`` (default True): each assistant is first tried with one row;
      its other rows wait in the runner (they count in ``concurrency``) until that row is
      answered. If it answers ``ASSISTANT_NOT_FOUND``, every other row of the assistant fails
      with ``SkippedAssistantError`` without being sent (``unknown_assistants`` lists them);
      any other error tries the next row. With replies quicker than the rate limit's interval
      this costs no throughput; ``False`` sends every row.

    ``client.normalize_identifier`` (e.g. ``e164("US")``) is checked when a row is pulled, so a
    refused identifier fails that row alone, named, before anything is sent.

    ``priority`` (default ``Priority.BACKGROUND``) is the lane the rows wait in for their
    rate-limit slots: a bulk run yields the next slot to any interactive call of any process
    sharing the token (a web app answering customers), keeping at least the limiter's
    ``background_share`` while interactive calls wait. ``Priority.INTERACTIVE`` runs the rows
    as live traffic.
    """

    def __init__(
        self,
        client: AsyncAutocalls,
        rows: Rows,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        stop_on: Collection[type[AutocallsError]] = DEFAULT_STOP_ON,
        skip_unknown_assistants: bool = True,
        on_send: Callable[[BulkRequest], None] | None = None,
        priority: Priority = Priority.BACKGROUND,
    ) -> None:
        if not isinstance(priority, Priority):
            raise InvalidRequestError(
                f"priority must be Priority.BACKGROUND or Priority.INTERACTIVE, got {priority!r}"
            )
        #: The lane every row waits in for its rate-limit slot.
        self.priority = priority
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidRequestError(f"concurrency must be an int >= 1, got {concurrency!r}")
        stop_on = tuple(stop_on)
        if not all(isinstance(cls, type) and issubclass(cls, AutocallsError) for cls in stop_on):
            raise InvalidRequestError(
                f"stop_on must be AutocallsError subclasses, e.g. DEFAULT_STOP_ON, got {stop_on!r}"
            )
        self.stop_on: tuple[type[AutocallsError], ...] = stop_on
        self.skip_unknown_assistants = skip_unknown_assistants
        #: The result whose error (one of ``stop_on``) stopped the run, if one did.
        self.stopped_by: BulkResult | None = None
        #: Assistants that answered ASSISTANT_NOT_FOUND in this run -> the row that learned it.
        self.unknown_assistants: dict[int, RowId] = {}
        self._unknown_rows: dict[int, str] = {}  #: their causes' rows, named for messages
        self._confirmed: set[int] = set()  # assistants that answered a row
        self._probing: dict[int, deque[BulkRequest]] = {}  # rows held behind a first row
        self._held = 0
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
                while (
                    not (exhausted or self._stopping)
                    and len(self._pending) + self._held < self.concurrency
                ):
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
                    invalid = _check(request, self.client.max_request_bytes)
                    invalid = invalid or self._check_identifier(request)
                    if invalid is not None:
                        yield BulkResult(request, error=invalid)
                    else:
                        skipped = self._admit(request)
                        if skipped is not None:
                            yield skipped
                if self._stopping:
                    for result in self._release_held():
                        yield result
                if not self._pending:
                    break  # exhausted or stopping, and nothing left in flight
                done, self._pending = await asyncio.wait(
                    self._pending, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    result = task.result()
                    if isinstance(result.error, ClientClosedError):
                        self._stopping = True  # closed under us: pulling more would only fail
                    follow = self._after(result)
                    yield result
                    for skipped in follow:
                        yield skipped
        finally:
            await self._cancel_pending()
            await rows.aclose()
        if failure is not None:
            raise failure

    # -- stopping early (issue 14) ----------------------------------------------------------

    def _check_identifier(self, request: BulkRequest) -> InvalidRequestError | None:
        """The client's ``normalize_identifier``, applied now so a refused row fails alone."""
        if self.client.normalize_identifier is None:
            return None
        try:
            self.client.normalize(request.customer_identifier)
        except InvalidRequestError as exc:
            return InvalidRequestError(f"row {_name(request)}: {exc}")
        return None

    def _admit(self, request: BulkRequest) -> BulkResult | None:
        """Start the row's call, hold it behind its assistant's first row, or skip it."""
        assistant = request.assistant_id
        if self.skip_unknown_assistants and assistant not in self._confirmed:
            if assistant in self.unknown_assistants:
                return self._skipped(request)
            held = self._probing.get(assistant)
            if held is not None:
                held.append(request)
                self._held += 1
                return None
            self._probing[assistant] = deque()  # this row is the assistant's first
        self._start(request)
        return None

    def _start(self, request: BulkRequest) -> None:
        self._pending.add(asyncio.create_task(self._call(request)))

    def _skipped(self, request: BulkRequest) -> BulkResult:
        cause = self.unknown_assistants[request.assistant_id]
        named = self._unknown_rows.get(request.assistant_id)
        error = SkippedAssistantError(request.assistant_id, cause, row=named)
        return BulkResult(request, error=error)

    def _after(self, result: BulkResult) -> list[BulkResult]:
        """React to a finished row: stop the run; confirm, refuse or retry its assistant."""
        error = result.error
        if self.stopped_by is None and isinstance(error, self.stop_on):
            self.stopped_by = result
            self.stop(close_client=not isinstance(error, BudgetExceededError))
        assistant = result.request.assistant_id
        held = self._probing.get(assistant)
        if held is None:
            if self.skip_unknown_assistants and isinstance(error, AssistantNotFoundError):
                self._confirmed.discard(assistant)  # deleted during the run: skip what follows
                self.unknown_assistants.setdefault(assistant, result.id)
                self._unknown_rows.setdefault(assistant, _name(result.request))
            return []
        if isinstance(error, AssistantNotFoundError):
            del self._probing[assistant]
            self.unknown_assistants[assistant] = result.id
            self._unknown_rows[assistant] = _name(result.request)
            self._held -= len(held)
            return [self._skipped(request) for request in held]
        if self._stopping:
            return []  # _release_held ends the rows held
        if error is None or not held:
            del self._probing[assistant]
            if error is None:
                self._confirmed.add(assistant)
            rows = list(held)
        else:  # another error says nothing about the assistant: try its next row
            rows = [held.popleft()]
        self._held -= len(rows)
        for request in rows:
            self._start(request)
        return []

    def _release_held(self) -> list[BulkResult]:
        """The run stops: rows held behind an assistant's first row end as not sent."""
        results = [
            BulkResult(request, error=ClientClosedError("the run stopped before this row was sent"))
            for held in self._probing.values()
            for request in held
        ]
        self._probing.clear()
        self._held = 0
        return results

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
                priority=self.priority,
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


def _check(
    request: BulkRequest, max_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES
) -> InvalidRequestError | None:
    """The core's own validation, so a bad row fails alone, named, before anything is sent
    (the CLI's dry run passes its ``--max-request-bytes``)."""
    if request.problem is not None:
        return InvalidRequestError(f"row {_name(request)}: {request.problem}")
    try:
        build_request(
            request.assistant_id,
            request.customer_identifier,
            request.message,
            request.variables,
            max_bytes=max_bytes,
        )
    except InvalidRequestError as exc:
        return InvalidRequestError(f"row {_name(request)}: {exc}")
    except Exception as exc:  # a BulkRequest built by hand with fields of the wrong type
        return InvalidRequestError(f"row {_name(request)}: {type(exc).__name__}: {exc}")
    return None


def _name(request: BulkRequest) -> str:
    """``7`` (the row as a spreadsheet numbers it) or ``7 (id 'A-7')``; a row not read from a
    file by its position (``row``)."""
    shown = request.row if request.sheet_row is None else request.sheet_row
    if request.row is None or request.id == request.row:
        return str(request.id if request.sheet_row is None else request.sheet_row)
    return f"{shown} (id {request.id!r})"
