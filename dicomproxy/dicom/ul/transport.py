"""The two drivers of :class:`.association.Association`: the same protocol object on a
blocking socket driven by one thread, or on asyncio streams.

* :class:`SocketAssociation`: blocking reads and writes on the calling thread. The storage
  acceptor's fast path: a C-STORE is read, spooled and answered on one thread with no hand-off
  (each hop between threads or to the event loop costs ~0.3 ms here, see ``storage_scp.py``).
* :class:`StreamAssociation`: asyncio, either role. The requestor of the forwarder, of the
  ``send`` command and of Query/Retrieve, and the Query/Retrieve acceptor. As requestor it is
  opened by :func:`.requestor.open_association`, the relay's way as well (over TLS when given a
  client context, :mod:`.tls`), then its socket is driven through :mod:`.tls_transport`.

On the TLS port the blocking driver gets an ``ssl.SSLSocket`` (handshaken by the acceptor):
the same calls, the record layer in between.

Both hand one whole PDU at a time to the protocol object (read after
:meth:`Association.check_header` has accepted its announced length; the blocking driver reads
ahead, :meth:`SocketAssociation._fill`),
write what it queued, and close the connection when it reaches Sta1. A read waits at most until
the ARTIM deadline while ARTIM runs; otherwise the blocking driver waits ``idle`` seconds (then
raises :class:`IdleTimeout`: aborting is the caller's decision) and the asyncio one as long as
its caller's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import requestor, tls_transport
from dicomproxy.dicom.ul.association import (
    Association,
    Indication,
)
from dicomproxy.dicom.ul.errors import UpperLayerError
from dicomproxy.dicom.ul.pdu import HEADER_SIZE, InvalidPdu

READ_AHEAD = 1 << 16
"""Bytes a blocking read asks for at least (a PDU longer than that is read to its end only).
Measured here: allocating it costs 1.5 us, a ``recv`` system call ~3 us."""
GATHER_BYTES = 1 << 16
"""Up to this many bytes the pieces of a write are joined (one copy, one plain ``send``);
beyond it they are written with ``sendmsg`` as they are."""
IOV_BATCH = 512
"""Pieces per ``sendmsg`` (under the kernel's IOV_MAX of 1024)."""


class IdleTimeout(UpperLayerError):
    """Nothing arrived for the idle time while no timer of the protocol ran."""


# --------------------------------------------------------------------------- blocking
class SocketAssociation:
    """An association on a blocking socket (one thread reads and writes)."""

    def __init__(
        self, core: Association, sock: socket.socket, *, idle: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.core = core
        self.sock = sock
        self.idle = idle
        self.clock = clock
        self._rest = memoryview(b"")  # bytes read past the last PDU handed over
        self._timeout_set: float | None = None
        sock.setblocking(True)

    def _set_timeout(self, timeout: float) -> None:
        """``settimeout`` is a system call (FIONBIO) every time: only when the value changes."""
        if timeout != self._timeout_set:
            self.sock.settimeout(timeout)
            self._timeout_set = timeout

    def flush(self) -> None:
        out = self.core.outgoing()
        if out:
            self._set_timeout(self.idle)
            try:
                if len(out) == 1:
                    self.sock.sendall(out[0])
                elif isinstance(self.sock, ssl.SSLSocket) or sum(map(len, out)) <= GATHER_BYTES:
                    self.sock.sendall(b"".join(out))
                else:
                    self._sendmsg(out)
            except OSError:
                self._closed()
        if self.core.closed:
            self.close()

    def _sendmsg(self, out: list[bytes | memoryview]) -> None:
        """Write the pieces as they are (``sendmsg``: no join). A relayed data set's PDUs are
        views of the modality's PDU re-framed for the PACS: joining them copied every byte once
        more (1 MiB per modality PDU)."""
        views = [memoryview(piece).cast("B") for piece in out]
        i = 0
        while i < len(views):
            sent = self.sock.sendmsg(views[i:i + IOV_BATCH])
            while i < len(views) and sent >= len(views[i]):
                sent -= len(views[i])
                i += 1
            if sent:
                views[i] = views[i][sent:]

    def receive(self) -> Indication | None:
        """Read and handle one PDU (or the connection's end, or ARTIM's); raise
        :class:`IdleTimeout` after ``idle`` seconds of silence outside ARTIM."""
        core = self.core
        try:
            if not self._fill(HEADER_SIZE):
                return self._closed()
            pdu_type, length = pdus.parse_header(self._rest[:HEADER_SIZE])
            try:
                core.check_header(pdu_type, length)
            except InvalidPdu as e:
                # Nothing after a bad header can be framed: drop what was read past it (kept, the
                # next receive() parsed the same header again, in a loop that never reached ARTIM).
                self._rest = memoryview(b"")
                indication = core.invalid(e, self.clock())
                self.flush()
                return indication
            if not self._fill(HEADER_SIZE + length):
                return self._closed()
            pdu, self._rest = self._rest[:HEADER_SIZE + length], self._rest[HEADER_SIZE + length:]
            indication = core.receive(pdu_type, pdu, self.clock())
        except TimeoutError:
            if core.artim_deadline is None:
                raise IdleTimeout(f"no PDU for {self.idle:.0f} s") from None
            indication = core.artim_expired(self.clock())
        except OSError:
            return self._closed()
        self.flush()
        return indication

    def _timeout(self) -> float:
        deadline = self.core.artim_deadline
        if deadline is None:
            return self.idle
        left = deadline - self.clock()
        if left <= 0:
            raise TimeoutError
        return left

    def _fill(self, n: int) -> bool:
        """At least ``n`` bytes in ``_rest`` (False: the connection ended first). Reads ask for up
        to :data:`READ_AHEAD` bytes, so a PDU's header and body, and the modality's C-STORE-RQ
        and its data set's PDU, usually come in one ``recv`` (two per PDU before: 7 system calls
        per relayed instance, now 3-4). A new buffer is allocated each time one is needed and
        never written again: what was handed over stays valid (the relay and the spool writer keep
        views of received fragments); what was read past the PDU is copied into the new buffer."""
        rest = self._rest
        have = len(rest)
        if have >= n:
            return True
        buf = memoryview(bytearray(max(n, READ_AHEAD)))
        buf[:have] = rest
        while have < n:
            self._set_timeout(self._timeout())
            k = self.sock.recv_into(buf[have:])
            if k == 0:
                self._rest = buf[:have]
                return False
            have += k
        self._rest = buf[:have]
        return True

    def _closed(self) -> Indication | None:
        indication = self.core.connection_closed(self.clock())
        self.close()
        return indication

    def send_pdata(self, encoded: list[bytes | memoryview]) -> None:
        self.core.send_data(encoded, self.clock())
        self.flush()

    def release_response(self) -> None:
        self.core.release_response(self.clock())
        self.flush()

    def abort(self) -> None:
        self.core.abort(self.clock())
        self.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def shutdown(self) -> None:
        """From another thread: end a blocked read (the owning thread then sees the close)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- asyncio
class StreamAssociation:
    """An association on asyncio streams; :meth:`request` opens one as the requestor."""

    def __init__(
        self,
        core: Association,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        label: str,
    ) -> None:
        self.core = core
        self.reader = reader
        self.writer = writer
        self.label = label
        self.tls_error = ""  # the TLS alert that ended the connection, if one did
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def request(
        cls, host: str, port: int, rq: pdus.A_ASSOCIATE_RQ, *, timeout: float, artim: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[StreamAssociation, pdus.A_ASSOCIATE_AC]:
        """Open the association with :func:`.requestor.open_association` (the relay's way too:
        same connection, TLS, timeouts and messages), then drive its socket with asyncio streams."""
        opened = await requestor.open_association(host, port, rq, timeout=timeout, artim=artim, tls=tls)
        try:
            reader, writer = await tls_transport.open_stream(opened.sock)
        except BaseException:
            opened.close()
            raise
        return cls(opened.core, reader, writer, label=opened.label), opened.ac

    @property
    def is_open(self) -> bool:
        return self.core.established and not self.writer.is_closing()

    def flush(self) -> None:
        out = self.core.outgoing()
        if out:
            self.writer.writelines(out)
        if self.core.closed:
            self.close()

    async def drain(self, timeout: float) -> None:
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def receive(self, timeout: float | None = None) -> Indication | None:
        """Read and handle one PDU. While ARTIM runs its deadline bounds the read; else
        ``timeout`` does (``TimeoutError``), or nothing when it is None (the caller's own
        deadline, e.g. a DIMSE operation's, bounds it)."""
        core = self.core
        deadline = core.artim_deadline
        if deadline is None and timeout is None:
            return await self._receive()
        wait = (deadline - self._loop.time()) if deadline is not None else (timeout or 0.0)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await self._receive()
        except TimeoutError:
            if deadline is None:
                raise
            indication = core.artim_expired(self._loop.time())
            self.flush()
            return indication

    async def _receive(self) -> Indication | None:
        core = self.core
        try:
            header = await self.reader.readexactly(HEADER_SIZE)
            pdu_type, length = pdus.parse_header(header)
            try:
                core.check_header(pdu_type, length)
            except InvalidPdu as e:
                indication = core.invalid(e, self._loop.time())
                self.flush()
                return indication
            body = await self.reader.readexactly(length)
        except ssl.SSLError as e:
            self.tls_error = str(e.reason or e).replace("_", " ").lower()
            indication = core.connection_closed(self._loop.time())
            self.close()
            return indication
        except (OSError, asyncio.IncompleteReadError):
            indication = core.connection_closed(self._loop.time())
            self.close()
            return indication
        indication = core.receive(pdu_type, memoryview(header + body), self._loop.time())
        self.flush()
        return indication

    def send_pdata(self, encoded: list[bytes | memoryview]) -> None:
        self.core.send_data(encoded, self._loop.time())
        self.flush()

    def release_response(self) -> None:
        """Answer the peer's A-RELEASE-RQ; the connection closes when the peer closes it."""
        self.core.release_response(self._loop.time())
        self.flush()

    async def release(self, timeout: float = 5.0) -> None:
        """A-RELEASE (requestor); closes the connection whatever the peer does."""
        if not self.core.established:
            self.close()
            return
        try:
            self.core.release(self._loop.time())
            self.flush()
            async with asyncio.timeout(timeout):
                while not self.core.closed:
                    await self.receive(timeout)
        except (TimeoutError, OSError):
            pass
        finally:
            self.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    def abort(self) -> None:
        """A-ABORT and close (no wait for the peer: the requestor's connection is its own)."""
        self.core.abort(self._loop.time())
        out = self.core.outgoing()
        with contextlib.suppress(Exception):
            self.writer.writelines(out)
        self.close()
        self.core.connection_closed(self._loop.time())

    def close(self) -> None:
        self.writer.close()
