"""One keep-alive connection to an upstream (:class:`Connection`) and the exchange it carries
(:class:`Exchange`): the request going out through a body writer, the answer coming in.

The answer's head is parsed by ``httptools`` (llhttp), which also decodes chunked bodies; a
``Content-Length`` body bypasses the parser once the head is in, so each chunk the event loop
reads is handed on as it is, without a copy (measured: the proxy's CPU per request about half
aiohttp's, whose parser and ``StreamReader`` copy every body byte twice). The framing state of
both sides lives in :class:`~dicomproxy.upstream.framing.ExchangeState`; this module feeds it
events and acts on its states:

* a second message in the same read (a status line after a complete answer, body bytes after
  a HEAD answer) never reaches the finished answer: the parser is stopped at its first callback
  and the connection dropped (``TRAILING``);
* the answer's head is capped in bytes (``max_head_bytes``, interim 1xx heads included) and in
  time (``head_timeout``, from its first byte to the end of the final head);
* a status outside 100-599 and ``101 Switching Protocols`` are protocol errors (the proxy
  answers 502); other 1xx answers are skipped;
* a ``Transfer-Encoding`` other than exactly ``chunked`` (``gzip``, ``gzip, chunked``, ...) is a
  protocol error too: a transfer coding is hop-by-hop, and passed on as it came the client would
  read the coded bytes as the body;
* the read timeout is the upstream's silence while it owes us something (the answer, or room
  for our body): the pool's :class:`~dicomproxy.upstream.watchdog.Watchdog` (one timer for all
  its exchanges) asks :meth:`Exchange.check` at the exact time one could be due.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterable, Callable
from typing import cast

import httptools

from dicomproxy.upstream.errors import (
    HeadTimeout,
    HeadTooLarge,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    Stale,
    UpstreamError,
)
from dicomproxy.upstream.flow import Budget, FlowControl
from dicomproxy.upstream.framing import (
    BodyWriter,
    Event,
    ExchangeState,
    Framing,
    Headers,
    Receiving,
    Sending,
    body_writer,
)
from dicomproxy.upstream.limits import Limits
from dicomproxy.upstream.watchdog import Watchdog

Body = bytes | AsyncIterable[bytes] | None
Release = Callable[["Connection", bool], None]

_HEAD_ONLY_STATUSES = (204, 304)


# Enum members bound once (in CPython 3.11 each ``Enum.MEMBER`` lookup costs ~0.4 µs).
RECV_HEAD, RECV_BODY, RECV_DONE, RECV_CLOSED = Receiving.HEAD, Receiving.BODY, Receiving.DONE, Receiving.CLOSED
SEND_IDLE, SEND_BODY, SEND_DONE = Sending.IDLE, Sending.BODY, Sending.DONE
EV_HEAD_AND_BODY, EV_HEAD_ONLY, EV_INTERIM = Event.HEAD_AND_BODY, Event.HEAD_ONLY, Event.INTERIM
EV_BODY_END, EV_TRAILING, EV_CLOSE = Event.BODY_END, Event.TRAILING, Event.CLOSE
FR_NONE, FR_LENGTH, FR_CHUNKED, FR_UNTIL_CLOSE = Framing.NONE, Framing.LENGTH, Framing.CHUNKED, Framing.UNTIL_CLOSE


class _Halt(Exception):
    """Raised in a parser callback to stop llhttp at once; what happened is already recorded."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; carries one :class:`Exchange` at a time (no pipelining)."""

    def __init__(self, label: str) -> None:
        self.label = label  # host:port, for messages
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.closed = False
        self.used = False  # has carried an exchange before (so it may have gone stale)
        self.idle_since = 0.0
        self.exchange: Exchange | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but is one
        self.flow = FlowControl(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.flow is not None:
            self.flow.lost()
        if self.exchange is not None:
            self.exchange.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # an idle connection must not talk: drop it rather than misparse later
            self.abort()
            return
        exchange.data_received(data)

    def eof_received(self) -> bool:
        return False  # close the transport: no half-close in HTTP/1.1 here

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume_writing()

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise RemoteProtocolError(f"the connection to {self.label} was lost while sending the request")
        self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Exchange(ExchangeState):
    """One request and its answer on one connection; its framing state is its own
    (``sending``, ``receiving``, moved only by :meth:`ExchangeState.step`).

    Once ``pool.request()`` returns, ``status``, ``headers``, ``framing`` and
    ``content_length`` describe the answer's head; ``await read()`` gives the body chunk by
    chunk (``b""`` at its end). ``close()`` ends the exchange: the connection goes back to the
    pool only when both messages are complete and nothing followed them. Call it in a ``finally``.
    """

    __slots__ = (
        "conn", "_loop", "_budget", "_limits", "_release", "_head_request", "status", "headers", "framing",
        "content_length", "body_consumed", "_parser", "_head", "_chunks", "_buffered", "_waiter", "_remaining",
        "_body_seen", "_head_bytes", "_received", "_head_started", "_last", "_keep_alive", "_error", "_sender",
        "_watchdog", "_read_size",
    )

    def __init__(
        self, conn: Connection, loop: asyncio.AbstractEventLoop, budget: Budget, limits: Limits, method: bytes,
        release: Release, watchdog: Watchdog,
    ) -> None:
        self.conn = conn
        self._loop = loop
        self._budget = budget
        self._limits = limits
        self._release = release
        self._head_request = method == b"HEAD"
        self.sending = SEND_IDLE
        self.receiving = RECV_HEAD
        self.status = 0
        self.headers: Headers = []
        self.framing = FR_NONE
        self.content_length: int | None = None
        self.body_consumed = False  # a chunk was taken from a streamed request body (no replay then)
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._remaining = -1  # Content-Length bytes still to come, once the parser is bypassed
        self._body_seen = 0
        self._head_bytes = 0  # the head's size so far (reads that did not finish it, interim heads' fields)
        self._read_size = 0  # the read being parsed while the head is due
        self._received = False  # any byte of the answer seen (a stale connection sees none)
        self._head_started = 0.0  # loop time of the answer's first byte
        self._last = loop.time()  # loop time of the last sign of life (read, write, or our side holding back)
        self._keep_alive = True
        self._error: UpstreamError | None = None
        self._sender: asyncio.Task[None] | None = None
        delay = limits.first_watch
        self._watchdog: Watchdog | None = None
        if delay > 0:
            self._watchdog = watchdog
            watchdog.watch(self, self._last + delay)

    # ---------------------------------------------------------------- sending
    async def send(self, head: bytes, framing: Framing, length: int, body: Body) -> None:
        """Write the request and return once the answer's head is in (or raise why not)."""
        conn = self.conn
        if conn.closed:
            raise (Stale if conn.used else RemoteProtocolError)(f"the connection to {conn.label} closed before use")
        if framing is FR_NONE:
            if body:
                raise LocalProtocolError("a body was given for a request whose head announces none")
            conn.write(head)
            self.step(True, EV_HEAD_ONLY)
            self._last = self._loop.time()
        elif body is None or type(body) is bytes:
            conn.write(head)
            self.step(True, EV_HEAD_AND_BODY)
            self._finish_body(body_writer(conn, framing, length), body or b"")
            self._last = self._loop.time()
        else:
            assert not isinstance(body, bytes)
            conn.write(head)
            self.step(True, EV_HEAD_AND_BODY)
            await self._send_streamed(body_writer(conn, framing, length), body)
        await self._head

    def _finish_body(self, writer: BodyWriter, body: bytes) -> None:
        try:
            writer.data(body)
            writer.end()
        except LocalProtocolError as e:
            self._fail(e)
            raise
        self.step(True, EV_BODY_END)

    async def _send_streamed(self, writer: BodyWriter, body: AsyncIterable[bytes]) -> None:
        sender = self._loop.create_task(self._stream_body(writer, body))
        # the upstream may answer (and even hang up) before it has read the whole body
        await asyncio.wait((sender, self._head), return_when=asyncio.FIRST_COMPLETED)
        if not sender.done():
            sender.add_done_callback(_retrieved)
            self._sender = sender
            return
        error = sender.exception()
        if error is None:
            return
        head_ok = self._head.done() and self._head.exception() is None
        if head_ok and isinstance(error, RemoteProtocolError):
            return  # the upstream answered and hung up before taking the whole body: that answer counts
        if isinstance(error, LocalProtocolError | RemoteProtocolError):
            self._fail(error)
        raise error

    async def _stream_body(self, writer: BodyWriter, body: AsyncIterable[bytes]) -> None:
        conn = self.conn
        flow = conn.flow
        assert flow is not None
        try:
            self.body_consumed = True
            async for chunk in body:
                if conn.closed:
                    raise RemoteProtocolError(f"the connection to {conn.label} was lost while sending the body")
                writer.data(chunk)
                self._last = self._loop.time()
                if flow.write_paused:
                    await flow.drain()
            writer.end()
        except LocalProtocolError as e:
            self._fail(e)  # nothing more is written: the upstream never sees a complete message
            raise
        if conn.closed:
            raise RemoteProtocolError(f"the connection to {conn.label} was lost while sending the body")
        self.step(True, EV_BODY_END)
        self._touch()

    # ---------------------------------------------------------------- receiving (from the connection)
    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        remaining = self._remaining
        if remaining > 0:  # Content-Length body past the head: no parser, no copy
            size = len(data)
            if size < remaining:
                self._remaining = remaining - size
                self._push(data)
                return
            self._remaining = 0
            self._push(data if size == remaining else data[:remaining])
            self.step(False, EV_BODY_END)
            self._wake()
            if size > remaining:
                self._trailing()
            return
        receiving = self.receiving
        if receiving is RECV_HEAD:
            if not self._received:
                self._received = True
                self._head_started = self._last
            self._read_size = len(data)
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                self._parse_error(e)
                return
            receiving = self.receiving
            if receiving is RECV_HEAD:
                self._head_bytes += len(data)
                if self._head_bytes > self._limits.max_head_bytes:
                    self._fail(HeadTooLarge(f"the answer's head is larger than {self._limits.max_head_bytes} bytes"))
            elif receiving is RECV_BODY and self.framing is FR_LENGTH and self._remaining < 0:
                assert self.content_length is not None
                self._remaining = self.content_length - self._body_seen
        elif receiving is RECV_BODY:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                self._parse_error(e)
        elif receiving is RECV_DONE:
            self._trailing()

    def _parse_error(self, e: httptools.HttpParserError) -> None:
        if self._error is not None or self.receiving is RECV_CLOSED:
            return  # a callback stopped the parser after recording why
        if self.receiving is RECV_DONE:
            self._trailing()  # garbage after a complete answer: the answer stands, the connection goes
            return
        self._fail(RemoteProtocolError(f"invalid HTTP from {self.conn.label}: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        receiving = self.receiving
        if receiving is RECV_DONE or (receiving is RECV_CLOSED and self._error is None):
            return
        if receiving is RECV_BODY and self.framing is FR_UNTIL_CLOSE:
            self._keep_alive = False
            self.step(False, EV_BODY_END)  # the body is delimited by the end of the connection
            self._wake()
            return
        why = f": {exc}" if exc else ""
        if not self._received and self.conn.used:
            self._fail(Stale(f"{self.conn.label} closed a kept-alive connection{why}"))
        elif receiving is RECV_BODY:
            self._fail(RemoteProtocolError(f"{self.conn.label} closed the connection mid-body{why}"))
        else:
            self._fail(RemoteProtocolError(f"{self.conn.label} closed the connection without answering{why}"))

    # ---------------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        receiving = self.receiving
        if receiving is not RECV_HEAD:
            if receiving is RECV_BODY:
                return  # chunked trailer fields: not forwarded
            self._trailing()  # a second message in the same read
            raise _Halt
        self.headers.append((name.lower(), value))  # its size is counted once the head ends (_head_fits)

    def on_headers_complete(self) -> None:
        if self.receiving is not RECV_HEAD:  # the head of a second message in the same read
            self._trailing()
            raise _Halt
        status = self._parser.get_status_code()
        if not 100 <= status <= 599 or status == 101:
            what = "101 Switching Protocols (only HTTP/1.1 is proxied)" if status == 101 else \
                f"status {status}, outside 100-599"
            self._fail(RemoteProtocolError(f"{self.conn.label} answered {what}"))
            raise _Halt
        if not self._head_fits():
            raise _Halt
        if status < 200:
            self._head_bytes += _fields_size(self.headers)  # interim heads count against the cap too
            self.headers = []  # an interim answer (100 Continue, 103 Early Hints): wait for the final one
            self.step(False, EV_INTERIM)
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        if not self._choose_framing():
            raise _Halt
        no_body = self.framing is FR_NONE
        self.step(False, EV_HEAD_ONLY if no_body else EV_HEAD_AND_BODY)
        if not self._head.done():
            self._head.set_result(None)
        if no_body:
            self._wake()

    def _head_fits(self) -> bool:
        """Whether the head so far is within ``max_head_bytes`` (else failed). Its fields are summed
        only when the reads it came in could exceed the cap: an accounting per field in
        :meth:`on_header` cost ~1,500 instructions per proxied request (bench/proxy_instructions.py)."""
        limit = self._limits.max_head_bytes
        if self._head_bytes + self._read_size <= limit or self._head_bytes + _fields_size(self.headers) <= limit:
            return True
        self._fail(HeadTooLarge(f"the answer's head is larger than {limit} bytes"))
        return False

    def _choose_framing(self) -> bool:
        """Set ``framing`` and ``content_length`` from the head; False (and failed) if invalid."""
        codings: list[bytes] = []
        for name, value in self.headers:
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18:
                    self._fail(RemoteProtocolError(f"invalid Content-Length {value[:40]!r} from {self.conn.label}"))
                    return False
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
        chunked = codings == [b"chunked"]
        if codings and not chunked and not (self._head_request or self.status in _HEAD_ONLY_STATUSES):
            # Another transfer coding (gzip, ...) is hop-by-hop: forwarded as it came, the client would
            # read compressed bytes as the body (found by tests/fuzz). Only chunked is proxied, as h11 does.
            self._fail(RemoteProtocolError(
                f"unsupported Transfer-Encoding {b', '.join(codings)[:60]!r} from {self.conn.label} (only chunked)"))
            return False
        if self._head_request or self.status in _HEAD_ONLY_STATUSES:
            self.framing = FR_NONE
        elif chunked:
            self.framing, self.content_length = FR_CHUNKED, None
        elif self.content_length is not None:
            self.framing = FR_LENGTH if self.content_length else FR_NONE
        else:
            self.framing = FR_UNTIL_CLOSE
            self._keep_alive = False
        return True

    def on_body(self, body: bytes) -> None:
        if self.receiving is not RECV_BODY:  # bytes after an answer that has none
            self._trailing()
            raise _Halt
        self._push(body)

    def on_message_complete(self) -> None:
        if self.receiving is RECV_BODY:
            self.step(False, EV_BODY_END)
            self._wake()

    # ---------------------------------------------------------------- internals
    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        size = len(data)
        self._body_seen += size
        self._buffered += size
        budget = self._budget
        held = budget.held = budget.held + size
        if self._buffered > (budget.read_ahead if held <= budget.total else budget.read_ahead // 8):
            flow = self.conn.flow
            if flow is not None:
                flow.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _touch(self) -> None:
        """Our side stops holding back (request sent, reading resumed): the upstream's silence counts from now."""
        self._last = self._loop.time()

    def _trailing(self) -> None:
        """Bytes after the complete answer: keep the answer as it is, drop the connection."""
        if self.receiving is RECV_DONE:
            self.step(False, EV_TRAILING)
        self._keep_alive = False
        self.conn.abort()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.step(False, EV_CLOSE)
        if self.sending is not SEND_DONE:
            self.step(True, EV_CLOSE)
        self._keep_alive = False
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: the caller gets it from send() or read()
        self._wake()
        self.conn.abort()

    # ---------------------------------------------------------------- the watchdog
    def check(self, now: float) -> float:
        """For the pool's :class:`~dicomproxy.upstream.watchdog.Watchdog`: fail on a timeout that
        is due at ``now``, else the loop time the next one could be (``inf``: nothing to watch)."""
        receiving = self.receiving
        if self._error is not None or receiving not in (RECV_HEAD, RECV_BODY):
            return math.inf
        limits = self._limits
        due = math.inf
        if receiving is RECV_HEAD and self._received and limits.head_timeout > 0:
            due = self._head_started + limits.head_timeout
            if due <= now:
                self._fail(HeadTimeout(f"the answer's head took more than {limits.head_timeout:g} s"))
                return math.inf
        if limits.read_timeout > 0:
            if self.waiting_for_upstream:
                silence_ends = self._last + limits.read_timeout
                if silence_ends <= now:
                    self._fail(ReadTimeout(f"no answer from {self.conn.label} within {limits.read_timeout:g} s"))
                    return math.inf
                due = min(due, silence_ends)
            else:
                due = min(due, now + limits.read_timeout)
        return due

    # ---------------------------------------------------------------- public
    @property
    def waiting_for_upstream(self) -> bool:
        """True while the upstream owes us something: the answer, or room to send the body.

        False while the request body still comes from a slow client, or while reading is
        paused for a slow client: silence then is not the upstream's fault.
        """
        flow = self.conn.flow
        if flow is None:
            return True
        if self.sending is SEND_DONE:
            return not flow.read_paused
        return flow.write_paused

    @property
    def body_bytes(self) -> int:
        """The answer's body bytes received so far (the proxy's bytes-out counter)."""
        return self._body_seen

    @property
    def at_end(self) -> bool:
        """Nothing more to read: lets the caller send the last chunk as the final message."""
        return not self._chunks and self._error is None and self.receiving in (RECV_DONE,
                                                                                     RECV_CLOSED)

    async def read(self) -> bytes:
        """The next body chunk as it arrived, or ``b""`` once the body is complete."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                size = len(chunk)
                self._buffered -= size
                budget = self._budget
                budget.held -= size
                flow = self.conn.flow
                if flow is not None and flow.read_paused and self._buffered <= budget.limit() // 4:
                    flow.resume_reading()
                    self._touch()
                return chunk
            if self._error is not None:
                raise self._error
            if self.receiving not in (RECV_HEAD, RECV_BODY):
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """End the exchange: back to the pool if it ended cleanly, else close the connection."""
        conn = self.conn
        if conn.exchange is not self:
            return
        conn.exchange = None
        if self._watchdog is not None:
            self._watchdog.forget(self)
            self._watchdog = None
        self._budget.held -= self._buffered
        self._buffered = 0
        self._chunks.clear()
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()  # the answer came before the whole body went: this connection is done
        reusable = (self.sending is SEND_DONE and self.receiving is RECV_DONE and self._keep_alive
                    and self._error is None and not conn.closed)
        if reusable and conn.flow is not None and conn.flow.read_paused:
            conn.flow.resume_reading()
        self._release(conn, reusable)


def _fields_size(headers: Headers) -> int:
    """A head's fields as counted against ``max_head_bytes`` (name, value, ": " and CRLF)."""
    return sum(len(n) + len(v) + 4 for n, v in headers)


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # the answer already came; a late failure sending the body is not news
