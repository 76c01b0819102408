"""The listening side of the upper layer: the port, connection admission, and the association
request phase up to the A-ASSOCIATE indication; what happens then is the handler's.

Runs on the event loop with non-blocking sockets (``loop.sock_accept``/``sock_recv_into``), so a
connection that has not yet sent its A-ASSOCIATE-RQ costs a socket and a small task, never a
thread. The rules, each from a real failure (70 connections dripping a byte every 10 s kept every
modality out with "local limit exceeded", long past ARTIM):

* ARTIM is one deadline for the whole A-ASSOCIATE-RQ PDU from the moment the connection is
  accepted (``Dicom:ArtimSeconds``); a connection that has not delivered it by then is closed.
* Only established associations (and those being decided) count towards
  ``Dicom:MaxAssociations``; beyond it a request gets A-ASSOCIATE-RJ (transient, local limit
  exceeded).
* Connections per source address are capped (``Dicom:MaxConnectionsPerAddress``); one over the
  cap gets the same A-ASSOCIATE-RJ if its request comes within a second, else it is closed.
* All connections together are capped (``Dicom:MaxConnections``); beyond it a new one is closed
  at once, before anything is read.
* On the TLS port (``tls``: an ``ssl.SSLContext``) the handshake comes first, inside the same
  ARTIM deadline and counted against the same caps; a failed one is one log line with the
  peer's address and OpenSSL's reason, counted by ``on_tls_refused``, and the connection is
  closed (no A-ASSOCIATE-RJ can be sent without TLS). An address that ``address_allowed``
  refuses (``Dicom:AllowedAddresses``) is closed before the handshake, so that it costs no
  key exchange (the plain port answers it with an A-ASSOCIATE-RJ instead). After it, the socket handed on is an
  ``ssl.SSLSocket`` (see :mod:`.tls`).
* Nothing a connection does ends the accept loop: each connection is its own task, errors are
  logged; if the loop itself dies, :attr:`Acceptor.listening` turns false (health says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import tls as tlsio
from dicomproxy.dicom.ul.association import (
    CONNECTION_CLOSED,
    Aborted,
    AssociateRejected,
    AssociateRequested,
    Association,
    Role,
)
from dicomproxy.dicom.ul.pdu import HEADER_SIZE, InvalidPdu

log = logging.getLogger(__name__)

OVER_CAP_DEADLINE = 1.0
"""How long a connection over the per-address cap may take to send its request (to hear why)."""

_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
LOCAL_LIMIT = (2, 3, 2)  # A-ASSOCIATE-RJ: transient, service provider (presentation), local limit exceeded


@dataclass(frozen=True)
class Limits:
    artim: float = 30.0
    max_associations: int = 64
    max_per_address: int = 16
    max_connections: int = 256
    max_pdu: int = 1 << 20  # what we announce and accept for P-DATA


class Admission:
    """Counts connections (per address and in all) and associations; thread-safe (associations
    end on their own threads)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._per_address: dict[str, int] = {}
        self.connections = 0
        self.associations = 0

    def connect(self, ip: str) -> bool | None:
        """A new connection from ``ip``: None to close it at once (MaxConnections), False when it
        is over the per-address cap (refused at its request), True when admitted."""
        with self._lock:
            if self.connections >= self.limits.max_connections:
                return None
            self.connections += 1
            count = self._per_address.get(ip, 0) + 1
            self._per_address[ip] = count
            return count <= self.limits.max_per_address

    def disconnect(self, ip: str) -> None:
        with self._lock:
            self.connections -= 1
            count = self._per_address.get(ip, 0) - 1
            if count > 0:
                self._per_address[ip] = count
            else:
                self._per_address.pop(ip, None)

    def from_address(self, ip: str) -> int:
        with self._lock:
            return self._per_address.get(ip, 0)

    def reserve(self) -> bool:
        """Take an association slot (False when ``max_associations`` are taken)."""
        with self._lock:
            if self.associations >= self.limits.max_associations:
                return False
            self.associations += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.associations -= 1


class Slot:
    """A connection's claim on the admission counts; :meth:`close` is idempotent and thread-safe."""

    def __init__(self, admission: Admission, ip: str) -> None:
        self.admission = admission
        self.ip = ip
        self._association = False
        self._closed = False
        self._lock = threading.Lock()

    def reserve_association(self) -> bool:
        with self._lock:
            if not self._association and not self._closed:
                self._association = self.admission.reserve()
            return self._association

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            association, self._association = self._association, False
        if association:
            self.admission.release()
        self.admission.disconnect(self.ip)


