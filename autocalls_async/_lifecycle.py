"""``async with`` for the SDK's closeable objects: entering returns the object, leaving awaits
``aclose()``."""

from __future__ import annotations

from typing import Self


class AsyncClosing:
    __slots__ = ()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError
