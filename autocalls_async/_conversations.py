"""The conversation cache: (assistant_id, customer_identifier) -> what the server last told us.

The service keeps the conversation; the SDK only remembers its id, so that an app can show it or
link to it. ``ConversationStore`` is the small protocol a shared backend (Redis) plugs into; the
client always keeps a bounded in-memory LRU near cache, so ``client.conversation_id()`` stays a
plain synchronous lookup.

The store is a cache: the client gives each of its reads and writes a bound (``GuardedStore``),
and a store that fails or has not answered by then is a miss (a write is skipped), logged
once per outage, so a reply the service processed is never held back nor turned into an error.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol, runtime_checkable

from ._log import logger
from ._models import Conversation

__all__ = ["ConversationStore", "MemoryConversationStore"]

ConversationKey = tuple[int, str]


@runtime_checkable
class ConversationStore(Protocol):
    """Where conversations are remembered. Methods are async so a network store can plug in."""

    async def get(self, assistant_id: int, customer_identifier: str) -> Conversation | None: ...

    async def set(self, conversation: Conversation) -> None: ...


class MemoryConversationStore:
    """A bounded least-recently-used map; the default store, also the client's near cache."""

    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int = 100_000) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, assistant_id: int, customer_identifier: str) -> Conversation | None:
        """The cached conversation, without waiting (marks it recently used)."""
        return self.peek_key((assistant_id, customer_identifier))

    def put(self, conversation: Conversation) -> None:
        self.put_key((conversation.assistant_id, conversation.customer_identifier), conversation)

    def peek_key(self, key: Hashable) -> Conversation | None:
        """``peek`` by a key of the caller's: an ``AutocallsAccounts`` keeps every token's
        conversations in one cache, each under (its token's key, assistant, customer)."""
        conversation = self._entries.get(key)
        if conversation is not None:
            self._entries.move_to_end(key)
        return conversation

    def put_key(self, key: Hashable, conversation: Conversation) -> None:
        self._entries[key] = conversation
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    async def get(self, assistant_id: int, customer_identifier: str) -> Conversation | None:
        return self.peek(assistant_id, customer_identifier)

    async def set(self, conversation: Conversation) -> None:
        self.put(conversation)


#: Seconds the client gives a conversation store's ``get`` or ``set`` when the store has no
#: ``timeout`` of its own. One that has (``RedisConversationStore``) bounds its operations
#: itself, and logs why: the client then waits ``timeout`` plus this margin, a backstop.
STORE_WAIT = 1.0
_MARGIN = 0.5


class GuardedStore:
    """The client's side of a ``ConversationStore``: each read and write within ``bound``
    seconds; past it, or when the store raises, a read is a miss and a write is skipped,
    logged once per outage (a WARNING, and an INFO when it answers again)."""

    __slots__ = ("_failing", "bound", "store")

    def __init__(self, store: ConversationStore) -> None:
        self.store = store
        timeout = getattr(store, "timeout", None)
        if (
            isinstance(timeout, int | float)
            and not isinstance(timeout, bool)
            and math.isfinite(timeout)
            and timeout > 0
        ):
            self.bound = float(timeout) + _MARGIN
        else:
            self.bound = STORE_WAIT
        self._failing = False

    def __repr__(self) -> str:
        return repr(self.store)

    async def get(
        self, assistant_id: int, customer_identifier: str, wait: float | None = None
    ) -> Conversation | None:
        """The stored conversation, or None: also past ``wait`` (the caller's ``max_wait``)."""
        bound = self.bound if wait is None else max(0.0, min(self.bound, wait))
        try:
            async with asyncio.timeout(bound):
                conversation = await self.store.get(assistant_id, customer_identifier)
        except TimeoutError as exc:
            if bound < self.bound:  # the caller's deadline, not the store's failure
                logger.debug("conversation store %r: no answer within max_wait: a miss", self)
                return None
            self._failed("reading", exc)
            return None
        except Exception as exc:
            self._failed("reading", exc)
            return None
        self._answered()
        return conversation

    async def set(self, conversation: Conversation) -> None:
        try:
            async with asyncio.timeout(self.bound):
                await self.store.set(conversation)
        except Exception as exc:  # the reply was received and paid for: never lose it for a cache
            self._failed("writing", exc)
            return
        self._answered()

    def _failed(self, what: str, exc: Exception) -> None:
        action = "read the conversation from" if what == "reading" else "save the conversation to"
        if self._failing:
            logger.debug("could not %s %r: %r", action, self, exc)
            return
        self._failing = True
        logger.warning(
            "could not %s %r (%s): it reads as a miss and writes are skipped, replies are not "
            "affected; logged once until the store answers again",
            action,
            self,
            f"no answer within {self.bound:g}s" if isinstance(exc, TimeoutError) else repr(exc),
            exc_info=None if isinstance(exc, TimeoutError) else exc,
        )

    def _answered(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("conversation store %r answers again", self)
