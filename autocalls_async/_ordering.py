"""Per-conversation ordering: calls for one (assistant, customer) reach the server one at a
time, in the order they were made; other conversations are not held up.

A key's gate exists only while some call for it is running or waiting, so nothing is left
behind for the thousands of customers a bulk job touches.
"""

from __future__ import annotations

from collections.abc import Hashable

from ._ratelimit import FifoGate

__all__ = ["KeyedOrder"]


class _Entry:
    __slots__ = ("gate", "users")

    def __init__(self) -> None:
        #: Made when a second call for the key arrives; until then the first holds the key.
        self.gate: FifoGate | None = None
        self.users = 1


class KeyedOrder:
    __slots__ = ("_entries",)

    def __init__(self) -> None:
        #: key -> its entry, or None while one call holds it and none waits (the usual case:
        #: no object made per call)
        self._entries: dict[Hashable, _Entry | None] = {}

    def __len__(self) -> int:
        """Keys with a running or waiting call (0 when idle: nothing is left behind)."""
        return len(self._entries)

    def try_acquire(self, key: Hashable) -> bool:
        """Take the turn of ``key`` now if no call has it (the usual case), without waiting;
        False: ``acquire`` waits for it. Every success must be paired with release()."""
        if key in self._entries:
            return False
        self._entries[key] = None
        return True

    async def acquire(self, key: Hashable) -> None:
        """Wait for the turn of ``key``; every successful call must be paired with release()."""
        entries = self._entries
        if key not in entries:
            entries[key] = None
            return
        entry = entries[key]
        if entry is None:  # held by one call: an entry now counts it and this one
            entry = entries[key] = _Entry()
        entry.users += 1
        try:
            gate = entry.gate
            if gate is None:
                # A new gate is free: taken at once, for the call that holds the key now,
                # whose release() hands it on.
                gate = entry.gate = FifoGate()
                await gate.acquire()
            await gate.acquire()
        except BaseException:
            self._leave(key, entry)
            raise

    def release(self, key: Hashable) -> None:
        entry = self._entries[key]
        if entry is None:  # nobody waits
            del self._entries[key]
            return
        if entry.gate is not None:
            entry.gate.release()
        self._leave(key, entry)

    def _leave(self, key: Hashable, entry: _Entry) -> None:
        entry.users -= 1
        if not entry.users:
            del self._entries[key]
