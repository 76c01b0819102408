"""The senders: one asyncio task per ``Audit:Collectors`` entry, reading the buffer from its cursor.

A sender is a small state machine (:class:`State`; :meth:`Sender._move` is the one place that
changes it): CONNECTING -> SENDING -> (the connection breaks) BACKOFF -> CONNECTING ... ->
STOPPED. Reconnects back off from 0.5 s, doubling, up to 10 s.

TLS (RFC 5425, ``tls://host:6514``): octet-counted frames over a verified TLS connection (the
collector's certificate against ``CaFile``, or the system CAs; its name against the URL's host
or ``ServerName``), with ``CertFile``/``KeyFile`` for mutual TLS. A refused certificate is a
Security Alert (Node Authentication), once per outage.

Delivery over TLS is *at least once*. TCP and RFC 5425 have no acknowledgement a sender can
see: bytes the kernel accepted may still be lost when the collector dies. So a record counts as
delivered (the cursor moves past it) only once the connection has stayed up ``ACK_AFTER``
seconds after it was written, or was closed cleanly after it; when a connection breaks, every
younger record is sent again on the next one. A collector may thus see a message twice, never
not at all; the syslog header's ``sequenceId`` tells the copies apart (:mod:`.syslog`).

UDP (RFC 5426, ``udp://host:514``): one message per datagram, fire and forget: the cursor
moves as soon as the datagram is handed to the kernel, so a collector that is down loses what
was sent meanwhile (use TLS where that matters). A message longer than ``MaxDatagramBytes``
is not sent (counted and logged: a cut XML message is no audit record); it stays in the
JSON-lines file and on TLS collectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dicomproxy.audit.journal import Journal, Reader
from dicomproxy.audit.syslog import octet_counted

log = logging.getLogger(__name__)

ACK_AFTER = 2.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
CONNECT_TIMEOUT = 10.0
BATCH_BYTES = 256 << 10


class State(enum.Enum):
    CONNECTING = "connecting"
    SENDING = "sending"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Collector:
    """Where to send: parsed from one ``Audit:Collectors`` entry."""

    url: str
    scheme: str  # tls | udp
    host: str
    port: int
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str = ""
    server_name: str = ""
    max_datagram: int = 8192

    @classmethod
    def parse(cls, url: str, **options: Any) -> Collector:
        parts = urlsplit(url)
        default = 6514 if parts.scheme == "tls" else 514
        return cls(url, parts.scheme, parts.hostname or "", parts.port or default, **options)


AlertCallback = Callable[[str, str], None]  # (collector url, what was refused)


class Sender:
    """Sends the journal to one collector, from its cursor on, until stopped."""

    def __init__(self, collector: Collector, journal: Journal, on_alert: AlertCallback | None = None) -> None:
        self.collector = collector
        self.journal = journal
        self.on_alert = on_alert
        self.state = State.CONNECTING
        self.wake = asyncio.Event()  # the writer appended records
        self._stop_event = asyncio.Event()
        self.sent = 0
        self.dropped_oversize = 0
        self.last_error = ""
        self.connected_at = 0.0
        self._backoff = BACKOFF_FIRST
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._reader: Reader = journal.reader(collector.url)

    # -- the state machine -----------------------------------------------------------------
    def _move(self, state: State, why: str = "") -> None:
        if state is self.state:
            return
        if state is State.BACKOFF:
            log.warning("audit collector %s: %s; retrying in %.1fs", self.collector.url, why, self._backoff)
        elif state is State.SENDING:
            log.info("audit collector %s connected", self.collector.url)
        self.state = state

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"audit-{self.collector.url}")

    async def stop(self, grace: float) -> None:
        """Send what is buffered for up to ``grace`` seconds, then close."""
        deadline = time.monotonic() + grace
        while self.state is State.SENDING and self.unsent and time.monotonic() < deadline:
            self.wake.set()
            await asyncio.sleep(0.05)
        self._stopping = True
        self.wake.set()
        self._stop_event.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=max(0.5, deadline - time.monotonic()))
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
        self._move(State.STOPPED)

    @property
    def pending(self) -> int:
        """Records buffered for this collector and not yet delivered."""
        return max(0, self.journal.last_seq - self.journal.cursor(self.collector.url))

    @property
    def unsent(self) -> bool:
        """Records this sender has not even written yet."""
        return self._reader.after < self.journal.last_seq

    def status(self) -> dict[str, Any]:
        return {"url": self.collector.url, "state": self.state.value, "pending": self.pending,
                "sent": self.sent, "lastError": self.last_error,
                **({"droppedOversize": self.dropped_oversize} if self.collector.scheme == "udp" else {})}

    async def _run(self) -> None:
        while not self._stopping:
            self._move(State.CONNECTING)
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # OSError, ssl.SSLError, a collector closing on us
                self.last_error = _describe(e)
                self._refused(e)
            if self._stopping:
                break
            self._move(State.BACKOFF, self.last_error)
            with contextlib.suppress(TimeoutError):  # new records do not cut a backoff short; stop() does
                await asyncio.wait_for(self._stop_event.wait(), timeout=self._backoff)
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def _next_batch(self, timeout: float) -> list[tuple[int, bytes]]:
        """What the reader has next, waiting up to ``timeout`` for the writer's wake-up."""
        batch = await asyncio.to_thread(self._reader.read, BATCH_BYTES)
        if batch or self._stopping:
            return batch
        await self._sleep(timeout)
        return await asyncio.to_thread(self._reader.read, BATCH_BYTES)

    def _refused(self, e: BaseException) -> None:
        if isinstance(e, ssl.SSLCertVerificationError) and self.on_alert is not None and self._backoff == BACKOFF_FIRST:
            self.on_alert(self.collector.url, self.last_error)

    async def _session(self) -> None:
        raise NotImplementedError


