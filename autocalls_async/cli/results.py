"""``autocalls-async results``: a bulk run's results aligned with its input, one row per input
row (``autocalls_async.bulk.read_results``), as CSV (formulas neutralised) or JSONL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .._bulkio import InputError, InputFile
from .._results import OutCheck, check_out, input_columns, result_rows, write_results
from .exits import EXIT_FAILED, EXIT_OK, exit_codes_help
from .options import parse_delimiter, same_file
from .output import PROG, plural, usage_error

__all__ = ["add_parser", "results_command", "results_command_line"]

#: OUT's lines named in a report, then counted.
SHOWN = 10


def add_parser(commands: Any) -> None:
    """``results``: its options and help."""
    results = commands.add_parser(
        "results",
        help="one row per input row with its result: a spreadsheet of a bulk run",
        description="Join INPUT and the OUT of its bulk run by content (as a run matches rows; "
        "never by row number, which shifts when rows are edited): one row per input row, in "
        "input order, its columns plus status (answered, edited_since_sent, failed, invalid, "
        "maybe_processed, not_sent), reply, conversation_id, error_code and error. OUT is "
        "checked against INPUT as bulk checks it: lines for rows that are not in INPUT as it "
        "is now are listed (an edited row is edited_since_sent, with its earlier reply). CSV "
        "cells that a spreadsheet would run as formulas (=, +, -, @) are prefixed with ' (a "
        "phone number such as +14155550001 is not a formula: kept as it is).",
        epilog=exit_codes_help("results")
        + f"\nexample:\n  {PROG} results contacts.csv --out replies.jsonl -o results.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    results.add_argument("input", type=Path, metavar="INPUT", help="the bulk run's input")
    results.add_argument(
        "out", type=Path, nargs="?", metavar="OUT", help="the bulk run's OUT (or --out)"
    )
    results.add_argument("--out", dest="out_option", type=Path, metavar="OUT", help="as bulk's")
    results.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write here (default: stdout)"
    )
    results.add_argument(
        "--format",
        choices=("csv", "jsonl"),
        help="output format (default: from -o's extension, else csv)",
    )
    results.add_argument("--input-format", choices=("csv", "jsonl"), help="as bulk's --format")
    results.add_argument("--delimiter", type=parse_delimiter, metavar="CHAR", help="as bulk's")
    results.add_argument(
        "--vars-from-columns",
        action="store_true",
        help="as given to bulk (it changes a row's content)",
    )
    results.add_argument(
        "--allow-foreign",
        action="store_true",
        help="as bulk's: accept OUT's lines for rows that are not in INPUT as it is now (an "
        "edited input, another day's OUT) and exit 0",
    )
    results.set_defaults(handler=results_command)


def results_command(args: argparse.Namespace) -> int:
    """``autocalls-async results IN OUT [-o FILE] [--format csv|jsonl]``."""
    args.out = args.out or args.out_option
    if args.out is None:
        return usage_error("results needs the bulk run's OUT: results INPUT OUT")
    if not args.input.is_file():
        return usage_error(f"cannot read {args.input}: no such file")
    target: Path | None = args.output
    if target is not None:
        for name, path in (("INPUT", args.input), ("OUT", args.out)):
            if same_file(target, path):
                return usage_error(
                    f"-o {target} is {name} ({path}): writing the results there would destroy "
                    + (
                        "the log that keeps the next bulk run from sending its rows again"
                        if name == "OUT"
                        else "the input"
                    )
                    + "; nothing was written. Give the results their own file, e.g. -o "
                    "results.csv"
                )
        if target.is_dir():
            return usage_error(f"cannot write {target}: it is a directory")
    if args.out.is_dir():
        return usage_error(f"OUT {args.out} is a directory: give the bulk run's --out file")
    fmt = args.format or (
        "jsonl" if target is not None and target.suffix.lower() in {".jsonl", ".ndjson"} else "csv"
    )
    source = InputFile(
        args.input,
        format=args.input_format,
        delimiter=args.delimiter,
        extra_as_variables=args.vars_from_columns,
    )
    try:
        source.take_snapshot()
        try:
            check = check_out(source, args.out)
        except FileNotFoundError:
            return usage_error(
                f"OUT {args.out} does not exist: check its path (the bulk run's --out). A run "
                "that has not started has no results; `bulk --dry-run` says what a run would "
                "send. Nothing was written"
            )
        refusal = _refusal(check, args)
        if refusal is not None:
            return usage_error(refusal)
        columns, fields = None, list[str]()
        if fmt == "csv" and source.format == "jsonl":  # lines may have different fields
            fields, columns = input_columns(source)
        rows = result_rows(source, args.out, check, fields)
        if target is None:
            counts = write_results(rows, sys.stdout, fmt, columns)
        else:
            counts = write_atomically(target, lambda file: write_results(rows, file, fmt, columns))
    except InputError as exc:
        return usage_error(str(exc))
    except OSError as exc:
        return usage_error(f"cannot write {target}: {exc.strerror or exc}")
    finally:
        source.close()
    total = sum(counts.values())
    said = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items()))
    print(
        f"{PROG}: {plural(total, 'row')}"
        + (f": {said}" if said else "")
        + ("" if target is None else f"; written to {target}"),
        file=sys.stderr,
    )
    if check.running:
        print(
            f"{PROG}: a bulk run is writing {args.out} right now (it holds OUT's lock): this "
            "is a snapshot. Rows being sent show as maybe_processed until their answer is "
            "written; run results again when the run has ended.",
            file=sys.stderr,
        )
    report = _report(check, args)
    if report:
        print(f"{PROG}: " + "\n".join(report), file=sys.stderr)
        return EXIT_OK if args.allow_foreign else EXIT_FAILED
    return EXIT_OK


def _refusal(check: OutCheck, args: argparse.Namespace) -> str | None:
    """Why the results would mislead and are not written: OUT read with the wrong
    ``--vars-from-columns``, or OUT of another input (without ``--allow-foreign``)."""
    name, input_name = args.out.name, args.input.name
    if check.flag is not None:
        return (
            f"{name} was written by a run {check.flag}: its lines match the rows of "
            f"{input_name} read that way, not as these options read them (a row's variables "
            f"are part of its content). Nothing was written; run results again {check.flag}, "
            "as the bulk run was given"
        )
    if check.foreign and not args.allow_foreign:
        return (
            f"{name} does not belong to {input_name} as it is now: none of its "
            f"{plural(len(check.deleted), 'answered or sent line')} matches a row, edited or "
            "not. Nothing was written.\n"
            + "\n".join(f"  line {e.line}: {e.describe()}" for e in check.deleted[:SHOWN])
            + (
                f"\n  ... and {len(check.deleted) - SHOWN} more"
                if len(check.deleted) > SHOWN
                else ""
            )
            + "\n  Check that INPUT and OUT are one run's (not another day's file), and give "
            "results the run's --vars-from-columns, --delimiter and --input-format. "
            "--allow-foreign writes the results anyway (every row then shows as not_sent)"
        )
    return None


def _report(check: OutCheck, args: argparse.Namespace) -> list[str]:
    """OUT's answered or sent lines that speak for no row as it is now, one line each (the
    first ``SHOWN``): rows edited since, and lines of rows that are gone."""
    name, input_name = args.out.name, args.input.name
    count = len(check.edited) + len(check.deleted)
    if not count:
        return []
    lines = [
        f"{name} has {plural(count, 'answered or sent line')} for rows that are not in "
        f"{input_name} as it is now:"
    ]
    said = {
        entry.line: f"now row {check.sheet_rows.get(row, row)} of {input_name}: {what}"
        for row, (entry, what) in check.edited.items()
    }
    for entry in check.deleted:
        said[entry.line] = "no row of the input has its content, nor its customer (deleted?)"
    entries = {e.line: e for e in [*check.deleted, *(e for e, _ in check.edited.values())]}
    for line in sorted(said)[:SHOWN]:
        lines.append(f"  line {line}: {entries[line].describe()}: {said[line]}")
    if count > SHOWN:
        lines.append(f"  ... and {count - SHOWN} more")
    if check.edited:
        lines.append(
            f"{plural(len(check.edited), 'row')} edited since sent "
            f"{'is' if len(check.edited) == 1 else 'are'} shown as edited_since_sent, with the "
            "earlier version's reply: a bulk run refuses them (its --allow-foreign sends them "
            "again, and those customers get a second message)"
        )
    if not check.matched:
        lines.append(
            f"None of {name}'s lines is a row of {input_name} as it is now: check that they are "
            "one run's files (not another day's)"
        )
    lines.append("Exit code 1 says so; --allow-foreign accepts these lines (exit 0)")
    return lines


def write_atomically(target: Path, write: Callable[[IO[str]], dict[str, int]]) -> dict[str, int]:
    """Write ``target`` whole or not at all: into a temporary file beside it, then renamed over
    it (``os.replace``), so that a failure (a refused input, a full disk) never leaves a half
    file, and the file read is never the one being written. A target that is not a regular
    file (``/dev/stdout``, a FIFO) is written in place. The file keeps an existing target's
    permissions; a new one is created 0600 (it holds customer data)."""
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with target.open("w", encoding="utf-8", newline="") as file:
            return write(file)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            counts = write(file)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temp, stat.S_IMODE(mode))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return counts


def results_command_line(source: InputFile, out: Path, *, allow_foreign: bool = False) -> str:
    """The ``results`` command that reads a run's OUT as the run read its input: every option
    that changes how a row is read, or its key (``--input-format``, ``--delimiter``,
    ``--vars-from-columns``), and ``--allow-foreign`` when the run was given it."""
    words = [PROG, "results", str(source.path), str(out)]
    if source._explicit_format is not None:
        words += ["--input-format", source.format]
    default = "\t" if source.path.suffix.lower() == ".tsv" else ","
    if source.format == "csv" and source.delimiter != default:
        words += ["--delimiter", "tab" if source.delimiter == "\t" else source.delimiter]
    if source.extra_as_variables:
        words.append("--vars-from-columns")
    if allow_foreign:
        words.append("--allow-foreign")
    return shlex.join(words)
