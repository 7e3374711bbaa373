"""``autocalls-async mock-server``: the emulator of the service, served until Ctrl-C.

It logs one line per request on stderr (never a token, only its id) and prints a summary when
it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import re
import shlex
import signal
import socket
import sys
import time
from typing import Any, Final

import attrs

from .._models import RateLimit
from .exits import EXIT_FAILED, EXIT_OK, exit_codes_help
from .options import parse_burst, parse_count, parse_rate_limit, parse_seconds
from .output import PROG, plural

__all__ = ["RequestLog", "add_parser", "listen_problem", "mock_server_command"]

#: The token ``mock-server`` suggests when it accepts any (it prints it; it is no secret).
MOCK_TOKEN: Final = "test-token"
ALL_INTERFACES: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def add_parser(commands: Any) -> None:
    """``mock-server``: its options and help."""
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
        epilog=exit_codes_help("mock-server") + "\nexample:\n"
        f"  {PROG} mock-server --port 8000 --quiet &\n"
        "  export AUTOCALLS_BASE_URL=http://127.0.0.1:8000/api AUTOCALLS_API_TOKEN=test-token\n"
        f'  {PROG} reply --assistant-id 123 --customer +14155551234 "Hi"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mock.add_argument(
        "--host",
        type=parse_host,
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1; 0.0.0.0 or :: for every interface)",
    )
    mock.add_argument(
        "--port", type=parse_port, default=8000, help="port (default: 8000; 0 picks a free port)"
    )
    mock.add_argument(
        "--rate-limit",
        type=parse_rate_limit,
        default=parse_rate_limit("5/60"),
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
        type=parse_burst,
        default=None,
        metavar="N",
        help="the server lets N come back to back, then one per period/N (nginx's burst=N-1 "
        "nodelay), on any --window (default: no such bucket; 1 with --window no-burst)",
    )
    mock.add_argument(
        "--assistants",
        type=parse_assistants,
        default=(123,),
        metavar="ID,ID",
        help="assistant ids that exist (default: 123)",
    )
    mock.add_argument(
        "--token",
        action="append",
        type=parse_mock_token,
        metavar="T",
        help="the only token(s) accepted; repeat for more (default: any non-empty token)",
    )
    mock.add_argument(
        "--balance", type=parse_count, metavar="N", help="replies paid for (default: unlimited)"
    )
    mock.add_argument(
        "--reply-delay",
        type=parse_seconds,
        default=0.0,
        metavar="SECONDS",
        help="time each reply takes (default: 0)",
    )
    mock.add_argument(
        "--quiet", action="store_true", help="no request log (one line per request on stderr)"
    )
    mock.set_defaults(handler=mock_server_command)


def parse_mock_token(text: str) -> str:
    """A token mock-server accepts: one the SDK and this CLI can send (printable ASCII, no
    space), else every call would be a 401. Its own test token: it may be shown."""
    if not text or any(not 0x21 <= ord(ch) <= 0x7E for ch in text):
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot be sent as a token: the SDK and the CLI send printable ASCII "
            "without spaces (a token copied from the Autocalls dashboard is)"
        )
    return text


def parse_port(text: str) -> int:
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


def parse_host(text: str) -> str:
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


def parse_assistants(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of assistant ids, e.g. 123,456"
        ) from None
    if not ids or any(i <= 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: assistant ids are positive integers")
    return ids


def mock_server_command(args: argparse.Namespace) -> int:
    return asyncio.run(_mock_server(args))


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


def listen_problem(args: argparse.Namespace, exc: OSError) -> str:
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
    from ..testing import MockAutocalls

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
            print(f"{PROG}: {listen_problem(args, exc)}", file=sys.stderr)
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
