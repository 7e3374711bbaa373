"""The only module that touches aiohttp: send one POST, read a bounded body, map failures.

The request body is a payload of ours, which aiohttp asks to write itself once the connection
is made. Since aiohttp 3.12 the headers wait in a buffer and leave with the body in one write,
so the payload's write is the moment the request starts, as the server sees it. There, and
synchronously (nothing can stall in between), the payload asks the rate-limit grant whether it
is still valid (``may_send``), writes, and reports the start (``sent``). This works the same on
our own session and on a caller's ``session=``, and it tells exactly whether a failed request
may have reached the server, which decides whether it is safe to retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from yarl import URL

from ._decoding import ACCEPT_ENCODING, BadEncodingError, BodyDecoder, TooLargeError
from ._errors import APIConnectionError, APIResponseValidationError, APITimeoutError
from ._pool import Gate, Pool, gate_of, lease_pool, release_pool
from ._wire import WITHHELD_MESSAGE, Redactor, auth_header, request_headers, shown_url

__all__ = ["GrantExpiredError", "Response", "SendGate", "Transport"]

Response = tuple[int, Mapping[str, str], bytes]
CHUNK = 64 * 1024


class SendGate(Protocol):
    """What the transport tells about a request's start (a rate-limit grant, or nothing)."""

    def sent(self) -> None: ...


class _Open:
    """No rate limit: always free to send."""

    def sent(self) -> None:
        pass


OPEN = _Open()


class GrantExpiredError(APIConnectionError):
    """Nothing was written: the rate-limit grant ran out first. The client asks for another
    slot (not a retry: nothing reached the server)."""


class _LeaseLost(Exception):
    """The grant ran out before the write (a stalled event loop): nothing was written."""


class _Body(aiohttp.BytesPayload):
    """The request body; its write is the request's start."""

    def __init__(self, body: bytes, gate: SendGate) -> None:
        super().__init__(body, content_type="application/json")
        self.gate = gate
        self.written = False
        self.lease_lost = False

    def __deepcopy__(self, memo: dict[int, object]) -> aiohttp.BytesPayload:
        # A recorder of requests (aioresponses deep-copies every call's arguments) gets the
        # body's bytes, not the live rate-limit grant: copying that would copy its event
        # loop, whose half-made copy then fails in __del__ (an unraisable error).
        return aiohttp.BytesPayload(self._value, content_type="application/json")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        may_send = getattr(self.gate, "may_send", None)
        if may_send is not None and not may_send():
            self.lease_lost = True
            raise _LeaseLost
        data = self._value if content_length is None else self._value[:content_length]
        self.written = True
        try:
            # No await happens before the bytes are handed to the socket: the check above
            # and the write are one step of the event loop.
            await writer.write(data)
        finally:
            self.gate.sent()


