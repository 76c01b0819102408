"""TLS for the DICOM upper layer (PS3.15 Annex B, the BCP 195 profile): the contexts, the
handshakes on a non-blocking socket (the acceptor's, the relay's), and event-loop I/O on a TLS socket.

What it owns:

* the protocol policy, one for both directions: TLS 1.2 or later, the TLS 1.2 suites
  ``TLS_ECDHE_{ECDSA,RSA}_WITH_AES_{128,256}_GCM_SHA{256,384}`` only (BCP 195 / RFC 9325's
  recommended suites without DHE: no DH parameters are loaded, and every DICOM TLS stack in use,
  dcmtk's ``+tls``, Orthanc, dcm4chee, offers ECDHE), TLS 1.3's suites as OpenSSL has them
  (all AEAD), no compression, no renegotiation; no CBC, RC4 or 3DES can be negotiated;
* the gateway's server context (``Dicom:Tls:*``: PEM certificate and key, optional key
  password, the client CA and whether a client certificate is required) and the client context
  per remote AE (``Tls``, ``TlsCa``, ``TlsCertificate``/``TlsKey``, ``TlsCheckHostname`` of a
  ``Dicom:Modalities`` entry or of ``Dicom:Upstream``), each file problem a
  :class:`DicomTlsError` naming the key;
* :func:`handshake`: the acceptor's server handshake on a non-blocking socket, bounded by the
  ARTIM deadline the connection already runs under (a peer cannot hold a slot by handshaking
  slowly), a failure turned into :class:`HandshakeRefused` with a short ``kind`` (the metric's
  label) and OpenSSL's reason (the log line's); :func:`client_handshake`, the same as a client,
  for the relay's association to the PACS (:mod:`..negotiation`), whose socket a thread then takes;
* :func:`recv_into`, :func:`recv`, :func:`sendall`: ``loop.sock_*`` for a plain socket, and the
  same on an ``ssl.SSLSocket``, which asyncio's ``sock_*`` refuse: try the call, wait for the file
  descriptor on ``SSLWantRead``/``SSLWantWrite``. A read that wants a write (only in a TLS 1.3
  key update) polls every millisecond instead of registering a writer, so that a reader and a
  writer on the same socket never replace each other's callback. (The Q/R services, on the
  loop, get whole asyncio streams on the ``SSLSocket`` from :mod:`.tls_transport`.)

Why an ``SSLSocket`` and not asyncio's TLS transport: after the request phase the storage
association is served on its own thread with a blocking socket (the hot path, see
``storage_scp.py``, ``relay.py``: both its sockets); an ``SSLSocket`` is a socket, so that thread
reads it unchanged (the
``ssl`` module releases the GIL for the record's decryption).

The HTTPS listeners (``dicomproxy/http/tls.py`` on the https branch) apply the same TLS 1.2+
and ECDHE/AEAD policy with their own keys (``Https:*``), PKCS#12 and renewal; the two share no
code yet (see the report of the dicom-tls branch for the plan to unify them).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import socket
import ssl
from pathlib import Path

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.settings import DicomTlsSettings, RemoteAe

BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
))
"""OpenSSL's names of the TLS 1.2 suites allowed (module docstring)."""

_READ_WANTS_WRITE_POLL = 0.001
REFUSAL_LINGER = 1.0
"""Seconds a refused handshake's connection stays open for the peer to read the alert."""


class DicomTlsError(ConfigError):
    """A certificate, key or CA file that cannot be used; the message names the key."""


class RefusalKind(enum.Enum):
    """Why a TLS handshake on the DICOM port failed (``dicomproxy_dicom_tls_refused_total{reason}``)."""

    UNTRUSTED_CERTIFICATE = "untrusted_certificate"
    NO_CERTIFICATE = "no_certificate"
    PROTOCOL = "protocol"  # version, suites, not TLS at all
    TIMEOUT = "timeout"
    CLOSED = "closed"


