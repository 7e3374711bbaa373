"""``python -m benchmarks [--quick] [--rounds N] [--out PATH] [NAME ...]``: one table, one JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from autocalls_async import __version__

from . import BENCHMARKS, BenchResult, Config, run_benchmark

DEFAULT_OUT = Path("bench-results/results.json")
COLUMNS = ("benchmark", "case", "metric", "median", "spread (min–max)", "target")


def table(results: Sequence[BenchResult]) -> str:
    """One Markdown table for every result, ready to paste into the README."""
    lines: list[tuple[str, ...]] = []
    for result in results:
        if result.failed is not None:
            lines.append((result.name, "FAILED (see below)", "", "", "", ""))
        elif not result.available:
            lines.append((result.name, "not available", "", "", "", ""))
        for row in result.rows:
            lines.append((result.name, row.case, row.metric, *row.formatted()))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]

    def render(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(COLUMNS), rule, *(render(line) for line in lines)])


def environment(config: Config, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "command": " ".join(["python -m benchmarks", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "autocalls_async": __version__,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "quick": config.quick,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of autocalls-async against the alternatives; "
        "prints one table and writes JSON.",
        epilog="benchmarks: "
        + "; ".join(f"{name}: {what}" for name, (_, what) in BENCHMARKS.items()),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument("--rounds", type=int, help="rounds per comparison (default: per benchmark)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = Config(quick=args.quick, rounds=args.rounds)
    results = []
    for name in args.names or list(BENCHMARKS):
        print(f"running {name}: {BENCHMARKS[name][1]} ...", file=sys.stderr, flush=True)
        try:
            result = run_benchmark(name, config)
        except Exception as exc:  # one broken benchmark must not cost the others' figures
            traceback.print_exc()
            failure = f"{type(exc).__name__}: {exc}"
            result = BenchResult(name, BENCHMARKS[name][1], failed=failure, notes=[failure])
        print(f"  done in {result.seconds:.1f}s", file=sys.stderr, flush=True)
        results.append(result)
    print(table(results))
    for result in results:
        for note in result.notes:
            print(f"- {result.name}: {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "environment": environment(config, argv),
        "benchmarks": {result.name: result.to_json() for result in results},
    }
    args.out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 1 if any(result.failed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
