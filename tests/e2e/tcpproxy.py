"""A loopback TCP proxy that can swallow the server's replies and drop connections: real
faults between the gateway and the broker, with nothing mocked."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from types import TracebackType


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self.swallow_replies = False  # server → client bytes are discarded while set
        self.reply_delay_s = 0.0  # server → client bytes are held this long (in order)
        self.refuse = False  # new connections are closed at once while set
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.drop_all()
        for task in self._tasks:
            task.cancel()

    def drop_all(self) -> None:
        """Abort every proxied connection (both sides see a reset)."""
        for client, upstream in list(self._open):
            client.transport.abort()
            upstream.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        pair = (writer, up_writer)
        self._open.add(pair)
        pumps = {
            asyncio.ensure_future(_pump(reader, up_writer, lambda: False)),
            asyncio.ensure_future(
                _pump(up_reader, writer, lambda: self.swallow_replies, lambda: self.reply_delay_s)
            ),
        }
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                self._tasks.discard(pump)
            self._open.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    swallow: Callable[[], bool],
    delay_s: Callable[[], float] = lambda: 0.0,
) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(65536):
            if swallow():
                continue
            if delay_s():
                await asyncio.sleep(delay_s())
            dst.write(data)
            await dst.drain()
