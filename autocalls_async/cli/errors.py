"""What an SDK error becomes on the command line: an exit code, and one line with a hint."""

from __future__ import annotations

import attrs

from .._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    AssistantNotFoundError,
    AuthenticationError,
    AutocallsError,
    BudgetExceededError,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RateLimitTimeout,
    UnprocessableEntityError,
)
from .._wire import DEFAULT_BASE_URL
from ..bulk import BulkResult, error_code
from .exits import (
    EXIT_AUTH,
    EXIT_BALANCE,
    EXIT_FAILED,
    EXIT_MAX_REPLIES,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_RATE_LIMITED,
    EXIT_SERVER,
    EXIT_USAGE,
)
from .output import PROG, duration, in_cli_words, printable

__all__ = ["cli_result", "describe", "exit_code_for", "hint_for"]


def exit_code_for(error: AutocallsError) -> int:
    """The documented exit code of ``reply`` for an error."""
    if isinstance(error, InvalidRequestError):
        return EXIT_USAGE
    if isinstance(error, AuthenticationError | PermissionDeniedError):
        return EXIT_AUTH
    if isinstance(error, AssistantNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, NotFoundError):  # a route the server does not have: a wrong base URL
        return EXIT_USAGE
    if isinstance(error, InsufficientBalanceError):
        return EXIT_BALANCE
    if isinstance(error, BudgetExceededError):
        return EXIT_MAX_REPLIES
    if isinstance(error, RateLimitError | RateLimitTimeout):
        return EXIT_RATE_LIMITED
    if isinstance(error, APIConnectionError):
        return EXIT_NETWORK
    if isinstance(error, InternalServerError | APIResponseValidationError):
        return EXIT_SERVER
    return EXIT_FAILED


#: Where the command's token came from, as a 401's hint names it (set by ``main``).
token_source = "AUTOCALLS_API_TOKEN"


def hint_for(error: AutocallsError) -> str:
    if isinstance(error, AssistantNotFoundError):
        return "check --assistant-id: the assistant must belong to the account of this token"
    if isinstance(error, NotFoundError):
        return (
            "check --base-url / AUTOCALLS_BASE_URL: it should be the API's root, like "
            f"{DEFAULT_BASE_URL} (not the site's root, not the whole endpoint)"
        )
    if isinstance(error, AuthenticationError):
        return f"check {token_source} (copy the token again from the Autocalls dashboard)"
    if isinstance(error, PermissionDeniedError):
        return "this token may not use this assistant or endpoint"
    if isinstance(error, InsufficientBalanceError):
        return "top up the account's balance in the Autocalls dashboard"
    if isinstance(error, BudgetExceededError):
        return "raise --max-replies, or run the same command again to send the rest"
    if isinstance(error, RateLimitError):
        if error.retry_after is not None:
            return (
                f"the service asks to wait {duration(error.retry_after)} (Retry-After) before "
                "the next request with this token; try again then"
            )
        return "the token's limit is used up; try again in a minute"
    if isinstance(error, RateLimitTimeout):
        return "no slot of the token's limit was free in time; raise --max-wait, or try later"
    if isinstance(error, APIConnectionError):
        return "check --base-url / AUTOCALLS_BASE_URL and the network; raise --timeout if slow"
    if isinstance(error, APIError) and error.status == 413:
        return (
            "the server refuses requests this big: shorten the message or the variables "
            "(--max-request-bytes N, at the server's limit, refuses them before sending)"
        )
    if isinstance(error, UnprocessableEntityError):
        return "the service refused the request's fields"
    if isinstance(error, InternalServerError | APIResponseValidationError):
        return "the service failed; try again later (the message may have been processed)"
    if isinstance(error, InvalidRequestError):
        return f"see `{PROG} --help`"
    return "see the message above"


def describe(error: AutocallsError) -> str:
    """One line: the error code, the status, the message and a hint; never a traceback."""
    status = f" (HTTP {error.status})" if isinstance(error, APIError) else ""
    message = error.message if isinstance(error, APIError) else str(error)
    message = printable(in_cli_words(" ".join(message.split())))
    return f"{PROG}: {error_code(error)}{status}: {message}; hint: {hint_for(error)}"


def cli_result(result: BulkResult) -> BulkResult:
    """A bulk row's result as OUT says it: an invalid row's message in the CLI's words."""
    error = result.error
    if isinstance(error, InvalidRequestError):
        text = in_cli_words(str(error))
        if text != str(error):
            return attrs.evolve(result, error=InvalidRequestError(text))
    return result
