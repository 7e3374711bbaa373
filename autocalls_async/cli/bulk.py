"""``autocalls-async bulk``: send every row of a CSV or JSONL file into a resumable OUT.

The run itself is ``job.run_job``; its summary ``summary``; ``--dry-run`` is ``dry_run``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .._budget import Budget
from .._errors import AutocallsError
from .._models import Priority
from ..bulk import DEFAULT_CONCURRENCY
from .dry_run import dry_run_command, respelling
from .exits import exit_codes_help
from .job import bulk_client, run_job
from .options import (
    client_options,
    input_problem,
    parse_count,
    parse_delimiter,
    parse_region,
    phone_extra_problem,
    redis_problem,
    same_file,
    token_problem,
)
from .output import ENVIRONMENT_HELP, print_lines, usage_error
from .summary import summary

__all__ = ["add_parser", "bulk_command"]


def add_parser(commands: Any) -> None:
    """``bulk``: its options and help."""
    bulk = commands.add_parser(
        "bulk",
        help="send every row of a CSV or JSONL file; resumable",
        description="Send every row of INPUT and append one JSON line per finished row to OUT, "
        "at the full rate the limit allows; a customer's rows are sent in file order. Each "
        "row is sent at most once per OUT: running it again sends only the rows OUT does not "
        "answer (matched by content); an edited or foreign input is refused, not guessed "
        "(--allow-foreign). Ctrl-C, SIGTERM or a crash lose nothing. "
        "Ctrl-C stops gracefully (calls in flight finish and are written); press it again to "
        "stop at once.",
        epilog="input:\n"
        "  CSV with a header row: assistant_id,customer_identifier,message and optionally\n"
        "  variables (a JSON object) and id (default: the row number); or JSONL, one object\n"
        "  per line with the same fields. A bad row gets its own error line (INVALID_ROW) and\n"
        "  the job goes on; a bad file is refused before anything is sent.\n\n"
        "output lines (one per finished row, and a journal around each send):\n"
        '  {"id":1,"sending":true,"key":...}        about to send row 1 (journal)\n'
        '  {"id":1,"ok":true,"key":...,"conversation_id":...,"reply":...}\n'
        '  {"id":2,"ok":false,"key":...,"error_code":"ASSISTANT_NOT_FOUND",...,\n'
        '   "sent":true,"maybe_processed":false}\n'
        '  {"id":3,"sending":false,"key":...,"error_code":"INSUFFICIENT_BALANCE"}\n'
        "                                  refused unprocessed: a rerun sends row 3\n\n"
        "cost:\n"
        "  --dry-run checks INPUT and OUT as a run would and reports what it would send,\n"
        "  skip and cost in time, sending nothing (no token needed; OUT is never created).\n"
        "  The run stops sending at the first INSUFFICIENT_BALANCE or 401 (exit 5 or 3) and\n"
        "  after --max-replies (exit 9): calls in flight finish, the rows left get no result\n"
        "  in OUT, and the same command sends them later. After ASSISTANT_NOT_FOUND the\n"
        "  assistant's other rows fail as SKIPPED_ASSISTANT_NOT_FOUND without being sent\n"
        "  (--retry-failed sends them again).\n\n"
        + exit_codes_help("bulk")
        + "\n"
        + ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bulk.add_argument("input", type=Path, metavar="INPUT", help="a .csv or .jsonl file")
    bulk.add_argument(
        "--out", type=Path, required=True, metavar="OUT.jsonl", help="results (appended)"
    )
    bulk.add_argument(
        "--format", choices=("csv", "jsonl"), help="input format (default: from the extension)"
    )
    bulk.add_argument(
        "--vars-from-columns",
        action="store_true",
        help="send the input's other columns as variables too (the variables column wins)",
    )
    bulk.add_argument(
        "--delimiter",
        type=parse_delimiter,
        metavar="CHAR",
        help="CSV field separator (default: tab for .tsv, else a comma; 'tab' for a tab)",
    )
    bulk.add_argument(
        "--retry-failed",
        action="store_true",
        help="also send again the rows that failed in an earlier run without reaching the "
        "service's processing (a 4xx, a 429, a 503, no connection)",
    )
    bulk.add_argument(
        "--retry-unsafe-failed",
        action="store_true",
        help="also send again the rows an earlier run may have had processed (a 5xx, a "
        "timeout, a run killed while they were sent): their message may be sent twice",
    )
    bulk.add_argument(
        "--give-up-uncertain",
        action="store_true",
        help="send the rows of a conversation that wait behind a row an earlier run may have "
        "had processed (held by default, so that the conversation stays in order); that row "
        "itself is never sent",
    )
    bulk.add_argument(
        "--allow-foreign",
        action="store_true",
        help="run even if OUT has lines for rows that are not in INPUT (an edited input, "
        "another day's file): rows are matched by content, the other lines are left alone",
    )
    bulk.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"rows in flight or queued for a slot at once (default: {DEFAULT_CONCURRENCY})",
    )
    bulk.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "off"),
        default="auto",
        help="progress on stderr: a bar on a terminal (with rich), else plain lines",
    )
    bulk.add_argument(
        "--fsync", action="store_true", help="fsync OUT after each line (survives power loss)"
    )
    bulk.add_argument(
        "--priority",
        choices=("background", "interactive"),
        default="background",
        help="the rows' lane for rate-limit slots: background (default) yields the next slot "
        "to interactive calls of any process on the token (a web app), keeping 1 slot in 5 "
        "while they wait; interactive competes with them first come, first served",
    )
    bulk.add_argument(
        "--allow-new-spelling",
        action="store_true",
        help="send the rows of customers OUT's lines spelled otherwise (--e164 added or "
        "dropped on a resume) under this run's spelling: each such customer's later rows "
        "start a new conversation (refused by default, exit 2)",
    )
    _cost_options(bulk)
    client_options(bulk, default_rate="5/60")
    bulk.set_defaults(handler=bulk_command)


def _cost_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cost")
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="check INPUT and report the rows to send, skip and refuse, the distinct customers "
        "and the time at the rate limit; send nothing (no token needed)",
    )
    group.add_argument(
        "--show-all",
        action="store_true",
        help="with --dry-run: list every invalid row (default: the first 5)",
    )
    group.add_argument(
        "--max-replies",
        type=parse_count,
        metavar="N",
        help="send at most N requests that may be billed, then stop (exit 9); run the same "
        "command again to send the rest",
    )
    group.add_argument(
        "--e164",
        type=parse_region,
        metavar="REGION",
        help="write phone numbers in E.164 before sending, reading numbers without a + as "
        "numbers of REGION (e.g. US); e-mails and other ids are left as they are; a row whose "
        "number is not possible, or local only (no area code), fails as INVALID_ROW (needs "
        "the phone extra)",
    )


def bulk_command(args: argparse.Namespace) -> int:
    from .._bulkio import InputError, InputFile, ResultLog

    if args.concurrency < 1:
        return usage_error("--concurrency must be >= 1")
    if args.out.resolve() == args.input.resolve() or same_file(args.input, args.out):
        return usage_error("--out must not be the input file")
    problem = phone_extra_problem(args)
    if problem is not None:
        return usage_error(problem)
    if args.dry_run:
        return dry_run_command(args)
    problem = (
        token_problem(args.token)
        or input_problem(args.input, args.out)
        or redis_problem(args.redis_url)
    )
    if problem is not None:
        return usage_error(problem)
    try:
        client, starts = bulk_client(
            args.token,
            args.base_url,
            args.rate_limit,
            redis_url=args.redis_url,
            max_retries=args.max_retries,
            timeout=args.timeout,
            max_request_bytes=args.max_request_bytes,
            **_cost_client_options(args),
        )
    except AutocallsError as exc:
        return usage_error(str(exc))
    source = InputFile(
        args.input,
        format=args.format,
        extra_as_variables=args.vars_from_columns,
        delimiter=args.delimiter,
    )
    log = ResultLog(args.out, fsync=args.fsync)

    async def job() -> int:
        try:
            outcome = await run_job(
                client,
                source,
                log,
                rate_limit=args.rate_limit,
                starts=starts,
                retry_failed=args.retry_failed,
                retry_unsafe_failed=args.retry_unsafe_failed,
                allow_foreign=args.allow_foreign,
                give_up_uncertain=args.give_up_uncertain,
                respelling=respelling(args),
                concurrency=args.concurrency,
                progress_mode=args.progress,
                description=args.input.name,
                priority=Priority[args.priority.upper()],
            )
        except InputError as exc:
            await client.close()
            return usage_error(str(exc))
        print_lines(summary(outcome, args.out))
        message = outcome.write_message(args.out)
        if message is not None:
            print(message, file=sys.stderr)
        return outcome.exit_code

    return asyncio.run(job())


def _cost_client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client options of ``--max-replies`` and ``--e164``."""
    options: dict[str, Any] = {}
    if args.max_replies is not None:
        options["budget"] = Budget(replies=args.max_replies)
    if args.e164 is not None:
        options["normalize_identifier"] = args.e164
    return options
