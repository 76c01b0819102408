"""Relay mode (``Dicom:StoreMode`` ``Relay`` / ``RelayOrSpool``): one modality association mirrored
by one association to the PACS, served on one thread, and every C-STORE answered with the PACS's
own status, after the PACS gave it.

The mirror was negotiated before the modality's A-ASSOCIATE-AC was sent (:mod:`.negotiation`:
same AE titles, same contexts; the PACS's results are the modality's), so a context id means the
same on both sides and a data set is passed on exactly as it arrives: the command set re-encoded
as received, each data set fragment re-framed for the PACS's maximum PDU (views of the received
PDU, no copy), one PDU at a time. Nothing is decoded on the way, and a 300 MB instance costs a
few PDU buffers. Blocking writes to the PACS are the back-pressure: a slow PACS slows the reads
from the modality. Why one thread with two blocking sockets: the same reason as
:mod:`.storage_scp` (no hop between threads or to the loop per instance, ~0.3 ms each here).

Before the first byte goes to the PACS the data set must read as its negotiated transfer syntax
(:func:`.datasets.check_encoding`, its first 8 bytes): explicit VR on an implicit VR context is
answered 0xC210 and never reaches the PACS. With ``onCStore`` / ``ReceivedInstanceFilter`` the
data set is received whole (into a :class:`.spool.SpoolWriter`, streamed to disk past 1 MiB), the
scripts run on the loop, and the result is sent as one data set.

Spool copy: no durable copy is written while relaying (the PACS's answer is the acknowledgement;
an fsync per instance is what relaying saves). In ``RelayOrSpool`` the fragments of an instance
up to :data:`.spool.SPILL_BYTES` are kept (the PDU buffers, no copy), so if the PACS goes away in
the middle of that instance it is spooled and answered success instead, and the rest of the
association is served from the spool (:class:`.storage_scp.StorageScp`'s rules); a larger
instance caught that way is answered 0xA700 (the modality sends it again). In ``Relay`` the loss of
the PACS aborts the modality's association, as the loss of a direct connection would.

Transcoding (``Dicom:Transcode`` ``ToAccepted``): a context the PACS refused for its compressed
syntax but could take transcoded (:func:`.negotiation.transcoded`) has its data sets received
whole (like the scripted path), decoded and re-encoded on this thread (:mod:`.transcode`), and
sent on the PACS's uncompressed context for that SOP class; the answer is still the PACS's.
Other contexts are untouched: with ``Never`` nothing on the relay path changes.
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from dicomproxy.dicom import datasets, dimse
from dicomproxy.dicom.dimse import Command, MessageAssembler
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import SPILL_BYTES, DatasetTooLarge, Spool, SpoolWriter
from dicomproxy.dicom.storage_scp import serve
from dicomproxy.dicom.storage_scu import ResponseKeeper
from dicomproxy.dicom.store import Edited, StoreService
from dicomproxy.dicom.transcode import NO_TRANSCODING, TranscodeError, Transcoding
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.association import (
    Aborted,
    Association,
    DataReceived,
    Indication,
    ReleaseConfirmed,
    ReleaseRequested,
)
from dicomproxy.dicom.ul.requestor import Opened
from dicomproxy.dicom.ul.transport import IdleTimeout, SocketAssociation

log = logging.getLogger(__name__)

STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISSING_DATASET = 0xC000
STATUS_UNRECOGNIZED = 0x0211
STATUS_PROCESSING_FAILURE = 0x0110
HEAD_BYTES = 8
"""Bytes of a data set needed before it goes on (:func:`.datasets.check_encoding`; 4 KB deflated)."""


class Route(enum.Enum):
    """Where the data set being received goes."""

    HEAD = "head"  # its first bytes are collected for the encoding check
    PACS = "pacs"  # streamed to the PACS
    REFUSED = "refused"  # read and dropped; answered with a failure status
    SPOOL = "spool"  # written to the spool (the PACS went away): answered once durable
    SCRIPTED = "scripted"  # received whole for the scripts, then sent (or spooled)
    TRANSCODE = "transcode"  # received whole, transcoded, sent on the PACS's uncompressed context
    DROP = "drop"  # an unsupported operation's data set


class Link(enum.Enum):
    """The mirror association."""

    UP = "up"
    LOST = "lost"


class PacsLost(Exception):
    """The mirror association failed (the message says how)."""


class _Incoming:
    def __init__(self, context_id: int, command: Command, route: Route) -> None:
        self.context_id = context_id
        self.command = command
        self.route = route
        self.head = bytearray()
        self.kept: list[memoryview] | None = []  # the fragments so far (RelayOrSpool), None past SPILL_BYTES
        self.size = 0
        self.writer: SpoolWriter | None = None
        self.status = (0, "")
        self.started = time.perf_counter()
        self.pacs_context = context_id  # the context it goes to the PACS on (another one when transcoded)


Reporter = Callable[[AssocSession, Command, str, int, Callable[[], bytes | None], float], None]
"""``(session, request, transfer syntax, PACS status, the data set if it was kept, seconds since
the request arrived)``: the PACS answered a relayed C-STORE, and the modality has had that answer.
Called after the answer is sent, so that metrics, audit and hooks are not on the modality's path
(storescu waits for each answer before sending the next instance)."""


class RelayScp:
    """One relayed storage association; :meth:`run` serves it until it ends (its own thread)."""

    def __init__(
        self, core: Association, sock: socket.socket, ac: pdus.A_ASSOCIATE_AC, mirror: Opened, session: AssocSession,
        bridge: LuaBridge, store: StoreService, spool: Spool, accepted: dict[int, str], abstract_of: dict[int, str],
        *, fallback: bool, idle: float, timeout: float, max_dataset: int, report: Reporter,
        on_end: Callable[[RelayScp], None], transcoded: dict[int, tuple[int, str]] | None = None,
        transcoding: Transcoding = NO_TRANSCODING,
    ) -> None:
        self.core, self.sock, self.ac, self.mirror = core, sock, ac, mirror
        self.session, self.bridge, self.store, self.spool = session, bridge, store, spool
        self.accepted, self.abstract_of = accepted, abstract_of
        self.fallback, self.idle, self.timeout, self.max_dataset = fallback, idle, timeout, max_dataset
        self.report, self.on_end = report, on_end
        self.transcoded, self.transcoding = transcoded or {}, transcoding
        self.assembler = MessageAssembler(accepted, self)
        self.answer = ResponseKeeper()
        self.pacs_assembler = MessageAssembler({**accepted, **dict(self.transcoded.values())}, self.answer)
        self.incoming: _Incoming | None = None
        self.link: SocketAssociation | None = None
        self.pacs: SocketAssociation | None = None
        self.state = Link.UP
        self.stopping = False

    @property
    def label(self) -> str:
        s = self.session
        return f"{s.calling} ({s.ip}:{s.port})"

    # -- the thread --------------------------------------------------------------------------
    def run(self) -> None:
        self.core.accept(self.ac, time.monotonic())
        link = self.link = SocketAssociation(self.core, self.sock, idle=self.idle)
        self.pacs = SocketAssociation(self.mirror.core, self.mirror.sock, idle=self.timeout)
        try:
            serve(link, self._handle, f"relayed association from {self.label}", lambda: self.stopping)
        finally:
            if self.incoming is not None and self.incoming.writer is not None:
                self.incoming.writer.discard()
            link.close()
            self._end_pacs()
            self.session.close()
            self.on_end(self)

    def _handle(self, indication: Indication | None) -> None:
        assert self.link is not None
        if isinstance(indication, DataReceived):
            try:
                self.assembler.feed(indication.pdvs)
            except (dimse.DimseError, DatasetTooLarge) as e:
                log.warning("relayed association from %s aborted: %s", self.label, e)
                self.link.abort()
        elif isinstance(indication, ReleaseRequested):
            if self.assembler.idle:
                self._release_pacs()
                self.link.release_response()
            else:
                log.warning("relayed association from %s aborted: release in the middle of a message", self.label)
                self.link.abort()
        elif isinstance(indication, Aborted) and not self.stopping:
            log.info("relayed association from %s ended: %s", self.label, indication.detail or "aborted by the peer")

    # -- the modality's messages (MessageHandler) ------------------------------------------------
    def on_command(self, context_id: int, command: Command) -> None:
        field = command.field
        if field == dimse.C_STORE_RQ:
            if not command.has_dataset:
                self._respond(context_id, command, STATUS_MISSING_DATASET, "no data set")
                return
            self.incoming = self._begin(context_id, command)
        elif field == dimse.C_ECHO_RQ:
            self._echo(context_id, command)
        elif field == dimse.C_CANCEL_RQ:
            return
        elif command.has_dataset:
            self.incoming = _Incoming(context_id, command, Route.DROP)
        else:
            self._respond(context_id, command, STATUS_UNRECOGNIZED, "unrecognized operation")

    def _begin(self, context_id: int, command: Command) -> _Incoming:
        if self.store.scripted() or self.state is Link.LOST or context_id in self.transcoded:
            route = Route.SCRIPTED if self.store.scripted() else Route.SPOOL if self.state is Link.LOST \
                else Route.TRANSCODE
            incoming = _Incoming(context_id, command, route)
            incoming.writer = self._writer(context_id, command)
            return incoming
        return _Incoming(context_id, command, Route.HEAD)

    def _writer(self, context_id: int, command: Command) -> SpoolWriter:
        return self.spool.begin(
            sop_class=self._sop_class(context_id, command), sop_instance=command.sop_instance,
            transfer_syntax=self.accepted[context_id], origin=self.session.table(), max_bytes=self.max_dataset,
        )

    def on_data(self, context_id: int, fragment: memoryview, last: bool) -> None:
        incoming = self.incoming
        if incoming is None:
            raise dimse.DimseError("data set fragment without a request")
        incoming.size += len(fragment)
        if self.max_dataset and incoming.size > self.max_dataset:
            raise DatasetTooLarge(f"data set larger than {self.max_dataset >> 20} MB (Dicom:MaxDatasetMB)")
        route = incoming.route
        if route is Route.HEAD:
            self._head(incoming, fragment, last)
        elif route is Route.PACS:
            self._keep(incoming, fragment)
            self._to_pacs(incoming, fragment, last)
        elif route in (Route.SPOOL, Route.SCRIPTED, Route.TRANSCODE):
            assert incoming.writer is not None
            incoming.writer.write(fragment)
        if last:
            self.incoming = None
            self._complete(incoming)

    def _keep(self, incoming: _Incoming, fragment: memoryview) -> None:
        if incoming.kept is not None:
            if self.fallback and incoming.size <= SPILL_BYTES:
                incoming.kept.append(fragment)
            else:
                incoming.kept = None

    def _head(self, incoming: _Incoming, fragment: memoryview, last: bool) -> None:
        incoming.head += fragment
        ts = self.accepted[incoming.context_id]
        if len(incoming.head) < (4096 if datasets.syntax_flags(ts)[2] else HEAD_BYTES) and not last:
            return
        head, incoming.head = memoryview(bytes(incoming.head)), bytearray()
        try:
            datasets.check_encoding(head, ts)
        except datasets.EncodingMismatch as e:
            log.error("C-STORE %s from %s refused: %s", incoming.command.sop_instance, self.label, e)
            incoming.route, incoming.status = Route.REFUSED, (STATUS_CANNOT_UNDERSTAND, "data set does not match "
                                                                                        "its transfer syntax")
            return
        incoming.route = Route.PACS
        self._keep(incoming, head)
        raw = dimse.encode_command(incoming.command.elements.items())  # the modality's, as received
        cid = incoming.context_id  # the request and the data set's head in one write
        self._send(incoming, [*self._pdata(cid, raw, command=True, last=True),
                              *self._pdata(cid, head, command=False, last=last)])

    # -- towards the PACS -----------------------------------------------------------------------
    def _send_request(self, incoming: _Incoming) -> None:
        raw = dimse.encode_command(incoming.command.elements.items())  # the modality's, as received
        self._send(incoming, self._pdata(incoming.pacs_context, raw, command=True, last=True))

    def _to_pacs(self, incoming: _Incoming, fragment: memoryview, last: bool) -> None:
        if incoming.route is Route.PACS:
            self._send(incoming, self._pdata(incoming.pacs_context, fragment, command=False, last=last))

    def _send(self, incoming: _Incoming | None, encoded: list[Any]) -> bool:
        """Write to the PACS (a failed write closes the mirror: then :meth:`_lost`)."""
        pacs = self.pacs
        assert pacs is not None
        if pacs.core.established:
            pacs.send_pdata(encoded)
            if pacs.core.established:
                return True
        self._lost(incoming, "the connection to the PACS was lost")
        return False

    def _pdata(self, context_id: int, payload: bytes | memoryview, *, command: bool, last: bool) -> list[Any]:
        assert self.pacs is not None
        return pdus.p_data(context_id, payload, command=command, max_pdu=self.pacs.core.peer_max_pdu, last=last)

    def _pacs_answer(self, message_id: int) -> Command:
        """The PACS's response to the request just sent (raises :class:`PacsLost`)."""
        assert self.pacs is not None
        self.answer.command = None
        while True:
            try:
                indication = self.pacs.receive()
            except IdleTimeout:
                self.pacs.abort()
                raise PacsLost(f"no answer from the PACS within {self.timeout:g} s") from None
            if isinstance(indication, DataReceived):
                try:
                    self.pacs_assembler.feed(indication.pdvs)
                except dimse.DimseError as e:
                    self.pacs.abort()
                    raise PacsLost(f"malformed answer from the PACS ({e})") from None
                command = self.answer.command
                if command is not None and command.us(dimse.MESSAGE_ID_RESPONDED) == message_id:
                    return command
            elif isinstance(indication, Aborted):
                raise PacsLost(f"the PACS aborted the association ({indication.detail or 'A-ABORT'})")
            elif isinstance(indication, ReleaseRequested):
                self.pacs.release_response()
                raise PacsLost("the PACS released the association during an operation")
            elif self.pacs.core.closed:
                raise PacsLost("the PACS closed the connection")

    def _lost(self, incoming: _Incoming | None, why: str) -> None:
        """The mirror is gone: spool what can be spooled (RelayOrSpool), else abort (Relay)."""
        if self.state is Link.LOST:
            return
        self.state = Link.LOST
        log.warning("relayed association from %s: %s; %s", self.label, why,
                    "serving it from the spool" if self.fallback else "aborting it")
        assert self.pacs is not None and self.link is not None
        self.pacs.abort()
        if not self.fallback:
            self.link.abort()
            if incoming is not None:
                incoming.route = Route.DROP
            return
        if incoming is None:
            return
        if incoming.kept is not None:
            incoming.writer = self._writer(incoming.context_id, incoming.command)
            for part in incoming.kept:
                incoming.writer.write(part)
            incoming.kept, incoming.route = None, Route.SPOOL
        else:
            incoming.route, incoming.status = Route.REFUSED, (STATUS_OUT_OF_RESOURCES, "PACS connection lost; "
                                                                                       "send the instance again")

    # -- answers --------------------------------------------------------------------------------
    def _complete(self, incoming: _Incoming) -> None:
        """Answer the message just received (a C-STORE timed into ``dicomproxy_dicom_store_seconds``:
        from its complete data set to the answer, the PACS's round trip or the spool's fsync)."""
        if incoming.route is Route.DROP:
            if self.state is Link.UP or self.fallback:
                self._respond(incoming.context_id, incoming.command, STATUS_UNRECOGNIZED, "unrecognized operation")
            return
        started = time.perf_counter()
        try:
            self._answer_store(incoming)
        finally:
            self.store.observe_answer(time.perf_counter() - started)

    def _answer_store(self, incoming: _Incoming) -> None:
        command, context_id, route = incoming.command, incoming.context_id, incoming.route
        if route is Route.REFUSED:
            self._respond(context_id, command, *incoming.status)
        elif route is Route.SPOOL:
            assert incoming.writer is not None
            self._respond(context_id, command, *self._spool(incoming.writer))
        elif route is Route.SCRIPTED:
            self._scripted(incoming)
        elif route is Route.TRANSCODE:
            writer = incoming.writer
            assert writer is not None
            raw = writer.dataset()
            writer.discard()
            self._send_whole(incoming, raw)
        else:
            self._relayed(incoming, None)

    def _relayed(self, incoming: _Incoming, edited: bytes | None) -> None:
        command, context_id = incoming.command, incoming.context_id
        try:
            answer = self._pacs_answer(command.message_id)
        except PacsLost as e:
            kept = incoming.kept
            self._lost(incoming if edited is None else None, str(e))
            if self.fallback and (edited is not None or kept is not None):
                writer = self._writer(context_id, command)
                for part in [memoryview(edited)] if edited is not None else (kept or []):
                    writer.write(part)
                self._respond(context_id, command, *self._spool(writer))
            elif self.fallback:
                self._respond(context_id, command, STATUS_OUT_OF_RESOURCES, "PACS connection lost; send it again")
            return
        status = answer.status()
        seconds = time.perf_counter() - incoming.started
        self._respond(context_id, command, status.status, status.comment)  # the modality first: bookkeeping after
        kept = incoming.kept
        self.report(self.session, command, self.accepted[context_id], status.status,
                    (lambda: edited) if edited is not None else (lambda: _joined(kept)), seconds)

    def _scripted(self, incoming: _Incoming) -> None:
        command, context_id = incoming.command, incoming.context_id
        writer = incoming.writer
        assert writer is not None
        ts = self.accepted[context_id]
        raw = writer.dataset()
        writer.discard()
        try:
            outcome = self.store.edit_blocking(self.session, raw, ts, command.sop_instance)
        except Exception:
            log.exception("C-STORE %s from %s: the scripts failed", command.sop_instance, self.label)
            outcome = (STATUS_PROCESSING_FAILURE, "gateway error")
        if not isinstance(outcome, Edited):
            self._respond(context_id, command, *outcome)
            return
        if outcome.destinations != ("default",):
            log.error("C-STORE %s from %s: onCStore chose %s, but this association is relayed to Dicom:Upstream: "
                      "set Dicom:StoreMode StoreAndForward, or route it with Dicom:Routes (which serves it from the "
                      "spool)", command.sop_instance, self.label, ", ".join(outcome.destinations))
            self._respond(context_id, command, STATUS_PROCESSING_FAILURE, "destinations need store-and-forward")
            return
        self._send_whole(incoming, outcome.raw)

    def _send_whole(self, incoming: _Incoming, raw: bytes) -> None:
        """Send a data set received whole (edited by the scripts, or to transcode: then on the PACS's
        uncompressed context); spooled as it is (not transcoded) when the PACS is gone."""
        command, context_id = incoming.command, incoming.context_id
        if self.state is Link.LOST:
            spooled = self._writer(context_id, command)
            spooled.write(memoryview(raw))
            self._respond(context_id, command, *self._spool(spooled))
            return
        data = raw
        if context_id in self.transcoded:
            incoming.pacs_context, to_syntax = self.transcoded[context_id]
            try:
                data = self.transcoding.run(raw, self.accepted[context_id], to_syntax,
                                            f"{command.sop_instance} from {self.label}")
            except TranscodeError as e:
                self._respond(context_id, command, STATUS_PROCESSING_FAILURE, f"cannot transcode: {e}"[:64])
                return
        incoming.route, incoming.kept = Route.PACS, None
        self._send_request(incoming)
        self._to_pacs(incoming, memoryview(data), True)
        if incoming.route is Route.PACS:
            self._relayed(incoming, raw)
        elif self.fallback:
            spooled = self._writer(context_id, command)
            spooled.write(memoryview(raw))
            self._respond(context_id, command, *self._spool(spooled))

    def _spool(self, writer: SpoolWriter) -> tuple[int, str]:
        try:
            return self.store.store_received(self.session, writer, timed=False)
        except Exception:
            log.exception("C-STORE %s from %s failed", writer.sop_instance, self.label)
            writer.discard()
            return STATUS_PROCESSING_FAILURE, "gateway error"

    def _echo(self, context_id: int, command: Command) -> None:
        try:
            self.bridge.call("onCEcho", self.session.table(), session=self.session)
        except Exception as e:
            log.error("onCEcho failed: %s", e)
        status, comment = 0x0000, ""
        if self.state is Link.UP and self._send(None, self._pdata(context_id, dimse.c_echo_rq(command.message_id),
                                                                   command=True, last=True)):
            try:
                answer = self._pacs_answer(command.message_id).status()
                status, comment = answer.status, answer.comment
            except PacsLost as e:
                self._lost(None, str(e))
        if self.state is Link.LOST and not self.fallback:
            return
        self._respond(context_id, command, status, comment)

    def _sop_class(self, context_id: int, command: Command) -> str:
        return command.sop_class or self.abstract_of.get(context_id, "")

    def _respond(self, context_id: int, command: Command, status: int, comment: str = "") -> None:
        assert self.link is not None
        if self.link.core.closed or not self.link.core.established:
            return
        raw = dimse.response(command.field | 0x8000, command.message_id, self._sop_class(context_id, command), status,
                             command.sop_instance, comment)
        self.link.send_pdata(pdus.p_data(context_id, raw, command=True, max_pdu=self.core.peer_max_pdu))

    # -- ending ---------------------------------------------------------------------------------
    def _release_pacs(self) -> None:
        pacs = self.pacs
        if pacs is None or self.state is Link.LOST or not pacs.core.established:
            return
        deadline = time.monotonic() + 5.0
        try:
            pacs.core.release(time.monotonic())
            pacs.flush()
            while not pacs.core.closed and time.monotonic() < deadline:
                if isinstance(pacs.receive(), ReleaseConfirmed):
                    break
        except (OSError, IdleTimeout):
            pass
        self.state = Link.LOST

    def _end_pacs(self) -> None:
        if self.pacs is not None and self.state is Link.UP:
            self.pacs.abort()
        self.mirror.close()

    def shutdown(self) -> None:
        """From another thread (component stop): wake the blocked reads and end the association."""
        self.stopping = True
        for sock in (self.sock, self.mirror.sock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _joined(parts: list[memoryview] | None) -> bytes | None:
    return b"".join(parts) if parts else None
