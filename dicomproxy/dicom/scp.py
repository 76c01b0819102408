"""The pynetdicom AE behind the DICOM port: Query/Retrieve associations (C-FIND in
``find.py``, C-MOVE/C-GET in ``retrieve.py``) and any association that proposes them.

Storage associations are served by ``acceptor.py`` (one thread each); everything else is
handed over to this AE, which listens on a private loopback port. Instances that arrive here
anyway (storage contexts next to Q/R ones on one association) take the same C-STORE path
(``store.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
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

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.store import StoreService

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
    """Component: ``start()`` binds the AE on 127.0.0.1 (an OS-chosen port), ``stop()`` shuts it."""

    def __init__(self, settings: DicomSettings, bridge: LuaBridge, store: StoreService | None,
                 audit: DicomAudit | None = None) -> None:
        self.settings = settings
        self.audit = audit or DicomAudit(None, settings, "dimse")
        self.bridge = bridge
        self.store = store
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ae: AE | None = None
        self.port = 0
        self._server: Any = None
        self._sessions: dict[int, AssocSession] = {}
        self._peers: dict[int, tuple[str, int]] = {}
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
            ae.require_calling_aet = [a.strip() for a in self.settings.allowed_calling_aets]
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:2])
        for cx in AllStoragePresentationContexts:
            # scu/scp roles accepted so a C-GET requester can take the SCP role for storage.
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for uid in (*QR_FIND, *QR_MOVE, *QR_GET):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES[:2])
        return ae

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
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
        self._server = await asyncio.to_thread(
            self.ae.start_server, ("127.0.0.1", 0), block=False, evt_handlers=handlers
        )
        self.port = int(self._server.server_address[1])
        log.debug("internal Q/R AE on 127.0.0.1:%d", self.port)

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

    # -- peers handed over by the listener ---------------------------------------------------
    def remember_peer(self, local_port: int, ip: str, port: int) -> None:
        self._peers[local_port] = (ip, port)

    def forget_peer(self, local_port: int) -> None:
        self._peers.pop(local_port, None)

    def _peer(self, assoc: Any) -> tuple[str, int]:
        ip, port = str(assoc.requestor.address), int(assoc.requestor.port or 0)
        return self._peers.get(port, (ip, port)) if ip == "127.0.0.1" else (ip, port)

    # -- associations ---------------------------------------------------------------------
    def session(self, assoc: Any) -> AssocSession:
        s = self._sessions.get(id(assoc))
        if s is None:  # not seen at EVT_REQUESTED (should not happen): build it from the assoc
            ip, port = self._peer(assoc)
            s = AssocSession(
                self.bridge,
                str(assoc.requestor.ae_title or ""),
                str(assoc.acceptor.ae_title or ""),
                ip,
                port,
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
        allowed = [a.strip() for a in self.settings.allowed_calling_aets]
        if allowed and session.calling not in allowed:  # pynetdicom refuses it (require_calling_aet)
            self.audit.association(session, "not in Dicom:AllowedCallingAets", blocked=True)
            return
        refused = self.bridge.refuses_association(session)
        self.audit.association(session, "refused by onDicomAssociation" if refused else "", blocked=refused)
        if refused:
            # Permanent, DUL service user, no reason given; kill() waits until the RJ is sent.
            assoc.acse.send_reject(0x01, 0x01, 0x01)
            assoc.kill()

    def _on_closed(self, event: evt.Event) -> None:
        session = self._sessions.pop(id(event.assoc), None)
        if session is not None:
            self.audit.ended(session)
            session.close()

    # -- C-ECHO ---------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        session = self.session(event.assoc)
        try:
            self.bridge.call("onCEcho", session.table(), session=session)
        except Exception as e:
            log.error("onCEcho failed: %s", e)
        return 0x0000

    # -- C-STORE (mixed associations) ------------------------------------------------------
    def _on_store(self, event: evt.Event) -> int | Dataset:
        session = self.session(event.assoc)
        rq = event.request
        assert self.store is not None
        status, comment = self.store.store_blocking(
            session,
            rq.DataSet.getvalue(),
            str(event.context.transfer_syntax),
            str(rq.AffectedSOPClassUID),
            str(rq.AffectedSOPInstanceUID),
        )
        return status_dataset(status, comment) if comment else status
