"""The only module that touches aiohttp: send one POST, read a bounded body, map failures.

Whether a failed request may have reached the server decides whether it is safe to retry, so
the transport records the moment the request's headers were written (aiohttp's
``on_request_headers_sent`` trace signal). That moment also releases the rate limiter's gate:
the next request is spaced from when this one really left, not from when it was admitted.
A caller's own ``ClientSession`` cannot carry our trace hook; then the request counts as
written just before it is handed to aiohttp, and failures are classified by exception type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from ._errors import APIConnectionError, APIResponseValidationError, APITimeoutError

__all__ = ["Response", "Transport"]

Response = tuple[int, Mapping[str, str], bytes]
CHUNK = 64 * 1024


class _Probe:
    """Per-request context handed to the trace hooks."""

    __slots__ = ("on_sent", "sent")

    def __init__(self, on_sent: Callable[[], None]) -> None:
        self.sent = False
        self.on_sent = on_sent

    def mark_sent(self) -> None:
        if not self.sent:
            self.sent = True
            self.on_sent()


async def _on_headers_sent(
    _session: aiohttp.ClientSession,
    context: SimpleNamespace,
    _params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    probe = context.trace_request_ctx
    if isinstance(probe, _Probe):
        probe.mark_sent()


def _trace_config() -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(_on_headers_sent)
    return config


class Transport:
    """Owns (or borrows) one ``aiohttp.ClientSession``."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        *,
        timeout: float | None,
        max_response_size: int,
        trust_env: bool = True,
    ) -> None:
        self._borrowed = session
        self._trust_env = trust_env
        self._own: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_response_size = max_response_size

    @property
    def borrowed(self) -> bool:
        return self._borrowed is not None

    def _session(self) -> aiohttp.ClientSession:
        if self._borrowed is not None:
            return self._borrowed
        if self._own is None:
            self._own = aiohttp.ClientSession(
                trace_configs=[_trace_config()],
                # Proxies from the environment are honoured (except for a loopback base URL,
                # where a plain-http proxy would see the token); cookies are not kept: the API
                # is stateless and a cookie jar would only grow.
                trust_env=self._trust_env,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._own

    async def close(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            await own.close()

    async def post(
        self,
        url: URL,
        headers: Mapping[str, str],
        body: bytes,
        on_sent: Callable[[], None],
    ) -> Response:
        probe = _Probe(on_sent)
        session = self._session()
        if self._borrowed is not None:
            if session.closed:
                raise APIConnectionError("the aiohttp session you passed is closed", sent=False)
            probe.mark_sent()
        try:
            async with session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self.timeout,
                trace_request_ctx=probe,
            ) as response:
                status = response.status
                return status, response.headers, await self._read(response)
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

    def _sent(self, probe: _Probe, exc: BaseException) -> bool:
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return False  # no connection, nothing written
        if self._borrowed is not None:
            return True  # no trace hook on a caller's session: assume the worst
        return probe.sent

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self.max_response_size
        declared = response.content_length
        if declared is not None and declared > cap:
            raise self._too_large(response, f"declares {declared} bytes")
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
