"""What the data means (issue 21): notes the dry run and the run print about an input.

* Columns the run does not send (``customer_name`` without ``--vars-from-columns``: replies
  then said "Hi there!"), with the flag that sends them. Extra columns stay opt-in: making them
  variables by default would change every row's content key, and a rerun after an upgrade
  would refuse every OUT written before.
* Identical rows (same assistant, customer, message, variables): each is sent, as two rows;
  named, with the way to send them once.
* Identifiers that look like one phone number written differently (``+1 (415) 555-1234``,
  ``415-555-1234``): the service keeps one conversation per spelling; ``--e164`` writes them
  one way. With ``--e164``, the spellings are compared as they are sent: those that still
  differ are named, and so are the identifiers with a phone number in them that ``--e164``
  did not write in E.164 (refused: an extension, a label, scientific notation; or left as
  written: not read as a phone number), row by row.

Memory: a few digests and row numbers, and a ``KeyTable`` slot (12 bytes, at most 70 % of
them used) per distinct phone number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs

from ._keys import KeyTable
from .bulk import BulkRequest

__all__ = ["DataNotes", "phone_like"]

GROUPS_SHOWN: Final = 5
COLUMNS_SHOWN: Final = 10
ROWS_SHOWN: Final = 10
#: A phone number as people write it: digits, spaces, dots, dashes, slashes, parentheses and
#: a leading +; at least 7 digits.
_PHONE: Final = re.compile(r"^\+?[\d\s().\-/]+$")
_DIGITS: Final = re.compile(r"\d")
_NOT_DIGITS: Final = re.compile(r"\D")
#: A phone number inside an identifier: 7 digits or more, with phone punctuation between them.
_NUMBER_IN: Final = re.compile(r"\d(?:[\s().\-/]*\d){6,}")


def phone_like(identifier: str) -> bool:
    """True for an identifier written like a phone number, not an e-mail nor a CRM id: only
    digits and phone punctuation, and either a leading +, some punctuation (``555-12``,
    ``(415) 555 1234``) or at least 7 digits. A short bare number (``12345``) is taken for a
    CRM id."""
    text = identifier.strip()
    if not _PHONE.match(text) or not _DIGITS.search(text):
        return False
    return text.startswith("+") or not text.isdigit() or len(text) >= 7


def has_number(identifier: str) -> bool:
    """Whether an identifier holds a phone number (7 digits or more, with phone punctuation
    between them), not an e-mail address."""
    return "@" not in identifier and _NUMBER_IN.search(identifier) is not None


def _tail(identifier: str) -> str:
    """The last 10 digits: what two spellings of one national number share."""
    return _NOT_DIGITS.sub("", identifier)[-10:]


def _phone_tail(identifier: str) -> str | None:
    """The last digits of a phone-like identifier with at least 7 of them (None: another
    identifier). A number written as bare digits, with or without a leading +, is read
    without a regular expression (a million-row input)."""
    digits = identifier[1:] if identifier.startswith("+") else identifier
    if digits.isdecimal():  # what \d matches: phone_like, once long enough
        return digits[-10:] if len(digits) >= 7 else None
    if not phone_like(identifier):
        return None
    tail = _tail(identifier)
    return tail if len(tail) >= 7 else None


def _row_name(request: BulkRequest) -> str:
    from .bulk import _name

    return _name(request)


def _spelled_tail(customer: str) -> str | None:
    """``_phone_tail``, or the last digits of a phone number inside an identifier (``415.555.1234
    mobile``, sent as written by ``--e164``)."""
    tail = _phone_tail(customer)
    if tail is None and has_number(customer):
        tail = _tail(customer)
    return tail


#: A phone's entry in ``DataNotes.phones``: this bit once a second spelling was seen, and the
#: hash of its first spelling in the others.
_MERGED: Final = 1 << 31


def _phone_number(tail: str) -> int:
    """A phone's last digits as a ``KeyTable`` number (their count kept: ``0012345`` is not
    ``12345``)."""
    return int(tail) << 4 | len(tail)


@attrs.define
class DataNotes:
    """Collects, row by row (``add``), what to tell about the input; ``find_rows`` then names
    the rows and spellings of the first few findings, in a second pass, only when there are
    some."""

    unused_columns: tuple[str, ...] = ()
    #: Columns sent as variables (``--vars-from-columns``), as the header spells them
    variable_columns: tuple[str, ...] = ()
    #: Columns without a name in the header that hold values (named ``column_N``): never sent
    unnamed_columns: tuple[str, ...] = ()
    #: digest -> rows with that content (only digests seen at least twice, a few of them)
    identical: dict[int, list[int]] = attrs.Factory(dict)
    identical_groups: int = 0  #: contents seen more than once
    identical_rows: int = 0  #: rows that are a copy of an earlier row
    #: Each phone-like identifier's last digits (``_phone_number``) -> ``_MERGED`` | the hash
    #: of its first spelling: 17 to 34 bytes per number.
    phones: KeyTable = attrs.Factory(lambda: KeyTable(0, "I"))
    merged: int = 0  #: numbers written in more than one way
    #: the first few of them (``_phone_number``) -> their spellings, named by ``find_rows``
    spellings: dict[int, list[str]] = attrs.Factory(dict)
    #: ``--e164``: the spellings are compared as sent; phone numbers it cannot write are noted
    normalize: Callable[[str], str] | None = None
    unwritten: int = 0  #: identifiers with a phone number --e164 did not write in E.164
    #: the first of them: (row, identifier, refused: INVALID_ROW, else sent as written)
    unwritten_rows: list[tuple[str, str, bool]] = attrs.Factory(list)
    #: how notes name a row (``row 7``)
    name: Callable[[BulkRequest], str] = lambda request: f"row {_row_name(request)}"

    def _sent(self, request: BulkRequest) -> str | None:
        """The identifier as ``--e164`` sends it (None: refused); notes an identifier with a
        phone number in it that it does not write in E.164."""
        customer = request.customer_identifier
        assert self.normalize is not None
        if not any(c.isdigit() for c in customer):
            return customer  # an e-mail, a name: no phone number to write
        try:
            sent = self.normalize(customer)
        except Exception:
            refused = True
            sent = None
        else:
            refused = False
            if sent != customer or phone_like(customer) or not has_number(customer):
                return sent
        if refused and not has_number(customer) and not phone_like(customer):
            return None
        self.unwritten += 1
        if len(self.unwritten_rows) < ROWS_SHOWN:
            self.unwritten_rows.append((self.name(request), customer, refused))
        return sent

    def add(self, request: BulkRequest, digest: int, occurrence: int) -> None:
        """Note one row, by its key's digest and occurrence (``InputFile.check`` calls it)."""
        if self.normalize is None:
            self.note(request.customer_identifier, request.problem is None, digest, occurrence)
            return
        if occurrence != 1 and request.problem is None:
            self._identical(digest, occurrence)
        customer: str | None = request.customer_identifier
        if request.problem is None:
            customer = self._sent(request)
            if customer is None:
                return  # refused: never sent, no conversation
        tail = _spelled_tail(customer) if request.problem is None and customer else None
        if tail is not None and customer is not None:
            self._phone(_phone_number(tail), customer)

    def _identical(self, digest: int, occurrence: int) -> None:
        self.identical_rows += 1
        if occurrence == 2:
            self.identical_groups += 1
            if len(self.identical) < GROUPS_SHOWN:
                self.identical[digest] = []

    def note(self, customer: str, valid: bool, digest: int, occurrence: int) -> None:
        """``add`` without ``normalize`` (--e164), given the row's customer and whether it is
        valid (has no problem): ``InputFile.check`` calls it without making a request of the
        usual row."""
        if not valid:
            return
        if occurrence != 1:
            self._identical(digest, occurrence)
        if not customer:
            return
        digits = customer[1:] if customer[:1] == "+" else customer
        if digits.isdecimal():  # _spelled_tail, inline: once a row
            tail = digits[-10:] if len(digits) >= 7 else None
        else:
            tail = _spelled_tail(customer)
        if tail is not None:
            self._phone(int(tail) << 4 | len(tail), customer)  # _phone_number, inline

    def _phone(self, number: int, customer: str) -> None:
        """Note a phone number (``_phone_number``) as ``customer`` spells it."""
        spelling = hash(customer) & (_MERGED - 1)
        phones = self.phones
        numbers, mask = phones.numbers, phones.mask
        i = number & mask
        while (found := numbers[i]) and found != number:  # phones.slot, inline
            i = (i + 1) & mask
        if not found:
            phones.put(i, number, spelling)
            return
        first = phones.values[i]
        if not first & _MERGED and first != spelling:
            phones.values[i] = first | _MERGED
            self.merged += 1
            if len(self.spellings) < GROUPS_SHOWN:
                self.spellings[number] = []

    def state(self) -> dict[str, Any]:
        """What ``add`` found, as JSON, for OUT's index (``restore`` takes it back): the
        counts, and the digests and numbers of the findings shown. Not the phone table,
        which only ``add`` reads."""
        return {
            "identical": list(self.identical),
            "identical_groups": self.identical_groups,
            "identical_rows": self.identical_rows,
            "merged": self.merged,
            "spellings": list(self.spellings),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what ``state`` said ``add`` found (``find_rows`` may then follow)."""
        self.identical = {int(digest): [] for digest in state["identical"]}
        self.identical_groups = int(state["identical_groups"])
        self.identical_rows = int(state["identical_rows"])
        self.merged = int(state["merged"])
        self.spellings = {int(number): [] for number in state["spellings"]}

    def find_rows(
        self, rows: Iterable[tuple[BulkRequest, int, int]], *, phones: bool = True
    ) -> None:
        """Name the rows of the identical contents shown, and (``phones``: they will be
        shown) the spellings of the phone numbers shown: a second pass, only when there are
        some."""
        if not phones:
            self.spellings.clear()
        normalize = self.normalize
        if not self.identical and not self.spellings:
            return
        for request, digest, _ in rows:  # InputFile.numbered()
            group = self.identical.get(digest)
            if group is not None and len(group) < ROWS_SHOWN:
                group.append(request.sheet_row or request.row or 0)
            customer = request.customer_identifier
            if normalize is not None and self.spellings and request.problem is None:
                try:
                    customer = normalize(customer)
                except Exception:
                    continue
            tail = _spelled_tail(customer) if self.spellings and request.problem is None else None
            if tail is not None:
                spellings = self.spellings.get(_phone_number(tail))
                if spellings is not None and customer not in spellings and len(spellings) < 5:
                    spellings.append(customer)

    def lines(self, *, e164: bool) -> list[str]:
        notes: list[str] = []
        if self.unused_columns:
            names = _shown(self.unused_columns)
            notes.append(
                f"column(s) not sent: {names}; add "
                "--vars-from-columns to send them as variables (e.g. {customer_name} in the "
                "assistant's prompt)"
            )
        if self.variable_columns:
            names = _shown(self.variable_columns)
            notes.append(
                f"column(s) sent as variables: {names} (named as the header spells them, e.g. "
                f"{{{self.variable_columns[0]}}} in the assistant's prompt; where a row's "
                "variables cell has a variable of the same name, the variables cell wins)"
            )
        if self.unnamed_columns:
            notes.append(
                f"column(s) without a name in the header hold values: "
                f"{', '.join(self.unnamed_columns[:COLUMNS_SHOWN])} (their position; results "
                "show them so); never sent: give them a name in the header to send them as "
                "variables with --vars-from-columns"
            )
        if self.identical_groups:
            groups = "; ".join(
                "rows " + ", ".join(map(str, rows)) for rows in self.identical.values() if rows
            )
            more = self.identical_groups - len(self.identical)
            notes.append(
                f"{self.identical_rows} identical row(s) (same assistant, customer, message "
                f"and variables), each sent as its own row: {groups}"
                + (f"; and {more} more group(s)" if more > 0 else "")
                + ". To send such a message once, delete its copies"
            )
        if self.merged:
            shown = "; ".join(
                " = ".join(spellings) for spellings in self.spellings.values() if spellings
            )
            notes.append(
                f"{self.merged} phone number(s) written in several ways"
                + (", still after --e164" if e164 else "")
                + f", each way its own conversation: {shown}"
                + (f"; and {self.merged - GROUPS_SHOWN} more" if self.merged > GROUPS_SHOWN else "")
                + (
                    ". Write each customer's number alone, one way, in the input"
                    if e164
                    else ". Add --e164 REGION (e.g. --e164 US) to write them one way"
                )
            )
        if self.unwritten:
            rows = ", ".join(
                f"{row} {customer!r} ("
                + ("INVALID_ROW, never sent" if refused else "sent as written")
                + ")"
                for row, customer, refused in self.unwritten_rows
            )
            more = self.unwritten - len(self.unwritten_rows)
            notes.append(
                f"{self.unwritten} identifier(s) hold a phone number that --e164 did not write "
                f"in E.164: {rows}"
                + (f"; and {more} more" if more > 0 else "")
                + ". Keep only the number in the column (an extension or a label in a column "
                "of its own; Excel's numbers formatted as Text): a row sent as written is a "
                "conversation apart from the number's"
            )
        return notes


def _shown(columns: tuple[str, ...]) -> str:
    """The first ``COLUMNS_SHOWN`` names, and how many more."""
    names = ", ".join(columns[:COLUMNS_SHOWN])
    if len(columns) > COLUMNS_SHOWN:
        names += f" and {len(columns) - COLUMNS_SHOWN} more"
    return names
