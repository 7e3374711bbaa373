"""The wire format, without any I/O: validate input, build the request, decipher the response.

Everything here is a pure function of its arguments, so it is tested on recorded samples
without a server (see ``tests/samples/``).
"""

from __future__ import annotations

import base64
import functools
import html
import html.entities
import json
import json.scanner
import math
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from ipaddress import ip_address
from itertools import chain
from typing import Any, NamedTuple, NoReturn

import aiohttp
import cattrs
from cattrs.preconf.json import make_converter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._errors import (
    APIError,
    APIResponseValidationError,
    AssistantNotFoundError,
    AuthenticationError,
    InsufficientBalanceError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from ._models import FunctionCall, RateLimit, Reply
from ._version import __version__

ENDPOINT = "ai/generate-reply"
DEFAULT_BASE_URL = "https://app.autocalls.ai/api"
MAX_CUSTOMER_IDENTIFIER = 255
MAX_ASSISTANT_ID = 2**63 - 1  # the service stores it in a signed BIGINT
MAX_JSON_DEPTH = 64
#: The integers a variable may hold: PHP, behind the service, reads a JSON integer outside the
#: signed 64-bit range as an approximate float (and Python will not even write one of more
#: than 4,300 digits).
MIN_JSON_INT, MAX_JSON_INT = -(2**63), 2**63 - 1
#: nginx's default ``client_max_body_size``: a bigger body would travel only to get a 413.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
EXCERPT = 200
#: What Laravel's TrimStrings middleware strips from both ends of every input string.
_TRIM = re.compile(r"^[\s\ufeff\u200b\u200e]+|[\s\ufeff\u200b\u200e]+$")
_ZERO_WIDTH = "\ufeff\u200b\u200e"


#: What ``_TRIM`` strips, for ``str.strip``: every character ``\s`` matches (``str.isspace``,
#: all below U+3001), and the zero-width ones.
_TRIM_CHARS = "".join(chr(code) for code in range(0x3001) if chr(code).isspace()) + _ZERO_WIDTH


def trim(text: str) -> str:
    """The string as the service will see it (it trims input before validating it)."""
    return text.strip(_TRIM_CHARS)  # the string itself when there is nothing to strip


USER_AGENT = (
    f"autocalls-async/{__version__} "
    f"python/{platform.python_version()} aiohttp/{aiohttp.__version__}"
)


# --------------------------------------------------------------------------- configuration


def check_token(token: object) -> str:
    """Return the token stripped of surrounding whitespace, or raise without ever showing it."""
    if token is None:
        raise InvalidRequestError(
            "no API token: pass api_token=... or set the AUTOCALLS_API_TOKEN environment variable"
        )
    if not isinstance(token, str):
        raise InvalidRequestError(f"api_token must be a str, got {type(token).__name__}")
    token = token.strip()
    if not token:
        raise InvalidRequestError("api_token is empty: set AUTOCALLS_API_TOKEN to your API token")
    if not (token.isascii() and token.isprintable()) or " " in token:
        # A CR/LF would let the token smuggle headers; anything non-ASCII cannot be a header.
        raise InvalidRequestError(
            "api_token contains a space, a control character (CR, LF, ...) or a non-ASCII "
            "character; copy the token again from the Autocalls dashboard"
        )
    return token


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    if host.lower() in {"localhost", "localhost."} or host.lower().endswith(".localhost"):
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- secrets

#: What a secret is replaced with in everything the SDK shows: messages, bodies, headers.
REDACTED = "***"
#: What a response body becomes when the token is in it in a form too mangled to mask in place.
WITHHELD = "[response body withheld by autocalls-async: it contained the API token]"
#: The same for the message of a connection failure (aiohttp's, quoting what the server sent).
WITHHELD_MESSAGE = "[message withheld by autocalls-async: it contained the API token]"
#: A token at least this long is masked wherever it appears; a shorter one (the service never
#: issues one: a test's ``"t"``) only right after ``Bearer``, or every "t" would be masked.
MIN_MASKED_ANYWHERE = 8
#: What may stand between ``Bearer`` and a short token: whitespace, raw or escaped.
_GAP = r"(?:\s|\+|%20|\\u0020|\\t|\\n|\\r|&#0*32;?|&#[xX]0*20;?|&nbsp;?)+"
#: The JSON escapes that may spell a token's character: ``\u00XX`` (ASCII), ``\"``, ``\\``
#: (``\/`` is replaced first, as a plain string: PHP writes it in every URL).
_JSON_ESCAPE = re.compile(r'\\(?:u00([0-7][0-9a-fA-F])|(["\\]))')


def _entity_names() -> dict[str, list[str]]:
    """Character -> the HTML5 entity names that stand for it (``"sol;"`` for ``"/"``)."""
    names: dict[str, list[str]] = {}
    for name, char in html.entities.html5.items():
        names.setdefault(char, []).append(name)
    return names


_NAMED = _entity_names()
#: What a disguised token cannot do without: an escape that stands for a letter or a digit, or
#: for what starts an escape (``\``, ``%``, ``&``, ``#``), so that one inside it may. A text
#: with none of these, no NUL, and not the token's longest alphanumeric run as is, cannot
#: decode into the token: ``_decodings`` is skipped (PHP's ``\/`` and ``\u00e9``, a ``&`` or
#: a ``%`` in a sentence do not count).
#: One regex each, so that each has a literal prefix (a fast scan, unlike a character class),
#: and each only after a substring search finds its start.
_ESCAPED_ALNUM = (
    ("\\u00", r"\\u00[0-7]"),
    ("%", r"%(?:2[3-6]|[3-7][0-9a-fA-F])"),
    ("&", r"&(?:#|[aA][mM][pP]|num|percnt|bsol)"),
)
_MAY_DISGUISE = tuple((start, re.compile(pattern)) for start, pattern in _ESCAPED_ALNUM)


def _may_disguise(text: str) -> bool:
    for start, pattern in _MAY_DISGUISE:
        if start in text and pattern.search(text) is not None:
            return True
    return False


_PERCENT = re.compile(r"%([0-9a-fA-F]{2})")


def _any_case(hex_digits: str) -> str:
    return "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in hex_digits)


def _char_pattern(char: str) -> str:
    """A regex for one character of the token, as sent or as a server may have escaped it:
    JSON (``\\/``, ``\\u002f``), HTML (``&#47;``, ``&#x2F;``, ``&sol;``), URL (``%2f``)."""
    code = ord(char)
    hexa = _any_case(f"{code:02x}")
    forms = [
        re.escape(char),
        rf"\\u00{hexa}",
        f"%{hexa}",
        f"&#0*{code};?",
        f"&#[xX]0*{hexa};?",
        *(f"&{re.escape(name)}" for name in sorted(_NAMED.get(char, ()), key=len, reverse=True)),
    ]
    if char in '"\\/':
        forms.append(re.escape("\\" + char))
    return f"(?:{'|'.join(forms)})"


def _unescape_json(match: re.Match[str]) -> str:
    code = match.group(1)
    return chr(int(code, 16)) if code is not None else match.group(2)


def _json_unescaped(text: str) -> str:
    text = text.replace("\\/", "/")
    return _JSON_ESCAPE.sub(_unescape_json, text) if "\\" in text else text


def _unescape_percent(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))  # byte by byte: the token is ASCII


