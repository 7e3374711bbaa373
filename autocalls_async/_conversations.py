"""The conversation cache: (assistant_id, customer_identifier) -> what the server last told us.

The service keeps the conversation; the SDK only remembers its id, so that an app can show it or
link to it. ``ConversationStore`` is the small protocol a shared backend (Redis) plugs into; the
client always keeps a bounded in-memory LRU near cache, so ``client.conversation_id()`` stays a
plain synchronous lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol, runtime_checkable

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
