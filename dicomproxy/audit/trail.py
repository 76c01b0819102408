"""AuditTrail, the ``host.audit`` service: features hand it events, it never blocks and never raises.

``record(event)`` appends the event to an in-memory queue (a ``deque``: safe from the DICOM
side's threads too) and wakes the writer task. On the proxy's path even building the event
is too dear (~7 µs for its half-dozen small objects, measured in tests/audit/test_web.py), so
``defer(build, *args)`` queues the function and its plain arguments and the writer builds the
event: a QIDO-RS request then pays ~1-2 µs for its audit record. The writer, on a
worker thread, builds each event's XML (:mod:`.message`) and RFC 5424 message
(:mod:`.syslog`), appends it to the durable buffer (:mod:`.journal`, fsync'ed once per
batch), writes the JSON-lines file (:mod:`.jsonfile`), then wakes the senders
(:mod:`.senders`), one per collector.

Past full (``Audit:BufferMaxMB``) the newest events are dropped, counted
(``dicomproxy_audit_dropped_total``), the health's ``audit`` section is not ok, an
``audit.buffer_full`` notification is emitted once, and an "Audit Recording Stopped" Security
Alert goes into the buffer's headroom; the first event that fits again is preceded by "Audit
Recording Started" with the number dropped. The in-memory queue is bounded too
(``MAX_PENDING``), for a writer that cannot keep up.

The writer also keeps the latest ``RECENT`` stored events in memory (:meth:`AuditTrail.recent`),
for the status page's audit panel: a poll never reads the buffer or the file.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from dicomproxy.audit import codes, events
from dicomproxy.audit.events import AuditEvent
from dicomproxy.audit.journal import Journal
from dicomproxy.audit.jsonfile import JsonLinesFile, as_json
from dicomproxy.audit.logins import LoginWatch
from dicomproxy.audit.message import AuditSource, to_xml
from dicomproxy.audit.senders import Collector, Sender, make_sender
from dicomproxy.audit.syslog import Framer
from dicomproxy.config.settings import AuditCollector, Settings
from dicomproxy.metrics import Metrics
from dicomproxy.notify.events import EventBus

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
RECENT = 200  # the latest events kept in memory for the status page (no disk read per poll)
STOP_GRACE = 5.0
# The writer gathers what arrives within this long into one batch: one worker-thread hop and one
# fsync per batch, not per event (bench/audit_bench.py: per-event batches cost a QIDO-RS request
# ~2 ms of gateway CPU in thread hops, fsyncs and cursor writes; gathered, see the docstring).
GATHER_SECONDS = 0.05


class AuditTrail:
    def __init__(self, settings: Settings, bus: EventBus, metrics: Metrics, worker: int = 0) -> None:
        """``worker``: with ``Server:Workers`` > 1, worker N > 0 keeps its own buffer
        (``<BufferFolder>/worker-N``) and file (``<File>.worker-N``) and sends them itself: no
        two processes ever append to one journal."""
        cfg = settings.audit
        self.enabled = cfg.enabled
        self.bus = bus
        host = socket.gethostname()
        pid = str(os.getpid())
        self.source = AuditSource(cfg.source_id or f"{settings.dicom.aet}@{host}", cfg.enterprise_site_id,
                                  settings.dicom.aet, host, pid)
        self.framer = Framer(host, cfg.app_name, pid, cfg.msg_id)
        self.logins = LoginWatch(cfg.failed_login_burst, cfg.failed_login_window, cfg.login_success_interval)
        self.login_window = cfg.failed_login_window
        suffix = f"worker-{worker}" if worker else ""
        self.journal = Journal(cfg.buffer_folder / suffix if suffix else cfg.buffer_folder, cfg.buffer_max)
        self.senders: list[Sender] = [make_sender(_collector(c), self.journal, self._refused)
                                      for c in cfg.collectors] if self.enabled else []
        file = cfg.file.with_name(f"{cfg.file.name}.{suffix}") if cfg.file is not None and suffix else cfg.file
        self._file_settings = (file, cfg.file_max, cfg.file_keep)
        self.file: JsonLinesFile | None = None
        self._pending: deque[AuditEvent | tuple[Any, ...]] = deque()
        self._recent: deque[tuple[AuditEvent, int]] = deque(maxlen=RECENT)
        self._signalled = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self.full = False
        self.dropped = 0
        self._dropped_since_full = 0
        self._m_events = metrics.counter("dicomproxy_audit_events_total", "Audit events recorded, by event",
                                         labels=("event",))
        self._m_dropped = metrics.counter("dicomproxy_audit_dropped_total", "Audit events dropped, by reason",
                                          labels=("reason",))
        metrics.gauge("dicomproxy_audit_buffer_bytes", "Bytes in the audit buffer", func=lambda: self.journal.size)

    # -- what features call ----------------------------------------------------------------
    def record(self, event: AuditEvent) -> None:
        """Queue ``event``; from any thread; never blocks, never raises."""
        if self.enabled:
            self._queue(event)

    def defer(self, build: Callable[..., AuditEvent], *args: Any) -> None:
        """Queue ``build(*args)``, called on the writer's thread (plain, immutable arguments only)."""
        if self.enabled:
            self._queue((build, *args))

    def _queue(self, event: AuditEvent | tuple[Any, ...]) -> None:
        try:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                self._m_dropped.inc(reason="queue")
                return
            self._pending.append(event)
            if not self._signalled and self._wake is not None and self._loop is not None:
                self._signalled = True
                if threading.get_ident() == self._loop_thread:
                    self._wake.set()
                else:
                    self._loop.call_soon_threadsafe(self._wake.set)
        except Exception:  # an audit failure must never fail the request that caused it
            log.exception("audit: cannot record %s", getattr(event, "kind", event))

    def login(self, user: str, address: str, ok: bool, *, via: str, reason: str = "") -> None:
        """A login (HTTP user, DICOM calling AE): recorded as the watch says, bursts become alerts."""
        if not self.enabled:
            return
        now = time.time()
        if ok:
            if self.logins.success(user, address, now):
                self.record(events.user_authentication(user, address, True, via=via))
            return
        self.record(events.user_authentication(user, address, False, via=via, reason=reason))
        if count := self.logins.failure(address, now):
            text = f"{count} failed logins from {address} within {self.login_window:g} s (last: {via}, {reason})"
            self.record(events.security_alert(codes.USE_OF_RESTRICTED_FUNCTION, events.node(address), text,
                                              performer=events.peer(user, address, requestor=True)))

    def alert(self, kind: codes.Code, subject: events.ParticipantObject, text: str,
              performer: events.Participant | None = None, *, ok: bool = False) -> None:
        """A Security Alert about ``subject`` (a blocked AE, a script, a refused certificate);
        ``ok``: a change that took effect as it should (a script loaded), not a failure."""
        if self.enabled:
            self.record(events.security_alert(kind, subject, text, performer=performer, ok=ok))

    # -- application activity --------------------------------------------------------------
    def started(self) -> None:
        self.record(events.application_activity(True, _launcher()))

    def stopping(self) -> None:
        self.record(events.application_activity(False, _launcher()))

    # -- component -------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        await asyncio.to_thread(self._open)
        self._writer = self._loop.create_task(self._write_loop(), name="audit-writer")
        if self._pending:
            self._wake.set()
        for sender in self.senders:
            sender.start()
        log.info("audit trail: %d collector(s), buffer %s, file %s", len(self.senders), self.journal.folder,
                 self.file.path if self.file else "none")

    def _open(self) -> None:
        self.journal.open([s.collector.url for s in self.senders])
        path, max_bytes, keep = self._file_settings
        if path is not None:
            self.file = JsonLinesFile(path, max_bytes, keep)

    async def stop(self) -> None:
        if self._writer is None:
            return
        assert self._wake is not None
        self._stopping = True
        self._wake.set()
        await self._writer  # it drains the queue first
        await asyncio.gather(*(s.stop(STOP_GRACE) for s in self.senders))
        await asyncio.to_thread(self._close)
        self._writer = None

    def _close(self) -> None:
        self.journal.close()
        if self.file is not None:
            self.file.close()

    def health(self) -> dict[str, Any]:
        return {"ok": not self.full, "enabled": self.enabled, "bufferFull": self.full, "dropped": self.dropped,
                "bufferBytes": self.journal.size, "lastSequence": self.journal.last_seq,
                "collectors": [s.status() for s in self.senders]}

    def recent(self, limit: int = RECENT) -> list[dict[str, Any]]:
        """The latest ``limit`` stored events, newest first, as the JSON file writes them."""
        latest = list(self._recent)[-limit:] if limit > 0 else []
        return [as_json(event, self.source, seq) for event, seq in reversed(latest)]

    # -- the writer ------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            if not self._stopping:
                await asyncio.sleep(GATHER_SECONDS)
            self._wake.clear()
            batch = self._take()
            if batch:
                await asyncio.to_thread(self._persist, batch)
                for sender in self.senders:
                    sender.wake.set()
            if self._stopping and not self._pending:
                return

    def _take(self) -> list[AuditEvent | tuple[Any, ...]]:
        self._signalled = False
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        return batch

    def _persist(self, batch: list[AuditEvent | tuple[Any, ...]]) -> None:
        """On a worker thread: XML, syslog message, buffer, file; one fsync for the batch."""
        for item in batch:
            try:
                self._store(item[0](*item[1:]) if isinstance(item, tuple) else item)
            except Exception:
                log.exception("audit: cannot store %s", item)
        self.journal.sync()

    def _store(self, event: AuditEvent, *, reserve: bool = False) -> int:
        if self.full and not reserve and not self._resume():
            self._drop(event, "buffer_full")
            return 0
        message = self.framer.frame(to_xml(event, self.source), event.time, self.journal.next_seq)
        seq = self.journal.append(message, reserve=reserve)
        if seq == 0 and not reserve:
            self._filled()
            self._drop(event, "buffer_full")
            return 0
        self._m_events.inc(event=event.kind)
        self._recent.append((event, seq))
        if self.file is not None:
            self.file.write(event, self.source, seq)
        return seq

    def _drop(self, event: AuditEvent, reason: str) -> None:
        self.dropped += 1
        self._dropped_since_full += 1
        self._m_dropped.inc(reason=reason)
        if self.file is not None and reason == "buffer_full":
            self.file.write(event, self.source, 0)

    def _filled(self) -> None:
        self.full = True
        self._dropped_since_full = 0
        text = (f"the audit buffer {self.journal.folder} is full (Audit:BufferMaxMB); new audit messages are "
                "dropped until the collectors take the buffered ones")
        log.error("audit: %s", text)
        self._store(events.security_alert(codes.AUDIT_RECORDING_STOPPED, events.node(str(self.journal.folder)),
                                          text), reserve=True)
        self.bus.emit("audit.buffer_full", "Audit buffer full", text, "/dicomproxy/health",
                      folder=str(self.journal.folder))

    def _resume(self) -> bool:
        """While full: record "Audit Recording Started" once there is room again."""
        text = f"the audit buffer has room again; {self._dropped_since_full} audit message(s) were dropped"
        alert = events.security_alert(codes.AUDIT_RECORDING_STARTED, events.node(str(self.journal.folder)), text,
                                      ok=True)
        message = self.framer.frame(to_xml(alert, self.source), alert.time, self.journal.next_seq)
        if self.journal.size + len(message) + 4096 > self.journal.max_bytes:
            return False
        self.full = False
        log.warning("audit: %s", text)
        self._store(alert)
        return True

    def _refused(self, url: str, why: str) -> None:
        self.alert(codes.NODE_AUTHENTICATION, events.node(url, "audit collector"),
                   f"audit collector {url}: {why}")


def _collector(c: AuditCollector) -> Collector:
    return Collector.parse(c.url, ca_file=c.ca_file, cert_file=c.cert_file, key_file=c.key_file,
                           key_password=c.key_password, server_name=c.server_name, max_datagram=c.max_datagram)


def _launcher() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
