"""What changed in a row since OUT recorded it (issue 21, findings 10 and 11).

OUT keeps a row's content as a digest (its ``key``), never its message: the earlier text
cannot be shown. What can be told is whether one of the edits a spreadsheet program makes
without anyone seeing it explains the change: the row's content with that edit undone is
hashed, and compared with the digest OUT holds. An edit nobody sees (line endings re-saved as
CRLF, a space at the end, another Unicode form, a no-break space) is named; any other change
is said to be a change of the message or variables.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator
from typing import Final

import attrs

from .bulk import BulkRequest

__all__ = ["explain", "key_digest"]


def key_digest(key: str | None) -> int | None:
    """The content digest of a key of OUT (``<16 hex digits>.<occurrence>``); None for
    another shape."""
    if key is None:
        return None
    head = key.split(".", 1)[0]
    if len(head) != 16:
        return None
    try:
        return int(head, 16)
    except ValueError:
        return None


def _endings_lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _endings_crlf(text: str) -> str:
    return _endings_lf(text).replace("\n", "\r\n")


#: Invisible edits, each as a way to undo it and what to say of it.
_EDITS: Final[tuple[tuple[Callable[[str], str], str], ...]] = (
    (
        _endings_lf,
        "the line endings inside its message differ (LF then, CRLF now: the sheet was saved "
        "again by a program that writes Windows line endings); the text is the same",
    ),
    (
        _endings_crlf,
        "the line endings inside its message differ (CRLF then, LF now: the sheet was saved "
        "again by another program); the text is the same",
    ),
    (str.strip, "spaces or line breaks at the start or end of its message differ"),
    (str.rstrip, "spaces or line breaks at the end of its message differ"),
    (
        lambda text: unicodedata.normalize("NFC", text),
        "its message is the same text in another Unicode form (accents written as two "
        "characters, NFD, now; as one, NFC, then)",
    ),
    (
        lambda text: unicodedata.normalize("NFD", text),
        "its message is the same text in another Unicode form (accents written as one "
        "character, NFC, now; as two, NFD, then)",
    ),
    (
        lambda text: text.replace("\u00a0", " "),
        "its message has no-break spaces (U+00A0) where it had plain spaces",
    ),
)


def _variants(message: str) -> Iterator[tuple[str, str]]:
    for undo, said in _EDITS:
        changed = undo(message)
        if changed != message:
            yield changed, said


def explain(key: str | None, request: BulkRequest) -> str | None:
    """What an invisible edit of ``request`` since OUT recorded ``key`` was, if one explains
    the change (None: none does; the message or variables changed)."""
    from ._bulkio import content_number

    digest = key_digest(key)
    if digest is None:
        return None
    for message, said in _variants(request.message):
        if content_number(attrs.evolve(request, message=message)) == digest:
            return said
    if (
        request.variables is not None
        and content_number(attrs.evolve(request, variables=None)) == digest
    ):
        return "it has variables now that it did not have then"
    return None


def difference(key: str | None, request: BulkRequest) -> str:
    """``explain``, or the plain statement when no invisible edit explains the change."""
    return explain(key, request) or (
        "its message or variables differ (OUT keeps a digest of a row's content, not its "
        "text, so the earlier text cannot be shown)"
    )