_DECODERS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("\\", _json_unescaped),
    ("&", html.unescape),
    ("%", partial(_PERCENT.sub, _unescape_percent)),
)


def _decodings(text: str) -> Iterator[str]:
    """``text`` as a reader might decode it: NULs dropped (UTF-16 read as bytes), then JSON
    escapes, HTML entities and URL encoding undone in turn until none changes it (an escape
    inside an escape), four rounds at most. Only for finding the token: nothing shows it."""
    if "\x00" in text:
        text = text.replace("\x00", "")
        yield text
    unchanged = 0
    for step in range(4 * len(_DECODERS)):
        trigger, decode = _DECODERS[step % len(_DECODERS)]
        if trigger in text:
            decoded = decode(text)
            if decoded != text:
                text = decoded
                unchanged = 0
                yield text
                continue
        unchanged += 1
        if unchanged == len(_DECODERS):
            return


def _text_of(body: bytes) -> tuple[str, bool]:
    """The body as text, and whether it was in UTF-16 or UTF-32 (found as ``json.loads`` finds
    it: by its BOM or its NULs) rather than UTF-8."""
    if b"\x00" in body:
        encoding = json.detect_encoding(body)
        if not encoding.startswith("utf-8"):
            return body.decode(encoding, errors="replace"), True
    return body.decode("utf-8", errors="replace"), False


#: A run of this many characters of the token (or of its reverse) is masked wherever it
#: appears, whatever surrounds it: a prefix, a suffix, the token less a few characters.
MIN_RUN = 16
#: A text that echoes the token more often than this is withheld whole, not masked echo by
#: echo: no server does it but to make the SDK work (a 10 MiB body of 16-character runs took
#: 14 s of the event loop).
MAX_ECHOES = 1000


