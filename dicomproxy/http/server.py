"""The HTTP server's front line: limits on what a client may hold before the app sees a request.

uvicorn's httptools protocol, as it comes, buffers a request head of any size (a 100 MB header
block, a 60 MB URL and 2 MiB headers were accepted here, RSS 75 -> 238 MB), gives a new
connection forever to send its head (1,100 connections dripping a header byte every 10 s were
never closed, and at the default ``LimitNOFILE`` of 1024 the DICOM side then failed C-STOREs
with 0xA700 for want of a file descriptor), and accepts connections without bound. Those are
decided before any ASGI code runs, so they are enforced here, in a subclass of uvicorn's own
protocol (the parser and the request/response cycle stay uvicorn's):

* the head (request line + headers) is capped at ``Server:MaxHeadBytes`` (431) and the URL at
  ``Server:MaxUrlBytes`` (414), counted on the raw bytes as they arrive, so the parser never
  holds more than the cap plus one socket read;
* the head must arrive within ``Server:HeadTimeoutSeconds`` of the connection opening or of the
  first byte of the next request on a kept-alive connection (408, then close);
* past ``Server:MaxConnections`` open connections a new one gets 503 at once and is closed; the
  cap is lowered to what the process's file-descriptor limit allows after keeping
  ``Server:ReservedFileDescriptors`` for the spool, the DICOM side and the upstream pool
  (:func:`connection_budget`).

Over TLS the same protocol runs on the decrypted stream (listeners.py does the handshake, within
``Server:HeadTimeoutSeconds`` and counted against ``Server:MaxConnections`` while it lasts); the
head timer starts once the handshake is done. A TLS connection's facts (the verified client
certificate's subject, the version, the suite) are computed once per connection and given to
every request on it as the ASGI TLS extension, ``scope["extensions"]["tls"]`` (tls.py).

Each listener gets its own protocol class (:func:`protocol_class`), bound to the app that
listener serves (wrapped for HSTS or the redirect to https, hsts.py), so nothing about the
listener is decided per request.

What it costs the hot path: one integer addition and comparison per socket read while a head
is arriving, and a clock read per request head (the head timer is one per connection, re-armed
only when it fires early for a later head; uvicorn arms one per response for keep-alive);
over TLS, one dictionary entry per request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dicomproxy.http.renewal import CertificateStore
from dicomproxy.http.tls import connection_scope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadLimits:
    max_head_bytes: int = 64 * 1024
    max_url_bytes: int = 8 * 1024
    head_timeout: float = 20.0
    max_connections: int = 1000


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the status is on the protocol."""


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (systemd and Docker give a soft 1024 and
    a far higher hard limit); returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # pragma: no cover - a container may forbid it
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft, hard


def connection_budget(max_connections: int, reserved: int, file_limit: int) -> int:
    """How many HTTP connections may be open at once, given the file-descriptor limit."""
    allowed = file_limit - reserved
    if allowed < max_connections:
        log.warning(
            "Server:MaxConnections is %d but the open-file limit is %d and %d are reserved "
            "(Server:ReservedFileDescriptors) for the spool, the DICOM side and the upstream pool: "
            "at most %d HTTP connections will be served. Raise LimitNOFILE (systemd) or --ulimit nofile "
            "(Docker) to serve more.", max_connections, file_limit, reserved, max(allowed, 1))
    return max(1, min(max_connections, allowed))


