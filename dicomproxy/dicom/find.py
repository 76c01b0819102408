"""C-FIND through the gateway: ``onCFind`` / ``IncomingFindRequestFilter`` may edit the query,
the PACS answers (a C-FIND of our own, same information model), and every match passes
``onCFindResult`` (edit it, or return false to drop it) on its way back.

A C-CANCEL from the requester is passed on upstream (C-CANCEL on our association to the PACS),
so a cancelled query stops costing the PACS anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from dicomproxy.dicom import datasets

if TYPE_CHECKING:
    from dicomproxy.dicom.scp import DicomServer
    from dicomproxy.dicom.session import AssocSession

log = logging.getLogger(__name__)

STATUS_UNABLE = 0xC000
STATUS_UPSTREAM = 0xA700
PENDING = (0xFF00, 0xFF01)


def upstream_ae(server: DicomServer, *models: str) -> AE:
    """A requester AE for queries to the PACS (calling AE title = ``Dicom:Aet``)."""
    from dicomproxy.dicom.scp import TRANSFER_SYNTAXES

    ae = AE(ae_title=server.settings.aet)
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    for model in models:
        ae.add_requested_context(model, TRANSFER_SYNTAXES[:2])
    return ae


def edit_query(
    server: DicomServer, session: AssocSession, identifier: Dataset, event_name: str
) -> tuple[Dataset, str | None]:
    """Run ``event_name`` (onCFind/onCMove/onCGet) and, for C-FIND, ``IncomingFindRequestFilter``
    on ``identifier``. Returns the edited identifier and, if a script refused, why."""
    bridge = server.bridge
    table = datasets.dataset_to_table(identifier)
    d = bridge.call(event_name, table, session.table(), session=session)
    if d is not None:
        if d.rejected:
            return identifier, f"refused by {event_name}"
        edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
        datasets.apply_table(identifier, table, edited)
    if event_name == "onCFind" and bridge.defines("IncomingFindRequestFilter"):
        table = datasets.dataset_to_table(identifier)
        d = bridge.call("IncomingFindRequestFilter", table, session.origin(), session=session)
        if d is not None:
            if d.rejected:
                return identifier, "refused by IncomingFindRequestFilter"
            returned = [r for r in d.results if isinstance(r, dict)]
            edited = returned[-1] if returned else (d.args[0] if d.args and isinstance(d.args[0], dict) else table)
            datasets.apply_table(identifier, table, edited)
    return identifier, None


class FindService:
    def __init__(self, server: DicomServer) -> None:
        self.server = server

    def handle(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        from dicomproxy.dicom.scp import set_nodelay, status_dataset

        server = self.server
        session = server.session(event.assoc)
        model = str(event.request.AffectedSOPClassUID)
        try:
            identifier = event.identifier
            for _elem in identifier:  # decode every element now: a bad identifier fails here
                pass
        except Exception as e:
            log.error("C-FIND from %s: cannot decode the identifier: %s", session.calling, e)
            yield status_dataset(0xC310, "identifier cannot be decoded"), None
            return
        server.audit.query(session, event)
        try:
            identifier, refused = edit_query(server, session, identifier, "onCFind")
        except Exception as e:
            log.error("C-FIND from %s: script failed: %s", session.calling, e)
            if not server.bridge.fail_open:
                yield status_dataset(STATUS_UNABLE, "script failed"), None
                return
            refused = None
        if refused:
            log.info("C-FIND from %s %s", session.calling, refused)
            yield status_dataset(STATUS_UNABLE, refused), None
            return

        up_cfg = server.settings.upstream
        ae = upstream_ae(server, model)
        up = ae.associate(
            up_cfg.host, up_cfg.port, ae_title=up_cfg.aet, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
        )
        if not up.is_established:
            log.error(
                "C-FIND from %s: cannot associate with the PACS %s@%s:%s",
                session.calling,
                up_cfg.aet,
                up_cfg.host,
                up_cfg.port,
            )
            yield status_dataset(STATUS_UPSTREAM, "PACS unreachable"), None
            return
        want_results = server.bridge.defines("onCFindResult")
        cancelled = False
        try:
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
                            if not server.bridge.fail_open:
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
        finally:
            if up.is_established:
                up.release()

    def _edit_result(self, session: AssocSession, match: Dataset) -> Dataset | None:
        table = datasets.dataset_to_table(match)
        d = self.server.bridge.call("onCFindResult", table, session.table(), session=session)
        if d is None:
            return match
        if d.rejected:
            return None
        edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
        datasets.apply_table(match, table, edited)
        return match
