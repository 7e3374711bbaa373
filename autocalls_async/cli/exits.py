"""Exit codes: the program's, and each command's own (its ``--help`` lists only those).

``docs/reference/cli.md`` has the same table, per command.
"""

from __future__ import annotations

import textwrap
from typing import Final

__all__ = [
    "EXITS",
    "EXIT_AUTH",
    "EXIT_BALANCE",
    "EXIT_CODES_HELP",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_MAX_REPLIES",
    "EXIT_NETWORK",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_OUT_WRITE",
    "EXIT_RATE_LIMITED",
    "EXIT_SERVER",
    "EXIT_USAGE",
    "exit_codes_help",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # bulk: some rows failed or are reported; reply: an API error not below
EXIT_USAGE: Final = 2  # bad option or input, no token, OUT refused; nothing was sent
EXIT_AUTH: Final = 3  # bulk: stopped at the first 401
EXIT_NOT_FOUND: Final = 4
EXIT_BALANCE: Final = 5  # bulk: stopped at the first INSUFFICIENT_BALANCE
EXIT_RATE_LIMITED: Final = 6
EXIT_NETWORK: Final = 7
EXIT_SERVER: Final = 8
EXIT_MAX_REPLIES: Final = 9  # bulk: --max-replies reached; the rest is left for a rerun
EXIT_OUT_WRITE: Final = 10  # bulk: OUT could not be written (disk full); sending stopped
EXIT_INTERRUPTED: Final = 130

#: What each exit code means, per command: a command's ``--help`` lists its own codes only.
EXITS: Final[dict[str, dict[int, str]]] = {
    "reply": {
        EXIT_OK: "replied",
        EXIT_FAILED: "an API error not listed below (e.g. 422)",
        EXIT_USAGE: "usage error: bad option or input, no token, a base URL that is not the "
        "API's root (refused, or a 404 that is not ASSISTANT_NOT_FOUND); nothing was sent",
        EXIT_AUTH: "401/403: the token is missing, wrong or may not use this assistant",
        EXIT_NOT_FOUND: "ASSISTANT_NOT_FOUND: no such assistant for this token",
        EXIT_BALANCE: "INSUFFICIENT_BALANCE: top up the account's balance",
        EXIT_RATE_LIMITED: "still rate limited (429) after retries, or no slot within --max-wait",
        EXIT_NETWORK: "network: could not connect, or the request timed out",
        EXIT_SERVER: "5xx, or a reply that is not valid",
        EXIT_INTERRUPTED: "interrupted (Ctrl-C / SIGTERM)",
    },
    "bulk": {
        EXIT_OK: "every row answered (--dry-run: every row to send is valid)",
        EXIT_FAILED: "some rows failed, or may have been processed by an earlier run "
        "(reported, not sent again), or are held behind such a row, or INPUT changed during "
        "the run; the summary names them (--dry-run: some rows would fail as INVALID_ROW)",
        EXIT_USAGE: "usage error: bad option, bad input file, no token, a refused base URL; "
        "OUT refused (being written by another run, lines for rows not in INPUT, not a bulk "
        "output). Nothing was sent",
        EXIT_AUTH: "stopped at the first 401: fix the token, then run it again",
        EXIT_BALANCE: "stopped at the first INSUFFICIENT_BALANCE: top up, then run it again",
        EXIT_MAX_REPLIES: "--max-replies reached (run it again to send the rest)",
        EXIT_OUT_WRITE: "OUT could not be written (disk full, quota): sending stopped, "
        "results that could not be written were printed on stderr as JSON lines",
        EXIT_INTERRUPTED: "interrupted (Ctrl-C / SIGTERM): run it again to resume",
    },
    "results": {
        EXIT_OK: "the results were written, and every answered or sent line of OUT is a row "
        "of INPUT (also during a run, with a notice that it is a snapshot)",
        EXIT_FAILED: "the results were written, but OUT has answered or sent lines for rows "
        "that are not in INPUT as it is now (rows edited since, shown as edited_since_sent; "
        "deleted rows): listed on stderr (--allow-foreign: exit 0)",
        EXIT_USAGE: "usage error: bad option; INPUT or OUT cannot be read, or OUT does not "
        "exist; OUT is refused (damaged, not a bulk output, written with another "
        "--vars-from-columns, or none of its lines is a row of INPUT: another input's); -o "
        "names INPUT or OUT; FILE cannot be written. Nothing was written",
    },
    "mock-server": {
        EXIT_OK: "stopped by Ctrl-C or SIGTERM (after printing its summary)",
        EXIT_FAILED: "could not listen (the port is in use, permission denied, an unknown --host)",
        EXIT_USAGE: "usage error: bad option",
    },
    "demo": {
        EXIT_OK: "the demo ran and rows were answered",
        EXIT_FAILED: "no row was answered",
        EXIT_USAGE: "usage error: bad option, or the demo's files cannot be written (--dir)",
        EXIT_INTERRUPTED: "interrupted (Ctrl-C / SIGTERM)",
    },
}

#: The program's ``--help``: every code, and the commands that return it.
EXIT_CODES_HELP: Final = """\
exit codes:
  0    success (bulk: every row answered)
  1    bulk: some rows failed, or may have been processed by an earlier run (reported,
       not sent again); reply: an API error not listed below (e.g. 422)
  2    usage error: bad option, bad input file, no token, a base URL that is not the
       API's root (refused, or a 404 that is not ASSISTANT_NOT_FOUND); bulk: OUT
       refused (being written by another run, lines for rows not in INPUT, not a bulk
       output). Nothing was processed
  3    401/403: the token is missing, wrong or may not use this assistant
       (bulk: stopped at the first 401; run it again once the token is fixed)
  4    ASSISTANT_NOT_FOUND: no such assistant for this token
  5    INSUFFICIENT_BALANCE (bulk: stopped at the first one; top up, run it again)
  6    still rate limited (429) after retries, or no slot within --max-wait
  7    network: could not connect, or the request timed out
  8    5xx, or a reply that is not valid
  9    bulk: --max-replies reached (run it again to send the rest)
  10   bulk: OUT could not be written (disk full, quota): sending stopped, results
       that could not be written were printed on stderr as JSON lines
  130  interrupted (Ctrl-C / SIGTERM; bulk: run it again to resume)
  each command's --help lists the codes it returns (e.g. autocalls-async bulk --help)
"""


def exit_codes_help(command: str | None = None) -> str:
    """The ``exit codes:`` section of a command's ``--help`` (None: the program's)."""
    if command is None:
        return EXIT_CODES_HELP
    lines = ["exit codes:"]
    for code, meaning in EXITS[command].items():
        wrapped = textwrap.wrap(meaning, 80, break_on_hyphens=False)
        lines.append(f"  {code:<5}{wrapped[0]}")
        lines.extend(f"       {line}" for line in wrapped[1:])
    return "\n".join(lines) + "\n"
