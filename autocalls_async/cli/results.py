"""``autocalls-async results``: a bulk run's results aligned with its input, one row per input
row (``autocalls_async.bulk.read_results``), as CSV (formulas neutralised) or JSONL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._bulkio import InputError
from .._results import read_results, write_results
from .exits import EXIT_OK, exit_codes_help
from .options import parse_delimiter
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
            with target.open("w", encoding="utf-8", newline="") as file:
                counts = write_results(rows, file, fmt)
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
