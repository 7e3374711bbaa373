"""Where the command line reads the API token: ``--token-file PATH`` or ``--token -`` (stdin).

``--token TOKEN`` puts the token in the process's command line, which every local user can
read (``ps``, ``/proc/PID/cmdline``) for as long as the command runs, and which the shell keeps
in its history. A file readable by its owner only, or the standard input, shows it to no one.

A token file is checked as ssh checks a private key: a regular file owned by this user and
readable by no one else (``chmod 600``), else it is refused unread. Its content is the token,
surrounding whitespace and one trailing newline allowed, nothing else. From the standard input,
the first line is the token: typed without echo on a terminal, or piped (``reply``'s message may
then follow it on the next lines, with ``-`` as the message).

A process that holds the token also leaves it in a core dump: ``reply`` and ``bulk`` set their
own soft core size limit to zero (the library never does: an application decides that for
itself, see the security page).
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from typing import TextIO

__all__ = ["no_core_dumps", "read_token_file", "read_token_stdin", "resolve_token"]

#: A token file bigger than this is not a token file (a wrong path, /dev/zero).
MAX_TOKEN_FILE = 4096


class TokenInputError(Exception):
    """The token could not be read; the message says why (it never quotes the token)."""


def read_token_file(path: str) -> str:
    """The token held in ``path``, once the file is found private to this user."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO: no wait
    except OSError as exc:
        raise TokenInputError(f"--token-file {path!r} cannot be opened: {exc.strerror}") from None
    try:
        # Checked on the descriptor that is read: no window for the file to be swapped.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenInputError(f"--token-file {path!r} is not a regular file")
        if os.name == "posix":  # pragma: no branch (Windows has no such modes)
            if info.st_uid != os.getuid():
                raise TokenInputError(
                    f"--token-file {path!r} belongs to another user; refusing to read a token "
                    "that user can change or read"
                )
            if info.st_mode & 0o077:
                raise TokenInputError(
                    f"--token-file {path!r} has mode {stat.S_IMODE(info.st_mode):04o}: other "
                    "users can read or change it, so the token in it is not secret. Make it "
                    f"private (chmod 600 {path}), and copy a new token from the Autocalls "
                    "dashboard if others may have seen this one"
                )
        data = os.read(fd, MAX_TOKEN_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE:
        raise TokenInputError(
            f"--token-file {path!r} is over {MAX_TOKEN_FILE} bytes: it holds more than a token"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenInputError(f"--token-file {path!r} is not text") from None
    token = text.strip()
    if not token:
        raise TokenInputError(f"--token-file {path!r} is empty")
    if "\n" in token or "\r" in token:
        raise TokenInputError(
            f"--token-file {path!r} holds several lines; it must hold the token alone"
        )
    return token


def read_token_stdin(stream: TextIO | None = None) -> str:
    """The token from the standard input: without echo on a terminal, else its first line."""
    stream = sys.stdin if stream is None else stream
    if stream.isatty():
        token = getpass.getpass("API token: ", stream=sys.stderr)
    else:
        token = stream.readline()
    token = token.strip()
    if not token:
        raise TokenInputError("--token -: the standard input gave no token (an empty line)")
    return token


def no_core_dumps() -> None:
    """This process writes no core dump from now on (POSIX): the token is in its memory. Only
    the soft limit: a program that runs ``main()`` in its own process may raise it again."""
    try:
        import resource
    except ImportError:  # pragma: no cover (Windows)
        return
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))


def resolve_token(args: argparse.Namespace) -> str | None:
    """Set ``args.token`` from ``--token-file`` or ``--token -``; what is wrong, or None.

    For commands without these options (``mock-server``'s ``--token`` is another thing), it
    does nothing."""
    if not hasattr(args, "token_file"):
        return None
    no_core_dumps()  # whichever way the token comes, it will be in this process's memory
    try:
        if args.token_file is not None:
            if args.token is not None:
                return "--token and --token-file are two ways to give one token: pass one"
            args.token = read_token_file(args.token_file)
        elif args.token == "-":
            args.token = read_token_stdin()
    except TokenInputError as exc:
        return str(exc)
    return None