class Pending:
    """A connection whose A-ASSOCIATE-RQ arrived and was admitted (Sta3): the handler accepts it
    (takes the socket with :meth:`take`) or rejects it (:meth:`reject`)."""

    def __init__(
        self, acceptor: Acceptor, core: Association, sock: socket.socket, slot: Slot, raw: bytes,
        indication: AssociateRequested, peer: tuple[str, int],
    ) -> None:
        self.acceptor = acceptor
        self.core = core
        self.sock = sock
        self.slot = slot
        self.raw = raw  # the A-ASSOCIATE-RQ as received (for a splice to another acceptor)
        self.pdu = indication.pdu
        self.request = indication.request
        self.ip, self.port = peer
        self.taken = False

    def take(self) -> socket.socket:
        """The handler owns the socket, the slot and the association from now on."""
        self.taken = True
        return self.sock

    async def reject(self, result: int, source: int, reason: int) -> None:
        self.core.reject(result, source, reason, self.acceptor.loop.time())
        await self.acceptor.finish(self.core, self.sock)


Handler = Callable[[Pending], Awaitable[None]]
TlsRefusedCallback = Callable[[tlsio.HandshakeRefused], None]


class Acceptor:
    """The DICOM port; ``handler`` decides each admitted association request."""

    def __init__(
        self, host: str, port: int, limits: Limits, handler: Handler, *, label: str = "DICOM",
        tls: ssl.SSLContext | None = None, on_tls_refused: TlsRefusedCallback | None = None,
        admission: Admission | None = None, address_allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self.handler = handler
        self.label = label
        self.tls = tls
        self.on_tls_refused = on_tls_refused
        self.address_allowed = address_allowed  # TLS port: checked before the handshake
        self.admission = admission or Admission(limits)  # the plain and the TLS port share one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused_full = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Acceptor.start() sets the loop"
        return self._loop

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            sock = socket.create_server((self.host, self.port), backlog=128)
        except OSError as e:
            raise RuntimeError(
                f"Dicom: cannot listen on {self.host}:{self.port}: {e.strerror or e} (change Dicom:Port or Dicom:Host)"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._task = self.loop.create_task(self._accept_loop(sock), name="dicom-accept")

    def stop_listening(self) -> None:
        """Close the port (drain): admitted associations go on; no new connection is accepted."""
        task, self._task = self._task, None
        sock, self._sock = self._sock, None
        if task is not None:
            task.cancel()  # the socket closes once the accept loop has let go of it
            if sock is not None:
                task.add_done_callback(lambda _: sock.close())
        elif sock is not None:
            sock.close()

    async def stop(self) -> None:
        """Stop listening and end the connections this acceptor still serves."""
        self.stop_listening()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    @property
    def listening(self) -> bool:
        """True while the accept loop runs (not merely while the socket exists)."""
        return self._task is not None and not self._task.done()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, addr = await self.loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS...: wait a little, keep listening
                log.error("%s port: accept failed (%s); retrying", self.label, e)
                await asyncio.sleep(0.1)
                continue
            try:
                self._admit(sock, str(addr[0]), int(addr[1]))
            except Exception:
                log.exception("%s port: could not take the connection from %s", self.label, addr[0])
                with contextlib.suppress(OSError):
                    sock.close()

    def _admit(self, sock: socket.socket, ip: str, port: int) -> None:
        admitted = self.admission.connect(ip)
        if admitted is None:
            self._refused_full += 1
            if self._refused_full == 1 or self._refused_full % 100 == 0:
                log.warning("%s port: %d connections open (Dicom:MaxConnections); closed the one from %s:%d "
                            "(%d so far)", self.label, self.limits.max_connections, ip, port, self._refused_full)
            sock.close()
            return
        self._refused_full = 0
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot = Slot(self.admission, ip)
        task = self.loop.create_task(self._connection(sock, slot, (ip, port), over_cap=not admitted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, sock: socket.socket, slot: Slot, peer: tuple[str, int], *, over_cap: bool) -> None:
        ip, port = peer
        artim = OVER_CAP_DEADLINE if over_cap else self.limits.artim
        core = Association(Role.ACCEPTOR, artim=artim, max_pdu=self.limits.max_pdu)
        core.connection_indicated(self.loop.time())
        pending: Pending | None = None
        try:
            if self.tls is not None:
                if self.address_allowed is not None and not self.address_allowed(ip):
                    log.warning("%s port: connection from %s:%d closed before the TLS handshake: the address is not "
                                "in Dicom:AllowedAddresses", self.label, ip, port)
                    return
                handshaken = await self._handshake(sock, core, peer)
                if handshaken is None:
                    return
                sock = handshaken
            indication, raw = await self._read_request(core, sock)
            if isinstance(indication, AssociateRequested):
                pending = Pending(self, core, sock, slot, raw, indication, peer)
                await self._decide(pending, over_cap)
            else:
                self._log_no_request(indication, ip, port)
                await self.finish(core, sock)
        except Exception:
            log.exception("%s port: connection from %s:%d failed", self.label, ip, port)
        finally:
            if pending is None or not pending.taken:
                slot.close()
                with contextlib.suppress(OSError):
                    sock.close()

    async def _handshake(self, sock: socket.socket, core: Association, peer: tuple[str, int]) -> ssl.SSLSocket | None:
        assert self.tls is not None and core.artim_deadline is not None
        try:
            tls = await tlsio.handshake(self.tls, sock, core.artim_deadline)
        except tlsio.HandshakeRefused as e:
            # a connection closed before any TLS (a TCP health check, a port scan) is not worth a warning
            level = logging.INFO if e.kind is tlsio.RefusalKind.CLOSED else logging.WARNING
            log.log(level, "%s port: handshake from %s:%d refused (%s): %s", self.label, *peer, e.kind.value, e.reason)
            if self.on_tls_refused is not None:
                self.on_tls_refused(e)
            return None
        subject = _subject(tls.getpeercert())
        log.debug("%s port: %s:%d, %s %s, client certificate %s", self.label, *peer, tls.version(),
                  (tls.cipher() or ("?",))[0], subject or "none")
        return tls

    async def _decide(self, pending: Pending, over_cap: bool) -> None:
        rq = pending.request
        who = f"{rq.calling or '?'} ({pending.ip}:{pending.port})"
        if over_cap:
            log.warning("association from %s refused: %d connections from %s (Dicom:MaxConnectionsPerAddress is %d)",
                        who, self.admission.from_address(pending.ip), pending.ip, self.limits.max_per_address)
            await pending.reject(*LOCAL_LIMIT)
        elif not pending.slot.reserve_association():
            log.warning("association from %s refused: %d associations established (Dicom:MaxAssociations)",
                        who, self.limits.max_associations)
            await pending.reject(*LOCAL_LIMIT)
        else:
            await self.handler(pending)

    @staticmethod
    def _log_no_request(indication: object, ip: str, port: int) -> None:
        if isinstance(indication, Aborted):
            # a plain close (a TCP health check, a port scan) is not worth a warning
            level = logging.INFO if indication.detail == CONNECTION_CLOSED else logging.WARNING
            log.log(level, "DICOM connection from %s:%d closed without an association: %s", ip, port,
                    indication.detail or "aborted")
        elif isinstance(indication, AssociateRejected):
            log.warning("DICOM connection from %s:%d: unsupported protocol version; rejected", ip, port)

    async def _read_request(self, core: Association, sock: socket.socket) -> tuple[object, bytes]:
        """Sta2: read PDUs until the association is requested or the connection ends; ARTIM
        bounds the whole of it."""
        while core.request is None and not core.closed:
            try:
                header = await self._recv(core, sock, HEADER_SIZE)
                if header is None:
                    return core.connection_closed(self.loop.time()), b""
                pdu_type, length = pdus.parse_header(header)
                try:
                    core.check_header(pdu_type, length)
                except InvalidPdu as e:
                    return core.invalid(e, self.loop.time()), b""
                body = await self._recv(core, sock, length)
                if body is None:
                    return core.connection_closed(self.loop.time()), b""
            except TimeoutError:
                return core.artim_expired(self.loop.time()), b""
            raw = header + body
            indication = core.receive(pdu_type, raw, self.loop.time())
            if indication is not None:
                return indication, raw
        return None, b""

    async def _recv(self, core: Association, sock: socket.socket, n: int) -> bytes | None:
        deadline = core.artim_deadline
        assert deadline is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        async with asyncio.timeout_at(deadline):
            while got < n:
                k = await tlsio.recv_into(self.loop, sock, view[got:])
                if k == 0:
                    return None
                got += k
        return bytes(buf)

    async def finish(self, core: Association, sock: socket.socket) -> None:
        """Write what the association queued; in Sta13 wait (ARTIM) for the peer to close."""
        with contextlib.suppress(OSError):
            for data in core.outgoing():
                await asyncio.wait_for(tlsio.sendall(self.loop, sock, data), self.limits.artim)
        try:
            while not core.closed and core.artim_deadline is not None:
                async with asyncio.timeout_at(core.artim_deadline):
                    chunk = await tlsio.recv(self.loop, sock, 1 << 12)
                if not chunk:
                    core.connection_closed(self.loop.time())
                # else: a PDU in Sta13 is ignored (AA-6); keep waiting for the close
        except TimeoutError:
            core.artim_expired(self.loop.time())
        except OSError:
            core.connection_closed(self.loop.time())


def _subject(cert: Any) -> str:
    """``CN=..,O=..`` of a verified peer certificate (``getpeercert()``), or ''."""
    if not cert:
        return ""
    rdns = cert.get("subject", ())
    assert isinstance(rdns, tuple)
    return ",".join(f"{_SHORT_NAMES.get(name, name)}={value}" for rdn in rdns for name, value in rdn)
