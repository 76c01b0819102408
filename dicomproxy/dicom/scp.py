"""The DICOM side's listening AE (pynetdicom): contexts, association policy, C-ECHO and the
C-STORE hot path. C-FIND is in ``find.py``, C-MOVE/C-GET in ``retrieve.py``.

C-STORE, in order: decode only if a script wants the dataset (``onCStore`` /
``ReceivedInstanceFilter``), apply the script's edits, write the instance durably to the spool,
hand it to the forwarder, and only then answer success. With no such script, the received
bytes are spooled as they are (never decoded and re-encoded), so compressed pixel data and
every element's original encoding pass through untouched.

Statuses a modality can see: 0x0124 (refused by a script), 0x0110 (a script failed, unless
``Lua:FailOpen``), 0xC210 (the dataset cannot be parsed), 0xA700 (the spool cannot be
written: disk full...). An unknown SOP class or transfer syntax is refused at association
time (presentation context rejected), as the standard intends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomproxy.dicom import datasets
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import Spool, SpoolEntry
from dicomproxy.settings import DicomSettings

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
QR_FIND = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
QR_MOVE = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
QR_GET = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)

STATUS_REFUSED = 0x0124
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_OUT_OF_RESOURCES = 0xA700


def set_nodelay(event: evt.Event) -> None:
    """pynetdicom leaves Nagle on: a C-STORE's command and data PDUs then wait ~40 ms for a
    delayed ACK. Every DICOM socket of the gateway turns it off."""
    with contextlib.suppress(Exception):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def status_dataset(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


class DicomServer:
    """Component: ``start()`` binds the AE (non-blocking server), ``stop()`` shuts it down."""

    def __init__(
        self,
        settings: DicomSettings,
        bridge: LuaBridge,
        spool: Spool,
        enqueue: Callable[[SpoolEntry], None],
        *,
        counters: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.bridge = bridge
        self.spool = spool
        self.enqueue = enqueue
        self.counters = counters or {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ae: AE | None = None
        self._server: Any = None
        self._sessions: dict[int, AssocSession] = {}
        self.error = ""
        # Imported here so the module graph stays one-way (find/retrieve use this module).
        from dicomproxy.dicom.find import FindService
        from dicomproxy.dicom.retrieve import RetrieveService

        self.find = FindService(self)
        self.retrieve = RetrieveService(self)

    # -- lifecycle ------------------------------------------------------------------------
    def make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.aet)
        ae.maximum_associations = 64
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 300
        ae.maximum_pdu_size = 1 << 20
        ae.require_called_aet = False
        if self.settings.allowed_calling_aets:
            ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:2])
        for cx in AllStoragePresentationContexts:
            # scu/scp roles accepted so a C-GET requester can take the SCP role for storage.
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for uid in (*QR_FIND, *QR_MOVE, *QR_GET):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES[:2])
        return ae

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.settings.port == 0:
            log.info("DICOM side is off (Dicom:Port is 0)")
            return
        self.ae = self.make_ae()
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self.find.handle),
            (evt.EVT_C_MOVE, self.retrieve.handle_move),
            (evt.EVT_C_GET, self.retrieve.handle_get),
        ]
        address = (self.settings.host, self.settings.port)
        try:
            self._server = await asyncio.to_thread(self.ae.start_server, address, block=False, evt_handlers=handlers)
        except OSError as e:
            self.error = f"cannot listen on {address[0]}:{address[1]}: {e.strerror or e}"
            raise RuntimeError(f"Dicom: {self.error} (change Dicom:Port or Dicom:Host)") from None
        log.info("DICOM AE %s listening on %s:%d", self.settings.aet, *address)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
        for session in list(self._sessions.values()):
            session.close()
        self._sessions.clear()

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def active_associations(self) -> int:
        return len(self._sessions)

    # -- associations ---------------------------------------------------------------------
    def session(self, assoc: Any) -> AssocSession:
        s = self._sessions.get(id(assoc))
        if s is None:  # not seen at EVT_REQUESTED (should not happen): build it from the assoc
            s = AssocSession(
                self.bridge,
                str(assoc.requestor.ae_title or ""),
                str(assoc.acceptor.ae_title or ""),
                str(assoc.requestor.address),
                int(assoc.requestor.port or 0),
                self.loop,
            )
            self._sessions[id(assoc)] = s
        return s

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = rq.calling_ae_title if rq is not None else ""
        called = rq.called_ae_title if rq is not None else ""
        session = AssocSession(
            self.bridge,
            str(calling),
            str(called),
            str(assoc.requestor.address),
            int(assoc.requestor.port or 0),
            self.loop,
        )
        self._sessions[id(assoc)] = session
        if not self.bridge.defines("onDicomAssociation"):
            return
        try:
            d = self.bridge.call("onDicomAssociation", session.table(), session=session)
            refused = d is not None and d.rejected
        except Exception as e:
            log.error("onDicomAssociation failed for %s: %s", session.calling, e)
            refused = not self.bridge.fail_open
        if refused:
            log.info(
                "association from %s (%s:%s) to %s refused by onDicomAssociation",
                session.calling,
                session.ip,
                session.port,
                session.called,
            )
            # Permanent, DUL service user, no reason given; kill() waits until the RJ is sent.
            assoc.acse.send_reject(0x01, 0x01, 0x01)
            assoc.kill()

    def _on_closed(self, event: evt.Event) -> None:
        session = self._sessions.pop(id(event.assoc), None)
        if session is not None:
            session.close()

    # -- C-ECHO ---------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        session = self.session(event.assoc)
        try:
            self.bridge.call("onCEcho", session.table(), session=session)
        except Exception as e:
            log.error("onCEcho failed: %s", e)
        return 0x0000

    # -- C-STORE --------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        metric = self.counters.get(name)
        if metric is not None:
            metric.inc()

    def _on_store(self, event: evt.Event) -> int | Dataset:
        session = self.session(event.assoc)
        rq = event.request
        ts = str(event.context.transfer_syntax)
        sop_class = str(rq.AffectedSOPClassUID)
        sop_instance = str(rq.AffectedSOPInstanceUID)
        raw = rq.DataSet.getvalue()
        if self.bridge.defines("onCStore", "ReceivedInstanceFilter"):
            outcome = self._scripted_store(session, raw, ts, sop_instance)
            if not isinstance(outcome, tuple):
                return outcome
            raw, header, sop_instance = outcome
        else:
            try:
                header = datasets.header_uids(raw, ts)
            except Exception as e:
                log.error("C-STORE %s from %s: cannot parse the dataset (%s)", sop_instance, session.calling, e)
                self._count("store_errors")
                return status_dataset(STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed")
        try:
            entry = self.spool.put(
                raw,
                sop_class=sop_class,
                sop_instance=sop_instance,
                transfer_syntax=ts,
                study=header.get("StudyInstanceUID", ""),
                series=header.get("SeriesInstanceUID", ""),
                patient_id=header.get("PatientID", ""),
                origin=session.table(),
            )
        except OSError as e:
            log.error("C-STORE %s from %s: spool write failed: %s", sop_instance, session.calling, e)
            self._count("store_errors")
            return status_dataset(STATUS_OUT_OF_RESOURCES, "gateway spool write failed")
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.enqueue, entry)
        self._count("received")
        return 0x0000

    def _scripted_store(
        self, session: AssocSession, raw: bytes, ts: str, sop_instance: str
    ) -> tuple[bytes, dict[str, str], str] | int | Dataset:
        try:
            ds = datasets.decode(raw, ts)
            table = datasets.dataset_to_table(ds)
        except Exception as e:
            log.error("C-STORE %s from %s: cannot decode the dataset (%s)", sop_instance, session.calling, e)
            self._count("store_errors")
            return status_dataset(STATUS_CANNOT_UNDERSTAND, "dataset cannot be decoded")
        changed = False
        try:
            d = self.bridge.call("onCStore", table, session.table(), session=session)
            if d is not None:
                if d.rejected:
                    log.info("C-STORE %s from %s rejected by onCStore", sop_instance, session.calling)
                    self._count("rejected")
                    return status_dataset(STATUS_REFUSED, "rejected by onCStore")
                edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
                changed = datasets.apply_table(ds, table, edited)
            if self.bridge.defines("ReceivedInstanceFilter"):
                info = {"HasPixelData": "PixelData" in ds, "TransferSyntaxUID": ts}
                view = datasets.dataset_to_table(ds) if changed else table
                d = self.bridge.call("ReceivedInstanceFilter", view, session.origin(), info, session=session)
                if d is not None and d.rejected:
                    log.info("C-STORE %s from %s rejected by ReceivedInstanceFilter", sop_instance, session.calling)
                    self._count("rejected")
                    return status_dataset(STATUS_REFUSED, "rejected by ReceivedInstanceFilter")
        except datasets.TableError as e:
            log.error("C-STORE %s: onCStore wrote an invalid value: %s", sop_instance, e)
            if not self.bridge.fail_open:
                return status_dataset(STATUS_PROCESSING_FAILURE, "script edit invalid")
            ds, changed = datasets.decode(raw, ts), False
        except Exception as e:
            log.error("C-STORE %s from %s: script failed: %s", sop_instance, session.calling, e)
            if not self.bridge.fail_open:
                self._count("store_errors")
                return status_dataset(STATUS_PROCESSING_FAILURE, "script failed")
            ds, changed = datasets.decode(raw, ts), False
        if changed:
            try:
                raw = datasets.encode(ds, ts)
            except Exception as e:
                log.error("C-STORE %s: the edited dataset cannot be encoded: %s", sop_instance, e)
                return status_dataset(STATUS_PROCESSING_FAILURE, "edited dataset cannot be encoded")
        header = {
            "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
            "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
            "PatientID": str(ds.get("PatientID", "") or ""),
        }
        return raw, header, str(ds.get("SOPInstanceUID", sop_instance) or sop_instance)
