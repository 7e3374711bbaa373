"""A TCP proxy for tests: adds latency to each direction, and can lose one reply.

Every chunk read on one side is written to the other ``delay`` seconds later, in order, so a
round trip through the proxy costs ``2 x delay`` more (a network between the workers and
Redis). ``drop_reply_after`` names bytes that, once a client sends them, make the proxy close
that connection instead of passing the server's next reply back: the command ran, its answer
was lost (a dropped connection, a failover).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LatencyProxy"]


class LatencyProxy:
    """``async with LatencyProxy(port, delay=0.025) as proxy``: ``proxy.port`` leads to ``port``."""

    def __init__(self, target_port: int, *, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self.connections = 0  #: connections accepted so far
        self.dropped = 0  #: replies lost on purpose
        self.drop_reply_after: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> LatencyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def drop_all(self) -> int:
        """Reset every open connection at once (a failover, a proxy restarting); returns how
        many. New connections are accepted as before."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        return len(writers)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        lose = asyncio.Event()  # set: the server's next reply is not passed on
        pair = (
            self._spawn(self._pipe(reader, up_writer, lose, upstream=True)),
            self._spawn(self._pipe(up_reader, writer, lose, upstream=False)),
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
        for task in pair:
            task.cancel()
        for end in (writer, up_writer):
            end.close()
            self._writers.discard(end)

    def _spawn(self, coroutine: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        lose: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not upstream and lose.is_set():
                    self.dropped += 1
                    writer.transport.abort()  # the connection ends without the reply
                    return
                writer.write(data)
                await writer.drain()

        sender = self._spawn(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                marker = self.drop_reply_after
                if upstream and marker is not None and marker in data:
                    self.drop_reply_after = None  # once
                    lose.set()
                queue.put_nowait((loop.time() + self.delay, data))
            while not queue.empty() and not sender.done():
                await asyncio.sleep(0.001)
        finally:
            if not sender.done():
                await asyncio.wait([sender], timeout=self.delay + 0.05)
            sender.cancel()
