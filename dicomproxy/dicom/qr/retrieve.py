"""C-MOVE and C-GET through the gateway, implemented with C-GET from the PACS.

Why C-GET upstream rather than C-MOVE: a C-MOVE to the PACS would make the PACS open a new
association back to the gateway, so the PACS would have to know the gateway's AE title, host
and port, the network would have to allow the reverse connection, and the incoming instances
would have to be matched to the request they belong to. C-GET brings the instances back on the
association the gateway opened itself: no PACS configuration, no reverse path, no matching.

For each request:

1. ``onCMove(request, assoc)`` / ``onCGet(request, assoc)`` may edit the identifier or refuse;
2. a C-FIND at IMAGE level lists the matching instances (their number is the sub-operation
   count the requester sees; their SOP classes are the storage contexts we propose);
3. a C-GET to the PACS streams the instances in; each one is handed to pynetdicom as soon as it
   arrives, which C-STOREs it to the move destination (C-MOVE: a ``Dicom:Modalities`` entry,
   else status 0xA801) or back on the requester's association (C-GET). pynetdicom reports
   remaining/completed/failed/warning counts as it goes.

A C-CANCEL stops the upstream C-GET; instances the PACS failed to deliver are reported as
failed sub-operations (final status 0xB000, or 0xA702 if none could be delivered).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.presentation import PresentationContext

from dicomproxy.config.settings import DicomSettings, RemoteAe
from dicomproxy.dicom import presentation
from dicomproxy.dicom.policy import STATUS_NOT_AUTHORIZED, Operation
from dicomproxy.dicom.qr import identifier as ident
from dicomproxy.dicom.qr import upstream
from dicomproxy.dicom.qr.identifier import status_dataset
from dicomproxy.dicom.qr.sessions import QrSessions
from dicomproxy.dicom.session import AssocSession, LuaBridge

log = logging.getLogger(__name__)

STATUS_UNABLE = 0xC000
STATUS_SUBOPS_FAILED = 0xA702
STATUS_WARNING = 0xB000
STATUS_UNKNOWN_DESTINATION = 0xA801
QUEUE_DEPTH = 16


def storage_contexts(sop_classes: list[str], reserved: int = 0) -> list[PresentationContext]:
    """The retrieve contexts of :func:`presentation.retrieve_pairs`, as pynetdicom contexts."""
    return [build_context(sc, ts) for sc, ts in presentation.retrieve_pairs(sop_classes, reserved)]


def _refusal_kwargs(target: RemoteAe) -> dict[str, Any]:
    """pynetdicom associates with the destination before it reads the (failure) status; an
    association needs one context: Verification, the cheapest."""
    return {"ae_title": target.aet, "contexts": [build_context(presentation.VERIFICATION)]}


def _models(request_model: str) -> tuple[str, str]:
    if request_model.startswith("1.2.840.10008.5.1.4.1.2.1."):  # Patient Root
        return presentation.PATIENT_ROOT_FIND, presentation.PATIENT_ROOT_GET
    return presentation.STUDY_ROOT_FIND, presentation.STUDY_ROOT_GET


class RetrieveService:
    def __init__(self, settings: DicomSettings, bridge: LuaBridge, sessions: QrSessions) -> None:
        self.settings = settings
        self.bridge = bridge
        self.sessions = sessions

    # -- handlers (pynetdicom threads) ----------------------------------------------------
    def handle_move(self, event: evt.Event) -> Iterator[Any]:
        session = self.sessions.session(event.assoc)
        destination = str(event.move_destination or "").strip()
        target = self._destination(destination)
        if target is None:
            log.error(
                "C-MOVE from %s: unknown destination %r (declare it in Dicom:Modalities)", session.calling, destination
            )
            yield None, None
            return
        if not session.permits(Operation.MOVE):  # after the destination check, as pynetdicom orders them
            yield target.host, target.port, {**_refusal_kwargs(target), **upstream.tls_kwargs(target, self.settings)}
            yield 1
            yield status_dataset(STATUS_NOT_AUTHORIZED, "not authorized"), None
            return
        prepared = self._prepare(event, session, "onCMove")
        if isinstance(prepared, str):
            # pynetdicom answers plain success to zero sub-operations, so a refusal is one
            # failed sub-operation with the reason in the Error Comment.
            yield target.host, target.port, {**_refusal_kwargs(target), **upstream.tls_kwargs(target, self.settings)}
            yield 1
            yield status_dataset(STATUS_UNABLE, prepared), None
            return
        identifier, _find_model, get_model, instances = prepared
        sop_classes = sorted({sc for _, sc in instances})
        kwargs: dict[str, Any] = {"ae_title": target.aet, "evt_handlers": [(evt.EVT_CONN_OPEN, upstream.set_nodelay)],
                                  **upstream.tls_kwargs(target, self.settings)}
        contexts = storage_contexts(sop_classes)
        if contexts:
            kwargs["contexts"] = contexts
        yield target.host, target.port, kwargs
        yield len(instances)
        yield from self._stream(event, session, identifier, get_model, instances)

    def handle_get(self, event: evt.Event) -> Iterator[Any]:
        session = self.sessions.session(event.assoc)
        if not session.permits(Operation.GET):
            yield 1
            yield status_dataset(STATUS_NOT_AUTHORIZED, "not authorized"), None
            return
        prepared = self._prepare(event, session, "onCGet")
        if isinstance(prepared, str):
            yield 1
            yield status_dataset(STATUS_UNABLE, prepared), None
            return
        identifier, _find_model, get_model, instances = prepared
        yield len(instances)
        yield from self._stream(event, session, identifier, get_model, instances)

    # -- steps ----------------------------------------------------------------------------
    def _destination(self, aet: str) -> RemoteAe | None:
        modalities = self.settings.modalities
        for ae in modalities.values():
            if ae.aet.strip() == aet:
                return ae
        for name, ae in modalities.items():
            if name.lower() == aet.lower():
                return ae
        return None

    def _prepare(
        self, event: evt.Event, session: AssocSession, event_name: str
    ) -> tuple[Dataset, str, str, list[tuple[str, str]]] | str:
        try:
            identifier = ident.decoded(event.identifier)
        except Exception as e:
            log.error("%s from %s: cannot decode the identifier: %s", event_name[2:], session.calling, e)
            return "identifier cannot be decoded"
        try:
            identifier, refused = ident.edit(self.bridge, session, identifier, event_name)
        except Exception as e:
            log.error("%s failed: %s", event_name, e)
            if not self.bridge.fail_open:
                return "script failed"
            refused = None
        if refused:
            log.info("%s from %s %s", event_name[2:], session.calling, refused)
            return refused
        find_model, get_model = _models(str(event.request.AffectedSOPClassUID))
        try:
            instances = self._enumerate(identifier, find_model)
        except RuntimeError as e:
            log.error("%s from %s: %s", event_name[2:], session.calling, e)
            return str(e)
        return identifier, find_model, get_model, instances

    def _enumerate(self, identifier: Dataset, find_model: str) -> list[tuple[str, str]]:
        """(SOPInstanceUID, SOPClassUID) of every instance the request designates."""
        query = Dataset()
        for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = identifier.get(kw, "")
            setattr(query, kw, value if value is not None else "")
        query.QueryRetrieveLevel = "IMAGE"
        query.SOPClassUID = ""
        up = upstream.associate(self.settings, upstream.requestor(self.settings, [find_model]))
        if not up.is_established:
            raise RuntimeError("PACS unreachable")
        out: list[tuple[str, str]] = []
        try:
            for status, match in up.send_c_find(query, find_model):
                if "Status" not in status:
                    raise RuntimeError("PACS did not answer the C-FIND")
                if status.Status in (0xFF00, 0xFF01) and match is not None:
                    out.append((str(match.get("SOPInstanceUID", "")), str(match.get("SOPClassUID", ""))))
                elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                    raise RuntimeError(f"PACS answered the C-FIND with 0x{status.Status:04X}")
        finally:
            if up.is_established:
                up.release()
        return [(uid, sc) for uid, sc in out if uid]

    def _stream(
        self,
        event: evt.Event,
        session: AssocSession,
        identifier: Dataset,
        get_model: str,
        instances: list[tuple[str, str]],
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if not instances:
            return
        items: queue.Queue[tuple[str, Any]] = queue.Queue(QUEUE_DEPTH)
        stop = threading.Event()
        fetch = threading.Thread(
            target=self._fetch,
            args=(identifier, get_model, sorted({sc for _, sc in instances}), items, stop),
            name="dicom-cget-upstream",
            daemon=True,
        )
        fetch.start()
        expected = {uid for uid, _ in instances}
        delivered: set[str] = set()
        error = ""
        try:
            while True:
                if event.is_cancelled or not event.assoc.is_established:
                    stop.set()
                    failed = Dataset()
                    failed.FailedSOPInstanceUIDList = sorted(expected - delivered)
                    log.info("retrieve from %s cancelled after %d instance(s)", session.calling, len(delivered))
                    yield 0xFE00, failed
                    return
                try:
                    kind, value = items.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "dataset":
                    delivered.add(str(value.get("SOPInstanceUID", "")))
                    yield 0xFF00, value
                elif kind == "error":
                    error = value
                elif kind == "done":
                    break
        finally:
            stop.set()
        missing = sorted(expected - delivered)
        if missing:
            log.error(
                "retrieve for %s: %d of %d instance(s) not delivered by the PACS%s",
                session.calling,
                len(missing),
                len(expected),
                f" ({error})" if error else "",
            )
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = missing
            yield (STATUS_WARNING if delivered else STATUS_SUBOPS_FAILED), failed

    def _fetch(
        self,
        identifier: Dataset,
        get_model: str,
        sop_classes: list[str],
        items: queue.Queue[tuple[str, Any]],
        stop: threading.Event,
    ) -> None:
        """Thread: C-GET from the PACS, each received instance put on ``items``."""

        def put(kind: str, value: Any) -> bool:
            while not stop.is_set():
                try:
                    items.put((kind, value), timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def on_store(ev: evt.Event) -> int:
            if stop.is_set():
                return 0xA700
            try:
                ds = ev.dataset
                ds.file_meta = ev.file_meta
            except Exception as e:
                log.error("C-GET from the PACS: undecodable instance: %s", e)
                return 0xC210
            return 0x0000 if put("dataset", ds) else 0xA700

        ae = upstream.requestor(self.settings)
        contexts = [build_context(get_model, [presentation.IMPLICIT, presentation.EXPLICIT])]
        contexts += storage_contexts(sop_classes, reserved=1)
        roles = [build_role(sc, scp_role=True) for sc in sop_classes]
        try:
            up = upstream.associate(
                self.settings, ae, contexts=contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
            if not up.is_established:
                put("error", "cannot associate with the PACS for C-GET")
                return
            try:
                query = Dataset()
                for elem in identifier:
                    query.add(elem)
                for status, _ in up.send_c_get(query, get_model, msg_id=1):
                    if stop.is_set():
                        up.abort()
                        return
                    if "Status" not in status:
                        put("error", "the PACS did not answer the C-GET")
                        break
                    code = int(status.Status)
                    if code not in (0x0000, 0xFF00, 0xFF01) and code != STATUS_WARNING:
                        put("error", f"the PACS answered the C-GET with 0x{code:04X}")
            finally:
                if up.is_established:
                    up.release()
        except Exception as e:  # never leave the requester waiting on a dead thread
            log.exception("C-GET from the PACS failed")
            put("error", str(e))
        finally:
            put("done", None)
