"""The only module that touches aiohttp: send one POST, read a bounded body, map failures.

Whether a failed request may have reached the server decides whether it is safe to retry, so
the transport records the moment the request was handed to the connection (a ``ClientRequest``
subclass on our own session). That moment also releases the rate limiter's gate: the next
request is spaced from when this one really left, not from when it was admitted (a new TLS
connection can take a while). A caller's own ``ClientSession`` has aiohttp's plain request
class; then the request counts as written just before it is handed to aiohttp, and failures
are classified by exception type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.connector import Connection
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from ._errors import APIConnectionError, APIResponseValidationError, APITimeoutError

__all__ = ["Response", "Transport"]

Response = tuple[int, Mapping[str, str], bytes]
CHUNK = 64 * 1024


class _Probe:
    """Records that the current request was written, and tells the rate limiter."""

    __slots__ = ("on_sent", "sent")

    def __init__(self, on_sent: Callable[[], None]) -> None:
        self.sent = False
        self.on_sent = on_sent

    def mark_sent(self) -> None:
        if not self.sent:
            self.sent = True
            self.on_sent()


#: The probe of the request the current task is sending (aiohttp sends in the caller's task).
_probe: ContextVar[_Probe | None] = ContextVar("autocalls_probe", default=None)


class _ProbedRequest(aiohttp.ClientRequest):
    """aiohttp's request, reporting the moment its headers are handed to the connection.

    aiohttp's tracing (``on_request_headers_sent``) would say the same, but a trace config makes
    aiohttp send a dozen signals per request, which cost more than the rest of our pipeline.
    """

    async def send(self, conn: Connection) -> aiohttp.ClientResponse:
        response = await super().send(conn)
        probe = _probe.get()
        if probe is not None:
            probe.mark_sent()
        return response


class Transport:
    """Sends to one endpoint with fixed headers, on its own ``ClientSession`` or a caller's."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        *,
        url: URL,
        headers: Mapping[str, str],
        timeout: float | None,
        max_response_size: int,
        trust_env: bool = True,
    ) -> None:
        self.url = url
        self._headers = dict(headers)
        self._borrowed = session
        self._trust_env = trust_env
        self._own: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_response_size = max_response_size

    def _own_session(self) -> aiohttp.ClientSession:
        if self._own is None:
            if self._trust_env:
                # The environment's proxy (HTTPS_PROXY, NO_PROXY, ~/.netrc) is looked up once
                # here: aiohttp's trust_env would look it up in a worker thread on every
                # request, which costs more than the rest of a call. Never for a loopback base
                # URL, where a plain-http proxy would see the token.
                with contextlib.suppress(LookupError):  # no proxy for this URL
                    self._proxy, self._proxy_auth = get_env_proxy_for_url(self.url)
            self._own = aiohttp.ClientSession(
                # Headers and timeout live on the session: nothing to merge per request.
                headers=self._headers,
                timeout=self.timeout,
                request_class=_ProbedRequest,
                trust_env=False,
                # The API is stateless; a cookie jar would only grow.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._own

    async def close(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            await own.close()

    async def post(self, body: bytes, on_sent: Callable[[], None]) -> Response:
        probe = _Probe(on_sent)
        url = self.url
        borrowed = self._borrowed
        reset = _probe.set(probe)
        try:
            if borrowed is None:
                request = self._own_session().post(
                    url,
                    data=body,
                    allow_redirects=False,
                    proxy=self._proxy,
                    proxy_auth=self._proxy_auth,
                )
            else:
                if borrowed.closed:
                    raise APIConnectionError("the aiohttp session you passed is closed", sent=False)
                probe.mark_sent()
                request = borrowed.post(
                    url,
                    data=body,
                    headers=self._headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
            async with request as response:
                return response.status, response.headers, await self._read(response)
        except APIResponseValidationError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:
            raise APITimeoutError(
                f"could not connect to {url.host} in time: {exc}", sent=False
            ) from exc
        except TimeoutError as exc:
            raise APITimeoutError(
                f"no complete response from {url.host} within {self.timeout.total}s",
                sent=self._sent(probe, exc),
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise APIConnectionError(
                f"request to {url.host} failed: {type(exc).__name__}: {exc}",
                sent=self._sent(probe, exc),
            ) from exc
        finally:
            _probe.reset(reset)

    def _sent(self, probe: _Probe, exc: BaseException) -> bool:
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return False  # no connection, nothing written
        return probe.sent  # on a caller's session it was marked at hand-over: assume the worst

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self.max_response_size
        declared = response.content_length
        if declared is not None:
            if declared > cap:
                raise self._too_large(response, f"declares {declared} bytes")
            return await response.read()  # aiohttp stops at the declared length
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > cap:
                raise self._too_large(response, "kept going")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, response: aiohttp.ClientResponse, what: str) -> APIResponseValidationError:
        headers: dict[str, Any] = dict(response.headers)
        return APIResponseValidationError(
            f"the response body {what}, more than max_response_size={self.max_response_size} "
            "bytes; it was not read",
            status=response.status,
            headers=headers,
        )
