"""Fault injection for the emulator: the failures a client of the real service meets.

A fault is consumed by an *authenticated* request (a missing token still gets its 401, so
queued faults are not wasted on it) and acts at one of two points, chosen by ``processed``:

``processed=False``: *before the application*, like nginx, a load balancer or Laravel's
    maintenance mode (a global middleware, ahead of the route's ``throttle``). The request is
    not counted by the throttle, not validated, not appended to any conversation, not charged.
    Safe to retry: what 429, 503 and connection failures look like.
``processed=True``: *after the application*: the request goes through the whole pipeline
    (throttle, validation, conversation, balance) and only then is its response replaced,
    delayed or lost, like an app crash after the AI replied or a proxy timing out. The request
    *was* processed if it was valid: retrying it would send the message twice. This is what
    makes 500, 502, 504, read timeouts and dropped connections unsafe to retry.

The request's record says which fault hit it and whether it was actually processed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ._laravel import encode_json

FaultKind = Literal["status", "rate_limited", "html", "malformed_json", "slow", "drop", "body"]

#: A JSON success body cut short, as when a proxy or the app dies mid-response.
TRUNCATED_JSON = (
    b'{"success":true,"conversation_id":"9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d",'
    b'"customer_identifier":"+1415'
)


def _headers(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((headers or {}).items())


def _check_status(status: int) -> int:
    if not 200 <= status <= 599:
        raise ValueError(f"a fault's status must be a final HTTP status (200-599), not {status}")
    return status


@attrs.frozen
class Fault:
    """One injected failure; immutable and hashable (usable as a key of ``fault_rates``).

    Build faults with the constructors (``Fault.status(503)``, ``Fault.drop()``, ...) rather
    than the attrs initialiser, whose fields are an implementation detail.
    """

    kind: FaultKind
    code: int | None = None
    processed: bool = False
    payload: bytes | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0

    @classmethod
    def status(
        cls,
        code: int,
        *,
        processed: bool = False,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Answer ``code``. Without ``body``: 502/504 get nginx's HTML page, others Laravel's
        error (``{"message": "Server Error"}`` for 500, ``"Service Unavailable"`` for 503,
        the reason phrase otherwise; HTML when the request does not ask for JSON). With
        ``body``: that JSON object. Add ``headers={"Retry-After": "30"}`` for a 503 that says
        when to come back."""
        payload = None if body is None else encode_json(dict(body))
        return cls(
            "status", _check_status(code), processed, payload, "application/json", _headers(headers)
        )

    @classmethod
    def rate_limited(cls, retry_after: int = 1) -> Fault:
        """A 429 exactly like the throttle's (``Retry-After``, ``X-RateLimit-*``, JSON body),
        e.g. the service counting requests that a client believed outside the window."""
        if retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        return cls("rate_limited", 429, delay=float(retry_after))

    @classmethod
    def html(cls, status: int = 502, *, processed: bool = False) -> Fault:
        """nginx's HTML error page (``502 Bad Gateway``) with ``text/html``."""
        return cls("html", _check_status(status), processed, content_type="text/html")

    @classmethod
    def malformed_json(cls, status: int = 200, *, processed: bool | None = None) -> Fault:
        """A truncated JSON body labelled ``application/json``. ``processed`` defaults to True
        for a 2xx (the app answered; the body broke on the way) and False otherwise."""
        if processed is None:
            processed = 200 <= status < 300
        return cls(
            "malformed_json", _check_status(status), processed, TRUNCATED_JSON, "application/json"
        )

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """The normal response, sent ``seconds`` after the request was processed: a client
        whose read timeout fires meanwhile cannot know the message was already handled."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls("slow", processed=True, delay=float(seconds))

    @classmethod
    def drop(cls, *, processed: bool = False) -> Fault:
        """Close the connection without any response (the client sees
        ``ServerDisconnectedError``), before or after processing the request."""
        return cls("drop", processed=processed)

    @classmethod
    def body(
        cls,
        status: int,
        raw_bytes: bytes,
        content_type: str,
        *,
        processed: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Any status, bytes and content type: hostile or surprising bodies for tests."""
        return cls(
            "body", _check_status(status), processed, raw_bytes, content_type, _headers(headers)
        )
