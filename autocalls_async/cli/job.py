"""A bulk run: OUT locked and read, the input snapshotted and checked, then every row to send
sent at the rate the limit allows, each result appended to OUT as it comes, with Ctrl-C and
SIGTERM handled (the first stops gracefully, the second at once) and a full disk survived.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import attrs

from .._client import AsyncAutocalls
from .._errors import AutocallsError, ClientClosedError
from .._models import Priority, RateLimit
from .._ratelimit import default_limiter
from .._spelling import Respelling, check_spellings, sent_spelling
from ..bulk import BulkRequest, BulkResult, BulkRunner
from .errors import cli_result, exit_code_for
from .exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_OUT_WRITE
from .output import PROG, duration, plural
from .progress import Meter, StartClock, make_progress, send_time
from .results import results_command_line

__all__ = ["BULK_CONVERSATION_CACHE", "Outcome", "bulk_client", "run_job"]

#: The bulk client remembers few conversations: a bulk job never asks for them again.
BULK_CONVERSATION_CACHE: Final = 1024
#: Seconds between two indexes of OUT left during a run (and one as it closes): a run killed
#: by a crash leaves one of all but its last minute, which the resume reads instead of OUT.
CHECKPOINT_EVERY: Final = 60.0


def bulk_client(
    token: str | None,
    base_url: str | None,
    rate_limit: RateLimit | None,
    *,
    redis_url: str | None = None,
    **options: Any,
) -> tuple[AsyncAutocalls, StartClock | None]:
    """A client for bulk runs: few cached conversations, starts timed when rate limited."""
    clock = (
        None if rate_limit is None else StartClock(default_limiter(rate_limit, redis_url=redis_url))
    )
    client = AsyncAutocalls(
        token,
        base_url=base_url,
        rate_limit=rate_limit,
        limiter=clock,
        conversation_cache_size=BULK_CONVERSATION_CACHE,
        **options,
    )
    return client, clock


@attrs.define
class Outcome:
    meter: Meter
    already_answered: int
    already_failed: int  #: failed in an earlier run and not sent again
    interrupted: bool
    uncertain: int = 0  #: may have been processed by an earlier run; not sent again
    total: int = 0  #: rows in the input
    #: Sent, and cut off by a second Ctrl-C before their answer: they may have been processed
    #: (their journal line stays, so the next run reports them rather than sending them again).
    cut_off: int = 0
    #: The error that stopped the run (balance, 401, --max-replies), if one did.
    stopped_by: AutocallsError | None = None
    #: How INPUT changed during the run (never read: the run sent its snapshot), if it did.
    input_changed: str | None = None
    #: OUT could not be written (disk full): the run stopped sending (an ``OutWriteError``).
    write_error: Exception | None = None
    unwritten: int = 0  #: results printed on stderr because OUT could not take them
    #: Rows held behind a row of their conversation that may have been processed (a ``Hold``).
    hold: Any = None
    notes: list[str] = attrs.Factory(list)  #: what the data means (unused columns, ...)
    already_invalid: int = 0  #: of already_failed: still invalid, a retry cannot fix them
    #: The first rows of each earlier outcome (failed, invalid, uncertain), by name.
    examples: dict[str, list[str]] = attrs.Factory(dict)
    command: str | None = None  #: the results command that lists every row

    @property
    def held(self) -> int:
        return 0 if self.hold is None else int(self.hold.held)

    def write_message(self, out: Path) -> str | None:
        """The one message of a run stopped by OUT's write error (None: no error)."""
        if self.write_error is None:
            return None
        left = self.meter.not_sent
        return (
            f"{PROG}: {self.write_error}: stopped sending. "
            + (
                f"{plural(self.unwritten, 'result')} that could not be written "
                f"{'is' if self.unwritten == 1 else 'are'} printed above on stderr as JSON "
                "lines: keep them (a rerun reports those rows as maybe processed and does not "
                "send them again). "
                if self.unwritten
                else ""
            )
            + f"Free some space on the disk of {out}, then run the same command again to send "
            f"the {plural(left, 'row')} left."
        )

    @property
    def exit_code(self) -> int:
        if self.write_error is not None:
            return EXIT_OUT_WRITE
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.stopped_by is not None:
            return exit_code_for(self.stopped_by)
        failed = self.meter.failed or self.already_failed or self.uncertain or self.held
        return EXIT_FAILED if failed or self.input_changed else EXIT_OK


