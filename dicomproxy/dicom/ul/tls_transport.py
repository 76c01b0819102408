"""asyncio streams on a connection of the DICOM TLS port: an ``asyncio.Transport`` over the
``ssl.SSLSocket`` the acceptor already shook hands on.

Why it exists: on the TLS port the handshake comes first (:func:`.tls.handshake`), before the
A-ASSOCIATE-RQ says whether the association is a storage one (served on a thread with the
blocking ``SSLSocket``, the hot path, see ``storage_scp.py``) or a Query/Retrieve one (served on
the event loop over asyncio streams, :mod:`..qr.service`). asyncio cannot take that socket:
``asyncio.open_connection(sock=...)`` refuses an ``SSLSocket`` (``TypeError: Socket cannot be of
type SSLSocket``), and a TLS session cannot be moved from an ``SSLSocket`` into asyncio's own TLS
protocol (``loop.start_tls`` would start a second handshake). Doing every handshake in asyncio
instead would leave the storage thread without a socket it can block on. So this module owns
the small piece in between: the ``SSLSocket``'s non-blocking ``recv``/``send`` driven by the
selector, behind the standard transport interface, so ``asyncio.StreamReader``/``StreamWriter``
(and everything built on them) work unchanged, flow control included.

The TLS details it handles: decrypted bytes can wait inside the ``SSLSocket`` with nothing
readable on the descriptor, so a read goes on until ``SSLWantReadError`` (and is rescheduled,
not waited for, when it stops early); a write that got ``SSLWantWriteError`` is retried with the
very same bytes (OpenSSL requires it); the rare read that wants a write, or write that wants a
read (a TLS 1.3 key update; renegotiation is off), is retried after a millisecond rather than by
registering the other direction's callback. Closing closes the socket without a close_notify, as
the storage path does: an association ends with its own A-RELEASE or A-ABORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

READ_SIZE = 1 << 16
"""Bytes asked of the ``SSLSocket`` per read (a TLS record carries at most 16 KiB)."""
WRITE_CHUNK = 1 << 16
"""Bytes handed to one ``SSLSocket.send``."""
READS_PER_TURN = 16
"""Reads in one callback before yielding to the loop (fairness; rescheduled at once)."""
_RETRY = 0.001
HIGH_WATER = 1 << 18
LOW_WATER = 1 << 16


async def open_stream(sock: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams on an accepted connection: a plain socket through asyncio itself, an
    ``ssl.SSLSocket`` (handshaken, non-blocking) through :class:`SslSocketTransport`."""
    if not isinstance(sock, ssl.SSLSocket):
        return await asyncio.open_connection(sock=sock)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = SslSocketTransport(loop, sock, protocol)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class SslSocketTransport(asyncio.Transport):
    """A stream transport on a non-blocking, handshaken ``ssl.SSLSocket`` (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.Protocol) -> None:
        super().__init__(extra={
            "socket": sock, "ssl_object": sock, "peername": _safe(sock.getpeername),
            "sockname": _safe(sock.getsockname), "peercert": sock.getpeercert(), "cipher": sock.cipher(),
            "compression": None,
        })
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()
        self._inflight: bytes | None = None  # the bytes of a send that must be retried as they are
        self._closing = False
        self._lost = False
        self._reading = False
        self._writing = False
        self._protocol_paused = False
        self._high, self._low = HIGH_WATER, LOW_WATER
        protocol.connection_made(self)
        self.resume_reading()

    # -- reading -------------------------------------------------------------------------
    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._reading or self._closing or self._lost:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)
        self._loop.call_soon(self._read_ready)  # bytes may wait decrypted inside the SSLSocket

    def _read_ready(self) -> None:
        for _ in range(READS_PER_TURN):
            if not self._reading:
                return
            try:
                data = self._sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._loop.call_later(_RETRY, self._read_ready)
                return
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                data = b""
            except OSError as e:
                self._force_close(e)
                return
            if not data:
                self._eof()
                return
            self._protocol.data_received(data)
        self._loop.call_soon(self._read_ready)

    def _eof(self) -> None:
        self.pause_reading()
        if not self._protocol.eof_received():
            self.close()

    # -- writing -------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        self._buffer.extend(data)
        if not self._writing:
            self._write_ready()
        self._check_high()

    def _write_ready(self) -> None:
        while self._buffer:
            chunk = self._inflight if self._inflight is not None else bytes(self._buffer[:WRITE_CHUNK])
            try:
                sent = self._sock.send(chunk)
            except ssl.SSLWantWriteError:
                self._inflight = chunk
                self._want_write(True)
                return
            except ssl.SSLWantReadError:
                self._inflight = chunk
                self._want_write(False)
                self._loop.call_later(_RETRY, self._write_ready)
                return
            except OSError as e:
                self._force_close(e)
                return
            self._inflight = None
            del self._buffer[:sent]
        self._want_write(False)
        self._check_low()
        if self._closing:
            self._loop.call_soon(self._connection_lost, None)

    def _want_write(self, on: bool) -> None:
        if on and not self._writing:
            self._loop.add_writer(self._fd, self._write_ready)
        elif not on and self._writing:
            self._loop.remove_writer(self._fd)
        self._writing = on

    def _check_high(self) -> None:
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _check_low(self) -> None:
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low
        self._check_high()

    def can_write_eof(self) -> bool:
        return False  # SSLSocket.shutdown would drop the TLS layer, not half-close it

    # -- closing -------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        self._closing = True
        self._buffer.clear()
        self._inflight = None
        self.pause_reading()
        self._want_write(False)
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.pause_reading()
        self._want_write(False)
        try:
            self._protocol.connection_lost(exc)
        finally:
            with contextlib.suppress(OSError):
                self._sock.close()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol


def _safe(call: Any) -> Any:
    try:
        return call()
    except OSError:
        return None
