"""autocalls-async: the asyncio-native SDK for the Autocalls "generate AI reply" API.

>>> async with AsyncAutocalls() as client:              # token from AUTOCALLS_API_TOKEN
...     reply = await client.generate_reply(
...         assistant_id=123, customer_identifier="+14155551234", message="Hi"
...     )
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._accounts import AutocallsAccounts
from ._budget import AssistantUsage, Budget, Usage
from ._client import AsyncAutocalls, ClientStats
from ._conversations import ConversationStore, MemoryConversationStore
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
from ._models import Conversation, FunctionCall, Priority, RateLimit, Reply
from ._ratelimit import HostRateLimiter, LocalRateLimiter, RateLimiter, Slot
from ._retry import RetryPolicy
from ._version import __version__

if TYPE_CHECKING:  # for type checkers; at run time they load lazily, see __getattr__
    from ._redis import RedisConversationStore as RedisConversationStore
    from ._redis import RedisRateLimiter as RedisRateLimiter

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APITimeoutError",
    "AssistantNotFoundError",
    "AssistantUsage",
    "AsyncAutocalls",
    "AuthenticationError",
    "AutocallsAccounts",
    "AutocallsError",
    "Budget",
    "BudgetExceededError",
    "ClientClosedError",
    "ClientStats",
    "Conversation",
    "ConversationStore",
    "FunctionCall",
    "HostRateLimiter",
    "InsufficientBalanceError",
    "InternalServerError",
    "InvalidRequestError",
    "LimiterUnavailableError",
    "LocalRateLimiter",
    "MemoryConversationStore",
    "NotFoundError",
    "PermissionDeniedError",
    "Priority",
    "RateLimit",
    "RateLimitError",
    "RateLimitTimeout",
    "RateLimiter",
    "Reply",
    "RetryPolicy",
    "Slot",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
]

_REDIS_NAMES = frozenset({"RedisConversationStore", "RedisRateLimiter"})


def __getattr__(name: str) -> object:
    # The Redis backends live behind the `redis` extra: import redis-py only when asked for.
    if name in _REDIS_NAMES:
        try:
            from . import _redis
        except ImportError as exc:  # pragma: no cover - only without the extra
            raise ImportError(
                f"{name} needs the redis extra: pip install 'autocalls-async[redis]'"
            ) from exc
        return getattr(_redis, name)
    raise AttributeError(f"module 'autocalls_async' has no attribute {name!r}")