async def run_job(
    client: AsyncAutocalls,
    source: Any,
    log: Any,
    *,
    rate_limit: RateLimit | None,
    starts: StartClock | None = None,
    retry_failed: bool,
    concurrency: int,
    progress_mode: str,
    description: str = "bulk",
    retry_unsafe_failed: bool = False,
    allow_foreign: bool = False,
    priority: Priority = Priority.BACKGROUND,
    give_up_uncertain: bool = False,
    respelling: Respelling | None = None,
) -> Outcome:
    """Run ``source`` (an ``InputFile``) into ``log`` (a ``ResultLog``), with signals handled.

    OUT is locked first, then read, then the input is checked against it: nothing is sent
    unless every line of OUT belongs to a row of the input (or ``allow_foreign``).
    """
    from .._bulkio import Ledger, OutWriteError, ResultLog, row_label
    from .._hold import Hold
    from .._notes import DataNotes

    log.open()
    try:
        ledger: Ledger = log.read()
        source.take_snapshot()  # the one read of INPUT: every pass below reads this copy
        notes = DataNotes(normalize=client.normalize_identifier)
        source.check(ledger, out=log.path, allow_foreign=allow_foreign, notes=notes)
        notes.unused_columns = () if source.extra_as_variables else source.extra_columns
        notes.find_rows(source.numbered())
        check_spellings(  # a customer OUT sent under another spelling: refused (finding 7)
            source,
            ledger,
            log.path,
            client.normalize_identifier,
            retry_failed=retry_failed or retry_unsafe_failed,
            retry_unsafe_failed=retry_unsafe_failed,
            respelling=respelling or Respelling(),
            name=row_label,
        )
    except BaseException:
        log.close()
        source.close()
        raise
    retry_failed = retry_failed or retry_unsafe_failed
    already_failed = 0 if retry_failed else source.already_failed
    uncertain = 0 if retry_unsafe_failed else source.uncertain
    todo = source.rows - source.already_answered - already_failed - uncertain
    hold = Hold(normalize=client.normalize if client.normalize_identifier else None)
    held_rows: set[int | None] = set()
    if uncertain and not give_up_uncertain:  # rows behind an uncertain row wait (item 7)
        for request, key in source.unanswered():
            state = ledger.state_of(request, key)
            if state == "uncertain":
                hold.uncertain(request)
            elif _to_send(state, retry_failed) and hold.holds(request):
                held_rows.add(request.row)
        todo -= hold.held
    keys: dict[int | None, str] = {}  # row -> identity, for the rows pulled and not yet written
    pending: set[int | None] = set()  # rows whose "sending" line has no result line yet

    def rows() -> Iterator[BulkRequest]:
        for request, key in source.unanswered():  # an answered row is never sent again
            state = ledger.state_of(request, key)
            if (
                state == "answered"
                or (state == "failed" and not retry_failed)
                or (state == "uncertain" and not retry_unsafe_failed)
                or request.row in held_rows
            ):
                continue
            keys[request.row] = key
            yield request

    write_error: OutWriteError | None = None
    unwritten = 0  # results that OUT could not take, printed on stderr instead

    def out_failed(error: OutWriteError) -> None:
        nonlocal write_error
        if write_error is None:
            write_error = error
            runner.stop()
            progress.note(
                f"{PROG}: {error}: stopped sending; calls in flight finish, and results that "
                "cannot be written are printed here as JSON lines"
            )

    def spelled(request: BulkRequest) -> str | None:
        return sent_spelling(client.normalize_identifier, request.customer_identifier)

    def sending(request: BulkRequest) -> None:
        if write_error is None:
            try:
                log.write_sending(request, keys[request.row], spelled(request))
            except OutWriteError as exc:
                out_failed(exc)
        if write_error is not None:  # no journal line, no send
            raise ClientClosedError("not sent: OUT cannot be written")
        pending.add(request.row)

    def record(result: BulkResult, key: str | None) -> None:
        nonlocal unwritten
        if write_error is None:
            try:
                log.write(result, key, spelled(result.request))
                return
            except OutWriteError as exc:
                out_failed(exc)
        unwritten += 1
        sys.stderr.write(ResultLog.line(result, key, spelled(result.request)).decode() + "\n")
        sys.stderr.flush()

    meter = Meter(todo, rate_limit, client.stats, starts=starts)
    progress = make_progress(progress_mode, meter, description)
    if progress_mode != "off":
        skipped = source.rows - todo
        # The same estimate as the dry run's: --max-replies caps the requests to send.
        budget = client.budget
        capped = todo if budget is None else min(todo, budget.replies)
        pace = ""
        if rate_limit is not None:
            seconds = send_time(capped, rate_limit.interval)
            pace = f"; at {rate_limit} about {duration(seconds)}"
        progress.note(
            f"{description}: {plural(todo, 'row')} to send"
            + (f" (--max-replies stops after {capped})" if capped < todo else "")
            + (f", {skipped} skipped (already in {log.path.name})" if skipped else "")
            + pace
        )
    runner = BulkRunner(client, rows(), concurrency=concurrency, on_send=sending, priority=priority)
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    interrupts = 0
    interrupted = False
    next_checkpoint = time.monotonic() + CHECKPOINT_EVERY

    def on_signal() -> None:
        nonlocal interrupts, interrupted
        interrupts += 1
        interrupted = True
        if interrupts == 1:
            runner.stop()
            progress.note(
                "stopping: nothing new is sent; waiting for "
                f"{plural(client.stats.in_flight, 'call')} in flight (Ctrl-C again to stop at "
                "once)"
            )
        else:
            main_task.cancel()

    handled = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal)
            handled.append(signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows, threads
            pass
    try:
        async with client, runner:
            async for result in runner:
                key = keys.pop(result.request.row, None)
                journaled = result.request.row in pending
                pending.discard(result.request.row)
                result = cli_result(result)
                if _left_unsent(result, runner.stop_on):
                    # Certainly not processed, and the run stops: no result line, so a plain
                    # rerun sends it; a "sending" line written for it is withdrawn.
                    meter.not_sent += 1
                    if journaled and key is not None and write_error is None:
                        try:
                            log.write_unsent(result, key)
                        except OutWriteError as exc:
                            out_failed(exc)  # its "sending" line stays: reported, not resent
                    continue
                record(result, key)
                if time.monotonic() >= next_checkpoint:
                    log.checkpoint(source.checked)  # a few MB: 0.1 s for a million rows
                    next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
                if result.ok:
                    meter.answered += 1
                else:
                    meter.failed += 1
                    meter.note_failure(result)
                progress.update()
    except asyncio.CancelledError:
        if interrupts < 2:
            raise
        main_task.uncancel()
    finally:
        meter.ended = time.monotonic()
        # Every row of this run is accounted for: answered, failed, cut off on the wire by a
        # second Ctrl-C (journaled, no answer), or never sent.
        cut_off = len(pending)
        meter.not_sent = max(todo - meter.done - cut_off, 0)
        for signum in handled:
            loop.remove_signal_handler(signum)
        progress.close()
        log.checkpoint(source.checked)  # the index beside OUT: the next run starts from it
        log.close()
        input_changed = source.changed()
        source.close()
        if starts is not None:
            await starts.aclose()  # this run stops counting as a user of the token
    stopped_by = runner.stopped_by.error if runner.stopped_by is not None else None
    return Outcome(
        meter,
        source.already_answered,
        already_failed,
        interrupted,
        uncertain=uncertain,
        stopped_by=stopped_by,
        total=source.rows,
        cut_off=cut_off,
        input_changed=input_changed,
        write_error=write_error,
        unwritten=unwritten,
        hold=hold,
        notes=notes.lines(e164=client.normalize_identifier is not None),
        already_invalid=0 if retry_failed else source.already_invalid,
        examples=source.examples,
        command=results_command_line(source, log.path, allow_foreign=allow_foreign),
    )


def _to_send(state: str | None, retry_failed: bool) -> bool:
    return state is None or (state == "failed" and retry_failed)


def _left_unsent(result: BulkResult, stop_on: tuple[type[AutocallsError], ...]) -> bool:
    """A row the run leaves for the next one: not sent (the run stopped or was closed first),
    or refused by a failure that stops the run (402, 401, --max-replies) without processing."""
    error = result.error
    return isinstance(error, (ClientClosedError, *stop_on)) and not result.maybe_processed
