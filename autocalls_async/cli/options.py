"""Options the commands share: their argument types, the connection options, and the checks
run before anything is sent (the token, the input, Redis, the phone extra).

The token itself is read by ``autocalls_async._token_input`` (``--token-file``, ``--token -``).
"""

from __future__ import annotations

import argparse
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs

from .._errors import InvalidRequestError
from .._models import RateLimit
from .._wire import DEFAULT_MAX_REQUEST_BYTES, check_token
from .output import PROG

__all__ = [
    "client_options",
    "input_problem",
    "parse_burst",
    "parse_count",
    "parse_delimiter",
    "parse_positive_seconds",
    "parse_rate_limit",
    "parse_region",
    "parse_request_bytes",
    "parse_seconds",
    "phone_extra_problem",
    "redis_problem",
    "same_file",
    "token_problem",
    "with_burst",
]


def parse_rate_limit(text: str) -> RateLimit | None:
    if text.strip().lower() in {"none", "off", "0"}:
        return None
    try:
        return RateLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_burst(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number >= 1 (1: evenly spaced starts)"
        )
    return value


def with_burst(args: argparse.Namespace) -> str | None:
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
    if args.command != "mock-server":  # the emulator takes its own burst as it is
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


def parse_positive_seconds(text: str) -> float:
    return _read_seconds(text, allow_zero=False)


def parse_seconds(text: str) -> float:
    return _read_seconds(text, allow_zero=True)


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def parse_delimiter(text: str) -> str:
    named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
    value = named.get(text.lower(), text)
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(
            f"expected one character (or 'tab'), not a quote or a line break: {text!r}"
        )
    return value


def parse_request_bytes(text: str) -> int | None:
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


def client_options(parser: argparse.ArgumentParser, *, default_rate: str) -> None:
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
        type=parse_rate_limit,
        default=parse_rate_limit(default_rate),
        metavar="N/SECONDS",
        help=f"client-side limit per token, e.g. 5/60 or 5/1m; 'none' disables it "
        f"(default: {default_rate}, the service's documented limit)",
    )
    group.add_argument(
        "--burst",
        type=parse_burst,
        default=None,
        metavar="N",
        help="starts allowed back to back (default: N of --rate-limit, the rolling window the "
        "service counts); 1 spaces every start evenly, for servers that refuse bursts "
        "(nginx limit_req without burst)",
    )
    group.add_argument(
        "--max-retries",
        type=parse_count,
        default=2,
        metavar="N",
        help="retries of 429, 503 and failed connections (default: 2)",
    )
    group.add_argument(
        "--timeout",
        type=parse_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds per attempt (default: 60)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=parse_request_bytes,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help=f"refuse, before sending, a message whose request (JSON, UTF-8) would be over N "
        f"bytes (default: {DEFAULT_MAX_REQUEST_BYTES}, 1 MiB, nginx's default "
        "client_max_body_size, past which the server answers 413); raise it if your server "
        "accepts more; 'none': no limit",
    )


#: Excel's way with a long number: 1.4155551234E+10
_SCIENTIFIC: Final = re.compile(r"[+-]?\d(?:[.,]\d+)?[eE]\+?\d+")
#: A phone number then an extension: x22, ext. 22, extension 22, ;22, #22
_EXTENSION: Final = re.compile(r"(.*?\d[\d\s().\-/]*?)\s*(?:x|ext\.?|extension|;|#)\s*\d+", re.I)
#: A phone number then a label in parentheses: (mobile)
_LABEL: Final = re.compile(r"(.*\d[\s().\-/]*?)\s*\([^\d()]*[^\W\d_][^\d()]*\)")


def parse_region(text: str) -> Callable[[str], str] | str:
    """``--e164 REGION``: a normaliser of phone-like identifiers (e-mails and CRM ids are left
    as they are); without the phone extra, the text itself, which the command then refuses
    in one line (``phone_extra_problem``)."""
    from .._notes import phone_like
    from ..identifiers import e164

    try:
        normalize = e164(text)
    except ImportError:
        return text
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("default_region", "--e164")) from None

    def phones_only(identifier: str) -> str:
        # What is unambiguous is read through: full-width digits and plus (NFKC), a tel: URI.
        text = unicodedata.normalize("NFKC", identifier).strip()
        if text[:4].lower() == "tel:":
            text = text[4:].strip()
        if _SCIENTIFIC.fullmatch(text):
            raise InvalidRequestError(
                f"customer_identifier {identifier!r} is a phone number a spreadsheet wrote in "
                "scientific notation: its last digits may be lost. Format the column as Text "
                "in the spreadsheet (or write the numbers with a leading +), export again"
            )
        extension = _EXTENSION.fullmatch(text)
        if extension is not None and phone_like(extension.group(1)):
            raise InvalidRequestError(
                f"customer_identifier {identifier!r} has an extension, which E.164 cannot "
                "hold: write the customer's direct number (one identifier per customer)"
            )
        label = _LABEL.fullmatch(text)
        if label is not None and phone_like(label.group(1)):
            raise InvalidRequestError(
                f"customer_identifier {identifier!r} has a label after the number: keep only "
                "the number in the column (the label in a column of its own)"
            )
        return normalize(text) if phone_like(text) else identifier

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
    """Why INPUT cannot be read as a file, or OUT is a directory or INPUT itself; None when
    none of these."""
    if path.is_dir():
        return f"cannot read {path}: it is a directory; give a .csv or .jsonl file"
    if not path.is_file():
        return f"cannot read {path}: no such file"
    if out.is_dir():
        return f"--out {out} is a directory; give a file, e.g. --out {out / 'replies.jsonl'}"
    if same_file(path, out):
        return f"--out {out} is the input file {path}: give OUT its own file (e.g. replies.jsonl)"
    return None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path, a symlink to it or a hard link (its
    device and inode); False when either does not exist."""
    try:
        first, second = a.stat(), b.stat()
    except OSError:
        return a.absolute() == b.absolute()
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def redis_problem(url: str | None) -> str | None:
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
        # Only the scheme is shown: the rest may hold a password.
        scheme, sep, _ = url.partition("://")
        plain = scheme[:1].isalpha() and scheme.replace("+", "").replace(".", "").isalnum()
        shown = f"{scheme}://..." if sep and plain and len(scheme) <= 32 else "no URL scheme"
        return f"--redis-url must start with redis://, rediss:// or unix://, got {shown}"
    return None
