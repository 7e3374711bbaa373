"""The ``autocalls-async`` command (also ``python -m autocalls_async``).

``reply`` sends one message, ``bulk`` runs a CSV/JSONL file through ``autocalls_async.bulk`` into
a resumable JSONL output, ``mock-server`` serves the emulator, ``demo`` shows the whole flow
with no token and no network. The token is read from ``--token`` or ``AUTOCALLS_API_TOKEN`` and
is never printed. rich (the ``cli`` extra) draws the progress bar and tables when installed and
writing to a terminal; otherwise output is plain lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from importlib import resources
from pathlib import Path
from typing import IO, Any, Final, Protocol

import attrs

from ._budget import Budget
from ._client import AsyncAutocalls, ClientStats
from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    AssistantNotFoundError,
    AuthenticationError,
    AutocallsError,
    BudgetExceededError,
    ClientClosedError,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RateLimitTimeout,
    UnprocessableEntityError,
)
from ._log import configure_from_env
from ._models import Priority, RateLimit
from ._ratelimit import Limiter, RateLimiter, Slot, default_limiter
from ._retry import Decision, RetryPolicy
from ._token_input import resolve_token
from ._version import __version__
from ._wire import DEFAULT_BASE_URL, DEFAULT_MAX_REQUEST_BYTES, RAISE_LIMIT_HINT, check_token
from .bulk import DEFAULT_CONCURRENCY, BulkRequest, BulkResult, BulkRunner, error_code

__all__ = ["main"]

PROG: Final = "autocalls-async"

# Exit codes, documented in ``--help``.
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
"""

ENVIRONMENT_HELP: Final = """\
environment:
  AUTOCALLS_API_TOKEN  the API token (preferred over --token, which shows in `ps`; or
                       --token-file PATH, or --token - to read it from stdin)
  AUTOCALLS_BASE_URL   the API's base URL (default https://app.autocalls.ai/api)
  AUTOCALLS_LOG        debug|info: log the SDK's requests and retries to stderr
"""

#: The bulk client remembers few conversations: a bulk job never asks for them again.
BULK_CONVERSATION_CACHE: Final = 1024
PLAIN_PROGRESS_EVERY: Final = 5.0  # seconds between plain progress lines
#: The ETA is measured over this run's last starts once it has this many (before: the limit's
#: pace); over the last ``PACE_WINDOW`` of them, so that it follows a change of traffic.
PACE_MIN_STARTS: Final = 5
PACE_WINDOW: Final = 32
#: Below this fraction of the token's slots, the progress says other traffic took the rest.
SHARE_SHOWN_BELOW: Final = 0.9
#: A call granted its slot later than this after it could have been is "late" by whole slots
#: (scheduling and the limiter's own margin are not other traffic).
LATE_MARGIN: Final = 0.05


# --------------------------------------------------------------------------- errors


def exit_code_for(error: AutocallsError) -> int:
    """The documented exit code of ``reply`` for an error."""
    if isinstance(error, InvalidRequestError):
        return EXIT_USAGE
    if isinstance(error, AuthenticationError | PermissionDeniedError):
        return EXIT_AUTH
    if isinstance(error, AssistantNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, NotFoundError):  # a route the server does not have: a wrong base URL
        return EXIT_USAGE
    if isinstance(error, InsufficientBalanceError):
        return EXIT_BALANCE
    if isinstance(error, BudgetExceededError):
        return EXIT_MAX_REPLIES
    if isinstance(error, RateLimitError | RateLimitTimeout):
        return EXIT_RATE_LIMITED
    if isinstance(error, APIConnectionError):
        return EXIT_NETWORK
    if isinstance(error, InternalServerError | APIResponseValidationError):
        return EXIT_SERVER
    return EXIT_FAILED


def hint_for(error: AutocallsError) -> str:
    if isinstance(error, AssistantNotFoundError):
        return "check --assistant-id: the assistant must belong to the account of this token"
    if isinstance(error, NotFoundError):
        return (
            "check --base-url / AUTOCALLS_BASE_URL: it should be the API's root, like "
            f"{DEFAULT_BASE_URL} (not the site's root, not the whole endpoint)"
        )
    if isinstance(error, AuthenticationError):
        return "check AUTOCALLS_API_TOKEN (copy the token again from the Autocalls dashboard)"
    if isinstance(error, PermissionDeniedError):
        return "this token may not use this assistant or endpoint"
    if isinstance(error, InsufficientBalanceError):
        return "top up the account's balance in the Autocalls dashboard"
    if isinstance(error, BudgetExceededError):
        return "raise --max-replies, or run the same command again to send the rest"
    if isinstance(error, RateLimitError):
        if error.retry_after is not None:
            return (
                f"the service asks to wait {_duration(error.retry_after)} (Retry-After) before "
                "the next request with this token; try again then"
            )
        return "the token's limit is used up; try again in a minute"
    if isinstance(error, RateLimitTimeout):
        return "no slot of the token's limit was free in time; raise --max-wait, or try later"
    if isinstance(error, APIConnectionError):
        return "check --base-url / AUTOCALLS_BASE_URL and the network; raise --timeout if slow"
    if isinstance(error, APIError) and error.status == 413:
        return (
            "the server refuses requests this big: shorten the message or the variables "
            "(--max-request-bytes N, at the server's limit, refuses them before sending)"
        )
    if isinstance(error, UnprocessableEntityError):
        return "the service refused the request's fields"
    if isinstance(error, InternalServerError | APIResponseValidationError):
        return "the service failed; try again later (the message may have been processed)"
    if isinstance(error, InvalidRequestError):
        return f"see `{PROG} --help`"
    return "see the message above"


#: Characters a terminal acts on (ESC sequences that move the cursor, retitle the window,
#: or hide text; BEL; C1 controls): never printed as they are (F14).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters shown escaped (``\x1b``), line breaks
    and tabs kept."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def describe(error: AutocallsError) -> str:
    """One line: the error code, the status, the message and a hint; never a traceback."""
    status = f" (HTTP {error.status})" if isinstance(error, APIError) else ""
    message = error.message if isinstance(error, APIError) else str(error)
    message = printable(in_cli_words(" ".join(message.split())))
    return f"{PROG}: {error_code(error)}{status}: {message}; hint: {hint_for(error)}"


#: The SDK's messages name its Python arguments; the command line's name its options.
CLI_WORDS: Final = {RAISE_LIMIT_HINT: "pass --max-request-bytes N"}


#: SDK advice naming Python, and the command line's own words for it.
CLI_PATTERNS: Final = (
    (
        re.compile(
            r"this client's rate_limit is (\S+) \(token_id=(\w+)\); set "
            r"rate_limit=RateLimit\((\d+), ([\d.e+-]+)\) to match it, or "
            r"RateLimit\.from_server\(\) to adopt it"
        ),
        r"--rate-limit is \1 (token_id=\2); pass --rate-limit \3/\4 to match it",
    ),
)


