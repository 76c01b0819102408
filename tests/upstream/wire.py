"""Byte-level test rig for the upstream client, in the style of uvicorn's protocol tests: every
connection the pool opens is one end of a ``socket.socketpair()``; the test holds the other end
(:class:`Wire`), reads the exact bytes the client wrote and answers with the exact bytes it
chooses, a broken or hostile upstream included."""

from __future__ import annotations

import asyncio
import socket

from dicomproxy.upstream.connection import Connection, Exchange
from dicomproxy.upstream.limits import Limits
from dicomproxy.upstream.pool import ConnectionPool


class Wire:
    """The upstream's end of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = b""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def _fill(self, timeout: float) -> bool:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), timeout)
        self.buffer += data
        return bool(data)

    async def head(self, timeout: float = 5) -> bytes:
        """The next request head, up to and including its blank line."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill(timeout):
                raise EOFError(f"the client closed before a full head; got {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    async def exactly(self, size: int, timeout: float = 5) -> bytes:
        while len(self.buffer) < size:
            if not await self._fill(timeout):
                raise EOFError(f"the client closed after {len(self.buffer)} of {size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def until(self, marker: bytes, timeout: float = 5) -> bytes:
        while marker not in self.buffer:
            if not await self._fill(timeout):
                raise EOFError(f"the client closed before {marker!r}; got {self.buffer!r}")
        data, _, self.buffer = self.buffer.partition(marker)
        return data + marker

    async def rest(self, timeout: float = 5) -> bytes:
        """Everything until the client closes the connection (proof that it did)."""
        try:
            while await self._fill(timeout):
                pass
        except ConnectionResetError:
            pass
        data, self.buffer = self.buffer, b""
        return data

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


class PairPool(ConnectionPool):
    """A pool to ``http://pacs.test:8042`` whose connections are socket pairs; the far end of
    each new one arrives in :attr:`wires`."""

    def __init__(self, limits: Limits | None = None, max_connections: int = 4) -> None:
        super().__init__("http://pacs.test:8042", limits or Limits(), max_connections)
        self.wires: asyncio.Queue[Wire] = asyncio.Queue()
        self._ends: list[Wire] = []

    async def _connect(self, limits: Limits) -> Connection:
        ours, theirs = socket.socketpair()
        _, conn = await self.loop.create_connection(lambda: Connection(self.origin.label), sock=ours)
        self.connections_made += 1
        wire = Wire(theirs)
        self._ends.append(wire)
        await self.wires.put(wire)
        return conn

    async def wire(self, timeout: float = 5) -> Wire:
        """The far end of the next connection the pool opens."""
        return await asyncio.wait_for(self.wires.get(), timeout)

    def close_wires(self) -> None:
        for wire in self._ends:
            wire.close()


def ok(body: bytes = b"ok", status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body


async def read_all(exchange: Exchange) -> bytes:
    parts = []
    while chunk := await exchange.read():
        parts.append(chunk)
    return b"".join(parts)
