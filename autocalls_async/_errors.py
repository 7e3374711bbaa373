"""The SDK's exceptions.

```text
AutocallsError
├── InvalidRequestError (also ValueError)    bad input, raised before anything is sent
├── RateLimitTimeout (also TimeoutError)     no client-side slot within max_wait
├── ClientClosedError                        the client was closed before this call was sent
├── LimiterUnavailableError                  a shared limiter backend (Redis) failed
├── BudgetExceededError                      the client's Budget is used up; nothing sent
├── APIConnectionError                       network failure, no response
│   └── APITimeoutError (also TimeoutError)
└── APIError                                 the server answered
    ├── AuthenticationError        401
    ├── PermissionDeniedError      403
    ├── NotFoundError              404
    │   └── AssistantNotFoundError         error_code ASSISTANT_NOT_FOUND
    ├── InsufficientBalanceError           error_code INSUFFICIENT_BALANCE
    ├── UnprocessableEntityError   422 (.errors: field -> messages)
    ├── RateLimitError             429 after retries (.retry_after)
    ├── InternalServerError        5xx
    └── APIResponseValidationError 2xx whose body is not a valid reply
```

Messages never contain the API token: nothing here ever sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APITimeoutError",
    "AssistantNotFoundError",
    "AuthenticationError",
    "AutocallsError",
    "BudgetExceededError",
    "ClientClosedError",
    "InsufficientBalanceError",
    "InternalServerError",
    "InvalidRequestError",
    "LimiterUnavailableError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RateLimitTimeout",
    "UnprocessableEntityError",
]


class AutocallsError(Exception):
    """Base class of every error this SDK raises.

    Every one pickles to an equal error (same type, ``args``, message and attributes:
    ``status``, ``error_code``, ``sent``, ``retry_after``, ...), whatever its constructor
    takes: a worker of a ``ProcessPoolExecutor``, multiprocessing or Celery can raise it.
    ``__cause__``, ``__context__`` and the traceback are not pickled (as for any exception).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls cls(*args): wrong for a keyword-only constructor
        # (``sent=``, ``status=``) or one whose arguments are not the message.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[AutocallsError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidRequestError(AutocallsError, ValueError):
    """The arguments are not a valid request; nothing was sent."""


class RateLimitTimeout(AutocallsError, TimeoutError):
    """No client-side rate-limit slot would be free within ``max_wait``; nothing was sent."""


class ClientClosedError(AutocallsError):
    """The client was closed (or is closing) before this call was sent; nothing was sent."""


class LimiterUnavailableError(AutocallsError):
    """A shared rate-limiter backend could not be reached; nothing was sent."""


class BudgetExceededError(AutocallsError):
    """The client's ``Budget`` is used up (calls in flight included); nothing was sent."""


class APIConnectionError(AutocallsError):
    """The request failed at the network level: no HTTP response was received.

    ``sent`` tells whether the request may have reached the server (it may then have been
    processed, and it is not retried unless ``retry_unsafe=True``).
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.message = message
        #: True when the request may have reached the server (and may have been processed).
        self.sent = sent


class APITimeoutError(APIConnectionError, TimeoutError):
    """One attempt took longer than ``timeout`` seconds."""


class APIError(AutocallsError):
    """The server answered with an error (or with a body that is not a valid reply)."""

    status: int  #: the HTTP status
    error_code: str | None  #: the service's ``error_code`` (``ASSISTANT_NOT_FOUND``, ...), if any
    message: str  #: the service's message, or a short excerpt of the body
    body: Any  #: the decoded JSON body, or the text when it was not JSON
    headers: Mapping[str, str]  #: the response's headers
    #: Seconds the server asked us to wait (``Retry-After``, ``X-RateLimit-Reset``), or None.
    retry_after: float | None

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_code: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.error_code = error_code
        self.message = message
        self.body = body
        self.headers = dict(headers or {})
        super().__init__(self._describe())

    def _describe(self) -> str:
        code = f" {self.error_code}" if self.error_code else ""
        return f"HTTP {self.status}{code}: {self.message}"


class AuthenticationError(APIError):
    """401: the API token is missing, wrong or revoked."""


class PermissionDeniedError(APIError):
    """403: the token may not use this assistant or endpoint."""


class NotFoundError(APIError):
    """404."""


class AssistantNotFoundError(NotFoundError):
    """error_code ASSISTANT_NOT_FOUND: no assistant with this id belongs to the account."""


class InsufficientBalanceError(APIError):
    """error_code INSUFFICIENT_BALANCE: the account has run out of credit."""


class UnprocessableEntityError(APIError):
    """422: the server's validation refused the request; ``errors`` maps field -> messages."""

    @property
    def errors(self) -> dict[str, list[str]]:
        body = self.body
        raw = body.get("errors") if isinstance(body, dict) else None
        if not isinstance(raw, dict):
            return {}
        return {
            str(field): [str(m) for m in msgs] if isinstance(msgs, list) else [str(msgs)]
            for field, msgs in raw.items()
        }


class RateLimitError(APIError):
    """429 received and not retried further; ``retry_after`` is in seconds (or None)."""


class InternalServerError(APIError):
    """5xx."""


class APIResponseValidationError(APIError):
    """A 2xx whose body is not a valid reply (not JSON, a missing or mistyped field)."""
