"""``async with`` for the SDK's closeable objects: entering returns the object, leaving awaits
``aclose()``; a plain ``with`` fails with a message that says what to write instead."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self


class AsyncOnly:
    """A plain ``with`` raises a ``TypeError`` that says to use ``async with``.

    Python's own message ("does not support the context manager protocol") does not say what
    to do. The methods exist at run time only: type checkers see no ``__enter__`` and keep
    reporting a plain ``with`` as an error.
    """

    __slots__ = ()

    if not TYPE_CHECKING:  # pragma: no branch (always true at run time)

        def __enter__(self):
            name = type(self).__name__
            raise TypeError(
                f"{name} is asynchronous: use `async with {name}(...) as ...:` inside an "
                "`async def` function (from synchronous code, run that function with "
                "asyncio.run(...)); a plain `with` cannot wait for it to close"
            )

        __exit__ = __enter__  # never called: entering has already failed


class AsyncClosing(AsyncOnly):
    __slots__ = ()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError
