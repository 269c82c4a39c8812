"""A TCP proxy on loopback that can make the server behind it fail as networks do.

Modes: `FORWARD` (a plain proxy), `STALL` (connections stay open, bytes stop flowing in
both directions: a hung server or a black-holed network), `REFUSE` (new connections are
closed at once, open ones are cut: a server that is down). It runs its own event loop in a
thread, so the service under test and Ray workers in other processes reach it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Iterator


class Mode(enum.Enum):
    FORWARD = "forward"
    STALL = "stall"
    REFUSE = "refuse"


class FaultyProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._mode = Mode.FORWARD
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faulty-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def start(self) -> FaultyProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def set_mode(self, mode: Mode) -> None:
        def apply() -> None:
            self._mode = mode
            if mode is Mode.REFUSE:
                for writer in list(self._writers):
                    writer.close()

        self._loop.call_soon_threadsafe(apply)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._mode is Mode.REFUSE:
            client_writer.close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.close()
            return
        self._writers.update((client_writer, server_writer))
        await asyncio.gather(
            self._pump(client_reader, server_writer), self._pump(server_reader, client_writer), return_exceptions=True
        )
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            while self._mode is Mode.STALL:
                await asyncio.sleep(0.02)
            if self._mode is Mode.REFUSE:
                return
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


@contextlib.contextmanager
def faulty_proxy(target_host: str, target_port: int) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(target_host, target_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
