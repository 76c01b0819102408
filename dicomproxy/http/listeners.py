"""The HTTP side's sockets: one listener per entry of ``Urls``, plain or TLS, served by one uvicorn
server.

uvicorn serves one SSL configuration per ``Server`` (``serve(sockets=[...])`` gives every socket
the same ``config.ssl``), and two ``Server`` objects on one loop would run the app's lifespan
twice and count connections apart, so :class:`GatewayServer` is one uvicorn server whose
start-up creates each listener itself: one lifespan, one signal handling, one graceful shutdown,
one set of open connections for ``Server:MaxConnections``.

* Sockets are bound before anything starts (:func:`bind`), so an address in use stops start-up
  with a line naming ``Urls`` and the address.
* A plain listener is asyncio's own server (``loop.create_server``), as before.
* A TLS listener is a :class:`TlsAcceptor`: it accepts the sockets itself and hands each one to
  ``loop.connect_accepted_socket(ssl=...)``. With ``create_server(ssl=...)`` a connection would
  only reach the HTTP protocol (and its connection cap) after its handshake, and a handshake may
  take 60 s by default: a client opening connections and sending nothing would hold file
  descriptors past the cap, which is what the cap is for (the DICOM side fails C-STOREs without
  descriptors). Here a connection in handshake counts against ``Server:MaxConnections`` (one
  past it is closed at once), the handshake must finish within ``Server:HeadTimeoutSeconds``,
  and a refused handshake is logged with its reason (no client certificate, one that does not
  verify, a TLS version below ``Https:MinimumTlsVersion``, plain HTTP on an https port).
  Checked with uvloop and asyncio's loop: the context's SNI callback (renewal.py) runs, and the
  app protocol sees the decrypted stream and the ``ssl_object``.

Each listener has its own protocol class (server.py), bound to the app it serves: the gateway,
wrapped by :class:`~dicomproxy.http.hsts.Hsts` on a TLS listener with ``Https:Hsts``, or by
:class:`~dicomproxy.http.hsts.RedirectToHttps` on a plain one with ``Https:RedirectHttp``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from dicomproxy.config.fields import Endpoint
from dicomproxy.config.settings import ConfigError, HttpsSettings
from dicomproxy.http.hsts import Hsts, RedirectToHttps, hsts_value
from dicomproxy.http.renewal import CertificateStore
from dicomproxy.http.server import HeadLimits, protocol_class

log = logging.getLogger(__name__)

ACCEPT_BATCH = 128  # connections accepted per wake-up, as asyncio's own servers do with their backlog
ACCEPT_RETRY_SECONDS = 1.0  # out of descriptors: stop accepting this long (asyncio's ACCEPT_RETRY_DELAY)
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass
class Listener:
    """One entry of ``Urls``: its bound socket and, for ``https``, the certificate store."""

    endpoint: Endpoint
    sock: socket.socket
    tls: CertificateStore | None = None


def bind(endpoint: Endpoint, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking socket for ``endpoint``; raises :class:`ConfigError` naming ``Urls``.
    ``reuse_port``: one of several on the same port (``Server:Workers``: one per worker, the
    kernel spreads the connections)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address[:2], family=family, backlog=backlog, reuse_port=reuse_port)
    except OSError as e:
        raise ConfigError(f"Urls: cannot listen on {endpoint.url}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class TlsAcceptor:
    """Accepts TLS connections on one socket (see the module docstring)."""

    def __init__(self, listener: Listener, factory: Callable[[], asyncio.Protocol], busy: Callable[[], int],
                 limits: HeadLimits) -> None:
        assert listener.tls is not None
        self.listener = listener
        self.store = listener.tls
        self.factory = factory
        self.busy = busy  # connections open or in handshake, on every listener
        self.limits = limits
        self.pending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.listener.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; handshakes under way are cancelled."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.listener.sock.fileno())
        self.listener.sock.close()
        for task in self.pending:
            task.cancel()

    async def wait_closed(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._accept_failed(e)
                return
            if self.busy() >= self.limits.max_connections:
                log.warning("refusing a TLS connection from %s: %d connections open or in handshake "
                            "(Server:MaxConnections)", address[0], self.busy())
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._handshake(conn, address[0]))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def _accept_failed(self, e: OSError) -> None:
        assert self._loop is not None
        if e.errno not in _OUT_OF_RESOURCES:
            log.warning("accepting on %s failed: %s", self.listener.endpoint.url, e)
            return
        log.error("accepting on %s: %s; not accepting for %g s (raise LimitNOFILE, or lower Server:MaxConnections)",
                  self.listener.endpoint.url, e.strerror or e, ACCEPT_RETRY_SECONDS)
        fd = self.listener.sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume, fd)

    def _resume(self, fd: int) -> None:
        if not self._closed and self._loop is not None:
            self._loop.add_reader(fd, self._accept)

    async def _handshake(self, conn: socket.socket, client: str) -> None:
        assert self._loop is not None
        started = time.monotonic()
        timeout = self.limits.head_timeout
        try:
            await self._loop.connect_accepted_socket(self.factory, conn, ssl=self.store.base,
                                                     ssl_handshake_timeout=timeout, ssl_shutdown_timeout=timeout)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:  # a handshake that fails closes the connection; the reason is logged
            conn.close()
            level, why = refusal(e, self.store.https, timeout, time.monotonic() - started)
            log.log(level, "TLS handshake from %s on %s refused: %s", client, self.listener.endpoint.url, why)


def refusal(e: BaseException, https: HttpsSettings, timeout: float, elapsed: float) -> tuple[int, str]:
    """The log level and the words for a failed handshake: warnings for client certificates (what a
    mutual-TLS deployment must see), information for what scanners and old clients do."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return logging.WARNING, (f"its client certificate does not verify against Https:ClientCaFile: "
                                 f"{e.verify_message or e.reason}")
    if isinstance(e, ssl.SSLError):
        reason = e.reason or ""
        known = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": (logging.WARNING, "it sent no client certificate "
                                                  "(Https:ClientCertificateMode is Required)"),
            "UNSUPPORTED_PROTOCOL": (logging.INFO, f"it offers only TLS versions older than {https.minimum_version} "
                                     "(Https:MinimumTlsVersion)"),
            "NO_SHARED_CIPHER": (logging.INFO, "no cipher suite in common (it offers none of Mozilla's "
                                 "intermediate suites)"),
            "HTTP_REQUEST": (logging.INFO, "it sent plain HTTP to an https:// listener"),
        }
        if reason in known:
            return known[reason]
        if "ALERT" in reason:
            return logging.INFO, f"the client ended the handshake ({reason}; e.g. it does not trust this certificate)"
        return logging.INFO, reason or str(e)
    if elapsed >= timeout * 0.99:
        return logging.INFO, f"no TLS handshake within {timeout:g} s (Server:HeadTimeoutSeconds)"
    return logging.DEBUG, str(e) or type(e).__name__


