"""Raw upstreams for the fuzzers, each an asyncio server on a thread of the test process.

* :class:`RecordingUpstream` keeps the exact bytes of every connection the gateway opens and
  reads them with h11, an HTTP/1.1 parser independent of the gateway's (httptools/llhttp):
  each request h11 reads becomes a :class:`Seen` (head, body, how it was framed, complete or
  cut off, or the error h11 found). It answers each complete request with a 200 that names the
  request's ``x-fuzz-id`` in ``x-recorded``, so the client can tell the upstream's answers from
  the gateway's own.
* :class:`ScriptedUpstream` answers each request for ``/plan/<n>`` with the exact bytes of plan
  ``n`` (writes, pauses, then close, hang or keep the connection), and anything else with
  :data:`FINE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import h11

FINE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-fine: 1\r\ncontent-length: 4\r\n\r\nfine"
MAX_HEAD = 1 << 20  # h11's buffer limit: far above any head the gateway may send (Server:MaxHeadBytes)


class _ThreadedServer:
    """An asyncio server on its own thread and loop; ``_serve`` handles one connection."""

    name = "upstream"

    def __init__(self) -> None:
        self.port = 0
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> _ThreadedServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the {self.name} did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def call(self, make: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop from the test's thread."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()


# --------------------------------------------------------------------------- recording
@dataclass
class Seen:
    """One request as h11 read it on the upstream's side."""

    connection: int
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # names lower-cased
    body: bytes = b""
    complete: bool = False  # h11 read the whole message (its end, by length or last chunk)
    error: str = ""  # h11 found it malformed (not merely cut off by a close)

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    @property
    def fuzz_id(self) -> bytes | None:
        ids = self.values(b"x-fuzz-id")
        return ids[0] if len(ids) == 1 else None


@dataclass
class _Connection:
    number: int
    raw: bytearray = field(default_factory=bytearray)
    open: bool = True
    parser: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD))

    @property
    def mid_message(self) -> bool:
        """A request has begun (some head bytes, or a head and part of its body) and not ended."""
        state = self.parser.their_state
        return self.open and (state is h11.SEND_BODY or (state is h11.IDLE and bool(self.parser.trailing_data[0])))


class RecordingUpstream(_ThreadedServer):
    """Records every byte and every request (see the module docstring)."""

    name = "recording-upstream"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.connections: list[_Connection] = []
        self.opened = 0

    def reset(self) -> None:
        with self.lock:
            self.seen = []
            self.connections = [c for c in self.connections if c.open]
            for c in self.connections:
                c.raw = bytearray()

    def snapshot(self) -> tuple[list[Seen], list[bytes]]:
        """The requests seen since :meth:`reset` and the raw bytes of each connection."""
        with self.lock:
            return list(self.seen), [bytes(c.raw) for c in self.connections]

    @property
    def settled(self) -> bool:
        """No connection holds a request that has begun but not ended."""
        with self.lock:
            return not any(c.mid_message for c in self.connections)

    def drop_connections(self) -> None:
        self.call(self._drop_all)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.opened += 1
            conn = _Connection(self.opened)
            self.connections.append(conn)
        current: Seen | None = None
        try:
            while True:
                data = await reader.read(65536)
                with self.lock:
                    conn.raw += data
                    conn.parser.receive_data(data)
                    current, answers, done = self._events(conn, current, eof=not data)
                for answer in answers:
                    writer.write(answer)
                if done:
                    return
        finally:
            with self.lock:
                conn.open = False

    def _events(self, conn: _Connection, current: Seen | None, eof: bool) -> tuple[Seen | None, list[bytes], bool]:
        """Drain h11's events (under the lock); the answers to write and whether the connection is done.

        An error h11 raises on a read with bytes is a malformed request; one it raises at the end
        of the connection ("peer closed connection ...") is a request cut off, which is not.
        """
        answers: list[bytes] = []
        parser = conn.parser
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as e:
                if current is None or current.complete:
                    current = Seen(conn.number, body=bytes(parser.trailing_data[0]))
                    self.seen.append(current)
                if not eof:
                    current.error = f"{e} (h11)"
                return current, answers, True
            if event is h11.NEED_DATA:
                return current, answers, eof
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return current, answers, True
            if isinstance(event, h11.Request):
                current = Seen(conn.number, event.method, event.target, list(event.headers))
                self.seen.append(current)
            elif isinstance(event, h11.Data) and current is not None:
                current.body += event.data
            elif isinstance(event, h11.EndOfMessage) and current is not None:
                current.complete = True
                answers.append(self._answer(parser, current))
                if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                    return current, answers, True
                parser.start_next_cycle()

    @staticmethod
    def _answer(parser: h11.Connection, seen: Seen) -> bytes:
        status = 405 if seen.method == b"CONNECT" else 200  # a 2xx to CONNECT would switch protocols
        body = b"" if seen.method == b"HEAD" else b"recorded"
        head = parser.send(h11.Response(status_code=status, headers=[
            ("x-recorded", seen.fuzz_id or b"-"), ("content-type", "text/plain"), ("content-length", b"8")]))
        out = (head or b"") + (parser.send(h11.Data(data=body)) or b"" if body else b"")
        return out + (parser.send(h11.EndOfMessage()) or b"")


# --------------------------------------------------------------------------- scripted
@dataclass(frozen=True)
class Plan:
    """The upstream's answer to one request: ``steps`` are bytes to write or seconds to wait;
    then ``end``: ``"keep"`` (read the next request), ``"close"`` or ``"hang"`` (until the
    client goes)."""

    steps: tuple[bytes | float, ...]
    end: str = "keep"

    @property
    def wire(self) -> bytes:
        return b"".join(s for s in self.steps if isinstance(s, bytes))

    def __repr__(self) -> str:  # what Hypothesis prints for a failing example: runs of a byte shortened
        return f"Plan(steps=({', '.join(map(short, self.steps))},), end={self.end!r})"


def short(value: bytes | float) -> str:
    """``repr(value)`` with any run of 20 or more equal bytes written ``<byte * n>``."""
    if not isinstance(value, bytes):
        return repr(value)
    return re.sub(r"(.)\1{19,}", lambda m: f"<{m.group(1)} * {len(m.group(0))}>", repr(value))


class ScriptedUpstream(_ThreadedServer):
    """Answers ``/plan/<n>`` with ``plans[n]`` (see the module docstring)."""

    name = "scripted-upstream"

    def __init__(self) -> None:
        super().__init__()
        self.plans: dict[int, Plan] = {}
        self.served: list[int] = []  # plan numbers, in the order their requests came (replays show twice)
        self.connections = 0

    def add(self, plan: Plan) -> int:
        with self.lock:
            number = len(self.plans)
            self.plans[number] = plan
            return number

    def drop_connections(self) -> None:
        self.call(self._drop_all)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1]
            length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                           if k.strip().lower() == b"content-length"), 0)
            if length:
                await reader.readexactly(length)
            plan = self._plan(target)
            if plan is None:
                writer.write(FINE)
                await writer.drain()
                continue
            if not await self._play(plan, reader, writer):
                return

    def _plan(self, target: bytes) -> Plan | None:
        if not target.startswith(b"/plan/"):
            return None
        number = int(target.split(b"/")[2].split(b"?")[0])
        with self.lock:
            self.served.append(number)
            return self.plans[number]

    @staticmethod
    async def _play(plan: Plan, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        for step in plan.steps:
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            else:
                await asyncio.sleep(step)
        if plan.end == "keep":
            return True
        if plan.end == "hang":
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        return False