class TlsSender(Sender):
    """RFC 5425: octet-counted RFC 5424 messages over TLS, at least once."""

    def __init__(self, collector: Collector, journal: Journal, on_alert: AlertCallback | None = None) -> None:
        super().__init__(collector, journal, on_alert)
        self.context = tls_context(collector)

    async def _session(self) -> None:
        c = self.collector
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(c.host, c.port, ssl=self.context, server_hostname=c.server_name or c.host),
            CONNECT_TIMEOUT)
        self._move(State.SENDING)
        self._backoff = BACKOFF_FIRST
        self.connected_at = time.monotonic()
        unacked: deque[tuple[float, int]] = deque()  # (written at, last sequence of that write)
        closed = asyncio.get_running_loop().create_task(reader.read(1))  # EOF: the collector hung up
        clean = False
        try:
            while not self._stopping and not closed.done():
                batch = await self._next_batch(timeout=ACK_AFTER / 2)
                if batch:
                    unacked.append((time.monotonic(), batch[-1][0]))  # before the write: it may fail halfway
                    writer.write(b"".join(octet_counted(payload) for _, payload in batch))
                    await writer.drain()
                    self.sent += len(batch)
                    log.debug("audit collector %s: sent %d..%d", c.url, batch[0][0], batch[-1][0])
                await self._ack(unacked, time.monotonic() - ACK_AFTER)
            if closed.done():
                raise ConnectionError("the collector closed the connection")
            clean = True
        finally:
            closed.cancel()
            await self._close(writer, unacked, clean)

    async def _close(self, writer: asyncio.StreamWriter, unacked: deque[tuple[float, int]], clean: bool) -> None:
        if clean:
            with contextlib.suppress(Exception):
                await writer.drain()
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)
                await self._ack(unacked, float("inf"))  # closed cleanly after the last write: delivered
        else:
            writer.close()
        # What is not known to be delivered is sent again on the next connection.
        cursor = self.journal.cursor(self.collector.url)
        if self._reader.after > cursor:
            log.debug("audit collector %s: connection lost, sending again after %d", self.collector.url, cursor)
            self._reader.rewind(cursor)

    async def _ack(self, unacked: deque[tuple[float, int]], before: float) -> None:
        last = 0
        while unacked and unacked[0][0] <= before:
            last = unacked.popleft()[1]
        if last:
            log.debug("audit collector %s: delivered up to %d", self.collector.url, last)
            await asyncio.to_thread(self.journal.ack, self.collector.url, last)  # a cursor file, maybe a segment


class UdpSender(Sender):
    """RFC 5426: one message per datagram; delivered as far as the kernel is concerned."""

    async def _session(self) -> None:
        c = self.collector
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(c.host, c.port))
        self._move(State.SENDING)
        self._backoff = BACKOFF_FIRST
        try:
            while not self._stopping:
                batch = await self._next_batch(timeout=1.0)
                for seq, payload in batch:
                    if len(payload) > c.max_datagram:
                        self.dropped_oversize += 1
                        log.warning("audit collector %s: message %d is %d bytes, over MaxDatagramBytes %d; not sent",
                                    c.url, seq, len(payload), c.max_datagram)
                        continue
                    transport.sendto(payload)
                    self.sent += 1
                if batch:
                    await asyncio.to_thread(self.journal.ack, c.url, batch[-1][0])
        finally:
            transport.close()


def tls_context(c: Collector) -> ssl.SSLContext:
    """Verified TLS 1.2+: ``CaFile`` (or the system CAs), a client certificate for mutual TLS."""
    context = ssl.create_default_context(cafile=str(c.ca_file) if c.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if c.cert_file is not None:
        context.load_cert_chain(str(c.cert_file), str(c.key_file) if c.key_file else None,
                                password=c.key_password or None)
    return context


def make_sender(collector: Collector, journal: Journal, on_alert: AlertCallback | None = None) -> Sender:
    if collector.scheme == "udp":
        return UdpSender(collector, journal, on_alert)
    return TlsSender(collector, journal, on_alert)


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate refused: {e.verify_message or e}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
