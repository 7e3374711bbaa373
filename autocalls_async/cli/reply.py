"""``autocalls-async reply``: send one message and print the assistant's reply.

Errors are one line on stderr (error code, message, hint) and an exit code per error class;
a wait for a rate-limit slot, or for a 429's Retry-After, is said on stderr as it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs

from .._client import AsyncAutocalls
from .._errors import AutocallsError, RateLimitError
from .._models import Priority
from .._ratelimit import Limiter, Slot, default_limiter
from .._retry import Decision, RetryPolicy
from ..bulk import error_code
from .errors import describe, exit_code_for
from .exits import EXIT_OK, exit_codes_help
from .options import client_options, parse_positive_seconds, redis_problem, token_problem
from .output import ENVIRONMENT_HELP, PROG, duration, printable, tell, usage_error

__all__ = ["TellingLimiter", "TellingRetryPolicy", "add_parser", "reply_command"]


def add_parser(commands: Any) -> None:
    """``reply``: its options and help."""
    reply = commands.add_parser(
        "reply",
        help="send one message and print the assistant's reply",
        description="Send one message to an assistant and print its reply. Errors are one "
        "line on stderr (error code, message, hint) and an exit code per error class.",
        epilog=exit_codes_help("reply")
        + "\n"
        + ENVIRONMENT_HELP
        + f'\nexample:\n  {PROG} reply --assistant-id 123 --customer +14155551234 "Hi" '
        "--var customer_name=John",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reply.add_argument("message", help="the customer's message ('-' reads it from stdin)")
    reply.add_argument(
        "--assistant-id",
        type=int,
        required=True,
        metavar="ID",
        help="the assistant to answer (its id in the Autocalls dashboard)",
    )
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
        type=parse_variable,
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
        type=parse_positive_seconds,
        metavar="SECONDS",
        help="fail (exit 6) rather than wait longer for a rate-limit slot",
    )
    client_options(reply, default_rate="5/60")
    reply.set_defaults(handler=reply_command)


def parse_variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.strip(), value


def reply_command(args: argparse.Namespace) -> int:
    problem = token_problem(args.token) or redis_problem(args.redis_url)
    if problem is not None:
        return usage_error(problem)
    message = sys.stdin.read() if args.message == "-" else args.message
    variables: dict[str, Any] | None = None
    if args.variables is not None:
        try:
            variables = json.loads(args.variables)
        except ValueError as exc:
            return usage_error(f"--variables is not valid JSON: {exc}")
        if not isinstance(variables, dict):
            return usage_error('--variables must be a JSON object, e.g. \'{"name": "John"}\'')
    if args.var:
        variables = {**(variables or {}), **dict(args.var)}
    return asyncio.run(_reply(args, message, variables))


#: ``reply`` says it waits for a rate-limit slot once the wait is longer than this.
WAIT_NOTICE_AFTER: Final = 1.0


@attrs.frozen
class TellingRetryPolicy(RetryPolicy):
    """The client's retry policy, saying on stderr what it waits for and how long (``reply``
    would otherwise sit silent for a 429's Retry-After)."""

    tell: Callable[[str], None] = attrs.field(default=tell, kw_only=True)

    def decide(
        self, error: AutocallsError, retries_done: int, random: Callable[[], float]
    ) -> Decision | None:
        decision = super().decide(error, retries_done, random)
        if decision is None:
            return None
        attempt = f"retry {retries_done + 1} of {self.max_retries}"
        if isinstance(error, RateLimitError):
            why = (
                f"the service asks to wait {duration(decision.delay)} (Retry-After)"
                if error.retry_after is not None
                else "it gave no Retry-After"
            )
            self.tell(
                f"429 Too Many Requests: the token's limit is used up; {why}: waiting "
                f"{duration(decision.delay)}, then retrying ({attempt}; Ctrl-C stops)"
            )
        else:
            self.tell(
                f"{error_code(error)}: retrying in {decision.delay:.1f}s ({attempt}; Ctrl-C stops)"
            )
        return decision


class TellingLimiter:
    """A rate limiter that says on stderr when a call waits for a slot (``reply``)."""

    def __init__(self, inner: Limiter, tell: Callable[[str], None] = tell) -> None:
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
