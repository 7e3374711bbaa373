"""Order after an uncertain row (issue 21): a conversation waits behind a row that may have
been processed.

A row that an earlier run may have had processed (cut off on the wire, a 5xx, a timeout) is
not sent again unless asked (``--retry-unsafe-failed``). Sending that customer's later rows
meanwhile would put the conversation out of order if the row is then resent. So on resume
the later rows of its conversation (same assistant, same customer) are held: reported, not
sent, and left for a later run, until the row is resolved: resent (``--retry-unsafe-failed``,
which sends it first, in input order) or given up (``--give-up-uncertain``, which sends the
rows behind it and never that row).

Memory: one entry per conversation with an uncertain row, not per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

import attrs

from .bulk import BulkRequest

__all__ = ["HELD_SHOWN", "Hold"]

#: The summary names this many held rows, then counts the rest.
HELD_SHOWN: Final = 5


def _name(request: BulkRequest) -> str:
    from .bulk import _name as name

    return f"row {name(request)}"


@attrs.define
class Hold:
    """Conversations behind an uncertain row, and the rows held behind them."""

    normalize: Callable[[str], str] | None = None
    #: conversation -> the uncertain row it waits behind (its name)
    blocked: dict[tuple[int, str], str] = attrs.Factory(dict)
    held: int = 0
    shown: list[str] = attrs.Factory(list)  #: the first held rows, described

    def _conversation(self, request: BulkRequest) -> tuple[int, str]:
        customer = request.customer_identifier
        if self.normalize is not None:
            with contextlib.suppress(Exception):  # it fails later, named, as INVALID_ROW
                customer = self.normalize(customer)
        return request.assistant_id, customer

    def uncertain(self, request: BulkRequest) -> None:
        """This row may have been processed and is not sent: its conversation waits."""
        if request.problem is None:
            self.blocked.setdefault(self._conversation(request), _name(request))

    def holds(self, request: BulkRequest) -> bool:
        """True (and counted) when the row must wait behind an uncertain row."""
        if not self.blocked or request.problem is not None:
            return False
        behind = self.blocked.get(self._conversation(request))
        if behind is None:
            return False
        self.held += 1
        if len(self.shown) < HELD_SHOWN:
            self.shown.append(
                f"{_name(request)} (customer {request.customer_identifier}) waits behind {behind}"
            )
        return True

    def report(self) -> list[str]:
        """The summary's lines about held rows (none if none was held)."""
        if not self.held:
            return []
        lines = [
            f"{self.held} row(s) held, not sent: an earlier row of the same conversation may "
            "have been processed, and sending later ones first would put the conversation out "
            "of order:"
        ]
        lines.extend(f"  {text}" for text in self.shown)
        if self.held > len(self.shown):
            lines.append(f"  ... and {self.held - len(self.shown)} more (see them all: results)")
        lines.append(
            "  Check those conversations, then run again with --retry-unsafe-failed (sends the "
            "uncertain row again, then the rows behind it) or --give-up-uncertain (never sends "
            "it; sends the rows behind it)."
        )
        return lines
