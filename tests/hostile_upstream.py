"""A broken or malicious HTTP upstream for the proxy's e2e tests: a raw asyncio socket server in a
thread of the test process, answering each request with exact bytes no well-behaved server sends.

Routes (the request path picks the answer)::

    /two-in-one   a complete 200 "fine" and, in the same write, a 302 with Location and Set-Cookie
    /trickle      "102 Processing" every 0.1 s, forever (records when the client gave up)
    /switch       101 Switching Protocols with Upgrade, then raw bytes
    /status/700   a status line outside 100-599
    /big-head     a 200 whose head is 200 KB of headers, in one write
    anything else a plain 200 "fine" (Content-Length, kept alive)

``requests`` lists the request lines seen, ``served`` each request's (connection number, path),
``connections`` counts connections, ``gave_up`` holds the seconds each trickle ran before the
client closed.
"""

from __future__ import annotations

import asyncio
import threading
import time

FINE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nfine"
EVIL = (b"HTTP/1.1 302 Found\r\nlocation: http://evil.example/\r\nset-cookie: session=stolen\r\n"
        b"content-length: 0\r\n\r\n")


class HostileUpstream:
    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.served: list[tuple[int, bytes]] = []
        self.connections = 0
        self.gave_up: list[float] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HostileUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the hostile upstream did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                self.requests.append(line)
                path = line.split(b" ")[1]
                self.served.append((number, path))
                if not await self._answer(path, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _answer(self, path: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write the answer for ``path``; False once the connection is done with."""
        if path == b"/two-in-one":
            writer.write(FINE + EVIL)
        elif path == b"/trickle":
            await self._trickle(reader, writer)
            return False
        elif path == b"/switch":
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
                         b"\x81\x05hello")
        elif path == b"/status/700":
            writer.write(b"HTTP/1.1 700 Weird\r\ncontent-length: 4\r\n\r\nodd!")
        elif path == b"/big-head":
            pad = b"".join(b"x-pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(200))
            writer.write(b"HTTP/1.1 200 OK\r\n" + pad + b"content-length: 4\r\n\r\nfine")
        else:
            writer.write(FINE)
        await writer.drain()
        return True

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        closed = asyncio.ensure_future(reader.read(1))  # b"" once the client hangs up
        closed.add_done_callback(lambda f: f.cancelled() or f.exception())
        while not closed.done():
            writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait([closed], timeout=0.1)
        self.gave_up.append(time.monotonic() - started)
