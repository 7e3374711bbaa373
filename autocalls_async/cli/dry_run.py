"""``bulk --dry-run``: check INPUT and OUT exactly as a run would, and report what it would
send, skip and refuse, and the time at the rate limit; send nothing (no token needed).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any, Final

import attrs

from .._bulkio import RowState
from .._errors import InvalidRequestError
from .._keys import KeyTable
from .._models import RateLimit
from .._wire import DEFAULT_MAX_REQUEST_BYTES
from ..bulk import BulkRequest
from .exits import EXIT_FAILED, EXIT_OK
from .options import input_problem
from .output import duration, in_cli_words, plural, print_lines, usage_error
from .progress import send_time

__all__ = ["DryRun", "dry_run", "dry_run_command", "dry_run_report"]


@attrs.define
class DryRun:
    """What ``bulk --dry-run`` found: counts only, nothing sent."""

    rows: int = 0
    to_send: int = 0
    answered_before: int = 0  #: skipped: answered in OUT
    failed_before: int = 0  #: skipped: failed in OUT (without --retry-failed)
    uncertain_before: int = 0  #: skipped: may have been processed (without --retry-unsafe-failed)
    invalid: int = 0
    problems: list[str] = attrs.Factory(list)  #: the first invalid rows' messages
    #: Distinct customers and (assistant, customer) conversations to send to, by a 64-bit
    #: digest each (``distinct``): a few bytes per customer, however big the input.
    customers: KeyTable = attrs.Factory(KeyTable)
    conversations: KeyTable = attrs.Factory(KeyTable)
    assistants: set[int] = attrs.Factory(set)
    hold: Any = None  #: rows held behind an uncertain row of their conversation (a ``Hold``)
    notes: list[str] = attrs.Factory(list)  #: what the data means (unused columns, ...)
    shown: int = 5  #: invalid rows named (--show-all: every one)


DRY_RUN_PROBLEMS_SHOWN: Final = 5


def dry_run(
    source: Any,
    log: Any,
    *,
    retry_failed: bool,
    retry_unsafe_failed: bool = False,
    allow_foreign: bool = False,
    normalize: Any = None,
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
    give_up_uncertain: bool = False,
    show_all: bool = False,
    respelling: Any = None,
) -> DryRun:
    """Check ``source`` against the output of earlier runs in ``log`` as ``run_job`` would
    (rows matched by content, foreign lines refused); send nothing.

    OUT is read with ``log.peek()``: never created nor written, under a shared lock that a
    run writing OUT refuses (the dry run then fails as the run would: exit 2). Rows are matched
    by the key of the row as read, before ``normalize``, exactly as a run matches them.
    """
    from .._bulkio import Ledger
    from .._hold import Hold

    ledger: Ledger = log.peek()
    source.take_snapshot()
    try:
        return _dry_run(
            source,
            ledger,
            log,
            retry_failed,
            retry_unsafe_failed,
            allow_foreign,
            normalize,
            max_request_bytes,
            None if give_up_uncertain else Hold(normalize=normalize),
            sys.maxsize if show_all else DRY_RUN_PROBLEMS_SHOWN,
            respelling,
        )
    finally:
        source.close()


def _dry_run(
    source: Any,
    ledger: Any,
    log: Any,
    retry_failed: bool,
    retry_unsafe_failed: bool,
    allow_foreign: bool,
    normalize: Any,
    max_request_bytes: int | None,
    hold: Any,
    shown: int,
    respelling: Any = None,
) -> DryRun:
    from .._notes import DataNotes
    from ..bulk import _check, _name

    notes = DataNotes(normalize=normalize)
    retry_failed = retry_failed or retry_unsafe_failed
    found = DryRun(hold=hold)
    found.shown = shown

    def count(request: BulkRequest, state: RowState | None) -> None:  # a row not answered
        if state == "failed" and not retry_failed:
            found.failed_before += 1
            return
        if state == "uncertain" and not retry_unsafe_failed:
            found.uncertain_before += 1
            if hold is not None:
                hold.uncertain(request)
            return
        if hold is not None and hold.holds(request):
            return
        problem = _check(request, max_request_bytes)
        customer = request.customer_identifier
        if problem is None and normalize is not None:
            try:
                customer = normalize(customer)
            except InvalidRequestError as exc:
                problem = InvalidRequestError(f"row {_name(request)}: {exc}")
        if problem is not None:
            found.invalid += 1
            if len(found.problems) < found.shown:
                found.problems.append(in_cli_words(" ".join(str(problem).split())))
            return
        found.to_send += 1
        distinct(found.customers, customer)
        distinct(found.conversations, f"{request.assistant_id} {customer}")
        found.assistants.add(request.assistant_id)

    # One pass: the check and the counts (the rows are matched exactly as the run matches them).
    source.check(ledger, out=log.path, allow_foreign=allow_foreign, notes=notes, observe=count)
    from .._bulkio import row_label
    from .._spelling import Respelling, check_spellings

    check_spellings(  # as the run: a customer OUT sent under another spelling is refused
        source,
        ledger,
        log.path,
        normalize,
        retry_failed=retry_failed,
        retry_unsafe_failed=retry_unsafe_failed,
        respelling=respelling or Respelling(),
        name=row_label,
    )
    found.rows = source.rows
    found.answered_before = source.already_answered
    notes.unused_columns = () if source.extra_as_variables else source.extra_columns
    notes.find_rows(source.numbered())
    found.notes = notes.lines(e164=normalize is not None)
    return found


def distinct(seen: KeyTable, text: str) -> None:
    """Add ``text`` to ``seen`` by its 64-bit digest (``len(seen)``: how many were distinct)."""
    number = (
        int.from_bytes(hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=8).digest())
        or 1
    )
    i = seen.slot(number)
    if not seen.numbers[i]:
        seen.put(i, number, 0)


def dry_run_report(
    found: DryRun, *, out: Path, rate_limit: RateLimit | None, max_replies: int | None
) -> list[str]:
    sending = found.to_send if max_replies is None else min(found.to_send, max_replies)
    lines = [
        f"Dry run: nothing was sent. {plural(found.rows, 'row')} in the input:",
        f"  to send:  {found.to_send}"
        + (f" (--max-replies stops after {max_replies})" if sending < found.to_send else ""),
        f"  to skip:  {found.answered_before + found.failed_before + found.uncertain_before} "
        f"({found.answered_before} already answered in {out}, {found.failed_before} failed "
        "before"
        + (": add --retry-failed to send them" if found.failed_before else "")
        + (
            f"; {found.uncertain_before} may have been processed: --retry-unsafe-failed sends them"
            if found.uncertain_before
            else ""
        )
        + ")",
        f"  invalid:  {found.invalid} (would fail as INVALID_ROW, never sent)",
    ]
    lines.extend(f"    {problem}" for problem in found.problems)
    if found.invalid > len(found.problems):
        lines.append(
            f"    … and {found.invalid - len(found.problems)} more (--show-all lists them)"
        )
    if found.hold is not None and found.hold.held:
        lines.extend("  " + line for line in found.hold.report())
    lines.append(
        f"  distinct customers: {len(found.customers)} "
        f"({plural(len(found.conversations), 'conversation')} with "
        f"{plural(len(found.assistants), 'assistant')})"
    )
    if rate_limit is None:
        lines.append("  time: no client-side rate limit (--rate-limit none)")
    else:
        seconds = send_time(sending, rate_limit.interval)
        lines.append(
            f"  time at {rate_limit}: about {duration(seconds)} "
            f"({plural(sending, 'request')}, one every {rate_limit.interval:g}s, retries not "
            "included)"
        )
    lines.extend(f"  note: {note}" for note in found.notes)
    return lines


def respelling(args: argparse.Namespace) -> Any:
    """``--allow-new-spelling`` and the command as run (``_spelling.Respelling``)."""
    from .._spelling import Respelling

    return Respelling(args.allow_new_spelling, tuple(getattr(args, "argv", ())))


def dry_run_command(args: argparse.Namespace) -> int:
    from .._bulkio import InputError, InputFile, ResultLog

    problem = input_problem(args.input, args.out)
    if problem is not None:
        return usage_error(problem)
    source = InputFile(
        args.input,
        format=args.format,
        extra_as_variables=args.vars_from_columns,
        delimiter=args.delimiter,
    )
    try:
        found = dry_run(
            source,
            ResultLog(args.out),
            retry_failed=args.retry_failed,
            retry_unsafe_failed=args.retry_unsafe_failed,
            allow_foreign=args.allow_foreign,
            normalize=args.e164,
            max_request_bytes=args.max_request_bytes,
            give_up_uncertain=args.give_up_uncertain,
            show_all=args.show_all,
            respelling=respelling(args),
        )
    except InputError as exc:
        return usage_error(str(exc))
    report = dry_run_report(
        found, out=args.out, rate_limit=args.rate_limit, max_replies=args.max_replies
    )
    print_lines(report)
    return EXIT_FAILED if found.invalid else EXIT_OK