def _base64_cores(secret: bytes) -> list[str]:
    """The base64 characters that depend on ``secret`` alone, wherever it sits in the encoded
    data (three alignments), in the standard and the URL-safe alphabets."""
    cores = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret).decode()
        core = encoded[4 if shift else 0 : 4 * ((shift + len(secret)) // 3)]
        cores += [core, core.replace("+", "-").replace("/", "_")]
    return cores


_BASE64_EDGE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")


def _forms(secret: str) -> list[_Runs]:
    """The secret's forms masked by their long runs, each with the length of a run that is
    masked: 16 characters of the token, as is or reversed, or their base64 or hex."""
    raw = secret.encode()
    forms = [(secret, MIN_RUN, False), (secret[::-1], MIN_RUN, False)]
    forms += [(core, 22, True) for core in _base64_cores(raw)]  # 16 bytes: 21.3 characters
    forms += [(raw.hex(), 2 * MIN_RUN, False), (raw.hex().upper(), 2 * MIN_RUN, False)]
    found: dict[str, _Runs] = {}
    for form, run, base64_edges in forms:
        if form and form not in found:
            found[form] = _Runs(form, min(run, len(form)), base64_edges=base64_edges)
    return list(found.values())


def _base64_edges(text: str, left: int, right: int) -> tuple[int, int]:
    for _ in range(4):
        if left > 0 and text[left - 1] in _BASE64_EDGE:
            left -= 1
    for _ in range(4):
        if right < len(text) and text[right] in _BASE64_EDGE:
            right += 1
    while right < len(text) and text[right] == "=" and right - left < 10_000:
        right += 1
    return left, right


class _Runs:
    """Finds every run of at least ``run`` characters of ``form`` in a text: each such run
    holds one of the form's aligned blocks of ``(run + 1) // 2`` characters whole, found by a
    substring search and then grown both ways as far as the text and the form agree."""

    __slots__ = ("base64_edges", "blocks", "form", "run")

    def __init__(self, form: str, run: int, *, base64_edges: bool = False) -> None:
        self.form = form
        self.run = run
        #: A base64 run also takes the characters of the groups it starts and ends in (they
        #: hold a few bits of the token) and the padding.
        self.base64_edges = base64_edges
        size = max((run + 1) // 2, 1)
        self.blocks = [
            (start, form[start : start + size]) for start in range(0, len(form) - size + 1, size)
        ]

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        form = self.form
        for start, block in self.blocks:
            at = text.find(block)
            while at >= 0:
                left, right = at, at + len(block)
                i, j = start, start + len(block)
                while left > 0 and i > 0 and text[left - 1] == form[i - 1]:
                    left, i = left - 1, i - 1
                while right < len(text) and j < len(form) and text[right] == form[j]:
                    right, j = right + 1, j + 1
                if right - left >= self.run:
                    if self.base64_edges:
                        left, right = _base64_edges(text, left, right)
                    yield left, right
                    at = text.find(block, max(right, at + 1))  # not the same run again
                else:
                    at = text.find(block, at + 1)


#: The characters every screen lets through: what base64 and hex are made of, and most of a
#: token. A screen adds the token's other characters (``|`` in ``123|abc...``).
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ALNUM_RUNS = re.compile("[A-Za-z0-9]+")
#: From this length on, every form of a token is at least as long as its masked run (16
#: characters of the token, 22 of its base64, 32 of its hex): the shared screens hold for it.
#: A shorter token (the service issues none) is screened by its own forms.
SCREENED = 24
#: A UUID (every reply's ``conversation_id``) as a run of its own: its longest stretch without
#: a dash is 12 characters, so a masked run (16 or more) in it would need a dash in the form.
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX_OR_DASH = re.compile(r"[0-9a-fA-F-]{16,}")
#: A text with more candidate runs than this is searched whole for the blocks.
_MANY_RUNS = 64


class _Screen:
    """Finds, cheaply, the runs of a text that may hold a long run of a family of forms.

    Such a run is made of the forms' characters only and is at least as long as the shortest
    run masked: a text's runs of an alphabet that holds those characters, as long as that, are
    found in C (``bytes.translate`` and substring searches). A reply has none, or its UUID.
    Screens depend on the alphabet only, so tokens that share theirs share a screen."""

    __slots__ = ("needle", "table")

    def __init__(self, alphabet: frozenset[str] | set[str], needle: int) -> None:
        table = bytearray(b" " * 256)
        for char in alphabet:
            if ord(char) < 256:  # pragma: no branch (a token is ASCII)
                table[ord(char)] = 0x78  # "x"
        self.table = bytes(table)
        self.needle = b"x" * needle

    def runs(self, data: bytes) -> list[bytes] | None:
        """The candidate runs (None: not one); past ``_MANY_RUNS`` of them, the whole text."""
        gated = data.translate(self.table)
        needle = self.needle
        at = gated.find(needle)
        if at < 0:
            return None
        runs: list[bytes] = []
        while at >= 0:  # ``at`` starts a run: the leftmost match of the needle
            if len(runs) == _MANY_RUNS:
                return [data]
            end = gated.find(b" ", at + len(needle))
            end = len(gated) if end < 0 else end
            runs.append(data[at:end])
            at = gated.find(needle, end)
        return runs


@functools.lru_cache(maxsize=64)
def _shared_screens(others: frozenset[str]) -> tuple[_Screen, _Screen, _Screen]:
    """The screens of every long token whose characters other than letters and digits are
    ``others``, one per family of forms (see ``_families``)."""
    return (
        _Screen(_ALNUM | others, MIN_RUN),
        _Screen(_ALNUM | others | {"+", "/"}, 22),
        _Screen(_ALNUM | {"-", "_"}, 22),
    )


def _families(secret: str, runs: list[_Runs]) -> tuple[list[_Runs], ...]:
    """The forms in three families, each found by its own screen: the token's own characters
    (as is, reversed, hex); base64 (a ``/`` or ``+`` would make every URL path a candidate for
    the first); URL-safe base64 with a ``-`` or ``_`` the token lacks (its ``-`` would make
    every UUID a candidate for the others)."""
    own, standard, urlsafe = [], [], []
    alphabet = set(secret) | _ALNUM
    for form in runs:
        if set(form.form) <= alphabet:
            own.append(form)
        elif set(form.form) & {"-", "_"} - set(secret):
            urlsafe.append(form)
        else:
            standard.append(form)
    return own, standard, urlsafe


def _own_screen(family: list[_Runs]) -> _Screen | None:
    """A short token's screen for one family: its forms' own characters and shortest run."""
    if not family:
        return None
    return _Screen({char for form in family for char in form.form}, min(f.run for f in family))


def _uuid_safe(secret: str) -> bool:
    """True when no form of ``secret`` can have a masked run inside a UUID: none has a stretch
    of hex digits and dashes, as long as its run, with a dash in it (a UUID's stretches
    without a dash are 12 characters long). The token itself and its URL-safe base64 are the
    only forms with a dash; for the tokens the service issues, this is always true."""
    forms = [(secret, MIN_RUN)] if "-" in secret else []
    forms += [(core, 22) for core in _base64_cores(secret.encode()) if "-" in core]
    return not any(
        len(stretch) >= run and "-" in stretch
        for form, run in forms
        for stretch in _HEX_OR_DASH.findall(form)
    )


class _Prepared:
    """What only a suspicious text needs: the forms, their blocks, the token's pattern."""

    __slots__ = ("_long", "_pattern", "_secret", "blocks", "replace", "runs", "screens")

    def __init__(self, secret: str, long: bool) -> None:
        self._secret = secret
        self._long = long
        self.runs = _forms(secret) if long else []
        families = _families(secret, self.runs)
        #: Each screen's blocks: a candidate run that holds none of them is no run of a form.
        self.blocks = tuple(
            tuple(sorted({block for form in family for _, block in form.blocks}))
            for family in families
        )
        #: A token too short for the shared screens gets its own (its forms' exact alphabets).
        self.screens = () if len(secret) >= SCREENED else tuple(map(_own_screen, families))
        self.replace = REDACTED if long else rf"\g<1>{REDACTED}"
        self._pattern: re.Pattern[str] | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        """The token in every escaped form: made on first use, to mask it (milliseconds: its
        alternatives hold every HTML entity name of each of its characters)."""
        if self._pattern is None:
            token = "".join(_char_pattern(char) for char in self._secret)
            if self._long:
                source = f"(?:{token})"
            else:
                bearer = "[Bb][Ee][Aa][Rr][Ee][Rr]"
                source = f"({bearer}{_GAP})(?:{token})(?![A-Za-z0-9])"
            self._pattern = re.compile(source)
        return self._pattern


class Redactor:
    """Masks a secret (the API token) in what a server sent back, as ``***``.

    A server or a gateway may echo the request's ``Authorization`` header in an error ("invalid
    credentials: Bearer ..."): the transport passes every response's body and headers through
    ``body`` and ``headers`` before anything reads them, so no message, body excerpt, header,
    log line or ``Reply.raw`` holds the token. The token is found as sent and as a server may
    have escaped it, each character its own way (JSON ``\\u00XX`` and ``\\/``, HTML entities,
    URL encoding in either case), in UTF-8, UTF-16 or UTF-32; and so is any run of 16 of its
    characters (a prefix, a suffix, the token less its last few characters), as is or reversed,
    and the base64 and hex of such a run (so of ``Bearer <token>`` too). What still shows it
    once decoded (an escape inside an escape) fails closed: the JSON string holding it becomes
    ``***``, a body that is not JSON becomes ``WITHHELD``. ``repr()`` never shows it.

    Cheap to make and cheap when there is nothing to find. Making one costs microseconds: what
    finding the token takes (its forms, their blocks, its pattern) is worked out at the first
    text that may hold it, and its pattern only to mask it. A text cannot hide the token when
    it has no NUL, not the token's longest alphanumeric run, no escape that may stand for a
    letter or a digit (or start another escape), and no run of the characters the forms are
    made of as long as the shortest run masked, but a UUID or one without the forms' blocks
    (substring searches in C, on screens shared by every token of the same alphabet); any
    other is decoded, as far as four rounds of JSON, HTML and URL decoding, and searched.
    """

    __slots__ = ("_long", "_prepared", "_run", "_safe_uuids", "_screens", "_secret")

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._long = len(secret) >= MIN_MASKED_ANYWHERE
        run = max(_ALNUM_RUNS.findall(secret), key=len, default="")
        #: The longest alphanumeric run, which encoders leave as is ("" is in any text).
        self._run = run if len(run) >= 4 else ""
        self._prepared: _Prepared | None = None
        self._screens: tuple[_Screen | None, ...]
        #: Whether a UUID can be passed over (see ``_uuid_safe``): worked out at the first one,
        #: for a token long enough for the shared screens; never for a shorter one.
        self._safe_uuids: bool | None
        if len(secret) >= SCREENED:
            self._screens = _shared_screens(frozenset(secret) - _ALNUM)
            self._safe_uuids = None
        else:
            self._screens = self._prepare().screens
            self._safe_uuids = False

    def __repr__(self) -> str:
        return "<Redactor ***>"

    def _prepare(self) -> _Prepared:
        prepared = self._prepared
        if prepared is None:
            prepared = self._prepared = _Prepared(self._secret, self._long)
        return prepared

    def _shows(self, text: str) -> bool:
        if not self._long:
            return self._prepare().pattern.search(text) is not None
        return self._secret in text or any(
            next(runs.spans(text), None) is not None for runs in self._prepare().runs
        )

    def _clean(self, text: str) -> bool:
        """True when ``text`` cannot show the token nor a long run of it (the usual case)."""
        return (
            self._long
            and "\x00" not in text
            and self._run not in text
            and not _may_disguise(text)
            and not self._holds_a_run(text.encode("utf-8", errors="replace"))
        )

    def clean(self, data: bytes) -> bool:
        """True when ``data`` (as it came: a body, or headers' names and values) cannot show
        the token nor a long run of it: the usual case, checked in C (see ``_clean``).

        The searches run on ``data`` read as latin-1, one character per byte, so that each
        finds what it would in the bytes: on bytes, ``in`` first tries its operand as an int
        and builds a TypeError to drop, and ``find`` parses its arguments, either costing
        more than the search itself (CPython 3.11)."""
        if not self._long:
            return False
        text = data.decode("latin-1")
        return (
            "\x00" not in text  # UTF-16 and UTF-32 have one in every ASCII character
            and self._run not in text  # part of the token: not there, nor is the token
            and not _may_disguise(text)
            and not self._holds_a_run(data)
        )

    def _holds_a_run(self, data: bytes) -> bool:
        blocks: tuple[tuple[str, ...], ...] | None = None
        family = -1
        for screen in self._screens:
            family += 1
            if screen is None:
                continue
            runs = screen.runs(data)
            if runs is None:
                continue
            if self._safe_uuids is not False:
                kept = [run for run in runs if len(run) != 36 or _UUID.fullmatch(run) is None]
                if len(kept) < len(runs) and self._uuids_are_safe():
                    if not kept:
                        continue
                    runs = kept
            joined = (b" ".join(runs) if len(runs) > 1 else runs[0]).decode("latin-1")
            if blocks is None:
                blocks = self._prepare().blocks
            for block in blocks[family]:
                if block in joined:
                    return True
        return False

    def _uuids_are_safe(self) -> bool:
        safe = self._safe_uuids
        if safe is None:
            safe = self._safe_uuids = _uuid_safe(self._secret)
        return safe

    def _reveals(self, text: str) -> bool:
        """Whether ``text`` shows the token, as is or to a reader who decodes it."""
        if self._clean(text):
            return False
        return self._shows(text) or any(self._shows(form) for form in _decodings(text))

    def _mask(self, text: str) -> str | None:
        """``text`` with every form of the token masked in place; None when it echoes the
        token more than ``MAX_ECHOES`` times (a hostile body: withheld whole, and the work
        stays bounded)."""
        prepared = self._prepare()
        text = prepared.pattern.sub(prepared.replace, text)
        spans: list[tuple[int, int]] = []
        for runs in prepared.runs:
            for span in runs.spans(text):
                spans.append(span)
                if len(spans) > MAX_ECHOES:
                    return None
        merged: list[list[int]] = []
        for left, right in sorted(spans):
            if merged and left <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], right)
            else:
                merged.append([left, right])
        parts, end = [], 0
        for left, right in merged:
            parts += [text[end:left], REDACTED]
            end = right
        parts.append(text[end:])
        return "".join(parts)

    def text(self, text: str, withheld: str = REDACTED) -> str:
        """``text`` with the token masked; ``withheld`` instead if it hides the token deeper."""
        if not self._reveals(text):
            return text
        masked = self._mask(text)
        return withheld if masked is None or self._reveals(masked) else masked

    def body(self, body: bytes) -> bytes:
        """The body with the token masked: the same bytes when it holds none (the usual case);
        a body in UTF-16 or UTF-32 is handed on as UTF-8."""
        if self.clean(body):
            return body
        text, transcoded = _text_of(body)
        if not self._reveals(text):
            return text.encode() if transcoded else body
        masked = self._mask(text)
        if masked is None:
            return WITHHELD.encode()
        if self._reveals(masked):
            masked = self._deep_clean(masked)
        return masked.encode("utf-8", errors="replace")

    def _deep_clean(self, text: str) -> str:
        """A JSON body with every string (and key) that still shows the token replaced by
        ``***``, re-serialised; any other body, ``WITHHELD``."""
        try:
            cleaned = json.dumps(
                self._walk(json.loads(text)), ensure_ascii=False, separators=(",", ":")
            )
        except (ValueError, RecursionError):
            return WITHHELD
        return WITHHELD if self._reveals(cleaned) else cleaned

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        if isinstance(value, dict):
            return {self.text(key): self._walk(item) for key, item in value.items()}
        return value

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``headers`` itself when no name or value holds the secret (the usual case), else a
        copy with it masked (a name or value that hides it deeper becomes ``***``)."""
        if not self._reveals("\n".join(chain.from_iterable(headers.items()))):
            return headers
        return CIMultiDict((self.text(name), self.text(value)) for name, value in headers.items())


_USERINFO = re.compile(r"^(?P<head>[^/@]*//|).*@")


def shown_url(url: str | URL, redactor: Redactor | None = None) -> str:
    """A URL as a message, a log line or a span may show it: whatever precedes its last ``@``
    after the scheme (a user name and password) becomes ``***``, and the token, if given, is
    masked too, raw or percent-encoded (yarl writes a ``|`` in a path as ``%7C``)."""
    url = str(url)
    if "@" in url:
        head = _USERINFO.match(url)
        if head is not None:  # pragma: no branch (the pattern matches any text with an @)
            url = f"{head['head']}{REDACTED}{url[head.end() - 1 :]}"
    return url if redactor is None else redactor.text(url)


def check_base_url(base_url: object, redactor: Redactor | None = None) -> URL:
    """Validate the base URL: https, or http to a loopback host only (the token travels in it).

    Messages show the URL with any user name and password (and the token) masked."""
    if not isinstance(base_url, str | URL):
        raise InvalidRequestError(f"base_url must be a str, got {type(base_url).__name__}")
    shown = shown_url(str(base_url).strip(), redactor)
    try:
        url = URL(str(base_url).strip())
    except (ValueError, TypeError) as exc:
        problem = str(exc) if redactor is None else redactor.text(str(exc))
        raise InvalidRequestError(f"base_url {shown!r} is not a URL: {problem}") from None
    if url.scheme not in {"http", "https"} or not url.host:
        raise InvalidRequestError(
            f"base_url {shown!r} must be an absolute http(s) URL, e.g. {DEFAULT_BASE_URL!r}"
        )
    if url.user is not None or url.password is not None:
        raise InvalidRequestError(
            f"base_url {shown!r} must not contain a user name or password: the API token is "
            "the only credential (api_token= / AUTOCALLS_API_TOKEN)"
        )
    if url.query_string or url.fragment:
        raise InvalidRequestError("base_url must not contain a query string or a fragment")
    if url.scheme == "http" and not is_loopback(url.host):
        raise InvalidRequestError(
            f"refusing to send the API token in clear text to {shown_url(url.host, redactor)!r}: "
            "use an https:// base_url (http:// is allowed for loopback hosts only)"
        )
    path = url.path.rstrip("/")
    root = shown_url(f"{url.origin()}{path.removesuffix('/' + ENDPOINT)}", redactor)
    if path.endswith("/" + ENDPOINT):
        raise InvalidRequestError(
            f"base_url {shown!r} is the whole endpoint; pass the API's root, {root!r}, "
            f"e.g. {DEFAULT_BASE_URL!r} (the SDK adds /{ENDPOINT})"
        )
    if url.host == URL(DEFAULT_BASE_URL).host and path != URL(DEFAULT_BASE_URL).path:
        raise InvalidRequestError(
            f"base_url {shown!r} is not the Autocalls API: it is at {DEFAULT_BASE_URL!r}"
        )
    return url.with_path(path)


@functools.lru_cache(maxsize=64)
def checked_base_url(base_url: str) -> URL:
    """``check_base_url`` once per base URL: thousands of clients share a few. A refusal is
    not remembered: check again with the token's redactor for its message."""
    return check_base_url(base_url)


@functools.lru_cache(maxsize=64)
def endpoint(base_url: URL) -> URL:
    return URL(f"{base_url}/{ENDPOINT}")


#: Every request's headers but the token's: a shared session sends them for every client.
COMMON_HEADERS: Mapping[str, str] = {
    "Accept": "application/json",
    "Content-Type": "application/json",
    "User-Agent": USER_AGENT,
}


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def request_headers(token: str) -> dict[str, str]:
    return {**auth_header(token), **COMMON_HEADERS}


# --------------------------------------------------------------------------- the request


def _refuse(message: str) -> NoReturn:
    raise InvalidRequestError(message)


#: How ``too_large`` says to raise the limit; the command line names its own option instead.
RAISE_LIMIT_HINT = "raise AsyncAutocalls(max_request_bytes=...)"


def too_large(size: int, limit: int) -> str:
    """Why a request body of ``size`` bytes is refused before it is sent."""
    default = ""
    if limit == DEFAULT_MAX_REQUEST_BYTES:
        default = " (1 MiB: nginx's default client_max_body_size)"
    return (
        f"the request would be {size:,} bytes (JSON, UTF-8), over the limit of {limit:,} "
        f"bytes{default}, and the server would refuse it with a 413 after receiving it all: "
        "shorten the message or the variables (or, if your server accepts bigger requests, "
        f"{RAISE_LIMIT_HINT}); nothing was sent"
    )


def _check_text(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(f"{name} contains a lone surrogate character and cannot be encoded as UTF-8")


def _json_value(value: object, path: str, depth: int = 0, *, check: bool = False) -> Any:
    """``value`` as plain JSON data (any ``Mapping`` becomes a dict, a tuple a list), or refuse.

    Only what serialises as strict JSON and means the same on the other side is accepted;
    ``json.dumps`` knows only ``dict`` and ``list``, so a ``MappingProxyType`` or a nested
    ``ChainMap`` is copied here rather than left to fail later with a bare ``TypeError``.
    ``check`` also refuses a string that cannot be encoded, naming it (``build_request``
    asks only once the whole body could not be).
    """
    if depth > MAX_JSON_DEPTH:
        _refuse(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep")
    if type(value) is dict and not check:
        flat = _flat_dict(value)
        if flat is not None:
            return flat
    if value is None or isinstance(value, bool):
        return value
    # A subclass of int, float or str (an IntEnum, a StrEnum, your own) is sent as the data it
    # holds, read by the base type's own method: never through its __int__, __float__, __str__
    # or __repr__, which may say something else.
    if isinstance(value, int):
        number = int.__index__(value)
        if not MIN_JSON_INT <= number <= MAX_JSON_INT:
            _refuse(
                f"{path} is an integer of {number.bit_length()} bits, outside the signed 64-bit "
                "range in which the service reads integers (it would become an approximate "
                "float, or not encode at all): send it as a string"
            )
        return number
    if isinstance(value, float):
        real = float.__float__(value)
        if not math.isfinite(real):
            _refuse(f"{path} is {real!r}, which JSON cannot represent; use null or a number")
        return real
    if isinstance(value, str):
        text = str.__str__(value)
        if check:
            _check_text(path, text)
        return text
    if isinstance(value, list | tuple):
        return [
            _json_value(item, f"{path}[{index}]", depth + 1, check=check)
            for index, item in enumerate(value)
        ]
    if isinstance(value, Mapping):
        plain: dict[str, Any] = {}
        try:
            items = list(value.items())
        except Exception as exc:  # a Mapping whose items() fails: the caller's bug, named
            _refuse(f"{path} could not be read as a mapping ({type(exc).__name__}: {exc})")
        for key, item in items:
            if not isinstance(key, str):
                _refuse(f"{path} has a key {key!r} of type {type(key).__name__}; keys must be str")
            name = str.__str__(key)  # as a value: the string data, whatever the subclass says
            if check:
                _check_text(f"{path} key {name!r}", name)
            plain[name] = _json_value(item, f"{path}[{name!r}]", depth + 1, check=check)
        return plain
    _refuse(
        f"{path} is a {type(value).__name__}, which is not JSON: use str, int, float, bool, "
        "None, list or dict (convert dates with .isoformat())"
    )


def _flat_dict(value: dict[Any, Any]) -> dict[str, Any] | None:
    """A copy of the usual ``variables`` (a dict of ``str`` keys to ``str``, ``bool``,
    ``None``, ``int`` in range, finite ``float``, all of exactly those types), which
    ``_json_value`` would return the same; None for anything else, which it then checks
    piece by piece (and names what it refuses)."""
    plain: dict[str, Any] = {}
    for key, item in value.items():
        kind = type(item)
        if type(key) is not str or not (
            kind is str
            or item is None
            or kind is bool
            or (kind is int and MIN_JSON_INT <= item <= MAX_JSON_INT)
            or (kind is float and math.isfinite(item))
        ):
            return None
        plain[key] = item
    return plain


class ReplyRequest(NamedTuple):
    """A validated request; ``body`` is the exact bytes that will be sent."""

    assistant_id: int
    customer_identifier: str
    message: str
    body: bytes

    #: The conversation on the service: it trims the identifier, so " A" and "A" are one.
    conversation_key: tuple[int, str]

    def __repr__(self) -> str:
        return (
            f"ReplyRequest(assistant_id={self.assistant_id!r}, "
            f"customer_identifier={self.customer_identifier!r}, message={self.message!r})"
        )


_new_tuple = tuple.__new__

#: One encoder for every request: ``json.dumps`` with options makes a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_DECODER = json.JSONDecoder()


def _c_encoder() -> Callable[[Any], str]:
    """``_ENCODER.encode``, with the C encoder made once rather than at each call (what
    ``JSONEncoder.iterencode`` does); the pure-Python path where the C one is missing."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover (CPython has it)
        return _ENCODER.encode
    # No circular-reference markers: the payload is a fresh tree of plain data that
    # ``_json_value`` built, no deeper than MAX_JSON_DEPTH.
    chunks = make(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    join = "".join

    def encode(payload: Any) -> str:
        return join(chunks(payload, 0))

    return encode


_encode = _c_encoder()


def build_request(
    assistant_id: object,
    customer_identifier: object,
    message: object,
    variables: object = None,
    *,
    max_bytes: int | None = None,
) -> ReplyRequest:
    """Validate the arguments of ``generate_reply`` and encode the JSON body, which must be at
    most ``max_bytes`` long (no limit when None)."""
    if isinstance(assistant_id, bool) or not isinstance(assistant_id, int):
        _refuse(
            f"assistant_id must be an int, got {type(assistant_id).__name__} {assistant_id!r}"
            + (" (convert it with int(...))" if isinstance(assistant_id, str | float) else "")
        )
    assistant_id = int.__index__(assistant_id)  # an int subclass: its value (see _json_value)
    if not 0 < assistant_id <= MAX_ASSISTANT_ID:
        _refuse(f"assistant_id must be a positive id, got {assistant_id}")
    if not isinstance(customer_identifier, str):
        _refuse(
            "customer_identifier must be a str (an E.164 phone number, an e-mail, a CRM id), "
            f"got {type(customer_identifier).__name__}"
        )
    customer_identifier = str.__str__(customer_identifier)  # a str subclass: its data
    trimmed = trim(customer_identifier)
    if not trimmed:
        _refuse("customer_identifier is empty")
    if len(customer_identifier) > MAX_CUSTOMER_IDENTIFIER:
        _refuse(
            f"customer_identifier is {len(customer_identifier)} characters long; "
            f"the service accepts at most {MAX_CUSTOMER_IDENTIFIER}"
        )
    if not isinstance(message, str):
        _refuse(f"message must be a str, got {type(message).__name__}")
    message = str.__str__(message)
    if not trim(message):
        _refuse("message is empty (the service trims whitespace and then requires text)")
    payload: dict[str, Any] = {
        "assistant_id": assistant_id,
        "customer_identifier": customer_identifier,
        "message": message,
    }
    if variables is not None:
        if not isinstance(variables, Mapping):
            _refuse(f"variables must be a dict (a JSON object), got {type(variables).__name__}")
        flat = _flat_dict(variables) if type(variables) is dict else None
        payload["variables"] = _json_value(variables, "variables") if flat is None else flat
    body = _encode(payload)
    try:
        encoded = body.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: say where
        _check_text("customer_identifier", customer_identifier)
        _check_text("message", message)
        _json_value(variables, "variables", check=True)
        raise  # pragma: no cover (one of the checks above refuses it)
    if max_bytes is not None and len(encoded) > max_bytes:
        _refuse(too_large(len(encoded), max_bytes))
    # tuple.__new__: what the NamedTuple's own __new__ calls, without its Python frame.
    return _new_tuple(
        ReplyRequest, (assistant_id, customer_identifier, message, encoded, (assistant_id, trimmed))
    )


# --------------------------------------------------------------------------- the response


def _strict(kind: type[Any], what: str) -> Any:
    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"expected {what}, got {type(value).__name__}")
        return value

    return structure


_a_list = _strict(list, "a list")


def _function_calls(value: Any, _: Any) -> tuple[FunctionCall, ...]:
    return tuple(FunctionCall.from_data(item) for item in _a_list(value, _))


def _make_converter() -> cattrs.Converter:
    converter = make_converter(forbid_extra_keys=False)
    # cattrs would turn 5 into "5" and "false" into True; a wrong type is a wrong reply.
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(bool, _strict(bool, "true or false"))
    converter.register_structure_hook(FunctionCall, lambda v, _: FunctionCall.from_data(v))
    converter.register_structure_hook_func(
        lambda cls: cls == Mapping[str, Any],
        lambda value, _: value,  # Reply.raw, kept as is
    )
    converter.register_structure_hook_func(
        lambda cls: cls == tuple[FunctionCall, ...], _function_calls
    )
    return converter


_converter = _make_converter()


def _usual_reply(data: dict[str, Any], customer_identifier: str) -> Reply | None:
    """The ``Reply`` of a body shaped as the service documents it, made directly (a few µs
    less than the converter per call); None for any other body, which the converter then
    structures, or explains."""
    get = data.get
    conversation_id, text = get("conversation_id"), get("reply")
    echoed = get("customer_identifier", customer_identifier)
    calls, ai_disabled = get("function_calls", ()), get("ai_disabled", False)
    if (
        type(conversation_id) is not str
        or type(text) is not str
        or type(ai_disabled) is not bool
        or type(echoed) is not str
        or (calls != () and type(calls) is not list)
    ):
        return None
    return Reply(
        conversation_id,
        echoed,
        text,
        tuple(FunctionCall.from_data(item) for item in calls) if calls else (),
        ai_disabled,
        data,
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not isinstance(headers, CIMultiDict | CIMultiDictProxy):
        lower = name.lower()
        for key, item in headers.items():
            if key.lower() == lower:
                return item
    return value


def excerpt(body: bytes, content_type: str | None = None) -> str:
    """A short, single-line, human excerpt of a body (an HTML page's title or text)."""
    text = body[: 64 * 1024].decode("utf-8", errors="replace")
    if "html" in (content_type or "") or re.match(r"\s*<(!doctype|html)", text, re.I):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        if title and title.group(1).strip():
            text = title.group(1)
        else:
            text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", text, flags=re.I | re.S)
            text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"


#: The C scanner ``_DECODER.decode`` runs, called directly for a body with no whitespace
#: around it (``decode`` skips that with two regex matches and two frames).
_SCAN = getattr(json.scanner, "c_make_scanner", None)
_scan_once = _SCAN(_DECODER) if _SCAN is not None else None


def _decode_json(body: bytes) -> Any:
    try:
        try:
            text = body.decode("utf-8")
            if _scan_once is not None and text[:1] == "{" and text[-1:] == "}":
                try:
                    data, end = _scan_once(text, 0)
                except StopIteration:
                    pass  # not JSON: decode() below says so
                else:
                    if end == len(text):
                        return data
            return _DECODER.decode(text)  # the usual body, read as json.loads
        except (UnicodeDecodeError, ValueError):
            return json.loads(body)  # a BOM, UTF-16 or UTF-32 (found as it finds them), or bad
    except (ValueError, RecursionError):
        return None


#: A delay or an epoch time: ASCII digits with an optional fraction (``float()`` would also
#: take ``1_000``, ``1e3``, ``inf`` and other scripts' digits, which no server sends).
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(?P<month>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
#: RFC 9110 section 5.6.7: IMF-fixdate, then the obsolete RFC 850 and asctime forms, all GMT.
_HTTP_DATES = (
    re.compile(rf"{_DAY}, (?P<day>[0-9]{{2}}) {_MONTH} (?P<year>[0-9]{{4}}) {_TIME} GMT", re.ASCII),
    re.compile(
        rf"{_LONG_DAY}, (?P<day>[0-9]{{2}})-{_MONTH}-(?P<year>[0-9]{{2}}) {_TIME} GMT", re.ASCII
    ),
    re.compile(rf"{_DAY} {_MONTH} (?P<day>[ 0-9][0-9]) {_TIME} (?P<year>[0-9]{{4}})", re.ASCII),
)


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip(" \t")
    return float(text) if _NUMBER.fullmatch(text) else None


def _http_date(text: str | None, now: float | None = None) -> float | None:
    """Epoch seconds of an HTTP date (always GMT, whatever the local time zone), or None."""
    if not text:
        return None
    text = text.strip(" \t")
    for pattern in _HTTP_DATES:
        match = pattern.fullmatch(text)
        if match is not None:
            break
    else:
        return None
    year = int(match["year"])
    if len(match["year"]) == 2:
        # RFC 9110: a two-digit year more than 50 years in the future is in the past century.
        current = time.gmtime(time.time() if now is None else now).tm_year
        year += current - current % 100
        if year > current + 50:
            year -= 100
    try:
        when = datetime(
            year,
            _MONTHS[match["month"]],
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            59 if match["second"] == "60" else int(match["second"]),  # a leap second
            tzinfo=UTC,
        )
    except ValueError:  # 31 Feb, hour 25
        return None
    return when.timestamp()


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait before retrying, from ``Retry-After`` or ``X-RateLimit-Reset``.

    ``Retry-After`` may be seconds (fractional accepted) or an HTTP date; an HTTP date and
    ``X-RateLimit-Reset`` (epoch seconds) are read against the response's own ``Date`` header
    when present, so a skewed local clock does not matter. ``now`` is ``time.time()``.
    """
    server_now = _http_date(_header(headers, "Date"), now) or now
    raw = _header(headers, "Retry-After")
    seconds = _number(raw)
    if seconds is not None:
        return seconds
    when = _http_date(raw, now)
    if when is not None:
        return max(when - server_now, 0.0)
    reset = _number(_header(headers, "X-RateLimit-Reset"))
    if reset is not None and reset > 1e9:  # epoch seconds; anything smaller is not a date
        return max(reset - server_now, 0.0)
    return None


#: The period of the service's throttle: ``X-RateLimit-Limit`` states requests per minute.
SERVER_PERIOD = 60.0
_MAX_STATED = 1_000_000


def stated_limit_text(headers: Mapping[str, str]) -> str | None:
    """The raw ``X-RateLimit-Limit`` header, or None (cheap: read on every response)."""
    return _header(headers, "X-RateLimit-Limit")


_POLICY_WINDOW = re.compile(r"(?:^|;)\s*w\s*=\s*(\d+(?:\.\d+)?)\s*(?:;|,|$)")


def stated_limit(
    text: str | None, margin: float = 0.02, *, policy: str | None = None
) -> RateLimit | None:
    """The limit the server states in ``X-RateLimit-Limit`` (Laravel's throttle middleware
    sends it on every response it counted), or None when absent or not a positive whole
    number. The period is the service's minute, unless ``policy`` (a ``RateLimit-Policy``
    header, ``5;w=60``, as the IETF draft and the emulator at a scaled rate send) names its
    window. ``margin`` is the client's own, so it never goes above it."""
    if text is None:
        return None
    text = text.strip(" \t")
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= _MAX_STATED:
        return None
    period = SERVER_PERIOD
    window = None if policy is None else _POLICY_WINDOW.search(policy)
    if window is not None and 0 < float(window.group(1)) <= 86_400:
        period = float(window.group(1))
    return RateLimit(int(text), period, margin=margin)


def _error_class(status: int, error_code: str | None) -> type[APIError]:
    if error_code == "ASSISTANT_NOT_FOUND":
        return AssistantNotFoundError
    if error_code == "INSUFFICIENT_BALANCE":
        return InsufficientBalanceError
    if status >= 500:
        return InternalServerError
    return {
        401: AuthenticationError,
        403: PermissionDeniedError,
        404: NotFoundError,
        422: UnprocessableEntityError,
        429: RateLimitError,
    }.get(status, APIError)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unexpected status"


def api_error(status: int, headers: Mapping[str, str], body: bytes, *, now: float) -> APIError:
    """Build the typed error for an error response (or a ``success: false`` body)."""
    content_type = _header(headers, "Content-Type")
    data = _decode_json(body)
    error_code: str | None = None
    if isinstance(data, dict):
        raw_code = data.get("error_code")
        error_code = str(raw_code) if raw_code is not None else None
        text = data.get("error") or data.get("message")
        message = str(text) if text else _reason(status)
        if status == 422 and isinstance(data.get("errors"), dict):
            message = _describe_validation(message, data["errors"])
        parsed: Any = data
    else:
        parsed = excerpt(body, content_type)
        message = _reason(status) + (f" ({parsed})" if parsed else "")
    if status == 404 and error_code is None:
        # Not the service's ASSISTANT_NOT_FOUND: a route the server does not have (an HTML
        # page, a framework's "route could not be found"), so the request went to a wrong URL.
        message += (
            f"; the base URL looks wrong: it must be the API's root, like {DEFAULT_BASE_URL!r}, "
            f"to which the SDK adds /{ENDPOINT}"
        )
    if 300 <= status < 400:
        location = URL(_header(headers, "Location") or "")
        message = (
            f"unexpected redirect to {location.host or 'the same host'}; redirects are not "
            "followed so that the API token never travels elsewhere: check base_url"
        )
    cls = _error_class(status, error_code)
    return cls(
        message,
        status=status,
        error_code=error_code,
        body=parsed,
        headers=headers,
        retry_after=retry_after(headers, now),
    )


def _describe_validation(message: str, errors: dict[Any, Any]) -> str:
    fields = ", ".join(str(field) for field in errors)
    return f"{message} [fields: {fields}]" if fields else message


def parse_reply(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    customer_identifier: str,
    now: float,
) -> Reply:
    """Return the ``Reply`` of a successful response, or raise the matching ``APIError``."""
    if not 200 <= status < 300:
        raise api_error(status, headers, body, now=now)
    data = _decode_json(body)
    if not isinstance(data, dict):
        what = "not JSON" if data is None else f"a JSON {type(data).__name__}, not an object"
        raise APIResponseValidationError(
            f"the reply body is {what}: {excerpt(body, _header(headers, 'Content-Type'))!r}",
            status=status,
            body=excerpt(body),
            headers=headers,
        )
    if data.get("success") is False:
        raise api_error(status, headers, body, now=now)
    reply = _usual_reply(data, customer_identifier)
    if reply is not None:
        return reply
    fields = dict(data)
    fields["raw"] = data  # the whole body, unknown fields included (structured as is)
    fields.setdefault("customer_identifier", customer_identifier)
    if fields.get("reply") is None and fields.get("ai_disabled") is True:
        fields["reply"] = ""  # a human has taken over: there is no AI text to give
    try:
        reply = _converter.structure(fields, Reply)
    except Exception as exc:
        problems = (
            "; ".join(cattrs.transform_error(exc))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise APIResponseValidationError(
            f"the reply body is not a valid reply: {problems}",
            status=status,
            body=data,
            headers=headers,
        ) from exc
    return reply
