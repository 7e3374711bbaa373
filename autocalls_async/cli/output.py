"""What the command line prints: its name, text safe for a terminal, notices and lines.

Every message starts with the command's name; text from the service or the input goes through
``printable`` (no terminal control sequences, F14); the SDK's words (``rate_limit=...``) are
put in the command line's (``--rate-limit``).
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import textwrap
from typing import Final

from .._wire import RAISE_LIMIT_HINT
from .exits import EXIT_USAGE

__all__ = [
    "ENVIRONMENT_HELP",
    "PROG",
    "CliWordsFormatter",
    "duration",
    "in_cli_words",
    "plural",
    "print_lines",
    "printable",
    "rich_available",
    "tell",
    "usage_error",
]

PROG: Final = "autocalls-async"

ENVIRONMENT_HELP: Final = """\
environment:
  AUTOCALLS_API_TOKEN  the API token (preferred over --token, which shows in `ps`; or
                       --token-file PATH, or --token - to read it from stdin)
  AUTOCALLS_BASE_URL   the API's base URL (default https://app.autocalls.ai/api)
  AUTOCALLS_LOG        debug|info: log the SDK's requests and retries to stderr
"""


#: Characters a terminal acts on (ESC sequences that move the cursor, retitle the window,
#: or hide text; BEL; C1 controls): never printed as they are (F14).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters shown escaped (``\x1b``), line breaks
    and tabs kept."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


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


def usage_error(message: str) -> int:
    """One message on stderr; its own line breaks kept (a refusal names lines, one each)."""
    lines = [
        (line[: len(line) - len(line.lstrip())] if n else "") + " ".join(line.split())
        for n, line in enumerate(message.splitlines())
    ]
    print(f"{PROG}: " + printable("\n".join(lines)), file=sys.stderr)
    return EXIT_USAGE


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 row``, ``2 rows``; ``many`` for irregular plurals (``1 retry``, ``2 retries``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def duration(seconds: float | None) -> str:
    """``1h02m``, ``1m15s``, ``7s``; ``?`` for None (not known)."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def tell(text: str) -> None:
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


def rich_available() -> bool:
    """Whether rich (the ``cli`` extra) can draw bars and tables."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
