"""C-FIND through the gateway: ``onCFind`` / ``IncomingFindRequestFilter`` may edit the query,
the PACS answers (a C-FIND of our own, same information model), and every match passes
``onCFindResult`` (edit it, or return false to drop it) on its way back.

A C-CANCEL from the requester is passed on upstream (C-CANCEL on our association to the PACS),
so a cancelled query stops costing the PACS anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import datasets
from dicomproxy.dicom.policy import STATUS_NOT_AUTHORIZED, Operation
from dicomproxy.dicom.qr import identifier as ident
from dicomproxy.dicom.qr import upstream
from dicomproxy.dicom.qr.identifier import status_dataset
from dicomproxy.dicom.qr.sessions import QrSessions
from dicomproxy.dicom.session import AssocSession, LuaBridge

log = logging.getLogger(__name__)

STATUS_UNABLE = 0xC000
STATUS_UPSTREAM = 0xA700
STATUS_CANNOT_DECODE = 0xC310
PENDING = (0xFF00, 0xFF01)


class FindService:
    def __init__(self, settings: DicomSettings, bridge: LuaBridge, sessions: QrSessions) -> None:
        self.settings = settings
        self.bridge = bridge
        self.sessions = sessions

    def handle(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        session = self.sessions.session(event.assoc)
        model = str(event.request.AffectedSOPClassUID)
        if not session.permits(Operation.FIND):
            yield status_dataset(STATUS_NOT_AUTHORIZED, "not authorized"), None
            return
        try:
            identifier = ident.decoded(event.identifier)
        except Exception as e:
            log.error("C-FIND from %s: cannot decode the identifier: %s", session.calling, e)
            yield status_dataset(STATUS_CANNOT_DECODE, "identifier cannot be decoded"), None
            return
        try:
            identifier, refused = ident.edit(self.bridge, session, identifier, "onCFind")
        except Exception as e:
            log.error("C-FIND from %s: script failed: %s", session.calling, e)
            if not self.bridge.fail_open:
                yield status_dataset(STATUS_UNABLE, "script failed"), None
                return
            refused = None
        if refused:
            log.info("C-FIND from %s %s", session.calling, refused)
            yield status_dataset(STATUS_UNABLE, refused), None
            return
        up = upstream.associate(self.settings, upstream.requestor(self.settings, [model]))
        if not up.is_established:
            log.error("C-FIND from %s: cannot associate with the PACS %s", session.calling,
                      upstream.describe(self.settings))
            yield status_dataset(STATUS_UPSTREAM, "PACS unreachable"), None
            return
        try:
            yield from self._relay(event, session, up, identifier, model)
        finally:
            if up.is_established:
                up.release()

    def _relay(
        self, event: evt.Event, session: AssocSession, up: Any, identifier: Dataset, model: str
    ) -> Iterator[tuple[Any, Dataset | None]]:
        want_results = self.bridge.defines("onCFindResult")
        cancelled = False
        for status, match in up.send_c_find(identifier, model, msg_id=1):
            if not cancelled and event.is_cancelled:
                log.info("C-FIND from %s cancelled; cancelling upstream", session.calling)
                up.send_c_cancel(1, query_model=model)
                cancelled = True
            if cancelled:
                continue  # drain what the PACS still sends until its final response
            if "Status" not in status:
                log.error("C-FIND from %s: the PACS did not answer (timeout or abort)", session.calling)
                yield status_dataset(STATUS_UPSTREAM, "PACS did not answer"), None
                return
            code = int(status.Status)
            if code in PENDING:
                if match is None:
                    continue
                if want_results:
                    try:
                        match = self._edit_result(session, match)
                    except Exception as e:
                        log.error("onCFindResult failed: %s", e)
                        if not self.bridge.fail_open:
                            yield status_dataset(STATUS_UNABLE, "script failed"), None
                            return
                    if match is None:
                        continue
                yield 0xFF00, match
            elif code == 0x0000:
                break
            elif code == 0xFE00:
                cancelled = True
            else:
                log.warning("C-FIND: the PACS answered 0x%04X", code)
                yield status, None
                return
        if cancelled:
            yield 0xFE00, None

    def _edit_result(self, session: AssocSession, match: Dataset) -> Dataset | None:
        table = datasets.dataset_to_table(match)
        d = self.bridge.call("onCFindResult", table, session.table(), session=session)
        if d is None:
            return match
        if d.rejected:
            return None
        edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
        datasets.apply_table(match, table, edited)
        return match