class Transport:
    """Sends to one endpoint with one token's headers: on a pool shared by the process's
    clients (``_pool``), an ``AutocallsAccounts``' pool, or a caller's ``ClientSession``."""

    __slots__ = (
        "_borrowed",
        "_headers",
        "_lease",
        "_pool",
        "_redactor",
        "_shown",
        "_trust_env",
        "max_response_size",
        "timeout",
        "url",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        *,
        url: URL,
        token: str,
        timeout: aiohttp.ClientTimeout,
        max_response_size: int,
        trust_env: bool = True,
        redactor: Redactor | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.url = url
        #: Masks the token in every response's body and headers, and in failures' messages,
        #: before anything else sees them: the one place where the SDK reads what came back.
        self._redactor = redactor
        self._borrowed = session
        self._pool = pool  # given: someone else's lease (an AutocallsAccounts')
        self._lease = False  # the pool is leased by this transport, to give back on close
        self._trust_env = trust_env
        self._shown: URL | None = None
        if session is None:
            # The pool's session sends the rest.
            self._headers: Mapping[str, str] = auth_header(token)
        else:
            # Only what _decoding can decode within the cap (aiohttp would add br and zstd
            # when their libraries are installed).
            self._headers = {**request_headers(token), "Accept-Encoding": ACCEPT_ENCODING}
        self.timeout = timeout
        self.max_response_size = max_response_size

    @property
    def shown(self) -> URL:
        """The URL as logs, messages and spans show it: the token masked if it is in it."""
        shown = self._shown
        if shown is None:
            shown = self._shown = URL(shown_url(self.url, self._redactor))
        return shown

    def shown_text(self, url: URL) -> str:
        """``url`` as messages show it, the token masked if it is in it."""
        return shown_url(url, self._redactor)

    def gate(self) -> Gate | None:
        """Where a call waits for a connection before asking for a rate-limit slot: its pool's
        gate (leased now if need be), or the gate of the caller's session (None: unlimited)."""
        borrowed = self._borrowed
        if borrowed is not None:
            return gate_of(borrowed)
        pool = self._pool
        if pool is None:
            pool = self._pool = lease_pool(self.url, trust_env=self._trust_env)
            self._lease = True
        return pool.gate

    def _session(self) -> tuple[aiohttp.ClientSession, Pool]:
        pool = self._pool
        if pool is None:
            pool = self._pool = lease_pool(self.url, trust_env=self._trust_env)
            self._lease = True
        return pool.session, pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._lease:
            self._lease = False
            await release_pool(pool)

    async def post(self, body: bytes, gate: SendGate = OPEN) -> Response:
        """Send ``body``; the response, or raise ``APIConnectionError`` or
        ``APIResponseValidationError``.

        The error is raised here, from a frame that holds no aiohttp object, and outside any
        ``except`` block: it has no ``__cause__`` nor ``__context__``, and its traceback starts
        here. aiohttp's exceptions keep the request's headers, and so the token
        (``ClientResponseError.request_info``), and an error reporter serialises the whole
        chain and every frame's locals: the SDK's error keeps only the type name of aiohttp's
        and its text, redacted."""
        payload = _Body(body, gate)
        try:
            outcome = await self._exchange(payload)
        finally:
            if not payload.written:
                give_back = getattr(payload.gate, "give_back", None)
                if give_back is not None:
                    give_back()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _exchange(
        self, payload: _Body
    ) -> Response | APIConnectionError | APIResponseValidationError:
        """The response, or the SDK error to raise (returned, not raised: see ``post``)."""
        borrowed = self._borrowed
        try:
            if borrowed is None:
                pool = self._pool
                if pool is None:
                    session, pool = self._session()
                else:
                    session = pool.session
                request = session.post(
                    self.url,
                    data=payload,
                    headers=self._headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                    proxy=pool.proxy,
                    proxy_auth=pool.proxy_auth,
                    auto_decompress=False,  # decoded by _decoding, within the cap
                )
            else:
                if borrowed.closed:
                    return APIConnectionError(
                        "the aiohttp session you passed is closed", sent=False
                    )
                request = borrowed.post(
                    self.url,
                    data=payload,
                    headers=self._headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                    # Whatever the caller's session says: every status is ours to read (a 429
                    # must pause the token, a 4xx is a typed error, not a connection failure).
                    raise_for_status=False,
                    auto_decompress=False,
                )
            async with request as response:
                status = response.status
                declared = response.content_length
                received = response.headers
                if (
                    declared is not None
                    and declared <= self.max_response_size
                    and "Content-Encoding" not in received
                    and "Transfer-Encoding" not in received
                ):
                    # The usual reply (see ``_read``), read before anything is shown, its
                    # headers and body then checked for the token in one pass.
                    body = await response.read()
                    return self._checked(status, response, body)
                headers = self._headers_of(response)
                try:
                    body = await self._read(response, headers)
                except _Refused as refused:
                    return APIResponseValidationError(
                        refused.message, status=status, headers=headers
                    )
                return status, headers, self._body(body)
        except aiohttp.ConnectionTimeoutError as exc:
            return APITimeoutError(
                f"could not connect to {self.shown.host} in time: {self._cause(exc)}", sent=False
            )
        except TimeoutError:
            return APITimeoutError(
                f"no complete response from {self.shown.host} within {self.timeout.total}s",
                sent=payload.written,
            )
        except (aiohttp.ClientError, OSError) as exc:
            if payload.lease_lost:
                return GrantExpiredError(
                    "the event loop was busy so long between the rate-limit grant and the "
                    "write that the grant ran out; nothing was sent",
                    sent=False,
                )
            return APIConnectionError(
                f"request to {self.shown.host} failed: {self._cause(exc)}", sent=payload.written
            )

    def _cause(self, exc: BaseException) -> str:
        """aiohttp's exception as text: its type's name and its message, the token masked
        (a ``ClientResponseError`` quotes the bad line the server sent)."""
        if isinstance(exc, aiohttp.ClientResponseError):
            # Its str() names the request's URL, which the SDK shows its own way.
            text = f"{exc.status}, message={exc.message!r}"
        else:
            text = str(exc)
        return self._text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    def _text(self, text: str) -> str:
        return text if self._redactor is None else self._redactor.text(text, WITHHELD_MESSAGE)

    def _body(self, body: bytes) -> bytes:
        return body if self._redactor is None else self._redactor.body(body)

    def _checked(self, status: int, response: aiohttp.ClientResponse, body: bytes) -> Response:
        """The response as received when neither its headers nor its body can show the token
        (the usual case: one check of both, joined by a line break, which no token holds, so
        that whatever either part shows the whole does); else each part masked."""
        redactor = self._redactor
        if redactor is None or redactor.clean(
            b"\n".join(chain(chain.from_iterable(response.raw_headers), (body,)))
        ):
            return status, response.headers, body
        return status, self._headers_of(response), self._body(body)

    def _headers_of(self, response: aiohttp.ClientResponse) -> Mapping[str, str]:
        headers = response.headers
        redactor = self._redactor
        if redactor is None or redactor.clean(
            b"\n".join(chain.from_iterable(response.raw_headers))
        ):
            return headers  # the usual case, checked on the bytes as they came
        return redactor.headers(headers)

    async def _read(self, response: aiohttp.ClientResponse, headers: Mapping[str, str]) -> bytes:
        """The body, decoded, read in chunks: never more than ``max_response_size`` bytes
        arrive or are made by decompression (``_decoding``), whatever the headers say."""
        cap = self.max_response_size
        declared = response.content_length
        if declared is not None and declared > cap:
            raise _Refused(self._too_large(f"declares {declared} bytes, more than"))
        if (
            declared is not None
            and "Content-Encoding" not in headers
            and "Transfer-Encoding" not in headers
        ):
            # The usual reply: its length is declared, within the cap, and it is not encoded:
            # aiohttp's parser stops at that length, so reading it whole is reading at most it.
            return await response.read()
        try:
            decoder = BodyDecoder(headers.get("Content-Encoding"), cap)  # a CIMultiDict
        except BadEncodingError as exc:
            raise _Refused(f"{exc}; it was not read") from None
        # One buffer, not a list of the pieces: a server that sends its body a byte at a time
        # would make each piece a Python object of 33 bytes more than its one.
        body = bytearray()
        size = 0
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > cap:
                    raise _Refused(self._too_large("kept going, past"))
                if decoder.identity:
                    body += chunk
                else:
                    for piece in decoder.feed(chunk):
                        body += piece
            decoder.finish()
        except TooLargeError:
            raise _Refused(self._too_large("decompresses to more than")) from None
        except BadEncodingError as exc:
            raise _Refused(f"the response body could not be decoded: {exc}") from None
        return bytes(body)

    def _too_large(self, what: str) -> str:
        return (
            f"the response body {what} max_response_size={self.max_response_size} bytes; it "
            "was not read further"
        )


class _Refused(Exception):
    """A body the transport will not hand on; ``message`` says why (no aiohttp object)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
