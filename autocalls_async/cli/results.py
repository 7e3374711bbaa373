"""``autocalls-async results``: a bulk run's results aligned with its input, one row per input
row (``autocalls_async.bulk.read_results``), as CSV (formulas neutralised) or JSONL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .._bulkio import InputError
from .._results import read_results, write_results
from .exits import EXIT_OK, exit_codes_help
from .options import parse_delimiter, same_file
from .output import PROG, plural, usage_error

__all__ = ["add_parser", "results_command"]


def add_parser(commands: Any) -> None:
    """``results``: its options and help."""
    results = commands.add_parser(
        "results",
        help="one row per input row with its result: a spreadsheet of a bulk run",
        description="Join INPUT and the OUT of its bulk run by content (as a run matches rows; "
        "never by row number, which shifts when rows are edited): one row per input row, in "
        "input order, its columns plus status (answered, failed, invalid, maybe_processed, "
        "not_sent), reply, conversation_id, error_code and error. CSV cells that a spreadsheet "
        "would run as formulas (=, +, -, @) are prefixed with '.",
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
    fmt = args.format or (
        "jsonl" if target is not None and target.suffix.lower() in {".jsonl", ".ndjson"} else "csv"
    )
    rows = read_results(
        args.input,
        args.out,
        format=args.input_format,
        delimiter=args.delimiter,
        extra_as_variables=args.vars_from_columns,
    )
    try:
        if target is None:
            counts = write_results(rows, sys.stdout, fmt)
        else:
            counts = write_atomically(target, lambda file: write_results(rows, file, fmt))
    except InputError as exc:
        return usage_error(str(exc))
    except OSError as exc:
        return usage_error(f"cannot write {target}: {exc.strerror or exc}")
    total = sum(counts.values())
    said = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items()))
    print(
        f"{PROG}: {plural(total, 'row')}"
        + (f": {said}" if said else "")
        + ("" if target is None else f"; written to {target}"),
        file=sys.stderr,
    )
    return EXIT_OK


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
