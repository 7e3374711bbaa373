"""What a bulk run did, every row of the input accounted for, with the advice that fits.

Rows are named (the first few of each outcome), then the ``results`` command that lists them
all; ``--retry-failed`` is offered only for rows a retry can fix.
"""

from __future__ import annotations

from pathlib import Path

from .._errors import AutocallsError, BudgetExceededError
from ..bulk import error_code
from .errors import hint_for
from .job import Outcome
from .output import duration, plural
from .progress import PACE_MIN_STARTS

__all__ = ["stop_message", "summary"]


def summary(outcome: Outcome, out: Path) -> list[str]:
    """What the run did, every row of the input accounted for: answered + failed + skipped +
    cut off + not sent = the rows of the input, however the run ended."""
    meter = outcome.meter
    stats = meter.stats
    skipped = outcome.already_answered + outcome.already_failed + outcome.uncertain
    counts = [
        f"{meter.answered} answered",
        f"{meter.failed} failed",
        f"{skipped} skipped (already in {out})",
    ]
    if outcome.held:
        counts.append(f"{outcome.held} held")
    if outcome.cut_off:
        counts.append(f"{outcome.cut_off} cut off in flight")
    if meter.not_sent:
        counts.append(f"{meter.not_sent} not sent")
    if outcome.interrupted:
        state = "Interrupted"
    elif outcome.write_error is not None:
        state = "Stopped: OUT could not be written"
    elif outcome.stopped_by is not None:
        state = f"Stopped: {_why(outcome.stopped_by)}"
    else:
        state = "Done"
    lines = [
        f"{state} in {duration(meter.elapsed)}: {plural(outcome.total, 'row')}: "
        + ", ".join(counts)
    ]
    limit = meter.rate_limit
    rate = meter.rate()
    received = (
        f"{plural(stats.rate_limited, '429')} received, {plural(stats.retries, 'retry', 'retries')}"
    )
    if not stats.requests:
        lines.append("Nothing was sent.")
    elif rate is None:
        lines.append(
            f"Rate: not measured ({plural(stats.requests, 'request')}; a rate needs at least "
            f"{PACE_MIN_STARTS}); {received}"
        )
    elif limit is not None:
        per_period = rate * limit.period
        share = per_period / limit.requests * 100
        lines.append(
            f"Rate: {meter.rate_text()} achieved ({per_period:.1f} per {limit.period:g}s, "
            f"{share:.0f}% of the limit {limit.requests} per {limit.period:g}s); {received}"
        )
    else:
        lines.append(f"Rate: {meter.rate_text()} achieved (no client-side limit); {received}")
    lines.extend(_failure_lines(outcome))
    if outcome.uncertain:
        lines.append(
            f"{plural(outcome.uncertain, 'row')} may have been processed by an earlier run (it "
            "stopped while they were sent, or they failed after reaching the service): not sent "
            f"again{_rows(outcome.examples.get('uncertain'), outcome.uncertain)}. The results "
            "command lists them (status maybe_processed); look at those customers' "
            "conversations in the Autocalls dashboard, then add --retry-unsafe-failed to send "
            "the ones that did not get the message"
        )
    if outcome.cut_off:
        lines.append(
            f"{plural(outcome.cut_off, 'row')} cut off in flight by the second Ctrl-C may have "
            "been processed: the next run reports them instead of sending them again "
            "(--retry-unsafe-failed sends them anyway)"
        )
    if outcome.hold is not None:
        lines.extend(outcome.hold.report())
    lines.extend(f"Note: {note}" for note in outcome.notes)
    if outcome.input_changed is not None:
        lines.append(
            f"The input file changed during the run ({outcome.input_changed}): this run sent "
            "the rows as they were when it started and never read the change. Run the same "
            "command again to check and send the file as it is now."
        )
    if outcome.interrupted:
        lines.append("Run the same command again to send the rows left.")
    elif outcome.stopped_by is not None:
        lines.append(stop_message(outcome.stopped_by, meter.not_sent))
    return lines


def _rows(names: list[str] | None, count: int) -> str:
    """``: rows 3, 7, 9`` (and ``, …`` when there are more); empty without names."""
    if not names:
        return ""
    return f": row{'s' if count > 1 else ''} {', '.join(names)}" + (
        ", …" if count > len(names) else ""
    )


def _failure_lines(outcome: Outcome) -> list[str]:
    """Failed rows, this run's and earlier ones, named, with the advice that fits each kind:
    a fix of the input for invalid rows (a retry cannot help), --retry-failed for the others,
    and where to see every row (the results command)."""
    meter = outcome.meter
    lines: list[str] = []
    invalid = meter.counts.get("invalid", 0) + outcome.already_invalid
    if invalid:
        names = [*meter.examples.get("invalid", []), *outcome.examples.get("invalid", [])]
        lines.append(
            f"{plural(invalid, 'row')} invalid, never sent{_rows(names[:5], invalid)}: fix "
            "them in the input (the next run sends the fixed rows; --dry-run --show-all lists "
            "every problem)"
        )
    failed = meter.counts.get("failed", 0)
    if failed:
        lines.append(
            f"{plural(failed, 'row')} failed without being processed"
            f"{_rows(meter.examples.get('failed'), failed)}: once the cause (error_code) is "
            "fixed, add --retry-failed to send them again"
        )
    earlier = outcome.already_failed - outcome.already_invalid
    if earlier:
        lines.append(
            f"{plural(earlier, 'row')} failed in an earlier run"
            f"{_rows(outcome.examples.get('failed'), earlier)}: add --retry-failed to send "
            "them again"
        )
    uncertain = meter.counts.get("uncertain", 0)
    if uncertain:
        lines.append(
            f"{plural(uncertain, 'row')} failed after reaching the service and may have been "
            f"processed{_rows(meter.examples.get('uncertain'), uncertain)}: the results "
            "command lists them (status maybe_processed); look at those customers' "
            "conversations in the Autocalls dashboard; --retry-unsafe-failed sends them again"
        )
    if lines and outcome.command is not None:
        lines.append(f"Every row with its result: {outcome.command}")
    return lines


def _why(error: AutocallsError) -> str:
    if isinstance(error, BudgetExceededError):
        return "--max-replies reached"
    return f"{error_code(error)} received"


def stop_message(error: AutocallsError, left: int) -> str:
    """Why a bulk run stopped sending, and how to send the rest."""
    if isinstance(error, BudgetExceededError):
        why = "Stopped at --max-replies"
        then = "run the same command again (with a new --max-replies) to send them"
    else:
        why = f"Stopped at the first {error_code(error)}"
        then = f"{hint_for(error)}, then run the same command again to send them"
    return f"{why}: {plural(left, 'row')} left unsent (no result in OUT); {then}."