_UVICORN = HttpToolsProtocol


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring.

    ``limits``, the listener's ``app``, the count of TLS ``handshakes`` under way and, on a TLS
    listener, its certificate store ``tls`` are set on the class by :func:`protocol_class`
    (uvicorn builds the protocol from its config and passes no extra arguments).
    """

    limits: HeadLimits = HeadLimits()
    listener_app: Any = None  # None: the config's app
    tls: CertificateStore | None = None
    handshakes: Callable[[], int] = staticmethod(lambda: 0)  # TLS handshakes under way, on every listener

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.listener_app is not None:
            self.app = self.listener_app
        self._tls_scope: dict[str, Any] | None = None
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0  # raw bytes received while a head is due (bounds what the parser holds)
        self._read_size = 0  # the size of the socket read being parsed
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = -1.0  # loop time the head due now counts from (-1: none due)
        self._refusal = 0
        self._deferred = 0  # a refusal waiting for the answers owed to earlier pipelined requests

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # TLS connections still in their handshake count too; this one's is still counted there
        busy = len(self.connections) + self.handshakes() - (1 if self.tls is not None else 0)
        if busy > self.limits.max_connections:
            log.warning("refusing a connection from %s: %d connections open or in handshake (Server:MaxConnections)",
                        self.client[0] if self.client else "?", busy - 1)
            self._refuse(503, close_only=False)
            return
        if self.tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self._tls_scope = connection_scope(ssl_object, self.tls.served_by(ssl_object.context))
        self._head_started = self.loop.time()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping. An idle TLS connection with nothing left to send is dropped at
        once: closing it would wait for the client's close_notify (up to the listener's shutdown
        timeout; measured: an idle keep-alive client held a stop 7.4 s), which a client that is
        not reading never sends."""
        idle = self.cycle is None or self.cycle.response_complete
        if self.tls is not None and idle and not self.transport.get_write_buffer_size():
            self.transport.abort()
            return
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        size = self._read_size = len(data)
        if self._in_head:
            if self._head_started < 0:
                self._head_started = self.loop.time()
                if self._head_timer is None:
                    self._arm_head_timer()
            self._head_bytes += size
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn does
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refusal:
                self.logger.warning("Invalid HTTP request received.")
            self._refuse_in_order(self._refusal or 400)
            return
        if self._in_head and self._head_bytes > self.limits.max_head_bytes:
            self._refuse_in_order(431)

    # -- parser callbacks -----------------------------------------------------------------------
    # The per-request callbacks call uvicorn's as ``_UVICORN.name(self)``, not ``super().name()``:
    # a ``super()`` object costs ~1,400 instructions a call under callgrind (a plain method call
    # ~400), and five ran per request. ``on_message_begin`` is overridden only on TLS listeners
    # (:class:`_TlsProtocol`), where a request gets the connection's TLS extension.
    def on_url(self, url: bytes) -> None:
        self.url += url  # uvicorn's on_url, in full: one call per URL fragment, not two
        if len(self.url) > self.limits.max_url_bytes:
            self._refusal = 414
            raise _Refused

    def on_headers_complete(self) -> None:
        # A whole head in one read: its size is at most the bytes read for it, this read included
        # (a pipelined head may start mid-read), so only a read that large has its head measured
        # (once, here; an on_header of our own per header cost ~1,200 instructions per request).
        limit = self.limits.max_head_bytes
        if self._head_bytes + self._read_size > limit and \
                len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > limit:
            self._refusal = 431
            raise _Refused
        self._in_head = False
        self._head_bytes = 0
        self._head_started = -1.0  # the timer stays armed: it fires once, finds no head due, and stops
        _UVICORN.on_headers_complete(self)

    def on_message_complete(self) -> None:
        _UVICORN.on_message_complete(self)
        self._in_head = True  # what comes next is the next request's head; its timer starts with its first byte

    def on_response_complete(self) -> None:
        _UVICORN.on_response_complete(self)  # starts the next pipelined request, if any
        if self._deferred and not self._answer_owed():
            self._refuse(self._deferred)

    # -- refusing a pipelined request in order --------------------------------------------------
    def _answer_owed(self) -> bool:
        """An earlier request on this connection still has (part of) its answer to come."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse_in_order(self, status: int) -> None:
        """Refuse the request being parsed without overtaking the answers owed to earlier ones.

        uvicorn writes its 400 at once: behind a pipelined request still being proxied, the client
        read that 400 as the earlier request's answer although the upstream had executed it (found
        by tests/fuzz/test_http_requests.py). Here the refusal waits for the earlier answers
        (:meth:`on_response_complete`); a request whose body broke is dropped if it has not started,
        and if it has, it owns the connection: refused now, or only closed once its answer began.
        """
        broken = None if self._in_head else self.cycle  # its head was read, its body broke
        if broken is not None and self.pipeline and self.pipeline[0][0] is broken:
            self.pipeline.popleft()  # queued behind another: it never runs
            broken = None
        if broken is None and self._answer_owed():
            self._deferred = self._deferred or status
            self.flow.pause_reading()
            return
        self._refuse(status, close_only=broken is not None and broken.response_started)

    # -- helpers --------------------------------------------------------------------------------
    def _arm_head_timer(self, at: float | None = None) -> None:
        """One timer per connection, armed for the head due (or ``at``), not one per request:
        a call_later and its cancel per request cost ~2 us of a proxied request's CPU (measured
        with ``bench/proxy_instructions.py --gateway``); this costs a clock read per head."""
        when = self._head_started + self.limits.head_timeout if at is None else at
        self._head_timer = self.loop.call_at(when, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head or self._head_started < 0:
            return  # no head due: the next one's first byte arms the timer again
        now = self.loop.time()
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head waits while the answer before it streams
            self._arm_head_timer(now + self.limits.head_timeout)
            return
        if self._head_started + self.limits.head_timeout > now:  # a later head than the timer was armed for
            self._arm_head_timer()
            return
        if self._head_bytes:
            log.info("closing a connection from %s: no complete request head within %g s "
                     "(Server:HeadTimeoutSeconds)", self.client[0] if self.client else "?", self.limits.head_timeout)
            self._refuse(408)
        else:
            self.transport.close()

    def _refuse(self, status: int, close_only: bool = False) -> None:
        """Answer ``status`` with a one-line body and close; the app never sees the request."""
        self._cancel_head_timer()
        self._in_head = False
        if status in (414, 431):
            what = "URL" if status == 414 else "request head"
            setting = "Server:MaxUrlBytes" if status == 414 else "Server:MaxHeadBytes"
            log.info("refused a %s from %s over %s", what, self.client[0] if self.client else "?", setting)
        if not close_only and not self.transport.is_closing():
            body = _REASONS[status] + b"\n"
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
            )
        self.transport.close()


class _TlsProtocol(GuardedHttpToolsProtocol):
    """On a TLS listener: every request gets its connection's TLS facts (tls.py)."""

    def on_message_begin(self) -> None:
        _UVICORN.on_message_begin(self)
        if self._tls_scope is not None:
            self.scope["extensions"] = {"tls": cast("dict[object, object]", self._tls_scope)}


def protocol_class(limits: HeadLimits, app: Any = None, tls: CertificateStore | None = None,
                   handshakes: Callable[[], int] | None = None) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to ``limits`` (for ``uvicorn.Config(http=...)``), and for one listener
    to the ``app`` it serves, the count of TLS handshakes under way and, over TLS, its certificate store."""
    attributes: dict[str, Any] = {"limits": limits, "listener_app": app, "tls": tls}
    if handshakes is not None:
        attributes["handshakes"] = staticmethod(handshakes)
    base = GuardedHttpToolsProtocol if tls is None else _TlsProtocol
    return type("GatewayHttpProtocol", (base,), attributes)
