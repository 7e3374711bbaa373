"""Cost control: a cap on the calls a client may send, and what it has sent.

Every attempt that may be billed counts against a ``Budget``: a reply received (billed), an
attempt whose outcome is unknown (a 500, a timeout or a dropped connection after the request
was written: possibly billed), and an attempt in progress. The budget is reserved before the
attempt queues for a rate-limit slot, so a call that could not be paid for never takes a slot
from the others, and ``asyncio.gather`` of 10 calls under ``Budget(replies=3)`` sends exactly 3.
The reservation is given back when the attempt certainly was not processed: it never left
(refused connection, client closed, no slot within ``max_wait``), or the service refused it
before the application ran or charged (429, 503, and its other 4xx answers: 401, 402, 403,
404, 422).
"""

from __future__ import annotations

import attrs

from ._errors import APIConnectionError, APIError, BudgetExceededError

__all__ = ["AssistantUsage", "Budget", "Ledger", "Ticket", "Usage"]


def _non_negative_int(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an int >= 0, got {value!r}")


@attrs.frozen
class Budget:
    """At most ``replies`` calls sent by one client that are billed or may be billed.

    Past it, ``generate_reply`` raises ``BudgetExceededError`` and sends nothing. Calls in
    flight count; calls the service certainly did not process are given back.
    """

    replies: int = attrs.field(validator=_non_negative_int)  #: billed or possibly billed calls


@attrs.frozen
class AssistantUsage:
    """What one client sent to one assistant (attempts, retries included)."""

    sent: int = 0  #: attempts that reached the service (or may have)
    billed: int = 0  #: attempts answered with a reply
    possibly_billed: int = 0  #: attempts with an unknown outcome (5xx, timeout after sending)
    refused: int = 0  #: attempts the service answered without processing (4xx, 429, 503)


@attrs.frozen
class Usage:
    """A snapshot of ``client.usage``: totals, the budget, and the figures per assistant."""

    sent: int  #: attempts that reached the service (or may have), retries included
    billed: int  #: attempts answered with a reply
    possibly_billed: int  #: attempts with an unknown outcome (5xx, timeout after sending)
    refused: int  #: attempts the service answered without processing (4xx, 429, 503)
    in_flight: int  #: attempts holding a reservation right now (queued for a slot or sent)
    budget: Budget | None  #: the client's budget, if it has one
    by_assistant: dict[int, AssistantUsage]  #: the same counts per assistant id

    @property
    def charged(self) -> int:
        """Billed or possibly billed: what the budget counts, besides calls in flight."""
        return self.billed + self.possibly_billed

    @property
    def remaining(self) -> int | None:
        """Calls the budget still allows (None without a budget)."""
        if self.budget is None:
            return None
        return max(0, self.budget.replies - self.charged - self.in_flight)


@attrs.define
class Ticket:
    """One attempt's reservation; ``sent`` is set when its bytes are handed to the socket."""

    assistant_id: int
    sent: bool = False

    def mark_sent(self) -> None:
        self.sent = True


def refused(error: APIError) -> bool:
    """True when the service answered without appending the message or charging for it."""
    return 400 <= error.status < 500 or error.status == 503


class Ledger:
    """A client's reservations and counts (one event loop: no locking needed).

    ``parent`` is a ledger shared by several clients (``AutocallsAccounts(budget=...)``): each
    reservation and outcome counts there too, and its budget caps them all together. A ledger
    made with ``by_assistant=False`` keeps totals only (its usage names no assistant), so that
    its memory does not grow with the assistants of thousands of accounts.
    """

    def __init__(
        self,
        budget: Budget | None,
        *,
        parent: Ledger | None = None,
        by_assistant: bool = True,
        scope: str = "",
    ) -> None:
        self.budget = budget
        self.parent = parent
        self._scope = scope
        self._in_flight = 0
        self._charged = 0  # billed or possibly billed
        self._totals = [0, 0, 0, 0]  # [sent, billed, possibly, refused]
        #: assistant -> [sent, billed, possibly, refused]; None: totals only
        self._by_assistant: dict[int, list[int]] | None = {} if by_assistant else None

    def check(self) -> None:
        """Raise ``BudgetExceededError`` if no call could be reserved now."""
        if self.budget is not None and self._charged + self._in_flight >= self.budget.replies:
            raise BudgetExceededError(self._refusal())
        if self.parent is not None:
            self.parent.check()

    def _refusal(self) -> str:
        assert self.budget is not None
        charged = self._charged
        return (
            f"the budget of {self.budget.replies} replies{self._scope} is used up ({charged} "
            f"billed or possibly billed, {self._in_flight} in flight); nothing was sent. Raise "
            "Budget(replies=...) or use a new client to send more"
        )

    def reserve(self, assistant_id: int) -> Ticket:
        """Reserve one call before it queues for a slot, or raise ``BudgetExceededError``."""
        if self.budget is None and self.parent is None:  # counts only: nothing to refuse
            self._in_flight += 1
            return Ticket(assistant_id)
        self.check()
        ledger: Ledger | None = self
        while ledger is not None:
            ledger._in_flight += 1
            ledger = ledger.parent
        return Ticket(assistant_id)

    def settle(self, ticket: Ticket, error: BaseException | None) -> None:
        """Record the attempt's outcome and release its reservation (call once per ticket)."""
        if error is None:
            outcome = 1  # billed
        elif isinstance(error, APIError):
            outcome = 3 if refused(error) else 2
        elif isinstance(error, APIConnectionError):
            outcome = 2 if error.sent else 0
        else:  # cancelled or closed: possibly billed once the bytes left
            outcome = 2 if ticket.sent else 0
        ledger: Ledger | None = self
        while ledger is not None:
            ledger._count(ticket.assistant_id, outcome)
            ledger = ledger.parent

    def _count(self, assistant_id: int, outcome: int) -> None:
        self._in_flight -= 1
        if not outcome:  # never sent: nothing to count
            return
        if outcome != 3:  # billed or possibly billed, not refused
            self._charged += 1
        row = self._totals
        row[0] += 1
        row[outcome] += 1
        rows = self._by_assistant
        if rows is not None:
            row = rows.get(assistant_id) or rows.setdefault(assistant_id, [0, 0, 0, 0])
            row[0] += 1
            row[outcome] += 1

    def usage(self) -> Usage:
        rows = self._by_assistant or {}
        by_assistant = {assistant: AssistantUsage(*row) for assistant, row in sorted(rows.items())}
        sent, billed, possibly, refused_ = self._totals
        return Usage(
            sent=sent,
            billed=billed,
            possibly_billed=possibly,
            refused=refused_,
            in_flight=self._in_flight,
            budget=self.budget,
            by_assistant=by_assistant,
        )