def in_cli_words(text: str) -> str:
    """An SDK message as the command line says it: its options, not the SDK's arguments."""
    for sdk, cli in CLI_WORDS.items():
        text = text.replace(sdk, cli)
    for pattern, replacement in CLI_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class CliWordsFormatter(logging.Formatter):
    """The SDK's log lines on the command line: prefixed with the command's name, in its
    words (``--rate-limit``, not ``rate_limit=RateLimit(...)``)."""

    def format(self, record: logging.LogRecord) -> str:
        return in_cli_words(super().format(record))


def cli_result(result: BulkResult) -> BulkResult:
    """A bulk row's result as OUT says it: an invalid row's message in the CLI's words."""
    error = result.error
    if isinstance(error, InvalidRequestError):
        text = in_cli_words(str(error))
        if text != str(error):
            return attrs.evolve(result, error=InvalidRequestError(text))
    return result


def _usage_error(message: str) -> int:
    """One message on stderr; its own line breaks kept (a refusal names lines, one each)."""
    lines = [
        (line[: len(line) - len(line.lstrip())] if n else "") + " ".join(line.split())
        for n, line in enumerate(message.splitlines())
    ]
    print(f"{PROG}: " + printable("\n".join(lines)), file=sys.stderr)
    return EXIT_USAGE


def token_problem(token: str | None) -> str | None:
    """What is wrong with the token from --token or the environment, in the CLI's words (the
    SDK's messages name the Python argument ``api_token=``); None when it may be sent."""
    if token is None:
        token = os.environ.get("AUTOCALLS_API_TOKEN")
    if token is None:
        return (
            "no API token: set the AUTOCALLS_API_TOKEN environment variable (export "
            "AUTOCALLS_API_TOKEN=...) or pass --token; nothing was sent. To try the command "
            f"without one: {PROG} demo, or {PROG} mock-server"
        )
    try:
        check_token(token)
    except InvalidRequestError as exc:
        return str(exc).replace("api_token", "the API token (--token / AUTOCALLS_API_TOKEN)")
    return None


def input_problem(path: Path, out: Path) -> str | None:
    """Why INPUT cannot be read as a file, or OUT is a directory; None when neither."""
    if path.is_dir():
        return f"cannot read {path}: it is a directory; give a .csv or .jsonl file"
    if not path.is_file():
        return f"cannot read {path}: no such file"
    if out.is_dir():
        return f"--out {out} is a directory; give a file, e.g. --out {out / 'replies.jsonl'}"
    return None


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 row``, ``2 rows``; ``many`` for irregular plurals (``1 retry``, ``2 retries``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


# --------------------------------------------------------------------------- options


def _rate_limit(text: str) -> RateLimit | None:
    if text.strip().lower() in {"none", "off", "0"}:
        return None
    try:
        return RateLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _burst(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number >= 1 (1: evenly spaced starts)"
        )
    return value


def _with_burst(args: argparse.Namespace) -> str | None:
    """Apply ``--burst`` to ``--rate-limit``; a problem to say, or None."""
    burst: int | None = getattr(args, "burst", None)
    limit: RateLimit | None = getattr(args, "rate_limit", None)
    if burst is None:
        return None
    if limit is None:
        return "--burst needs a --rate-limit (it shapes the limit; 'none' has no starts to shape)"
    if burst > limit.requests:
        return (
            f"--burst {burst} is more than the {limit.requests} requests of --rate-limit "
            f"{limit.requests}/{limit.period:g}: at most {limit.requests} can start back to back"
        )
    if args.handler is not _mock_server_command:
        args.rate_limit = attrs.evolve(limit, burst=burst)
    return None


def _read_seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds {bound}")
    return value


def _positive_float(text: str) -> float:
    return _read_seconds(text, allow_zero=False)


def _seconds(text: str) -> float:
    return _read_seconds(text, allow_zero=True)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _mock_token(text: str) -> str:
    """A token mock-server accepts: one the SDK and this CLI can send (printable ASCII, no
    space), else every call would be a 401. Its own test token: it may be shown."""
    if not text or any(not 0x21 <= ord(ch) <= 0x7E for ch in text):
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot be sent as a token: the SDK and the CLI send printable ASCII "
            "without spaces (a token copied from the Autocalls dashboard is)"
        )
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value} is not a port: ports are 0-65535 (0 picks a free one)"
        )
    return value


#: A host name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME: Final = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _host(text: str) -> str:
    """An address to bind: an IP address, a host name, or '' (every interface)."""
    host = text.strip()
    if host in ALL_INTERFACES:
        return host
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))
    if _HOST_NAME.match(host):
        return host
    hint = "an IP address (127.0.0.1; 0.0.0.0 or :: for every interface) or a host name"
    if "://" in host or "/" in host:
        hint += ", not a URL"
    elif host.count(":") == 1 or (host.startswith("[") and "]:" in host):
        hint += ", without a port (give the port with --port)"
    raise argparse.ArgumentTypeError(f"{text!r} is not an address to listen on: give {hint}")


def _assistants(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of assistant ids, e.g. 123,456"
        ) from None
    if not ids or any(i <= 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: assistant ids are positive integers")
    return ids


def _delimiter(text: str) -> str:
    named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
    value = named.get(text.lower(), text)
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(
            f"expected one character (or 'tab'), not a quote or a line break: {text!r}"
        )
    return value


def _request_bytes(text: str) -> int | None:
    if text.strip().lower() in {"none", "off"}:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of bytes (or 'none' for no limit)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte (or 'none')")
    return value


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.strip(), value


def _client_options(parser: argparse.ArgumentParser, *, default_rate: str) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--token",
        help="API token, or '-' to read it from stdin (default: $AUTOCALLS_API_TOKEN; a token "
        "given here shows in `ps` to every local user: prefer the variable or --token-file)",
    )
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the API token from PATH, a file only you can read (chmod 600)",
    )
    group.add_argument(
        "--base-url", help="API base URL (default: $AUTOCALLS_BASE_URL or the real service)"
    )
    group.add_argument(
        "--redis-url",
        default=os.environ.get("AUTOCALLS_REDIS_URL") or None,
        metavar="URL",
        help="keep the token's limit in Redis, shared with every process and host that uses "
        "this URL (a web app on Redis): default $AUTOCALLS_REDIS_URL, else the host store "
        "(every process of your user on this machine); needs the redis extra",
    )
    group.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=_rate_limit(default_rate),
        metavar="N/SECONDS",
        help=f"client-side limit per token, e.g. 5/60 or 5/1m; 'none' disables it "
        f"(default: {default_rate}, the service's documented limit)",
    )
    group.add_argument(
        "--burst",
        type=_burst,
        default=None,
        metavar="N",
        help="starts allowed back to back (default: N of --rate-limit, the rolling window the "
        "service counts); 1 spaces every start evenly, for servers that refuse bursts "
        "(nginx limit_req without burst)",
    )
    group.add_argument(
        "--max-retries",
        type=_count,
        default=2,
        metavar="N",
        help="retries of 429, 503 and failed connections (default: 2)",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="seconds per attempt (default: 60)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=_request_bytes,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help=f"refuse, before sending, a message whose request (JSON, UTF-8) would be over N "
        f"bytes (default: {DEFAULT_MAX_REQUEST_BYTES}, 1 MiB, nginx's default "
        "client_max_body_size, past which the server answers 413); raise it if your server "
        "accepts more; 'none': no limit",
    )


