"""What the emulator remembers: conversations, their turns, and a record of every request.

These are plain mutable attrs classes so tests can read them directly (and, if they must,
arrange state, e.g. pre-fill a conversation's variables).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any, Final

import attrs

from ._faults import Fault

#: Words that make the default responder "book an appointment" through a function call.
_BOOKING: Final = re.compile(r"\b(book|booking|appointment|schedule|reserve)", re.IGNORECASE)


@attrs.define
class Turn:
    """One user message and what the service answered to it (``reply`` None: no AI reply)."""

    message: str
    reply: str | None = None
    function_calls: list[dict[str, Any]] = attrs.Factory(list)
    ai_disabled: bool = False


@attrs.define
class Conversation:
    """The service's conversation for one (assistant_id, customer_identifier)."""

    assistant_id: int
    customer_identifier: str
    conversation_id: str
    variables: dict[str, Any] = attrs.Factory(dict)
    ai_disabled: bool = False
    turns: list[Turn] = attrs.Factory(list)

    @property
    def messages(self) -> list[str]:
        """The user messages, in the order the service received them."""
        return [turn.message for turn in self.turns]

    @property
    def replies(self) -> list[str | None]:
        """The replies, aligned with ``messages`` (None: AI disabled or not finished yet)."""
        return [turn.reply for turn in self.turns]


@attrs.define
class RequestRecord:
    """One request that reached the endpoint's handler, filled in as it is handled.

    ``token_hash`` is a SHA-256 of the bearer token (None when there was none): the raw token
    is never kept. ``body`` is the decoded JSON (None if absent or invalid). ``status`` is None
    while the request is in progress and when the connection was dropped. ``counted`` means
    the throttle counted it; ``processed`` that it was appended to a conversation and charged.
    """

    time: float
    token_hash: str | None = None
    body: Any = None
    status: int | None = None
    counted: bool = False
    processed: bool = False
    conversation_id: str | None = None
    fault: Fault | None = None


#: A responder computes (reply text, function calls) for a message; variables are merged first.
Responder = Callable[[Conversation, str], tuple[str, list[dict[str, Any]]]]


def default_responder(conversation: Conversation, message: str) -> tuple[str, list[dict[str, Any]]]:
    """Answer predictably, like an assistant whose prompt uses the ``customer_name`` variable.

    A message about booking gets a ``book_appointment`` function call for the day in the
    ``appointment_date`` variable, or tomorrow (UTC).
    """
    name = conversation.variables.get("customer_name")
    greeting = f"Hi {name}!" if name is not None else "Hi there!"
    if not _BOOKING.search(message):
        return f"{greeting} Thanks for your message: {message}", []
    day = (
        conversation.variables.get("appointment_date")
        or (datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)).isoformat()
    )
    call = {
        "name": "book_appointment",
        "arguments": {"date": str(day), "customer_identifier": conversation.customer_identifier},
    }
    return f"{greeting} Your appointment is booked for {day}.", [call]
