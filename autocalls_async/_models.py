"""Public value types: frozen attrs classes, built from JSON by the converter in ``_wire``."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Conversation", "FunctionCall", "Priority", "RateLimit", "Reply"]


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"RateLimit.{attribute.name} must be a positive int, got {value!r}")


def _positive_finite(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"RateLimit.{attribute.name} must be a positive number, got {value!r}")


def _margin(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"RateLimit.margin must be in [0, 1), got {value!r}")


def _burst(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            "RateLimit.burst must be None (the exact rolling window) or an int >= 1 "
            f"(1: evenly spaced), got {value!r}"
        )


def _number(value: float) -> str:
    """``60`` for 60.0, and every digit a value needs to be read back as itself."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?|\.\d+)\s*(s|m|h)?\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@attrs.frozen
class RateLimit:
    """At most ``requests`` requests may *start* in any rolling ``period`` seconds.

    ``margin`` widens the window by that fraction (default 2 %): at most ``requests`` starts in
    any ``period x (1 + margin)``, so that network and scheduling jitter cannot push one more
    request into a strict server's window.

    ``burst`` is how many starts may go back to back. ``None`` (the default) means
    ``requests``: the exact rolling window, which is how the service counts ("5 per minute")
    and what a fixed-window throttle (Laravel's) or a strict rolling window accepts; a burst
    on an idle token starts at once. ``burst=1`` spaces every start ``period / requests x
    (1 + margin)`` apart, for servers that refuse bursts (nginx ``limit_req`` without
    ``burst``, a token bucket of one). In between, at most ``burst`` starts go back to back:
    any ``k + 1`` consecutive starts, ``k >= burst``, span at least ``(k + 1 - burst)``
    spacings, and never more than ``requests`` start in the window.
    """

    requests: int = attrs.field(validator=_positive_int)  #: requests allowed per ``period``
    period: float = attrs.field(converter=float, validator=_positive_finite)  #: seconds
    #: Fraction added to the spacing of starts (0.02: starts ``1.02 * period / requests`` apart).
    margin: float = attrs.field(default=0.02, converter=float, validator=_margin, kw_only=True)
    #: Starts allowed back to back (``None``: ``requests``, the exact rolling window; 1: evenly
    #: spaced, for servers that refuse bursts).
    burst: int | None = attrs.field(default=None, kw_only=True, validator=_burst)
    #: Set by ``from_server``: the client adopts the limit the server states. Not part of the
    #: limit's value (two clients at 5/60s use the same limit, whichever follows the server).
    follows_server: bool = attrs.field(default=False, kw_only=True, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.burst is not None and self.burst > self.requests:
            raise ValueError(
                f"RateLimit.burst must be between 1 and requests ({self.requests}), got "
                f"{self.burst!r}: no more than requests can start in one period"
            )
        if self.burst == self.requests:
            # The same limit as None (the window): equal, and one hash.
            object.__setattr__(self, "burst", None)

    @property
    def bursts(self) -> int:
        """How many starts may go back to back: ``burst``, or ``requests`` when it is None."""
        return self.requests if self.burst is None else self.burst

    @property
    def window(self) -> float:
        """The rolling window the schedule keeps, margin included: ``period x (1 + margin)``."""
        return self.period * (1.0 + self.margin)

    @property
    def interval(self) -> float:
        """Seconds between two evenly spaced starts at the full rate, margin included (the
        spacing of ``burst=1``, and of background work whatever ``burst``)."""
        return self.period / self.requests * (1.0 + self.margin)

    @classmethod
    def from_server(cls, default: RateLimit | None = None) -> RateLimit:
        """``default`` (5 per 60 s) until the server states its limit, then the server's.

        The service's throttle sends ``X-RateLimit-Limit`` (requests per minute) on every
        response it counted. ``AsyncAutocalls(rate_limit=RateLimit.from_server())`` starts at
        ``default`` and, from the first such response, limits its token to what the header
        states (with ``default``'s margin: never above it); a later 429 still pauses the
        token. The client switches only its own limiter (``limiter=None``), and only while no
        other live client uses the token at another rate: then it keeps ``default`` and logs
        a warning naming both limits.
        """
        base = RateLimit(5, 60.0) if default is None else default
        if not isinstance(base, RateLimit):
            raise TypeError(f"default must be a RateLimit(requests, period), got {base!r}")
        return attrs.evolve(base, follows_server=True)

    def same_schedule(self, other: RateLimit) -> bool:
        """True when limiters at ``self`` and ``other`` may share one token's schedule.

        Evenly spaced (``burst=1`` on both), only the rate and margin matter: 5/60s and 1/12s
        space every start alike. With bursts, the window is the schedule: the same
        ``requests``, ``period``, ``margin`` and ``burst``."""
        if not math.isclose(self.margin, other.margin):
            return False
        if self.bursts == 1 and other.bursts == 1:
            return self.same_rate(other)
        return (
            self.requests == other.requests
            and math.isclose(self.period, other.period)
            and self.bursts == other.bursts
        )

    def same_rate(self, other: RateLimit) -> bool:
        """True when both allow the same requests per second (5/60s and 1/12s do).

        Limiters of one token may differ only that way (and must have the same ``margin``):
        starts are spaced ``period / requests`` apart whatever the period, so each keeps the
        other's rolling window too."""
        return math.isclose(self.requests / self.period, other.requests / other.period)

    @classmethod
    def parse(cls, text: str, *, burst: int | None = None) -> RateLimit:
        """Parse ``"5/60"`` (5 per 60 s), ``"5/1m"``, ``"100/0.5"``; ``burst`` as in the class."""
        match = _RATE.match(text)
        if match is None:
            raise ValueError(
                f"rate limit {text!r} is not REQUESTS/SECONDS, e.g. '5/60' for 5 per minute"
            )
        requests, period, unit = match.groups()
        return cls(int(requests), float(period) * _UNIT[unit], burst=burst)

    def __str__(self) -> str:
        text = f"{self.requests}/{self.period:g}s"
        if self.bursts == 1 and self.requests > 1:
            return f"{text} evenly spaced"
        if self.bursts < self.requests:
            return f"{text} burst {self.bursts}"
        return text

    def __repr__(self) -> str:
        burst = "" if self.burst is None else f", burst={self.burst}"
        text = (
            f"RateLimit({self.requests}, {_number(self.period)}, "
            f"margin={_number(self.margin)}{burst})"
        )
        return f"RateLimit.from_server(default={text})" if self.follows_server else text


class Priority(enum.IntEnum):
    """Which lane a call waits in for its rate-limit slot.

    A waiting ``INTERACTIVE`` call (a customer waiting on a web page) gets the next slot before
    any ``BACKGROUND`` call (a bulk job) not yet granted one, in every process sharing the
    token; background work keeps a minimum share so it always progresses.
    """

    INTERACTIVE = 0  #: a customer waits: the default of ``generate_reply`` and the client
    BACKGROUND = 1  #: bulk work: the default of ``BulkRunner`` and ``autocalls-async bulk``


@attrs.frozen
class FunctionCall:
    """One function call the assistant made while replying.

    The service does not document their schema, so ``data`` keeps the item exactly as received;
    ``name`` and ``arguments`` are read from it when present.
    """

    data: Any  #: the item exactly as the service sent it
    name: str | None = None  #: the function's name, when the item has one
    arguments: Any = None  #: its arguments (``arguments`` or ``args``), when present

    @classmethod
    def from_data(cls, data: Any) -> FunctionCall:
        if not isinstance(data, Mapping):
            return cls(data)
        name = data.get("name")
        if name is None and isinstance(data.get("function"), Mapping):
            name = data["function"].get("name")
        arguments = data.get("arguments", data.get("args"))
        return cls(data, name if isinstance(name, str) else None, arguments)


@attrs.frozen
class Reply:
    """The assistant's answer to one customer message.

    ``reply`` is ``""`` when ``ai_disabled`` is true and the service sent no text (a human has
    taken the conversation over). ``raw`` is the whole JSON body, unknown fields included.
    """

    conversation_id: str  #: the service's id of the (assistant, customer) conversation
    customer_identifier: str  #: as the service echoed it
    reply: str  #: the assistant's text; ``""`` when a human took over and none was sent
    function_calls: tuple[FunctionCall, ...] = ()  #: the functions the assistant called
    ai_disabled: bool = False  #: the AI is off for this conversation (a human answers)
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)  #: the whole body


@attrs.frozen
class Conversation:
    """What the client last saw of one (assistant, customer) conversation."""

    assistant_id: int  #: the assistant
    customer_identifier: str  #: the customer, normalised as sent
    conversation_id: str  #: the service's id of the conversation
    ai_disabled: bool  #: the last reply said the AI is off for it
    last_seen: float  #: ``time.time()`` of the reply that told us