def _region(text: str) -> Callable[[str], str] | str:
    """``--e164 REGION``: a normaliser of phone-like identifiers (e-mails and CRM ids are left
    as they are); without the phone extra, the text itself, which the command then refuses
    in one line (``phone_extra_problem``)."""
    from ._notes import phone_like
    from .identifiers import e164

    try:
        normalize = e164(text)
    except ImportError:
        return text
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("default_region", "--e164")) from None

    def phones_only(identifier: str) -> str:
        return normalize(identifier) if phone_like(identifier) else identifier

    phones_only.__name__ = phones_only.__qualname__ = f"--e164 {text}"
    return phones_only


def phone_extra_problem(args: argparse.Namespace) -> str | None:
    """``--e164`` without the phone extra: one line, exit 2."""
    if isinstance(args.e164, str):
        return (
            "--e164 needs the phone extra (the phonenumbers package): pip install "
            "'autocalls-async[phone]'; nothing was sent"
        )
    return None


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
        type=_count,
        metavar="N",
        help="send at most N requests that may be billed, then stop (exit 9); run the same "
        "command again to send the rest",
    )
    group.add_argument(
        "--e164",
        type=_region,
        metavar="REGION",
        help="write phone numbers in E.164 before sending, reading numbers without a + as "
        "numbers of REGION (e.g. US); e-mails and other ids are left as they are; a row whose "
        "number is not possible, or local only (no area code), fails as INVALID_ROW (needs "
        "the phone extra)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send messages to Autocalls AI assistants: one (reply), a whole file "
        "(bulk), or try everything locally (demo, mock-server).",
        epilog=EXIT_CODES_HELP + "\n" + ENVIRONMENT_HELP + f"\nstart here: {PROG} demo",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    reply = commands.add_parser(
        "reply",
        help="send one message and print the assistant's reply",
        description="Send one message to an assistant and print its reply. Errors are one "
        "line on stderr (error code, message, hint) and an exit code per error class.",
        epilog=EXIT_CODES_HELP
        + "\n"
        + ENVIRONMENT_HELP
        + f'\nexample:\n  {PROG} reply --assistant-id 123 --customer +14155551234 "Hi" '
        "--var customer_name=John",
        formatter_class=formatter,
    )
    reply.add_argument("message", help="the customer's message ('-' reads it from stdin)")
    reply.add_argument("--assistant-id", type=int, required=True, metavar="ID")
    reply.add_argument(
        "--customer",
        "--customer-identifier",
        dest="customer",
        required=True,
        metavar="ID",
        help="the customer: an E.164 phone number, an e-mail, a CRM id",
    )
    reply.add_argument(
        "--var",
        type=_variable,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a conversation variable (string value); repeat for more",
    )
    reply.add_argument(
        "--variables",
        metavar="JSON",
        help='variables as a JSON object, e.g. \'{"customer_name": "John"}\' (--var wins)',
    )
    reply.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    reply.add_argument(
        "--max-wait",
        type=_positive_float,
        metavar="SECONDS",
        help="fail (exit 6) rather than wait longer for a rate-limit slot",
    )
    _client_options(reply, default_rate="5/60")
    reply.set_defaults(handler=_reply_command)

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
        "  (--retry-failed sends them again).\n\n" + EXIT_CODES_HELP + "\n" + ENVIRONMENT_HELP,
        formatter_class=formatter,
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
        type=_delimiter,
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
    _cost_options(bulk)
    _client_options(bulk, default_rate="5/60")
    bulk.set_defaults(handler=_bulk_command)

    _results_parser(commands, formatter)

    mock = commands.add_parser(
        "mock-server",
        help="serve the local emulator of the service",
        description="Serve a local emulator of the Autocalls 'generate AI reply' service, "
        "faithful to the documented behaviour: conversations persist per (assistant, customer), "
        "unknown assistants get 404 ASSISTANT_NOT_FOUND, an exhausted balance 402 "
        "INSUFFICIENT_BALANCE, a wrong token 401, and requests past the limit 429 with "
        "Retry-After. It logs one line per request on stderr (time, method, path, status, "
        "the token's id, never the token, and latency). Ctrl-C or SIGTERM stops it and prints "
        "a summary: requests by status, replies, conversations.",
        epilog="example:\n"
        f"  {PROG} mock-server --port 8000 --quiet &\n"
        "  export AUTOCALLS_BASE_URL=http://127.0.0.1:8000/api AUTOCALLS_API_TOKEN=test-token\n"
        f'  {PROG} reply --assistant-id 123 --customer +14155551234 "Hi"',
        formatter_class=formatter,
    )
    mock.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1; 0.0.0.0 or :: for every interface)",
    )
    mock.add_argument(
        "--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free port)"
    )
    mock.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=_rate_limit("5/60"),
        metavar="N/SECONDS",
        help="per-token limit, 'none' for unlimited (default: 5/60, like the service)",
    )
    mock.add_argument(
        "--window",
        choices=("rolling", "fixed", "no-burst"),
        default="rolling",
        help="rolling: at most N in any period (strict); fixed: Laravel's fixed window; "
        "no-burst: nginx limit_req without burst (one per period/N)",
    )
    mock.add_argument(
        "--burst",
        type=_burst,
        default=None,
        metavar="N",
        help="the server lets N come back to back, then one per period/N (nginx's burst=N-1 "
        "nodelay), on any --window (default: no such bucket; 1 with --window no-burst)",
    )
    mock.add_argument(
        "--assistants",
        type=_assistants,
        default=(123,),
        metavar="ID,ID",
        help="assistant ids that exist (default: 123)",
    )
    mock.add_argument(
        "--token",
        action="append",
        type=_mock_token,
        metavar="T",
        help="the only token(s) accepted; repeat for more (default: any non-empty token)",
    )
    mock.add_argument(
        "--balance", type=_count, metavar="N", help="replies paid for (default: unlimited)"
    )
    mock.add_argument(
        "--reply-delay",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="time each reply takes (default: 0)",
    )
    mock.add_argument(
        "--quiet", action="store_true", help="no request log (one line per request on stderr)"
    )
    mock.set_defaults(handler=_mock_server_command)

    demo = commands.add_parser(
        "demo",
        help="run a bulk job against the emulator: no token, no network",
        description="Start the emulator in-process with a fast limit (5 per second), run the "
        "bulk runner over a bundled example CSV, then show the replies and the stats, and "
        "the commands to run the same job yourself (--keep or --dir keeps the files).",
    )
    demo.add_argument("--progress", choices=("auto", "bar", "plain", "off"), default="auto")
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
    demo.set_defaults(handler=_demo_command)
    return parser