class HandshakeRefused(Exception):
    def __init__(self, kind: RefusalKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# --------------------------------------------------------------------------- contexts
def server_context(tls: DicomTlsSettings) -> ssl.SSLContext:
    """The context of the gateway's TLS port; raises :class:`DicomTlsError`."""
    ctx = _policy(ssl.PROTOCOL_TLS_SERVER)
    assert tls.certificate is not None and tls.key_file is not None  # the model checks it
    _load_pair(ctx, tls.certificate, tls.key_file, tls.key_password, "Dicom:Tls:Certificate", "Dicom:Tls:Key")
    if tls.client_ca is not None:
        _load_ca(ctx, tls.client_ca, "Dicom:Tls:ClientCa")
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@functools.lru_cache(maxsize=64)
def client_context(ae: RemoteAe, own: DicomTlsSettings) -> ssl.SSLContext | None:
    """The context to associate with ``ae`` (None: ``Tls`` is off); raises :class:`DicomTlsError`.

    Cached per (remote AE, ``Dicom:Tls``) pair: both are frozen settings, and a context is
    immutable once built, so every association to the same peer reuses one (loading a key is
    ~1-10 ms). A certificate renewed on disk is read at the next start."""
    if not ae.tls:
        return None
    name = f"remote AE {ae.aet}@{ae.host}:{ae.port}"
    ctx = _policy(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = ae.tls_check_hostname
    if ae.tls_ca is not None:
        _load_ca(ctx, ae.tls_ca, f"TlsCa of {name}")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if ae.tls_certificate is not None and ae.tls_key is not None:
        _load_pair(ctx, ae.tls_certificate, ae.tls_key, ae.tls_key_password, f"TlsCertificate of {name}",
                   f"TlsKey of {name}")
    elif own.certificate is not None and own.key_file is not None:
        _load_pair(ctx, own.certificate, own.key_file, own.key_password, "Dicom:Tls:Certificate", "Dicom:Tls:Key")
    return ctx


def _policy(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path, password: str, cert_key: str, key_key: str) -> None:
    for path, what in ((cert, cert_key), (key, key_key)):
        if not path.is_file():
            raise DicomTlsError(f"{what}: {path} does not exist (a PEM file)")
    try:
        ctx.load_cert_chain(cert, key, password=password or None)
    except ssl.SSLError as e:
        fix = "is the key encrypted (set its password) and is it this certificate's?"
        raise DicomTlsError(f"{key_key}: cannot use {cert} with {key}: {e.reason or e} ({fix})") from None
    except OSError as e:
        raise DicomTlsError(f"{cert_key}: cannot read {cert} or {key}: {e.strerror or e}") from None


def _load_ca(ctx: ssl.SSLContext, path: Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise DicomTlsError(f"{what}: {path} does not exist (a PEM CA bundle)") from None
    except (ssl.SSLError, OSError) as e:
        raise DicomTlsError(f"{what}: {path} holds no usable PEM certificate: {e}") from None


# --------------------------------------------------------------------------- handshakes on a raw socket
async def handshake(ctx: ssl.SSLContext, sock: socket.socket, deadline: float) -> ssl.SSLSocket:
    """Wrap the accepted non-blocking ``sock`` and shake hands by ``deadline`` (loop time);
    raises :class:`HandshakeRefused` (the connection is closed then)."""
    loop = asyncio.get_running_loop()
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)  # detaches ``sock``
    try:
        return await _shake(loop, tls, deadline)
    except HandshakeRefused as e:
        if e.kind not in (RefusalKind.TIMEOUT, RefusalKind.CLOSED):
            await _linger(loop, tls)
        tls.close()
        raise
    except BaseException:
        tls.close()
        raise


async def client_handshake(ctx: ssl.SSLContext, sock: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
    """Wrap the connected non-blocking ``sock`` as a client of ``host`` (its name checked when
    ``ctx`` says so) and shake hands by ``deadline`` (loop time); raises :class:`HandshakeRefused`
    (the connection is closed then). For the requests made with ``loop.sock_*`` (the relay's
    association to the PACS, :mod:`..negotiation`), whose socket a thread takes afterwards."""
    loop = asyncio.get_running_loop()
    tls = ctx.wrap_socket(sock, server_side=False, server_hostname=host, do_handshake_on_connect=False)
    try:
        return await _shake(loop, tls, deadline)
    except BaseException:
        tls.close()
        raise


async def _linger(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
    """Let the peer read the alert: half-close, then discard what it sends until it closes
    (at most ``REFUSAL_LINGER`` s). Closing at once makes the peer's next write (its
    A-ASSOCIATE-RQ: in TLS 1.3 the client's handshake is over before the server judges its
    certificate) meet a reset, which discards the alert unread: the modality would log
    "connection reset" instead of "unknown ca". The bytes are read below the TLS layer."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(tls, socket.SHUT_WR)
    try:
        async with asyncio.timeout(REFUSAL_LINGER):
            while True:
                await _ready(loop, tls, write=False)
                try:
                    if not socket.socket.recv(tls, 1 << 12):
                        return
                except BlockingIOError:
                    continue
    except (TimeoutError, OSError):
        return


async def _shake(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket, deadline: float) -> ssl.SSLSocket:
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await _ready(loop, tls, write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, tls, write=True)
    except TimeoutError:
        raise HandshakeRefused(RefusalKind.TIMEOUT, "no TLS handshake within ARTIM (Dicom:ArtimSeconds)") from None
    except ssl.SSLCertVerificationError as e:
        raise HandshakeRefused(RefusalKind.UNTRUSTED_CERTIFICATE, _reason(e)) from None
    except ssl.SSLError as e:
        raise _refusal(e) from None
    except OSError as e:  # reset by the peer in the middle
        raise HandshakeRefused(RefusalKind.CLOSED, f"connection lost during the handshake ({e.strerror or e})") \
            from None


def _refusal(e: ssl.SSLError) -> HandshakeRefused:
    reason = _reason(e)
    text = reason.lower()
    if "certificate verify failed" in text or "unknown ca" in text or "bad certificate" in text:
        return HandshakeRefused(RefusalKind.UNTRUSTED_CERTIFICATE, reason)
    if "did not return a certificate" in text or "certificate required" in text:
        return HandshakeRefused(RefusalKind.NO_CERTIFICATE, reason)
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return HandshakeRefused(RefusalKind.CLOSED, reason)
    return HandshakeRefused(RefusalKind.PROTOCOL, reason)


def _reason(e: ssl.SSLError) -> str:
    verify = getattr(e, "verify_message", None)
    if verify:
        return f"certificate verify failed: {verify}"
    return str(e.reason or e.strerror or e).replace("_", " ").lower()


# --------------------------------------------------------------------------- event-loop I/O
async def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> int:
    if not isinstance(sock, ssl.SSLSocket):
        return await loop.sock_recv_into(sock, view)
    while True:
        try:
            return sock.recv_into(view)
        except ssl.SSLWantReadError:
            await _ready(loop, sock, write=False)
        except ssl.SSLWantWriteError:
            await asyncio.sleep(_READ_WANTS_WRITE_POLL)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return 0


async def recv(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    if not isinstance(sock, ssl.SSLSocket):
        return await loop.sock_recv(sock, n)
    buf = bytearray(n)
    got = await recv_into(loop, sock, memoryview(buf))
    return bytes(buf[:got])


async def sendall(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes | memoryview) -> None:
    if not isinstance(sock, ssl.SSLSocket):
        await loop.sock_sendall(sock, data)
        return
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except ssl.SSLWantWriteError:
            await _ready(loop, sock, write=True)
        except ssl.SSLWantReadError:
            await _ready(loop, sock, write=False)


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    fd = sock.fileno()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await waiter
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
