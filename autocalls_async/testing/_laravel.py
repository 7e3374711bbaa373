"""Pure re-implementations of the Laravel behaviours the real service shows.

The upstream service is a Laravel application, so what a client sees on errors is mostly the
framework's doing, not the application's: Sanctum's bearer-token parsing, the ``throttle``
middleware, the ``TrimStrings`` / ``ConvertEmptyStringsToNull`` middleware, the validator's
messages and the exception handler's content negotiation (JSON or an HTML error page). These
functions copy those behaviours closely enough that a client tested against the emulator
behaves the same against the service. No I/O here: the aiohttp layer lives in ``_server``.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final, Literal

import attrs

Window = Literal["rolling", "fixed", "no-burst"]
WINDOWS: tuple[str, ...] = ("rolling", "fixed", "no-burst")

#: Laravel's ``TrimStrings`` pattern: whitespace plus BOM, zero-width space and LRM, at both ends.
_TRIM: Final = re.compile(r"^[\s\ufeff\u200b\u200e]+|[\s\ufeff\u200b\u200e]+$")


def bearer_token(authorization: str) -> str | None:
    """Return the bearer token the way ``Request::bearerToken()`` finds it, or None.

    Laravel searches the *last* case-insensitive ``"Bearer "`` and cuts the value at a comma.
    A blank token is treated as no token (Sanctum would not find it either).
    """
    position = authorization.lower().rfind("bearer ")
    if position < 0:
        return None
    token = authorization[position + len("bearer ") :].split(",", 1)[0]
    return token if token.strip() else None


def wants_json(headers: Mapping[str, str]) -> bool:
    """Return whether Laravel's ``Request::expectsJson()`` holds for these headers.

    Only the *most preferred* Accept entry counts (``wantsJson``): ``Accept: text/html,
    application/json`` gets HTML. An XHR (``X-Requested-With: XMLHttpRequest``) that accepts
    anything gets JSON too.
    """
    entries: list[tuple[float, str]] = []
    for item in headers.get("Accept", "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if not media:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        entries.append((quality, media.lower()))
    entries.sort(key=lambda entry: -entry[0])  # stable: ties keep the header's order
    first = entries[0][1] if entries else ""
    if "/json" in first or "+json" in first:
        return True
    is_xhr = headers.get("X-Requested-With", "") == "XMLHttpRequest"
    return is_xhr and first in ("", "*/*", "*")


def parse_input(raw: bytes, content_type: str) -> tuple[dict[str, Any], Any]:
    """Return (the request input as Laravel sees it, the decoded JSON body or None).

    Laravel decodes the body only when the content type is JSON (``/json`` or ``+json``), with
    PHP's ``json_decode``: invalid JSON (including ``NaN``, which PHP rejects) becomes an empty
    input, and so does a JSON value that is not an object (its keys would be 0, 1, ...). Other
    content types (forms, text) are treated as an empty input too; the emulator does not
    decode form bodies or merge the query string, which the SDK never relies on.
    """
    is_json = "/json" in content_type.lower() or "+json" in content_type.lower()
    if not is_json or not raw:
        return {}, None
    try:
        decoded = json.loads(raw, parse_constant=_reject_constant)
    except ValueError:  # includes UnicodeDecodeError and json.JSONDecodeError
        return {}, None
    return (decoded if isinstance(decoded, dict) else {}), decoded


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def clean(value: Any) -> Any:
    """Apply ``TrimStrings`` then ``ConvertEmptyStringsToNull``, recursively like Laravel."""
    if isinstance(value, str):
        return _TRIM.sub("", value) or None
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


def _is_empty(value: Any) -> bool:
    """Laravel's ``required`` fails for null, "" and empty arrays (``[]`` and ``{}`` alike)."""
    return value is None or value == "" or (isinstance(value, list | dict) and not value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(data: Mapping[str, Any]) -> dict[str, list[str]]:
    """Validate the cleaned input with the service's rules; return Laravel's error bag.

    Rules: ``assistant_id`` required|integer|min:1, ``customer_identifier``
    required|string|max:255, ``message`` required|string, ``variables`` nullable|array. As in
    Laravel, a failed ``required`` stops the other rules of that field, the other rules all run.

    Stricter than PHP on purpose (documented in the package): ``integer`` accepts only a JSON
    integer, not a numeric string, ``true`` or ``1.0`` (which PHP's ``FILTER_VALIDATE_INT``
    lets through), and ``array`` accepts only a JSON object, not a list: the emulator exists to
    catch a client sending the wrong types, and the SDK must never rely on PHP's leniency.
    """
    errors: dict[str, list[str]] = {}

    def fail(field: str, template: str) -> None:
        errors.setdefault(field, []).append(template.format(field.replace("_", " ")))

    assistant_id: Any = data.get("assistant_id")
    if _is_empty(assistant_id):
        fail("assistant_id", "The {} field is required.")
    else:
        if not isinstance(assistant_id, int) or isinstance(assistant_id, bool):
            fail("assistant_id", "The {} field must be an integer.")
        if _is_number(assistant_id) and assistant_id < 1:
            fail("assistant_id", "The {} field must be at least 1.")

    customer: Any = data.get("customer_identifier")
    if _is_empty(customer):
        fail("customer_identifier", "The {} field is required.")
    else:
        if not isinstance(customer, str):
            fail("customer_identifier", "The {} field must be a string.")
        size = len(customer) if isinstance(customer, str | list | dict) else len(str(customer))
        if size > 255:
            fail("customer_identifier", "The {} field must not be greater than 255 characters.")

    message: Any = data.get("message")
    if _is_empty(message):
        fail("message", "The {} field is required.")
    elif not isinstance(message, str):
        fail("message", "The {} field must be a string.")

    variables: Any = data.get("variables")
    if variables is not None and not isinstance(variables, dict):
        fail("variables", "The {} field must be an array.")
    return errors


def summarize(errors: Mapping[str, list[str]]) -> str:
    """Return ``ValidationException::summarize``: the first message and "(and N more errors)"."""
    messages = [message for field_messages in errors.values() for message in field_messages]
    first, rest = messages[0], len(messages) - 1
    if not rest:
        return first
    return f"{first} (and {rest} more {'error' if rest == 1 else 'errors'})"


@attrs.frozen
class ThrottleDecision:
    """The throttle's verdict for one request."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until a slot frees; 0.0 when allowed


class Throttle:
    """Per-key request counter in one of three server shapes.

    ``rolling``: a request is refused when ``requests`` arrivals already happened in
    ``(now - period, now]``, the strictest window a client can meet (what DESIGN.md's guarantee
    is about). ``fixed``: Laravel's ``RateLimiter``: a window opens at the first hit of a key,
    allows ``requests`` hits, and closes ``period`` seconds later (Laravel rounds to whole
    seconds; the emulator does not, so scaled sub-second periods work). ``no-burst``: nginx's
    ``limit_req`` leaky bucket: a request is refused when it comes less than
    ``period / requests`` after the previous one allowed (with ``burst=b``, nginx's
    ``burst=b-1 nodelay``: ``b`` may come back to back, then one per ``period / requests``).
    ``burst`` on a window adds that bucket to it. Only allowed requests are counted, as Laravel
    increments the counter only after ``tooManyAttempts`` and nginx its excess only when it
    lets a request through.
    """

    def __init__(
        self,
        requests: int,
        period: float,
        window: Window,
        clock: Callable[[], float],
        burst: int | None = None,
    ) -> None:
        if requests < 1 or period <= 0:
            raise ValueError("rate_limit must be (requests >= 1, period > 0)")
        if window not in WINDOWS:
            raise ValueError(f"window must be 'rolling', 'fixed' or 'no-burst', not {window!r}")
        if burst is not None and (
            isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= requests
        ):
            raise ValueError(f"burst must be between 1 and {requests} (requests), got {burst!r}")
        self.requests, self.period, self.window = requests, period, window
        self.burst = 1 if burst is None and window == "no-burst" else burst
        self._clock = clock
        self._arrivals: dict[str, collections.deque[float]] = {}
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, hits)
        self._buckets: dict[str, float] = {}  # key -> when the bucket is empty (GCRA's tat)

    def hit(self, key: str) -> ThrottleDecision:
        """Count one arrival for ``key`` if allowed; say how long to wait otherwise."""
        now = self._clock()
        interval = self.period / self.requests
        tat = self._buckets.get(key, now)
        if self.burst is not None:
            free = tat - (self.burst - 1) * interval
            if now < free:
                return ThrottleDecision(False, self.requests, 0, free - now)
        decision = self._window(key, now)
        if decision.allowed and self.burst is not None:
            self._buckets[key] = max(tat, now) + interval
            if len(self._buckets) > 100_000:  # drained buckets say nothing: drop them
                self._buckets = {k: v for k, v in self._buckets.items() if v > now}
        return decision

    def _within(self, seconds: float) -> float:
        """A wait in (0, period]: ``(a + period) - now`` may round a hair past the period (or
        to 0) in floating point, which a client would read as a wait longer than the window."""
        return min(self.period, max(seconds, 1e-9))

    def _window(self, key: str, now: float) -> ThrottleDecision:
        if self.window == "no-burst":
            return ThrottleDecision(True, self.requests, self.requests - 1, 0.0)
        if self.window == "rolling":
            arrivals = self._arrivals.setdefault(key, collections.deque())
            while arrivals and arrivals[0] <= now - self.period:
                arrivals.popleft()
            if len(arrivals) >= self.requests:
                return ThrottleDecision(
                    False, self.requests, 0, self._within(arrivals[0] + self.period - now)
                )
            arrivals.append(now)
            return ThrottleDecision(True, self.requests, self.requests - len(arrivals), 0.0)
        start, hits = self._windows.get(key, (now, 0))
        if now >= start + self.period:
            start, hits = now, 0
        if hits >= self.requests:
            return ThrottleDecision(
                False, self.requests, 0, self._within(start + self.period - now)
            )
        self._windows[key] = (start, hits + 1)
        return ThrottleDecision(True, self.requests, self.requests - hits - 1, 0.0)

    def reset(self) -> None:
        """Forget every key's history."""
        self._arrivals.clear()
        self._windows.clear()
        self._buckets.clear()


#: Titles of Laravel's own error views where they differ from the HTTP reason phrase.
_LARAVEL_TITLES: Final = {500: "Server Error", 419: "Page Expired"}
#: nginx's reason phrases where they differ from Python's.
_NGINX_PHRASES: Final = {504: "Gateway Time-out", 413: "Request Entity Too Large"}


def reason_phrase(status: int) -> str:
    """Return the HTTP reason phrase, "Error" for codes Python does not know."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def laravel_error_page(status: int) -> str:
    """Return a page shaped like Laravel's minimal error views (``429 | Too Many Requests``)."""
    title = _LARAVEL_TITLES.get(status, reason_phrase(status))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n</head>\n<body>\n"
        f'<div class="flex-center">{status} | {title}</div>\n</body>\n</html>\n'
    )


def nginx_error_page(status: int) -> str:
    """Return nginx's built-in error page, what a proxy in front of the app answers."""
    line = f"{status} {_NGINX_PHRASES.get(status, reason_phrase(status))}"
    return (
        f"<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n"
        f"<center><h1>{line}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


def encode_json(payload: Any) -> bytes:
    """Encode like PHP's ``json_encode`` with Laravel's defaults: compact, ASCII, ``\\/``."""
    return json.dumps(payload, separators=(",", ":")).replace("/", "\\/").encode("ascii")
