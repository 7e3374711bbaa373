"""The ``autocalls-async`` command (also ``python -m autocalls_async``).

``reply`` sends one message, ``bulk`` runs a CSV/JSONL file through ``autocalls_async.bulk`` into
a resumable JSONL output, ``mock-server`` serves the emulator, ``demo`` shows the whole flow
with no token and no network. The token is read from ``--token`` or ``AUTOCALLS_API_TOKEN`` and
is never printed. rich (the ``cli`` extra) draws the progress bar and tables when installed and
writing to a terminal; otherwise output is plain lines.

One module per command (``reply``, ``bulk``, ``results``, ``mock_server``, ``demo``), each with
its ``add_parser``; shared modules: ``exits`` (exit codes), ``errors`` (an SDK error's line and
exit code), ``output`` (what is printed), ``options`` (shared options and checks), ``progress``
(a bulk run's meter and bar), ``job``, ``summary`` and ``dry_run`` (the bulk run's parts).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .._log import configure_from_env
from .._token_input import resolve_token
from .._version import __version__
from . import bulk, demo, mock_server, reply, results
from .exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, exit_codes_help
from .options import with_burst
from .output import ENVIRONMENT_HELP, PROG, CliWordsFormatter, usage_error

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The program's parser: one subcommand per command module."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send messages to Autocalls AI assistants: one (reply), a whole file "
        "(bulk), or try everything locally (demo, mock-server).",
        epilog=exit_codes_help() + "\n" + ENVIRONMENT_HELP + f"\nstart here: {PROG} demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (reply, bulk, results, mock_server, demo):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        # Bare `autocalls-async`: what a newcomer types first gets the whole help on stdout,
        # not a usage error; the exit code stays argparse's for a missing command.
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed them
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print the command again
    stdin_token = getattr(args, "token", None) == "-"
    problem = resolve_token(args) or with_burst(args)  # --token-file, --token -, --burst
    if hasattr(args, "token_file"):  # a 401's hint names where the token came from
        from . import errors

        errors.token_source = (
            f"the token in --token-file {args.token_file}"
            if args.token_file is not None
            else "the token given on stdin (--token -)"
            if stdin_token
            else "--token"
            if args.token is not None
            else "AUTOCALLS_API_TOKEN"
        )
    if problem is not None:
        return usage_error(problem)
    warnings = _sdk_warnings_to_stderr()
    configure_from_env()  # every command, mock-server too: an unknown AUTOCALLS_LOG is said once
    package = logging.getLogger("autocalls_async")
    if warnings is not None and len(package.handlers) > 1:  # AUTOCALLS_LOG added its own
        package.removeHandler(warnings)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout piped into `head` or a pager that closed: no traceback for the reader's
        # choice; what is left to print goes nowhere (else Python's exit flush raises again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        if warnings is not None:
            package.removeHandler(warnings)


def _sdk_warnings_to_stderr() -> logging.Handler | None:
    """The SDK's WARNINGs (a limiter falling back, a server stating another limit) as the
    CLI's other messages: one line on stderr prefixed with the command's name, instead of
    Python's bare last-resort line. Only where nothing handles them already (a program that
    calls main() with its own logging keeps it)."""
    package = logging.getLogger("autocalls_async")
    if package.handlers or logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(CliWordsFormatter(f"{PROG}: %(message)s"))
    package.addHandler(handler)
    return handler
