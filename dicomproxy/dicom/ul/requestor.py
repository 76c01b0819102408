"""The one way the gateway opens an association with a remote AE (the PACS, a move destination,
a ``send`` target): connect, shake hands over TLS when asked, send the A-ASSOCIATE-RQ and read
the answer, all on the event loop with a non-blocking socket (``loop.sock_*``).

Why a raw socket and not asyncio streams: the relay (:mod:`..relay`) hands the socket of its
association to the PACS to the modality association's thread, which reads and writes it
blocking; asyncio cannot give a socket back once a transport owns it. The asyncio users (the
forwarder and ``send`` via :mod:`..storage_scu`, Query/Retrieve via :mod:`..qr.upstream`) wrap
the same socket in streams afterwards (:meth:`.transport.StreamAssociation.request`, through
:func:`.tls_transport.open_stream`, which takes an ``ssl.SSLSocket`` too). So the connection, the
TLS handshake, the timeouts and every failure message are the same for all of them.

TCP_NODELAY is set on the socket at once: with Nagle on, each C-STORE-RQ whose data set follows
in a second write waits ~40 ms for the peer's delayed ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import tls as dicom_tls
from dicomproxy.dicom.ul.association import (
    AssociateAccepted,
    AssociateRejected,
    Association,
    ReleaseConfirmed,
    Role,
)
from dicomproxy.dicom.ul.errors import AssociationAborted, AssociationRejected, UpperLayerError
from dicomproxy.dicom.ul.pdu import HEADER_SIZE, InvalidPdu

TLS_KEYS = "Dicom:Upstream:Tls or the Dicom:Modalities entry's Tls, TlsCa, TlsCertificate"


@dataclass
class Opened:
    """An association established on a non-blocking socket (Sta6), not yet used."""

    core: Association
    sock: socket.socket
    ac: pdus.A_ASSOCIATE_AC
    label: str

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


async def open_association(
    host: str, port: int, rq: pdus.A_ASSOCIATE_RQ, *, timeout: float, artim: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> Opened:
    """Open an association with ``rq`` (over TLS with ``tls``, a context of
    :func:`.tls.client_context`) within ``timeout`` (connection, handshake and answer); raise
    :class:`AssociationRejected` or another :class:`UpperLayerError` (cannot connect, TLS refused,
    no answer, aborted) whose message names the peer and, for TLS, the keys to check."""
    loop = asyncio.get_running_loop()
    label = f"{rq.called_ae_title.strip()}@{host}:{port}"
    core = Association(Role.REQUESTOR, artim=artim, max_pdu=0)
    core.request_association(rq, loop.time())
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            info = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = info[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = await dicom_tls.client_handshake(tls, sock, host, loop.time() + timeout)
            core.connection_confirmed(loop.time())
            for data in core.outgoing():
                await dicom_tls.sendall(loop, sock, data)
            answer = await _answer(loop, core, sock)
    except dicom_tls.HandshakeRefused as e:  # the socket is closed
        if e.kind is dicom_tls.RefusalKind.UNTRUSTED_CERTIFICATE:
            raise UpperLayerError(f"TLS handshake with {label} failed: its certificate is not trusted ({e.reason}; "
                                  f"check {TLS_KEYS}, TlsCheckHostname)") from None
        raise UpperLayerError(f"TLS handshake with {label} failed: {e.reason} (is its port one for DICOM over TLS? "
                              f"check {TLS_KEYS})") from None
    except ssl.SSLError as e:  # TLS 1.3: the peer judges the client certificate after the handshake
        _close(sock)
        reason = str(e.reason or e).replace("_", " ").lower()
        raise UpperLayerError(f"cannot connect to {label} over TLS: it ended the connection with {reason!r} "
                              "(does it trust the gateway's client certificate?)") from None
    except TimeoutError:
        _close(sock)
        raise UpperLayerError(f"{label} did not answer the association request within {timeout:g} s") from None
    except OSError as e:
        _close(sock)
        raise UpperLayerError(f"cannot connect to {label}: {e.strerror or e}") from None
    assert sock is not None
    if isinstance(answer, AssociateAccepted):
        return Opened(core, sock, answer.pdu, label)
    _close(sock)
    if isinstance(answer, AssociateRejected):
        raise AssociationRejected(label, answer.result, answer.source, answer.reason)
    detail = getattr(answer, "detail", "")
    raise AssociationAborted(f"{label} aborted the association request ({detail or 'no reason given'})")


async def _answer(loop: asyncio.AbstractEventLoop, core: Association, sock: socket.socket) -> object:
    while True:
        header = await _recv(loop, sock, HEADER_SIZE)
        if header is None:
            return core.connection_closed(loop.time())
        pdu_type, length = pdus.parse_header(header)
        try:
            core.check_header(pdu_type, length)
        except InvalidPdu as e:
            return core.invalid(e, loop.time())
        body = await _recv(loop, sock, length)
        if body is None:
            return core.connection_closed(loop.time())
        indication = core.receive(pdu_type, header + body, loop.time())
        for data in core.outgoing():
            await dicom_tls.sendall(loop, sock, data)
        if indication is not None or core.closed:
            return indication


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await dicom_tls.recv_into(loop, sock, view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


async def release(opened: Opened, timeout: float = 2.0) -> None:
    """A-RELEASE an association that is not needed (a negotiation probe); closes the socket
    whatever happens."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            opened.core.release(loop.time())
            for data in opened.core.outgoing():
                await dicom_tls.sendall(loop, opened.sock, data)
            while not opened.core.closed:
                if isinstance(await _answer(loop, opened.core, opened.sock), ReleaseConfirmed):
                    break
    except (TimeoutError, OSError, Exception):
        pass
    finally:
        opened.close()


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
