"""The acceptor side of the Storage and Verification services (PS3.4 annexes A and B): one
accepted storage association, served on its own thread with a blocking socket.

Why a thread and not the event loop: storage is the hot path. A C-STORE is read, its data set
streamed into the spool file (:class:`.spool.SpoolWriter`), fsync'ed and answered on this one
thread, with no hand-off on the way (each hop between threads, or to and from the event loop,
cost ~0.3 ms here; pynetdicom's AE, which moves every message between three threads polling
with 1 ms sleeps, took about half of what Orthanc takes from the same storescu). The event loop
(forwarding, HTTP, Lua) never waits on a disk. Lua events are raised with
``dispatch_threadsafe`` (Lua runs on the loop) and only when a script defines them.

The upper layer is :mod:`.ul` (:class:`.ul.transport.SocketAssociation`), the DIMSE framing
:mod:`.dimse`; this module is the service: C-STORE, C-ECHO, C-CANCEL (nothing to cancel), any
other operation answered 0x0211 (unrecognised).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable

from dicomproxy.dicom import dimse
from dicomproxy.dicom.dimse import Command, MessageAssembler
from dicomproxy.dicom.policy import STATUS_NOT_AUTHORIZED, Operation
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import DatasetTooLarge, Spool, SpoolWriter
from dicomproxy.dicom.store import STATUS_OUT_OF_RESOURCES, StoreService
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.association import (
    CONNECTION_CLOSED,
    Aborted,
    Association,
    DataReceived,
    Indication,
    ReleaseRequested,
)
from dicomproxy.dicom.ul.transport import IdleTimeout, SocketAssociation

log = logging.getLogger(__name__)

STATUS_MISSING_DATASET = 0xC000
STATUS_UNRECOGNIZED = 0x0211
STATUS_PROCESSING_FAILURE = 0x0110


class _Abort(Exception):
    """Abort the association (the message is its one log line)."""


class _Incoming:
    """The data set of the request being received, and where its bytes go."""

    def __init__(self, context_id: int, command: Command, writer: SpoolWriter | None, status: int = 0) -> None:
        self.context_id = context_id
        self.command = command
        self.writer = writer  # None: the data set is read and dropped, then answered ``status``
        self.status = status or STATUS_UNRECOGNIZED
        self.error: OSError | None = None


class StorageScp:
    """One accepted storage association; :meth:`run` serves it until it ends."""

    def __init__(
        self,
        core: Association,
        sock: socket.socket,
        ac: pdus.A_ASSOCIATE_AC,
        session: AssocSession,
        bridge: LuaBridge,
        store: StoreService,
        spool: Spool,
        accepted: dict[int, str],
        abstract_of: dict[int, str],
        *,
        idle: float,
        max_dataset: int,
        on_end: Callable[[StorageScp], None],
    ) -> None:
        self.core = core
        self.sock = sock
        self.ac = ac
        self.idle = idle
        self.link: SocketAssociation | None = None
        self.session = session
        self.bridge = bridge
        self.store = store
        self.spool = spool
        self.accepted = accepted  # context id -> transfer syntax
        self.abstract_of = abstract_of
        self.max_dataset = max_dataset
        self.on_end = on_end
        self.assembler = MessageAssembler(accepted, self)
        self.incoming: _Incoming | None = None
        self.stopping = False

    @property
    def label(self) -> str:
        s = self.session
        return f"{s.calling} ({s.ip}:{s.port})"

    def run(self) -> None:
        """The association's thread: send the A-ASSOCIATE-AC, then serve until the end."""
        self.core.accept(self.ac, time.monotonic())
        link = self.link = SocketAssociation(self.core, self.sock, idle=self.idle)
        try:
            serve(link, self._handle, f"association from {self.label}", lambda: self.stopping)
        finally:
            if self.incoming is not None and self.incoming.writer is not None:
                self.incoming.writer.discard()
            link.close()
            self.session.close()
            self.on_end(self)

    def _handle(self, indication: Indication | None) -> None:
        assert self.link is not None
        if isinstance(indication, DataReceived):
            try:
                self.assembler.feed(indication.pdvs)
            except (dimse.DimseError, DatasetTooLarge, _Abort) as e:
                log.warning("association from %s aborted: %s", self.label, e)
                self.link.abort()
        elif isinstance(indication, ReleaseRequested):
            if self.assembler.idle:
                self.link.release_response()
            else:
                log.warning("association from %s aborted: release requested in the middle of a message", self.label)
                self.link.abort()
        elif isinstance(indication, Aborted):
            self._log_abort(indication)

    def _log_abort(self, indication: Aborted) -> None:
        if self.stopping:
            return
        if indication.by_peer:
            log.info("association from %s aborted by the peer", self.label)
        elif indication.detail == CONNECTION_CLOSED:
            log.info("association from %s: the peer vanished (connection closed)", self.label)
        else:
            log.warning("association from %s aborted: %s", self.label, indication.detail)

    # -- messages (MessageHandler) ------------------------------------------------------------
    def on_command(self, context_id: int, command: Command) -> None:
        field = command.field
        if field == dimse.C_STORE_RQ:
            if not command.has_dataset:
                self._respond(context_id, command, STATUS_MISSING_DATASET, "no data set")
                return
            if not self.session.permits(Operation.STORE):
                self.incoming = _Incoming(context_id, command, None, STATUS_NOT_AUTHORIZED)
                return
            writer = self.spool.begin(
                sop_class=self._sop_class(context_id, command),
                sop_instance=command.sop_instance,
                transfer_syntax=self.accepted[context_id],
                origin=self.session.table(),
                max_bytes=self.max_dataset,
            )
            self.incoming = _Incoming(context_id, command, writer)
        elif field == dimse.C_ECHO_RQ:
            try:
                self.bridge.call("onCEcho", self.session.table(), session=self.session)
            except Exception as e:
                log.error("onCEcho failed: %s", e)
            self._respond(context_id, command, 0x0000)
        elif field == dimse.C_CANCEL_RQ:
            return  # nothing to cancel on a storage association
        else:
            log.warning("association from %s: unsupported command 0x%04X", self.label, field)
            if command.has_dataset:
                self.incoming = _Incoming(context_id, command, None)
            else:
                self._respond(context_id, command, STATUS_UNRECOGNIZED, "unrecognized operation")

    def on_data(self, context_id: int, fragment: memoryview, last: bool) -> None:
        incoming = self.incoming
        if incoming is None:
            raise _Abort("data set fragment without a request")
        writer = incoming.writer
        if writer is not None and incoming.error is None:
            try:
                writer.write(fragment)
            except DatasetTooLarge:
                writer.discard()
                raise
            except OSError as e:  # disk full...: read the rest, answer "out of resources"
                incoming.error = e
                writer.discard()
        if last:
            self.incoming = None
            self._complete(incoming)

    def _complete(self, incoming: _Incoming) -> None:
        command, context_id = incoming.command, incoming.context_id
        if incoming.writer is None:
            why = "not authorized" if incoming.status == STATUS_NOT_AUTHORIZED else "unrecognized operation"
            self._respond(context_id, command, incoming.status, why)
            return
        if incoming.error is not None:
            log.error("C-STORE %s from %s: spool write failed: %s", command.sop_instance, self.label, incoming.error)
            self._respond(context_id, command, STATUS_OUT_OF_RESOURCES, "gateway spool write failed")
            return
        try:
            status, comment = self.store.store_received(self.session, incoming.writer)
        except Exception:
            log.exception("C-STORE %s from %s failed", command.sop_instance, self.label)
            incoming.writer.discard()
            status, comment = STATUS_PROCESSING_FAILURE, "gateway error"
        self._respond(context_id, command, status, comment)

    def _sop_class(self, context_id: int, command: Command) -> str:
        return command.sop_class or self.abstract_of.get(context_id, "")

    def _respond(self, context_id: int, command: Command, status: int, comment: str = "") -> None:
        raw = dimse.response(
            command.field | 0x8000, command.message_id, self._sop_class(context_id, command), status,
            command.sop_instance, comment,
        )
        assert self.link is not None
        max_pdu = self.core.peer_max_pdu
        self.link.send_pdata(pdus.p_data(context_id, raw, command=True, max_pdu=max_pdu))

    def shutdown(self) -> None:
        """From another thread (component stop): wake the blocked read and end the association."""
        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def serve(link: SocketAssociation, handle: Callable[[Indication | None], None], what: str,
          stopping: Callable[[], bool]) -> None:
    """One storage association's loop, for both storage SCPs (this one and :class:`.relay.RelayScp`):
    send what is queued (the A-ASSOCIATE-AC), then hand every indication to ``handle`` until the
    association ends; a peer silent past its idle limit is aborted; a failure is logged (``what``
    names the association) unless the gateway is stopping."""
    try:
        link.flush()
        if stopping():
            link.abort()
        while not link.core.closed:
            try:
                indication = link.receive()
            except IdleTimeout as e:
                log.warning("%s aborted: %s", what, e)
                link.abort()
                continue
            handle(indication)
    except Exception:
        if not stopping():
            log.exception("%s failed", what)
