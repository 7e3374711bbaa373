"""Content-Encoding, decoded by the SDK itself, with every byte it makes counted.

aiohttp's own decoding (``auto_decompress=True``) hands on whole what it inflates, and
``response.read()`` reads it all: a 1 MB gzip body of zeros became 1 GiB in memory before the
SDK could count it. The transport therefore asks aiohttp for the bytes as sent
(``auto_decompress=False``) and decodes them here, a layer at a time, asking zlib for at most
64 KiB at a time and never more than one byte past the room left under the cap: a layer never
makes more than ``max_response_size`` (plus a little for an inner layer's own framing), and
memory holds the decoded body and a piece per layer, whatever the compression ratio, the
number of layers, or the gzip members. Pure code, no I/O: the transport feeds it the chunks
it reads.

Only what this module can bound is asked for (``Accept-Encoding: gzip, deflate``) and decoded;
a body in another encoding (``br``, ``zstd``, ``compress``) is refused, not passed on raw.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["ACCEPT_ENCODING", "BadEncodingError", "BodyDecoder", "TooLargeError"]

#: What the SDK asks for: what it can decode within the cap.
ACCEPT_ENCODING: Final = "gzip, deflate"
#: More layers than this (``gzip, gzip, gzip, gzip``) is no server's honest answer.
MAX_LAYERS: Final = 3
#: gzip members in one body (RFC 1952 allows several); each costs a new decompressor.
MAX_MEMBERS: Final = 64
#: What one call to zlib may make: the pieces a layer hands on.
STEP: Final = 64 * 1024
_ALIASES: Final = {"x-gzip": "gzip", "gzip": "gzip", "deflate": "deflate"}


class TooLargeError(Exception):
    """A layer would make more than its limit of bytes."""


class BadEncodingError(Exception):
    """An encoding the SDK does not decode, or data that is not what its header says."""


def _layers(content_encoding: str | None) -> list[str]:
    """The encodings in the order they were applied (RFC 9110 8.4), ``identity`` dropped."""
    if not content_encoding:
        return []
    layers = []
    for raw in content_encoding.split(","):
        name = raw.strip().lower()
        if name in ("", "identity"):
            continue
        if name not in _ALIASES:
            shown = name if name.isascii() and name.isprintable() and len(name) <= 20 else "?"
            raise BadEncodingError(
                f"the response is in Content-Encoding {shown!r}, which was not asked for "
                f"(Accept-Encoding: {ACCEPT_ENCODING}) and is not decoded"
            )
        layers.append(_ALIASES[name])
    if len(layers) > MAX_LAYERS:
        raise BadEncodingError(
            f"the response has {len(layers)} layers of Content-Encoding; at most "
            f"{MAX_LAYERS} are decoded"
        )
    return layers


class _Inflater:
    """One gzip or deflate layer, its output bounded by ``limit`` bytes in all."""

    __slots__ = ("_gzip", "_members", "_obj", "limit", "made")

    def __init__(self, encoding: str, limit: int) -> None:
        self._gzip = encoding == "gzip"
        self._obj: zlib._Decompress | None = None
        self._members = 0
        self.limit = limit
        self.made = 0

    def _new(self, first: int) -> zlib._Decompress:
        self._members += 1
        if self._members > MAX_MEMBERS:
            raise BadEncodingError(f"the gzip body has more than {MAX_MEMBERS} members")
        if self._gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # "deflate" is meant to be zlib (RFC 1950), but some servers send raw deflate: tell
        # them apart by the first byte, as browsers and aiohttp do.
        return zlib.decompressobj(zlib.MAX_WBITS if first & 0x0F == 8 else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``data``, in pieces of at most ``STEP`` bytes."""
        while True:
            obj = self._obj
            if obj is None or obj.eof:
                if not data or (obj is not None and not self._gzip):
                    return  # all used; or bytes after the end of a deflate stream: ignored
                obj = self._obj = self._new(data[0])
            step = min(self.limit - self.made + 1, STEP)
            try:
                out = obj.decompress(data, step)
            except zlib.error:
                kind = "gzip" if self._gzip else "deflate"
                raise BadEncodingError(f"the body is not valid {kind} data") from None
            self.made += len(out)
            if self.made > self.limit:
                raise TooLargeError
            if out:
                yield out
            data = obj.unused_data if obj.eof else obj.unconsumed_tail
            if not obj.eof and not data and len(out) < step:
                return  # all of the input used, and no output pending

    def feed_all(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            yield from self.feed(piece)

    def finish(self) -> None:
        if self._obj is not None and not self._obj.eof:
            kind = "gzip" if self._gzip else "deflate"
            raise BadEncodingError(f"the {kind} body was cut short")


class BodyDecoder:
    """Decodes a body in ``Content-Encoding`` layers; the decoded body is at most ``cap``
    bytes, and each inner layer at most ``cap`` plus 1/1024 and 1 KiB of framing.

    Raises ``BadEncodingError`` at construction for an encoding it does not decode."""

    __slots__ = ("_stages",)

    def __init__(self, content_encoding: str | None, cap: int) -> None:
        inner = cap + cap // 1024 + 1024
        layers = _layers(content_encoding)
        # The last encoding applied is undone first; the outermost layer of the result is
        # the decoded body itself.
        self._stages = [
            _Inflater(name, cap if index == 0 else inner) for index, name in enumerate(layers)
        ][::-1]

    @property
    def identity(self) -> bool:
        return not self._stages

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``chunk``, in pieces: a piece is handed on before the next is
        made, so that memory holds the cap and a piece per layer, never a layer whole."""
        pieces: Iterable[bytes] = (chunk,)
        for stage in self._stages:
            pieces = stage.feed_all(pieces)
        return iter(pieces)

    def finish(self) -> None:
        for stage in self._stages:
            stage.finish()
