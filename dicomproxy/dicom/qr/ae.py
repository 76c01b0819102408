"""The pynetdicom AE behind the DICOM port for Query/Retrieve associations: C-FIND (``find``),
C-MOVE/C-GET (``retrieve``), C-ECHO, and C-STORE when a storage context comes on the same
association (the same store path as everywhere, :mod:`dicomproxy.dicom.store`).

It listens on 127.0.0.1 on a port the OS picks; only the dispatcher's splices connect to it.
Associations reach it already decided (AE titles, ``onDicomAssociation``, the association
limits), so it accepts what it is handed; ``sessions`` maps each back to its Lua session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import presentation
from dicomproxy.dicom.policy import STATUS_NOT_AUTHORIZED, Operation
from dicomproxy.dicom.qr.find import FindService
from dicomproxy.dicom.qr.identifier import status_dataset
from dicomproxy.dicom.qr.retrieve import RetrieveService
from dicomproxy.dicom.qr.sessions import QrSessions
from dicomproxy.dicom.qr.upstream import set_nodelay
from dicomproxy.dicom.session import LuaBridge
from dicomproxy.dicom.store import StoreService

log = logging.getLogger(__name__)

QR_MODELS = (
    presentation.PATIENT_ROOT_FIND, presentation.STUDY_ROOT_FIND, presentation.PATIENT_ROOT_MOVE,
    presentation.STUDY_ROOT_MOVE, presentation.PATIENT_ROOT_GET, presentation.STUDY_ROOT_GET,
)


class QueryRetrieveAe:
    """Component: ``start()`` binds the AE on 127.0.0.1 (an OS-chosen port), ``stop()`` shuts it."""

    def __init__(
        self, settings: DicomSettings, bridge: LuaBridge, store: StoreService, *, max_associations: int,
        artim: float, idle: float,
    ) -> None:
        self.settings = settings
        self.bridge = bridge
        self.store = store
        self.max_associations = max_associations
        self.artim = artim
        self.idle = idle
        self.sessions = QrSessions(bridge)
        self.find = FindService(settings, bridge, self.sessions)
        self.retrieve = RetrieveService(settings, bridge, self.sessions)
        self.port = 0
        self._server: Any = None

    def make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.aet)
        ae.maximum_associations = self.max_associations
        ae.acse_timeout = self.artim
        ae.dimse_timeout = 120
        ae.network_timeout = self.idle
        ae.maximum_pdu_size = 1 << 20
        ae.require_called_aet = False
        syntaxes = list(presentation.TRANSFER_SYNTAXES)
        ae.add_supported_context(presentation.VERIFICATION, syntaxes[:2])
        for sop_class in sorted(presentation.STORAGE_SOP_CLASSES):
            # scu/scp roles accepted so a C-GET requester can take the SCP role for storage.
            ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
        for uid in QR_MODELS:
            ae.add_supported_context(uid, syntaxes[:2])
        return ae

    async def start(self) -> None:
        self.sessions.loop = asyncio.get_running_loop()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self.find.handle),
            (evt.EVT_C_MOVE, self.retrieve.handle_move),
            (evt.EVT_C_GET, self.retrieve.handle_get),
        ]
        ae = self.make_ae()
        self._server = await asyncio.to_thread(ae.start_server, ("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        log.debug("internal Q/R AE on 127.0.0.1:%d", self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
        self.sessions.close_all()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _on_closed(self, event: evt.Event) -> None:
        self.sessions.closed(event.assoc)

    def _on_echo(self, event: evt.Event) -> int:
        session = self.sessions.session(event.assoc)
        try:
            self.bridge.call("onCEcho", session.table(), session=session)
        except Exception as e:
            log.error("onCEcho failed: %s", e)
        return 0x0000

    def _on_store(self, event: evt.Event) -> int | Dataset:
        session = self.sessions.session(event.assoc)
        rq = cast(C_STORE, event.request)
        if not session.permits(Operation.STORE):
            return status_dataset(STATUS_NOT_AUTHORIZED, "not authorized")
        status, comment = self.store.store_blocking(
            session,
            rq.DataSet.getvalue(),  # type: ignore[union-attr]
            str(event.context.transfer_syntax),
            str(rq.AffectedSOPClassUID),
            str(rq.AffectedSOPInstanceUID),
        )
        return status_dataset(status, comment) if comment else status