class GatewayServer(uvicorn.Server):
    """uvicorn's server, serving every listener (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, listeners: list[Listener], limits: HeadLimits,
                 https: HttpsSettings) -> None:
        super().__init__(config)
        self.listeners = listeners
        self.limits = limits
        self.https = https
        self.acceptors: list[TlsAcceptor] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown (exit -15); a service that
        stopped cleanly on request should exit 0, as supervisors expect."""
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        loop = asyncio.get_running_loop()
        self.servers = []
        for listener in self.listeners:
            factory = self._factory(listener)
            if listener.tls is None:
                self.servers.append(await loop.create_server(factory, sock=listener.sock, backlog=self.config.backlog))
            else:
                acceptor = TlsAcceptor(listener, factory, self._busy, self.limits)
                acceptor.start()
                self.acceptors.append(acceptor)
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        await asyncio.gather(*(a.wait_closed() for a in self.acceptors))
        await super().shutdown(sockets)

    def _handshakes(self) -> int:
        return sum(len(a.pending) for a in self.acceptors)

    def _busy(self) -> int:
        return len(self.server_state.connections) + self._handshakes()

    def _factory(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        config, state = self.config, self.server_state
        cls = protocol_class(self.limits, self._app_for(listener), listener.tls, self._handshakes)

        def create() -> asyncio.Protocol:
            return cls(config=config, server_state=state, app_state=self.lifespan.state)

        return create

    def _app_for(self, listener: Listener) -> Any:
        app = self.config.loaded_app
        if listener.tls is not None and self.https.hsts:
            return Hsts(app, hsts_value(self.https.hsts_max_age, self.https.hsts_include_subdomains))
        if listener.tls is None and self.https.redirect_http:
            port = next(li.endpoint.port for li in self.listeners if li.tls is not None)
            return RedirectToHttps(app, port)
        return app
