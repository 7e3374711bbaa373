"""``autocalls-async demo``: the emulator in-process with a fast limit and a bulk run over the
bundled example CSV, so that a newcomer sees the whole flow in seconds, with no token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import tempfile
import textwrap
from importlib import resources
from pathlib import Path
from typing import Any, Final

from .._models import RateLimit
from ..bulk import DEFAULT_CONCURRENCY
from .exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, exit_codes_help
from .job import bulk_client, run_job
from .output import PROG, plural, printable, rich_available, usage_error
from .summary import summary

__all__ = ["Show", "add_parser", "demo_command"]


def add_parser(commands: Any) -> None:
    """``demo``: its options and help."""
    demo = commands.add_parser(
        "demo",
        help="run a bulk job against the emulator: no token, no network",
        description=textwrap.fill(
            "Start the emulator in-process with a fast limit (5 per second), run the bulk "
            "runner over a bundled example CSV, then show the replies and the stats, and the "
            "commands to run the same job yourself (--keep or --dir keeps the files).",
            88,
        ),
        epilog=exit_codes_help("demo"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "off"),
        default="auto",
        help="the bulk run's progress on stderr, as bulk's --progress (default: auto)",
    )
    demo.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="where to write the demo's files, demo.csv and replies.jsonl, and keep them "
        "(default: a new temporary directory, removed at the end unless --keep)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory and its files (printed at the end), to run the "
        "commands the demo prints",
    )
    demo.set_defaults(handler=demo_command)


DEMO_LIMIT: Final = RateLimit(5, 1.0)
DEMO_TOKEN: Final = "demo-token"


def demo_command(args: argparse.Namespace) -> int:
    # With --dir or --keep the files stay after the demo, so that every command it prints works
    # once it has ended; otherwise its temporary directory is removed.
    folder: Path = args.dir or Path(tempfile.mkdtemp(prefix="autocalls-demo-"))
    args.keep = args.keep or args.dir is not None
    try:
        return _demo_in(args, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _demo_in(args: argparse.Namespace, folder: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = resources.files("autocalls_async") / "examples" / "demo.csv"
        (folder / "demo.csv").write_bytes(data.read_bytes())
        (folder / "replies.jsonl").unlink(missing_ok=True)  # run again in a --dir: afresh
    except OSError as exc:
        return usage_error(f"cannot write the demo's files in {folder}: {exc}")
    return asyncio.run(_demo(args, folder))


async def _demo(args: argparse.Namespace, folder: Path) -> int:
    from .._bulkio import InputFile, ResultLog
    from ..testing import MockAutocalls

    csv_path, out = folder / "demo.csv", folder / "replies.jsonl"
    where = shlex.quote(str(folder))
    show = Show()
    limit = (DEMO_LIMIT.requests, DEMO_LIMIT.period)
    async with MockAutocalls(rate_limit=limit, assistants=(123, 456), reply_delay=0.1) as srv:
        show.heading("autocalls-async demo: no token, no network")
        show.line(
            f"1. Started the Autocalls emulator at {srv.base_url} with a limit of "
            f"{DEMO_LIMIT.requests} requests per second (the real service allows 5 per "
            "minute: the same job there takes minutes, not seconds)."
        )
        show.line(
            f"2. Running the bulk runner over the bundled demo.csv, copied to {folder}: the "
            f"command is\n   {PROG} bulk {where}/demo.csv --out {where}/replies.jsonl "
            "--rate-limit 5/1"
        )
        client, starts = bulk_client(DEMO_TOKEN, srv.base_url, DEMO_LIMIT)
        outcome = await run_job(
            client,
            InputFile(csv_path),
            ResultLog(out),
            rate_limit=DEMO_LIMIT,
            starts=starts,
            retry_failed=False,
            concurrency=DEFAULT_CONCURRENCY,
            progress_mode=args.progress,
            description=csv_path.name,
        )
        conversations = len(srv.conversations)
        served = srv.count()
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    results = [line for line in results if "sending" not in line]  # not the journal's lines
    results.sort(key=lambda line: line.get("row", 0))
    show.line(
        f"3. {plural(len(results), 'result line')} in replies.jsonl, one per row, written as "
        "each finished (rerunning skips the rows already answered):"
    )
    show.table(results)
    for line in summary(outcome, Path("replies.jsonl")):
        show.line("   " + line)
    show.line(
        f"   The emulator received {plural(served, 'request')} and now holds "
        f"{plural(conversations, 'conversation')} (one per assistant and customer, messages "
        "kept in file order)."
    )
    kept = (
        f"The files are kept in {folder}."
        if args.keep
        else f"The demo's files are removed now (run it with --keep to keep them in {folder})."
    )
    show.line(
        f"\n{kept} To run the same job yourself, in two shells:\n"
        f"   {PROG} mock-server --port 8000 --assistants 123,456 --rate-limit 5/1\n"
        f"   export AUTOCALLS_BASE_URL=http://127.0.0.1:8000/api AUTOCALLS_API_TOKEN={DEMO_TOKEN}\n"
        f"   {PROG} bulk {where}/demo.csv --out {where}/replies-2.jsonl --rate-limit 5/1\n"
        "\nThen with the real service: export AUTOCALLS_API_TOKEN=<your token> (and unset "
        "AUTOCALLS_BASE_URL), then\n"
        f'   {PROG} reply --assistant-id <id> --customer +14155551234 "Hi"\n'
        f"   {PROG} bulk <your-file.csv> --out replies.jsonl"
    )
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if outcome.meter.answered else EXIT_FAILED


class Show:
    """The demo's output on stdout: rich tables on a terminal, plain text otherwise."""

    def __init__(self) -> None:
        self.console: Any = None
        if sys.stdout.isatty() and rich_available():
            from rich.console import Console

            self.console = Console()

    def heading(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(f"[bold]{text}")
        else:
            print(f"== {text} ==", flush=True)

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def table(self, results: list[dict[str, Any]]) -> None:
        rows = [
            (
                str(item.get("id", "")),
                str(item.get("customer_identifier", "")),
                str(item.get("reply") or "")
                if item.get("ok")
                else f"✗ {item.get('error_code')}: {item.get('error', '')}",
            )
            for item in results
        ]
        if self.console is not None:
            from rich.table import Table

            table = Table("id", "customer", "reply (or error)", expand=False)
            for row_id, customer, text in rows:
                style = None if not text.startswith("✗") else "red"
                table.add_row(printable(row_id), printable(customer), printable(text), style=style)
            self.console.print(table)
            return
        width = max((len(customer) for _, customer, _ in rows), default=8)
        for row_id, customer, text in rows:
            text = printable(text if len(text) <= 90 else text[:89] + "…")
            print(f"  {row_id:>3}  {customer:<{width}}  {text}", flush=True)
