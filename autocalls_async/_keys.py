"""Row identities as compact integers (issue 21 item 8: resuming on a million-row OUT).

A row's key in OUT is ``<16 hex digits>.<occurrence>``: the 8-byte digest of its content and
which of the rows with that content it is. A run holds one key per row it reads, twice over (the
rows of OUT, and the contents of the input seen so far); as strings in dicts and sets that is
about 250 bytes a row. Here a key is one 64-bit integer (``key_number``) in an open-addressing
table of machine words (``KeyTable``): 8 bytes a slot, at most 70 % of the slots used, plus
what the caller keeps beside each slot (a state byte, a count). No Python object per row.

Two keys share a number only if their digests collide, which the 8-byte digests of the key
itself already risk (a chance of about 1 in 2**64 per pair).
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Iterator
from typing import Final

__all__ = ["KeyTable", "key_number", "number_of"]

_MASK: Final = (1 << 64) - 1
#: An odd constant that spreads the occurrence over the word (the golden ratio, 2**64 / phi).
_SPREAD: Final = 0x9E3779B97F4A7C15
#: The fraction of a table's slots in use before it doubles.
_LOAD: Final = 0.7
_KEY: Final = re.compile(r"([0-9a-f]{16})\.([1-9][0-9]{0,9})")


def number_of(digest: int, occurrence: int) -> int:
    """The number of the key ``<digest>.<occurrence>``: never 0 (0 marks an empty slot)."""
    number = digest if occurrence == 1 else (digest ^ (occurrence * _SPREAD)) & _MASK
    return number or 1


def key_number(key: str) -> int:
    """The number of a key as OUT writes it; a key of another shape (a test's, a hand-made
    line's) gets the first 8 bytes of its own digest."""
    match = _KEY.fullmatch(key)
    if match is not None:
        return number_of(int(match.group(1), 16), int(match.group(2)))
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


class KeyTable:
    """A map of 64-bit numbers (never 0) to unsigned values, in two flat arrays.

    ``slot(number)`` finds the number's slot, or the empty slot where it goes (then
    ``numbers[i]`` is 0); ``put(i, number, value)`` fills that empty slot; ``values[i]`` may be
    changed in place. The arrays double once 70 % full (linear probing then looks at about
    two slots to find a number, six to miss one), so a slot found before a ``put`` is stale
    after it.
    """

    __slots__ = ("limit", "mask", "numbers", "size", "values")

    def __init__(self, expected: int = 0, typecode: str = "Q") -> None:
        capacity = 16
        while capacity * _LOAD < expected:
            capacity *= 2
        self.numbers = array("Q", bytes(8 * capacity))
        self.values = array(typecode, bytes(array(typecode).itemsize * capacity))
        self.mask = capacity - 1
        self.limit = int(capacity * _LOAD)  #: the size past which it doubles
        self.size = 0

    @classmethod
    def of(cls, numbers: array[int], values: array[int], size: int) -> KeyTable:
        """A table made of arrays another table held (``numbers``: a power of two of them,
        at least 16, ``size`` of them not 0; a value beside each)."""
        capacity = len(numbers)
        if capacity < 16 or capacity & (capacity - 1) or len(values) != capacity:
            raise ValueError("not the arrays of a KeyTable")
        table = cls.__new__(cls)
        table.numbers, table.values = numbers, values
        table.mask = capacity - 1
        table.limit = int(capacity * _LOAD)
        table.size = size
        return table

    def __len__(self) -> int:
        return self.size

    def slot(self, number: int) -> int:
        numbers, mask = self.numbers, self.mask
        i = number & mask
        while True:
            found = numbers[i]
            if found == number or not found:
                return i
            i = (i + 1) & mask

    def get(self, number: int) -> int | None:
        i = self.slot(number)
        return self.values[i] if self.numbers[i] else None

    def put(self, i: int, number: int, value: int) -> None:
        self.numbers[i] = number
        self.values[i] = value
        self.size += 1
        if self.size > self.limit:
            self._grow()

    def _grow(self) -> None:
        old_numbers, old_values = self.numbers, self.values
        capacity = 2 * len(old_numbers)
        self.numbers = numbers = array("Q", bytes(8 * capacity))
        self.values = values = array(old_values.typecode, bytes(old_values.itemsize * capacity))
        self.mask = mask = capacity - 1
        self.limit = int(capacity * _LOAD)
        for number, value in zip(old_numbers, old_values, strict=True):
            if number:
                i = number & mask
                while numbers[i]:
                    i = (i + 1) & mask
                numbers[i] = number
                values[i] = value

    def items(self) -> Iterator[tuple[int, int]]:
        """``(number, value)`` for every number in the table, in no particular order."""
        for number, value in zip(self.numbers, self.values, strict=True):
            if number:
                yield number, value
