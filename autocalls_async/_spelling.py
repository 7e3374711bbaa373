"""One customer, one spelling, across runs (issue 21, finding 7).

The service keeps a conversation per (assistant, customer identifier) and compares identifiers
as strings. A resume that spells a customer otherwise than the earlier run did (``--e164``
added, or dropped) sends the customer's later rows into a new conversation, without what was
said in the first. So, before anything is sent, every row this run would send is compared
with the lines of OUT that may have reached the service (answered, or maybe processed) for
the same customer: the same identifier as written, or, with ``--e164``, the same E.164
number. A customer OUT's lines sent under another spelling than this run would is refused
(``InputError``: nothing sent, exit 2), naming the rows and OUT's lines, with the command that
goes on in the old conversations and the flag that accepts the split
(``--allow-new-spelling``).

What a line was sent as is the ``sent_as`` field a run writes when it sent another spelling
than the row's own (``--e164``); a line without one was sent as its ``customer_identifier``.
Lines written before ``sent_as`` existed do not say: they are taken as sent as written, and
the refusal then says that an earlier ``--e164`` run makes it a false alarm.

Memory: a ``KeyTable`` slot (16 bytes, at most 70 % of them used) per spelling OUT sent to,
read only when it can matter (this run has ``--e164``, or OUT has a ``sent_as``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from ._keys import KeyTable

__all__ = ["Respelling", "check_spellings", "sent_spelling"]

#: A refusal names this many rows, and this many of OUT's lines for each.
ROWS_SHOWN: Final = 10
LINES_SHOWN: Final = 3
#: A KeyTable value for a customer OUT sent under several spellings.
_SEVERAL: Final = 0
_FIELD: Final = b'"sent_as"'


@attrs.frozen
class Respelling:
    """The command line's part: ``--allow-new-spelling``, and the command as run (to print
    the one that goes on)."""

    allow: bool = False
    argv: Sequence[str] = ()


def sent_spelling(normalize: Callable[[str], str] | None, customer: str) -> str | None:
    """What a row is sent as when that is not its own ``customer_identifier`` (None: as
    written, or it is refused, and then never sent)."""
    if normalize is None:
        return None
    try:
        sent = normalize(customer)
    except Exception:
        return None
    return sent if sent != customer else None


def _number(kind: str, assistant: object, text: str) -> int:
    data = f"{kind}\x00{assistant}\x00{text}".encode(errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest()) or 1


def _spelling(text: str) -> int:
    return _number("s", "", text) | 1  # never _SEVERAL


@attrs.define
class _Seen:
    """OUT's spellings: the customer as written, and (``--e164``) as normalised -> the
    spelling its lines were sent as (``_SEVERAL``: more than one)."""

    table: KeyTable = attrs.Factory(lambda: KeyTable(0, "Q"))

    def add(self, number: int, sent: int) -> None:
        table = self.table
        i = table.slot(number)
        if not table.numbers[i]:
            table.put(i, number, sent)
        elif table.values[i] != sent:
            table.values[i] = _SEVERAL

    def get(self, number: int) -> int | None:
        return self.table.get(number)


def _lines(out: Path) -> Any:
    """OUT's row lines: (line number, decoded object); unreadable lines are skipped (the
    ledger refused or accepted them already)."""
    with out.open("rb") as file:
        for number, line in enumerate(file, 1):
            if b'"customer_identifier"' not in line:
                continue
            with contextlib.suppress(ValueError, RecursionError):
                data = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
                if isinstance(data, dict):
                    yield number, data


def _reached(data: dict[str, Any], ledger: Any) -> bool:
    """Whether the row of this line may have reached the service: answered or uncertain."""
    key = data.get("key")
    if isinstance(key, str):
        state = ledger.state_of_key(key)
    else:
        entry = ledger.legacy.get(data.get("id"))
        state = None if entry is None else entry.state
    return state in ("answered", "uncertain")


def _has_field(out: Path) -> bool:
    with contextlib.suppress(OSError), out.open("rb") as file:
        tail = b""
        while chunk := file.read(1 << 20):
            if _FIELD in tail + chunk:
                return True
            tail = chunk[-len(_FIELD) :]
    return False


def check_spellings(
    source: Any,
    ledger: Any,
    out: Path,
    normalize: Callable[[str], str] | None,
    *,
    retry_failed: bool,
    retry_unsafe_failed: bool,
    respelling: Respelling,
    name: Callable[[Any], str],
) -> None:
    """Refuse (``InputError``) a run that would send a customer's rows under another
    spelling than OUT's lines for that customer were sent as; ``source`` checked against
    ``ledger`` already. ``name`` names a row as messages do."""
    from ._bulkio import InputError

    if respelling.allow or not len(ledger) or not out.exists():
        return
    if normalize is None and not _has_field(out):
        return  # every line was sent as written, as this run sends its rows

    def normalized(text: str) -> str | None:
        try:
            return normalize(text) if normalize is not None else None
        except Exception:
            return None

    cache: dict[str, str | None] = {}
    seen = _Seen()
    marked = False  # a line of OUT says what it was sent as
    with contextlib.suppress(OSError):
        for _, data in _lines(out):
            raw, assistant = data.get("customer_identifier"), data.get("assistant_id")
            if not isinstance(raw, str) or not _reached(data, ledger):
                continue
            sent = data.get("sent_as")
            marked = marked or isinstance(sent, str)
            spelling = _spelling(sent if isinstance(sent, str) else raw)
            seen.add(_number("r", assistant, raw), spelling)
            if normalize is not None:
                if raw not in cache:
                    if len(cache) > 65536:
                        cache.clear()
                    cache[raw] = normalized(raw)
                same = cache[raw]
                if same is not None:
                    seen.add(_number("n", assistant, same), spelling)
    if not len(seen.table):
        return
    split: list[tuple[Any, str, list[int]]] = []  # (row, sent now, the OUT numbers it met)
    rows = customers = 0
    counted: set[int] = set()
    for request, key in source.unanswered():
        if request.problem is not None:
            continue
        state = ledger.state_of(request, key)
        if (
            state == "answered"
            or (state == "failed" and not retry_failed)
            or (state == "uncertain" and not retry_unsafe_failed)
        ):
            continue
        raw, assistant = request.customer_identifier, request.assistant_id
        now = raw
        if normalize is not None:
            now = normalized(raw)
            if now is None:
                continue  # refused: it fails as INVALID_ROW, never sent
        spelling = _spelling(now)
        met = [_number("r", assistant, raw)]
        if normalize is not None:
            met.append(_number("n", assistant, now))
        if any(seen.get(n) not in (None, spelling) for n in met):
            rows += 1
            customer = _number("c", assistant, now)
            if customer not in counted:
                customers += 1
                counted.add(customer)
            if len(split) < ROWS_SHOWN:
                split.append((request, now, met))
    if split:
        raise InputError(
            _message(split, rows, customers, out, ledger, normalize, respelling, name, marked)
        )


def _message(
    split: list[tuple[Any, str, list[int]]],
    rows: int,
    customers: int,
    out: Path,
    ledger: Any,
    normalize: Callable[[str], str] | None,
    respelling: Respelling,
    name: Callable[[Any], str],
    marked: bool,
) -> str:
    wanted = {n for _, _, met in split for n in met}
    found: dict[int, list[str]] = {}
    regions: list[str] = []
    named: set[tuple[Any, tuple[int, ...]]] = set()
    with contextlib.suppress(OSError):
        for line, data in _lines(out):
            raw, assistant = data.get("customer_identifier"), data.get("assistant_id")
            if not isinstance(raw, str) or not _reached(data, ledger):
                continue
            sent = data.get("sent_as")
            numbers = [_number("r", assistant, raw)]
            if normalize is not None:
                with contextlib.suppress(Exception):
                    numbers.append(_number("n", assistant, normalize(raw)))
            row_id = data.get("id")
            if (row_id, tuple(numbers)) in named:
                continue  # the row's other line (its "sending" line, its answer)
            named.add((row_id, tuple(numbers)))
            said = f"line {line}: sent as {sent if isinstance(sent, str) else raw}"
            for number in numbers:
                if number in wanted:
                    lines = found.setdefault(number, [])
                    if len(lines) < LINES_SHOWN and said not in lines:
                        lines.append(said)
                    if isinstance(sent, str) and len(regions) < 1:
                        regions.extend(_region(sent))
    how = "in E.164, --e164" if normalize is not None else "as written, without --e164"
    lines = [
        f"{customers} customer(s) of this run were sent to before under another spelling than "
        f"this run would use ({how}): their {rows} row(s) would start a new conversation, "
        f"without what was said in the old one. Nothing was sent."
    ]
    for request, now, met in split:
        earlier: list[str] = []
        for number in met:
            for said in found.get(number, []):
                if said not in earlier:
                    earlier.append(said)
        lines.append(
            f"  {name(request)} (assistant {request.assistant_id}, customer "
            f"{request.customer_identifier}): would be sent as {now}; {out.name} "
            + "; ".join(earlier[:LINES_SHOWN])
        )
    if rows > len(split):
        lines.append(f"  ... and {rows - len(split)} more row(s)")
    if normalize is not None:
        lines.append(
            "  To go on in the conversations as they were spelled: run again without --e164:"
        )
        lines.append("    " + _command(respelling.argv, None))
        if not marked:
            lines.append(
                f"  (Unless {out.name} was written by a version before the one that records "
                "the spelling sent (sent_as) with --e164 too: then those rows went out as "
                "E.164 and nothing splits: add --allow-new-spelling.)"
            )
    else:
        region = regions[0] if regions else "REGION"
        lines.append(
            "  To go on in the conversations as they were spelled: run again with the --e164 "
            f"the earlier run had{'' if regions else ' (its region)'}:"
        )
        lines.append("    " + _command(respelling.argv, region))
    lines.append(
        "  To send these rows under this run's spelling anyway (each of those customers then "
        "has two conversations): add --allow-new-spelling"
    )
    return "\n".join(lines)


def _region(sent: str) -> list[str]:
    """The region of an E.164 number, to suggest --e164 REGION (none without the extra)."""
    try:
        import phonenumbers

        region = phonenumbers.region_code_for_number(phonenumbers.parse(sent, None))
    except Exception:
        return []
    return [region] if isinstance(region, str) and region.isalpha() else []


def _command(argv: Sequence[str], region: str | None) -> str:
    """The command as run, ``--e164`` taken out (``region`` None) or set; a token masked."""
    from .cli.output import PROG

    words: list[str] = []
    skip = False
    masked = False
    for word in argv:
        if skip:
            skip = False
            continue
        if masked:
            words.append("***")
            masked = False
            continue
        if word == "--e164":
            skip = True
            continue
        if word.startswith("--e164="):
            continue
        if word == "--token":
            masked = True
        elif word.startswith("--token="):
            word = "--token=***"
        words.append(word)
    if region is not None:
        words += ["--e164", region]
    return shlex.join([PROG, *words])