def _results_parser(commands: Any, formatter: Any) -> None:
    results = commands.add_parser(
        "results",
        help="one row per input row with its result: a spreadsheet of a bulk run",
        description="Join INPUT and the OUT of its bulk run by content (as a run matches rows; "
        "never by row number, which shifts when rows are edited): one row per input row, in "
        "input order, its columns plus status (answered, failed, invalid, maybe_processed, "
        "not_sent), reply, conversation_id, error_code and error. CSV cells that a spreadsheet "
        "would run as formulas (=, +, -, @) are prefixed with '.",
        epilog=f"example:\n  {PROG} results contacts.csv --out replies.jsonl -o results.csv",
        formatter_class=formatter,
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
    results.add_argument("--delimiter", type=_delimiter, metavar="CHAR", help="as bulk's")
    results.add_argument(
        "--vars-from-columns",
        action="store_true",
        help="as given to bulk (it changes a row's content)",
    )
    results.set_defaults(handler=_results_command)


def _results_command(args: argparse.Namespace) -> int:
    from ._results import results_command

    args.out = args.out or args.out_option
    if args.out is None:
        return _usage_error("results needs the bulk run's OUT: results INPUT OUT")
    return results_command(args)


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
    problem = resolve_token(args) or _with_burst(args)  # --token-file, --token -, --burst
    if problem is not None:
        return _usage_error(problem)
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


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- reply


def _redis_problem(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        import redis  # noqa: F401
    except ImportError:
        return (
            "--redis-url (or AUTOCALLS_REDIS_URL) needs the redis extra: "
            "pip install 'autocalls-async[redis]'"
        )
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return f"--redis-url must start with redis://, rediss:// or unix://, got {url[:40]!r}"
    return None


def _reply_command(args: argparse.Namespace) -> int:
    problem = token_problem(args.token) or _redis_problem(args.redis_url)
    if problem is not None:
        return _usage_error(problem)
    message = sys.stdin.read() if args.message == "-" else args.message
    variables: dict[str, Any] | None = None
    if args.variables is not None:
        try:
            variables = json.loads(args.variables)
        except ValueError as exc:
            return _usage_error(f"--variables is not valid JSON: {exc}")
        if not isinstance(variables, dict):
            return _usage_error('--variables must be a JSON object, e.g. \'{"name": "John"}\'')
    if args.var:
        variables = {**(variables or {}), **dict(args.var)}
    return _run(_reply(args, message, variables))


def _tell(text: str) -> None:
    """One notice on stderr; on a terminal, wrapped at word boundaries to its width."""
    text = f"{PROG}: {text}"
    width = shutil.get_terminal_size().columns if sys.stderr.isatty() else 0
    if width >= 20:
        text = textwrap.fill(
            text,
            width - 1,
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    print(text, file=sys.stderr, flush=True)


#: ``reply`` says it waits for a rate-limit slot once the wait is longer than this.
WAIT_NOTICE_AFTER: Final = 1.0


@attrs.frozen
class TellingRetryPolicy(RetryPolicy):
    """The client's retry policy, saying on stderr what it waits for and how long (``reply``
    would otherwise sit silent for a 429's Retry-After)."""

    tell: Callable[[str], None] = attrs.field(default=_tell, kw_only=True)

    def decide(
        self, error: AutocallsError, retries_done: int, random: Callable[[], float]
    ) -> Decision | None:
        decision = super().decide(error, retries_done, random)
        if decision is None:
            return None
        attempt = f"retry {retries_done + 1} of {self.max_retries}"
        if isinstance(error, RateLimitError):
            why = (
                f"the service asks to wait {_duration(decision.delay)} (Retry-After)"
                if error.retry_after is not None
                else "it gave no Retry-After"
            )
            self.tell(
                f"429 Too Many Requests: the token's limit is used up; {why}: waiting "
                f"{_duration(decision.delay)}, then retrying ({attempt}; Ctrl-C stops)"
            )
        else:
            self.tell(
                f"{error_code(error)}: retrying in {decision.delay:.1f}s ({attempt}; Ctrl-C stops)"
            )
        return decision


class TellingLimiter:
    """A rate limiter that says on stderr when a call waits for a slot (``reply``)."""

    def __init__(self, inner: Limiter, tell: Callable[[str], None] = _tell) -> None:
        self.inner = inner
        self.rate_limit = inner.rate_limit
        self.tell = tell
        self.paused = False  #: a 429 paused the token: the retry's notice said why already

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: str,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[Slot]:
        loop = asyncio.get_running_loop()
        notice = loop.call_later(WAIT_NOTICE_AFTER, self._waiting)
        try:
            async with self.inner.slot(key, deadline=deadline, priority=priority) as slot:
                notice.cancel()
                yield slot
        finally:
            notice.cancel()

    def _waiting(self) -> None:
        if self.paused:
            return
        limit = self.rate_limit
        shape = (
            f"one every {limit.interval:.0f}s"
            if limit.bursts == 1
            else f"the last {limit.requests} started within {limit.period:g}s"
        )
        self.tell(
            f"waiting for a rate-limit slot ({limit.requests} per {limit.period:g}s for this "
            f"token, shared by this host's processes: {shape}); "
            "--max-wait bounds the wait, Ctrl-C stops"
        )

    async def pause(self, key: str, seconds: float) -> None:
        self.paused = True
        await self.inner.pause(key, seconds)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _reply(args: argparse.Namespace, message: str, variables: dict[str, Any] | None) -> int:
    limiter = (
        None
        if args.rate_limit is None
        else TellingLimiter(default_limiter(args.rate_limit, redis_url=args.redis_url))
    )
    try:
        async with AsyncAutocalls(
            args.token,
            base_url=args.base_url,
            rate_limit=args.rate_limit,
            limiter=limiter,
            retry_policy=TellingRetryPolicy(max_retries=args.max_retries),
            timeout=args.timeout,
            max_request_bytes=args.max_request_bytes,
        ) as client:
            reply = await client.generate_reply(
                assistant_id=args.assistant_id,
                customer_identifier=args.customer,
                message=message,
                variables=variables,
                max_wait=args.max_wait,
            )
    except AutocallsError as exc:
        print(describe(exc), file=sys.stderr)
        return exit_code_for(exc)
    finally:
        if limiter is not None:
            await limiter.aclose()
    if args.json:
        print(json.dumps(dict(reply.raw), ensure_ascii=False, indent=2))
        return EXIT_OK
    if reply.reply:
        print(printable(reply.reply) if sys.stdout.isatty() else reply.reply)
    if reply.ai_disabled:
        print("(AI disabled: a human has taken this conversation over)", file=sys.stderr)
    for call in reply.function_calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        print(f"function call: {call.name or '?'} {arguments}", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- bulk


class StartClock:
    """A rate limiter that notes when requests start, around the real one.

    The achieved rate is then (starts - 1) / (last start - first start): n requests at the full
    rate span n - 1 intervals, so dividing by the run's elapsed time would misreport it.
    """

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.rate_limit = inner.rate_limit
        self.count = 0
        self.first = self.last = 0.0
        self.recent: deque[float] = deque(maxlen=PACE_WINDOW)  #: the last starts' times
        #: Slots this run waited through while one of its calls was ready: other traffic on
        #: the token took them (a web app, another run). Without any, a slow pace is this
        #: run's own (reply latency, concurrency), never "other traffic".
        self.lost_slots = 0
        self.recent_lost: deque[int] = deque(maxlen=PACE_WINDOW)  #: per start, the last ones

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: str,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[Slot]:
        entered = time.monotonic()
        async with self.inner.slot(key, deadline=deadline, priority=priority) as slot:
            now = time.monotonic()
            lost = 0
            if self.count and self.rate_limit is not None:
                interval = self.rate_limit.interval
                late = now - max(entered, self.last + interval) - LATE_MARGIN
                if late >= interval:  # a whole slot went by while this call was ready
                    lost = int(late / interval)
            self.lost_slots += lost
            self.recent_lost.append(lost)
            self.last = now
            if not self.count:
                self.first = self.last
            self.count += 1
            self.recent.append(self.last)
            yield slot

    async def pause(self, key: str, seconds: float) -> None:
        await self.inner.pause(key, seconds)

    async def aclose(self) -> None:
        if isinstance(self.inner, Limiter):
            await self.inner.aclose()

    def rate(self) -> float | None:
        """Starts per second, or None before two starts."""
        span = self.last - self.first
        return (self.count - 1) / span if self.count > 1 and span > 0 else None

    def pace(self) -> float | None:
        """Seconds between this run's starts, over its last ``PACE_WINDOW`` starts; None
        before ``PACE_MIN_STARTS``. Slots that other traffic on the token took (a web app's
        interactive calls, another run) lengthen it; so do 429 pauses."""
        recent = self.recent
        if len(recent) < PACE_MIN_STARTS:
            return None
        return (recent[-1] - recent[0]) / (len(recent) - 1)


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


def send_time(requests: int, interval: float, *, first_at_once: bool = True) -> float:
    """Seconds until the last of ``requests`` starts, one every ``interval``: the first starts
    at once when nothing else uses the token (``first_at_once``), so n requests span n - 1
    intervals; once a run has started, each request left waits an interval. Both the dry
    run's estimate and the run's first line (and its ETA) come from here."""
    if requests <= 0:
        return 0.0
    return (requests - 1 if first_at_once else requests) * interval


@attrs.define
class Meter:
    """Counts of a bulk run, and the figures its progress and summary show."""

    todo: int  #: rows this run will send
    rate_limit: RateLimit | None
    stats: ClientStats
    started: float = attrs.Factory(time.monotonic)
    answered: int = 0
    failed: int = 0
    not_sent: int = 0
    ended: float | None = None
    starts: StartClock | None = None
    #: This run's failures by kind (invalid, failed, uncertain) and the first rows of each.
    counts: dict[str, int] = attrs.Factory(dict)
    examples: dict[str, list[str]] = attrs.Factory(dict)

    def note_failure(self, result: BulkResult) -> None:
        from ._bulkio import EXAMPLES_SHOWN, row_name

        if isinstance(result.error, InvalidRequestError):
            kind = "invalid"
        else:
            kind = "uncertain" if result.maybe_processed else "failed"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_SHOWN:
            shown.append(row_name(result.request))

    @property
    def done(self) -> int:
        return self.answered + self.failed

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def rate(self) -> float | None:
        """Requests started per second so far; None until there are enough of them
        (``PACE_MIN_STARTS``) for a rate to mean something: one request in 0.05 s is not
        "1,200 per minute"."""
        if self.starts is not None:
            return self.starts.rate() if self.starts.count >= PACE_MIN_STARTS else None
        elapsed = self.elapsed
        if self.stats.requests < PACE_MIN_STARTS or elapsed <= 0:
            return None
        return self.stats.requests / elapsed

    def eta(self) -> float | None:
        """Seconds left: the rows left at the pace this run measured over its last starts
        (never faster than the limit), which counts the slots other traffic on the token
        took; before a few starts, at the limit's pace (or the pace seen, if no limit)."""
        left = max(self.todo - self.done - self.not_sent, 0)
        if not left:
            return 0.0
        if self.rate_limit is not None:
            pace = self.starts.pace() if self.starts is not None else None
            started = self.starts.count if self.starts is not None else self.stats.requests
            interval = max(pace or 0.0, self.rate_limit.interval)
            return send_time(left, interval, first_at_once=not started)
        if self.done:
            return left * self.elapsed / self.done
        return None

    def share(self) -> float | None:
        """The fraction of the token's slots this run got over its last starts (1.0: all of
        them); None before a few starts or without a limit."""
        pace = self.starts.pace() if self.starts is not None else None
        if pace is None or self.rate_limit is None or pace <= 0:
            return None
        return min(1.0, self.rate_limit.interval / pace)

    def figures(self, *, finished: bool = False) -> str:
        """Rate, the slots other traffic took (when it took some), and the ETA (none once
        ``finished``)."""
        others = ""
        lost = sum(self.starts.recent_lost) if self.starts is not None else 0
        if lost and self.starts is not None:
            taken = lost / (lost + len(self.starts.recent_lost))
            if taken > 1 - SHARE_SHOWN_BELOW:
                others = f" ({taken:.0%} of slots to other traffic)"
        measured = (self.rate_text() if self.rate() is not None else "") + others
        parts = [measured.strip()] if measured else []
        if not finished:
            parts.append(f"ETA {_duration(self.eta())}")
        return ", ".join(parts)

    def rate_text(self) -> str:
        """``12.0 req/min`` (per second for limits under a minute); ``rate not measured``
        before ``PACE_MIN_STARTS`` requests."""
        rate = self.rate()
        if rate is None:
            return "rate not measured"
        per_minute = self.rate_limit is not None and self.rate_limit.period >= 60
        rate *= 60 if per_minute else 1
        return f"{rate:.1f} req/{'min' if per_minute else 's'}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress(Protocol):
    def update(self) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def update(self) -> None:
        pass

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class PlainProgress:
    """A line on stderr at most every few seconds: for logs, pipes and CI."""

    def __init__(self, meter: Meter, stream: IO[str], every: float = PLAIN_PROGRESS_EVERY):
        self.meter, self.stream, self.every = meter, stream, every
        self._last = time.monotonic()

    def update(self) -> None:
        now = time.monotonic()
        finished = self.meter.done >= self.meter.todo
        if now - self._last >= self.every or finished:
            self._last = now
            meter = self.meter
            figures = meter.figures(finished=finished)
            print(
                f"{meter.done}/{plural(meter.todo, 'row')} ({meter.answered} answered, "
                f"{meter.failed} failed)" + (f", {figures}" if figures else ""),
                file=self.stream,
                flush=True,
            )

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """rich's progress bar on stderr: rows done, rate, and an ETA from the rate limit.

    Once closed it shows the outcome instead of a spinner ("done", or "stopped" before the
    last row) and no ETA; the figures never wrap, they are cut with an ellipsis.
    """

    def __init__(self, meter: Meter, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
        )
        from rich.progress import Progress as RichBar
        from rich.text import Text

        progress = self

        class State(SpinnerColumn):
            def render(self, task: Any) -> Any:
                if progress.closed:
                    done = meter.done >= meter.todo
                    return Text("done" if done else "stopped", style="green" if done else "red")
                return super().render(task)

        class Figures(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(
                    f"{meter.failed} failed"
                    + "".join(f" · {f}" for f in [meter.figures(finished=progress.closed)] if f),
                    style="progress.remaining",
                    no_wrap=True,
                    overflow="ellipsis",
                )

        self.meter = meter
        self.closed = False
        self.console = Console(stderr=True)
        self.bar = RichBar(
            State(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            Figures(),
            console=self.console,
        )
        self.task = self.bar.add_task(description, total=meter.todo)
        self.bar.start()

    def update(self) -> None:
        self.bar.update(self.task, completed=self.meter.done)

    def note(self, text: str) -> None:
        self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.closed = True
        self.update()
        self.bar.stop()  # draws the bar a last time, in its closed state


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def make_progress(mode: str, meter: Meter, description: str) -> Progress:
    if mode == "off":
        return NoProgress()
    terminal = sys.stderr.isatty()
    if mode == "bar" or (mode == "auto" and terminal):
        if _rich_available():
            return RichProgress(meter, description)
        if mode == "bar":
            print(
                f"{PROG}: no progress bar without rich: pip install 'autocalls-async[cli]'",
                file=sys.stderr,
            )
    return PlainProgress(meter, sys.stderr)


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
                f"{plural(self.unwritten, 'result')} that could not be written are printed "
                "above on stderr as JSON lines: keep them (a rerun reports those rows as maybe "
                "processed and does not send them again). "
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
) -> Outcome:
    """Run ``source`` (an ``InputFile``) into ``log`` (a ``ResultLog``), with signals handled.

    OUT is locked first, then read, then the input is checked against it: nothing is sent
    unless every line of OUT belongs to a row of the input (or ``allow_foreign``).
    """
    from ._bulkio import Ledger, OutWriteError, ResultLog
    from ._hold import Hold
    from ._notes import DataNotes

    log.open()
    try:
        ledger: Ledger = log.read()
        source.take_snapshot()  # the one read of INPUT: every pass below reads this copy
        notes = DataNotes()
        source.check(ledger, out=log.path, allow_foreign=allow_foreign, observe=notes.add)
        notes.unused_columns = () if source.extra_as_variables else source.extra_columns
        notes.find_rows(source.keyed())
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
        for request, key in source.keyed():
            state = ledger.state_of(request, key)
            if state == "uncertain":
                hold.uncertain(request)
            elif _to_send(state, retry_failed) and hold.holds(request):
                held_rows.add(request.row)
        todo -= hold.held
    keys: dict[int | None, str] = {}  # row -> identity, for the rows pulled and not yet written
    pending: set[int | None] = set()  # rows whose "sending" line has no result line yet

    def rows() -> Iterator[BulkRequest]:
        for request, key in source.keyed():
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

    def sending(request: BulkRequest) -> None:
        if write_error is None:
            try:
                log.write_sending(request, keys[request.row])
            except OutWriteError as exc:
                out_failed(exc)
        if write_error is not None:  # no journal line, no send
            raise ClientClosedError("not sent: OUT cannot be written")
        pending.add(request.row)

    def record(result: BulkResult, key: str | None) -> None:
        nonlocal unwritten
        if write_error is None:
            try:
                log.write(result, key)
                return
            except OutWriteError as exc:
                out_failed(exc)
        unwritten += 1
        sys.stderr.write(ResultLog.line(result, key).decode() + "\n")
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
            pace = f"; at {rate_limit} about {_duration(seconds)}"
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
        command=f"{PROG} results {shlex.quote(str(source.path))} {shlex.quote(str(log.path))}",
    )


def _to_send(state: str | None, retry_failed: bool) -> bool:
    return state is None or (state == "failed" and retry_failed)


def _left_unsent(result: BulkResult, stop_on: tuple[type[AutocallsError], ...]) -> bool:
    """A row the run leaves for the next one: not sent (the run stopped or was closed first),
    or refused by a failure that stops the run (402, 401, --max-replies) without processing."""
    error = result.error
    return isinstance(error, (ClientClosedError, *stop_on)) and not result.maybe_processed


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
    state = "Interrupted" if outcome.interrupted else "Done"
    lines = [
        f"{state} in {_duration(meter.elapsed)}: {plural(outcome.total, 'row')}: "
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
            f"again{_rows(outcome.examples.get('uncertain'), outcome.uncertain)}. Check those "
            "conversations; add --retry-unsafe-failed to send them anyway"
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
            f"processed{_rows(meter.examples.get('uncertain'), uncertain)}: check those "
            "conversations; --retry-unsafe-failed sends them again"
        )
    if lines and outcome.command is not None:
        lines.append(f"Every row with its result: {outcome.command}")
    return lines


def print_lines(lines: list[str]) -> None:
    """Print on stdout; on a terminal, each line wrapped at word boundaries to its width
    (``COLUMNS`` or the terminal's), continuation lines indented. Elsewhere (a pipe, a log)
    one line each, whole, for grep."""
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    for line in map(printable, lines):
        if width >= 20:
            indent = line[: len(line) - len(line.lstrip())]
            line = textwrap.fill(
                line,
                width - 1,  # some terminals wrap a line that fills the last column
                subsequent_indent=indent + "  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        print(line, flush=True)


def stop_message(error: AutocallsError, left: int) -> str:
    """Why a bulk run stopped sending, and how to send the rest."""
    if isinstance(error, BudgetExceededError):
        why = "Stopped at --max-replies"
        then = "run the same command again (with a new --max-replies) to send them"
    else:
        why = f"Stopped at the first {error_code(error)}"
        then = f"{hint_for(error)}, then run the same command again to send them"
    return f"{why}: {plural(left, 'row')} left unsent (no result in OUT); {then}."


def _bulk_command(args: argparse.Namespace) -> int:
    from ._bulkio import InputError, InputFile, ResultLog

    if args.concurrency < 1:
        return _usage_error("--concurrency must be >= 1")
    if args.out.resolve() == args.input.resolve():
        return _usage_error("--out must not be the input file")
    problem = phone_extra_problem(args)
    if problem is not None:
        return _usage_error(problem)
    if args.dry_run:
        return _dry_run_command(args)
    problem = (
        token_problem(args.token)
        or input_problem(args.input, args.out)
        or _redis_problem(args.redis_url)
    )
    if problem is not None:
        return _usage_error(problem)
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
        return _usage_error(str(exc))
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
                concurrency=args.concurrency,
                progress_mode=args.progress,
                description=args.input.name,
                priority=Priority[args.priority.upper()],
            )
        except InputError as exc:
            await client.close()
            return _usage_error(str(exc))
        print_lines(summary(outcome, args.out))
        message = outcome.write_message(args.out)
        if message is not None:
            print(message, file=sys.stderr)
        return outcome.exit_code

    return _run(job())


def _cost_client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client options of ``--max-replies`` and ``--e164``."""
    options: dict[str, Any] = {}
    if args.max_replies is not None:
        options["budget"] = Budget(replies=args.max_replies)
    if args.e164 is not None:
        options["normalize_identifier"] = args.e164
    return options


@attrs.define
class DryRun:
    """What ``bulk --dry-run`` found: counts only, nothing sent."""

    rows: int = 0
    to_send: int = 0
    answered_before: int = 0  #: skipped: answered in OUT
    failed_before: int = 0  #: skipped: failed in OUT (without --retry-failed)
    uncertain_before: int = 0  #: skipped: may have been processed (without --retry-unsafe-failed)
    invalid: int = 0
    problems: list[str] = attrs.Factory(list)  #: the first invalid rows' messages
    customers: set[str] = attrs.Factory(set)
    conversations: set[tuple[int, str]] = attrs.Factory(set)
    assistants: set[int] = attrs.Factory(set)
    hold: Any = None  #: rows held behind an uncertain row of their conversation (a ``Hold``)
    notes: list[str] = attrs.Factory(list)  #: what the data means (unused columns, ...)
    shown: int = 5  #: invalid rows named (--show-all: every one)


DRY_RUN_PROBLEMS_SHOWN: Final = 5


def dry_run(
    source: Any,
    log: Any,
    *,
    retry_failed: bool,
    retry_unsafe_failed: bool = False,
    allow_foreign: bool = False,
    normalize: Any = None,
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
    give_up_uncertain: bool = False,
    show_all: bool = False,
) -> DryRun:
    """Check ``source`` against the output of earlier runs in ``log`` as ``run_job`` would
    (rows matched by content, foreign lines refused); send nothing.

    OUT is read with ``log.peek()``: never created nor written, under a shared lock that a
    run writing OUT refuses (the dry run then fails as the run would: exit 2). Rows are matched
    by the key of the row as read, before ``normalize``, exactly as a run matches them.
    """
    from ._bulkio import Ledger
    from ._hold import Hold

    ledger: Ledger = log.peek()
    source.take_snapshot()
    try:
        return _dry_run(
            source,
            ledger,
            log,
            retry_failed,
            retry_unsafe_failed,
            allow_foreign,
            normalize,
            max_request_bytes,
            None if give_up_uncertain else Hold(normalize=normalize),
            sys.maxsize if show_all else DRY_RUN_PROBLEMS_SHOWN,
        )
    finally:
        source.close()


def _dry_run(
    source: Any,
    ledger: Any,
    log: Any,
    retry_failed: bool,
    retry_unsafe_failed: bool,
    allow_foreign: bool,
    normalize: Any,
    max_request_bytes: int | None,
    hold: Any,
    shown: int,
) -> DryRun:
    from ._notes import DataNotes
    from .bulk import _check

    notes = DataNotes()
    retry_failed = retry_failed or retry_unsafe_failed
    found = DryRun(hold=hold)
    found.shown = shown

    def count(request: BulkRequest, key: str) -> None:
        notes.add(request, key)
        state = ledger.state_of(request, key)
        if state == "answered":
            found.answered_before += 1
            return
        if state == "failed" and not retry_failed:
            found.failed_before += 1
            return
        if state == "uncertain" and not retry_unsafe_failed:
            found.uncertain_before += 1
            if hold is not None:
                hold.uncertain(request)
            return
        if hold is not None and hold.holds(request):
            return
        problem = _check(request, max_request_bytes)
        customer = request.customer_identifier
        if problem is None and normalize is not None:
            try:
                customer = normalize(customer)
            except InvalidRequestError as exc:
                problem = InvalidRequestError(f"row {request.row or request.id}: {exc}")
        if problem is not None:
            found.invalid += 1
            if len(found.problems) < found.shown:
                found.problems.append(in_cli_words(" ".join(str(problem).split())))
            return
        found.to_send += 1
        found.customers.add(customer)
        found.conversations.add((request.assistant_id, customer))
        found.assistants.add(request.assistant_id)

    # One pass: the check and the counts (the rows are matched exactly as the run matches them).
    source.check(ledger, out=log.path, allow_foreign=allow_foreign, observe=count)
    found.rows = source.rows
    notes.unused_columns = () if source.extra_as_variables else source.extra_columns
    notes.find_rows(source.keyed())
    found.notes = notes.lines(e164=normalize is not None)
    return found


def dry_run_report(
    found: DryRun, *, out: Path, rate_limit: RateLimit | None, max_replies: int | None
) -> list[str]:
    sending = found.to_send if max_replies is None else min(found.to_send, max_replies)
    lines = [
        f"Dry run: nothing was sent. {plural(found.rows, 'row')} in the input:",
        f"  to send:  {found.to_send}"
        + (f" (--max-replies stops after {max_replies})" if sending < found.to_send else ""),
        f"  to skip:  {found.answered_before + found.failed_before + found.uncertain_before} "
        f"({found.answered_before} already answered in {out}, {found.failed_before} failed "
        "before"
        + (": add --retry-failed to send them" if found.failed_before else "")
        + (
            f"; {found.uncertain_before} may have been processed: --retry-unsafe-failed sends them"
            if found.uncertain_before
            else ""
        )
        + ")",
        f"  invalid:  {found.invalid} (would fail as INVALID_ROW, never sent)",
    ]
    lines.extend(f"    {problem}" for problem in found.problems)
    if found.invalid > len(found.problems):
        lines.append(
            f"    … and {found.invalid - len(found.problems)} more (--show-all lists them)"
        )
    if found.hold is not None and found.hold.held:
        lines.extend("  " + line for line in found.hold.report())
    lines.append(
        f"  distinct customers: {len(found.customers)} "
        f"({plural(len(found.conversations), 'conversation')} with "
        f"{plural(len(found.assistants), 'assistant')})"
    )
    if rate_limit is None:
        lines.append("  time: no client-side rate limit (--rate-limit none)")
    else:
        seconds = send_time(sending, rate_limit.interval)
        lines.append(
            f"  time at {rate_limit}: about {_duration(seconds)} "
            f"({plural(sending, 'request')}, one every {rate_limit.interval:g}s, retries not "
            "included)"
        )
    lines.extend(f"  note: {note}" for note in found.notes)
    return lines


def _dry_run_command(args: argparse.Namespace) -> int:
    from ._bulkio import InputError, InputFile, ResultLog

    problem = input_problem(args.input, args.out)
    if problem is not None:
        return _usage_error(problem)
    source = InputFile(
        args.input,
        format=args.format,
        extra_as_variables=args.vars_from_columns,
        delimiter=args.delimiter,
    )
    try:
        found = dry_run(
            source,
            ResultLog(args.out),
            retry_failed=args.retry_failed,
            retry_unsafe_failed=args.retry_unsafe_failed,
            allow_foreign=args.allow_foreign,
            normalize=args.e164,
            max_request_bytes=args.max_request_bytes,
            give_up_uncertain=args.give_up_uncertain,
            show_all=args.show_all,
        )
    except InputError as exc:
        return _usage_error(str(exc))
    report = dry_run_report(
        found, out=args.out, rate_limit=args.rate_limit, max_replies=args.max_replies
    )
    print_lines(report)
    return EXIT_FAILED if found.invalid else EXIT_OK


# --------------------------------------------------------------------------- mock-server


def _mock_server_command(args: argparse.Namespace) -> int:
    return _run(_mock_server(args))


#: The token ``mock-server`` suggests when it accepts any (it prints it; it is no secret).
MOCK_TOKEN: Final = "test-token"
ALL_INTERFACES: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@attrs.define
class RequestLog:
    """``mock-server``'s request log (one line per request on stderr, unless quiet) and the
    counts its summary shows on exit. Lines name a token by its id, never the token."""

    quiet: bool = False
    by_status: dict[str, int] = attrs.Factory(dict)

    def __call__(self, record: Any) -> None:
        status = "dropped" if record.status is None else str(record.status)
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if self.quiet:
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(record.time))
        millis = int(record.time % 1 * 1000)
        token = f"token={record.token_id}" if record.token_id else "no-token"
        print(
            f"{stamp}.{millis:03d} {record.method} {record.path} {status} {token} "
            f"{record.latency * 1000:.0f}ms",
            file=sys.stderr,
            flush=True,
        )

    def summary(self, server: Any) -> str:
        total = sum(self.by_status.values())
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(self.by_status.items()))
        return (
            f"Autocalls emulator stopped: {plural(total, 'request')}"
            + (f" ({statuses})" if statuses else "")
            + f"; {plural(server.replies_served, 'reply', 'replies')}; "
            f"{plural(len(server.conversations), 'conversation')}"
        )


def _listen_problem(args: argparse.Namespace, exc: OSError) -> str:
    where = f"{args.host}:{args.port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the port is in use (another mock-server?); pick "
            f"another with --port {args.port + 1 if args.port else 8001}, or --port 0 for a "
            "free one"
        )
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied; use a port above 1023"
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot listen on {where}: {exc.strerror or exc}; --host must be an address of "
            "this machine: 127.0.0.1 (this host only), 0.0.0.0 or :: (every interface), or a "
            "name that resolves to one"
        )
    return f"cannot listen on {where}: {exc.strerror or exc}"


async def _mock_server(args: argparse.Namespace) -> int:
    from .testing import MockAutocalls

    limit: RateLimit | None = args.rate_limit
    log = RequestLog(quiet=args.quiet)
    server = MockAutocalls(
        host=args.host,
        port=args.port,
        rate_limit=None if limit is None else (limit.requests, limit.period),
        window=args.window,
        burst=args.burst,
        assistants=args.assistants,
        tokens=args.token,
        balance=args.balance,
        reply_delay=args.reply_delay,
        on_request=log,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            await server.start()
        except OSError as exc:
            print(f"{PROG}: {_listen_problem(args, exc)}", file=sys.stderr)
            return EXIT_FAILED
        # The SDK sends the token over http:// to a loopback host only: on all interfaces,
        # print the loopback URL, which works from this host.
        loopback = ALL_INTERFACES.get(args.host)
        host = args.host if loopback is None else loopback
        shown = f"[{host}]" if ":" in host else host
        base_url = f"http://{shown}:{server.port}/api"
        print(f"Autocalls emulator listening on {base_url}", flush=True)
        if loopback is not None:
            print(
                f"  on all interfaces ({args.host or '*'} port {server.port}); the SDK and the "
                "CLI send a token over http:// to a loopback address only, so use the URL "
                "above on this host",
                flush=True,
            )
        tokens = (
            "any non-empty token"
            if args.token is None
            else f"only {plural(len(args.token), 'token')} given with --token"
        )
        limit_text = "no rate limit" if limit is None else f"limit {limit} per token"
        print(
            f"  assistants {','.join(map(str, sorted(server.assistants)))}; {limit_text} "
            f"({args.window} window); {tokens}"
            + ("" if args.balance is None else f"; balance {args.balance} replies"),
            flush=True,
        )
        token = MOCK_TOKEN if args.token is None else args.token[0]
        assistant = min(server.assistants, default=123)
        print(
            "  In another shell:\n"
            f"  export AUTOCALLS_BASE_URL={base_url} AUTOCALLS_API_TOKEN={shlex.quote(token)}\n"
            f'  {PROG} reply --assistant-id {assistant} --customer +14155551234 "Hi"\n'
            f"  curl -X POST {base_url}/ai/generate-reply "
            '-H "Authorization: Bearer $AUTOCALLS_API_TOKEN" '
            "-H 'Content-Type: application/json' -H 'Accept: application/json' "
            f'-d \'{{"assistant_id": {assistant}, "customer_identifier": "+14155551234", '
            '"message": "Hi"}\'',
            flush=True,
        )
        root = base_url.removesuffix("/api")
        print(
            f"  state: curl {root}/_emulator/state; top up: curl -X POST "
            f"{root}/_emulator/top-up -H 'Content-Type: application/json' -d '{{\"replies\": 10}}'",
            flush=True,
        )
        print(
            "  One line per request on stderr"
            + (" (--quiet: off)" if args.quiet else "")
            + "; Ctrl-C stops and prints a summary",
            flush=True,
        )
        await stop.wait()
    finally:
        await server.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print(log.summary(server), flush=True)
    return EXIT_OK


# --------------------------------------------------------------------------- demo

DEMO_LIMIT: Final = RateLimit(5, 1.0)
DEMO_TOKEN: Final = "demo-token"


def _demo_command(args: argparse.Namespace) -> int:
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
        return _usage_error(f"cannot write the demo's files in {folder}: {exc}")
    return _run(_demo(args, folder))


async def _demo(args: argparse.Namespace, folder: Path) -> int:
    from ._bulkio import InputFile, ResultLog
    from .testing import MockAutocalls

    csv_path, out = folder / "demo.csv", folder / "replies.jsonl"
    where = shlex.quote(str(folder))
    show = _Show()
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


class _Show:
    """The demo's output on stdout: rich tables on a terminal, plain text otherwise."""

    def __init__(self) -> None:
        self.console: Any = None
        if sys.stdout.isatty() and _rich_available():
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
