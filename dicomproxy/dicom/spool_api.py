"""The spool's API under ``/dicomproxy/spool`` (mounted through the Host interface; the built-in
role rules reserve the prefix for ``admin``, :mod:`dicomproxy.auth.policy`):

* ``GET /dicomproxy/spool``: what waits to be forwarded, per destination and study (waiting,
  in backoff, being sent, the next attempt), the failed count; ``?limit=`` studies (<= 1000);
* ``GET /dicomproxy/spool/failed``: the failed instances, oldest first, each with its ``id``,
  reason, attempts, first and last error, origin AE titles and address, study/series/SOP UIDs;
  ``?offset=`` and ``?limit=`` (<= 1000); ``?study=UID``: that study's only;
* ``GET /dicomproxy/spool/failed/studies``: the failed folder grouped by study (instances, bytes,
  first and last failure, the highest attempt count, statuses, the three most frequent reasons
  with their counts), the study that failed first first; ``?offset=``, ``?limit=`` (<= 1000
  studies). 100 000 failed instances are a page of groups, never 100 000 rows;
* ``POST /dicomproxy/spool/failed/{id}/retry``: back into the queue, attempts from zero
  (``409`` when the file is not a spool file the gateway can read);
* ``DELETE /dicomproxy/spool/failed/{id}``: the instance and its note are deleted (``204``);
* ``POST /dicomproxy/spool/failed/studies/{study}/retry`` and ``DELETE .../studies/{study}``:
  the same for every failed instance of a study (at most ``MAX_BULK`` per call; the answer says
  how many, call again for the rest).

Every retry and discard is recorded in the audit trail (``Audit:Enabled``) as DICOM Instances
Accessed (PS3.15 A.5.3.5; action ``U`` for a retry, ``D`` for a discard) with the user, their
address, the study and patient, and in the log. An unknown id is ``404``.

With ``Authentication`` off the gateway's whole API is open (as the
PACS's is through the proxy); keep ``Urls`` on loopback then, the default.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from dicomproxy.audit import events
from dicomproxy.audit.events import Study
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.dicom.spool import FailedSummary, Spool, SpoolEntry, SpoolError

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
MAX_BULK = 10_000  # failed instances one per-study retry or discard handles


def _user(request: Request) -> str:
    return str(request.scope.get("user") or "anonymous")


def _studies(items: list[tuple[str, str, str]]) -> list[Study]:
    """``(study, patient, SOP class)`` of each instance touched, as the audit's studies."""
    out: dict[str, Study] = {}
    for study, patient, sop_class in items:
        s = out.get(study)
        if s is None:
            s = out[study] = Study(study, patient_id=patient)
        s.add(sop_class or "unknown")
    return list(out.values())


class SpoolAudit:
    """Retries and discards as audit events (DICOM Instances Accessed) and log lines."""

    def __init__(self, trail: AuditTrail | None) -> None:
        self.trail = trail

    def record(self, request: Request, action: str, items: list[tuple[str, str, str]], what: str) -> None:
        user = _user(request)
        log.warning("%s by %s", what, user)
        if self.trail is None or not self.trail.enabled or not items:
            return
        client = request.scope.get("client")
        who = events.peer(user, client[0] if client else "", requestor=True)
        self.trail.record(events.instances_accessed(_studies(items), who, action=action, description=what))


def _number(request: Request, name: str, default: int, most: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > most:
        return None
    return int(raw)


def _bad(name: str, most: int) -> Response:
    return JSONResponse({"error": f"{name} must be a whole number from 0 to {most}"}, status_code=400)


MAX_OFFSET = 1 << 31


def _paging(request: Request, default_limit: int) -> tuple[int, int] | Response:
    """``(limit, offset)`` from the query, or the 400 that names the bad one."""
    limit = _number(request, "limit", default_limit, MAX_LIMIT)
    if limit is None:
        return _bad("limit", MAX_LIMIT)
    offset = _number(request, "offset", 0, MAX_OFFSET)
    if offset is None:
        return _bad("offset", MAX_OFFSET)
    return limit, offset


def build_spool_api(
    spool: Spool, snapshot: Callable[[int], list[dict[str, Any]]], enqueue: Callable[[SpoolEntry], None],
    audit: AuditTrail | None = None,
) -> Router:
    trail = SpoolAudit(audit)

    async def waiting(request: Request) -> Response:
        limit = _number(request, "limit", 100, MAX_LIMIT)
        if limit is None:
            return _bad("limit", MAX_LIMIT)
        return JSONResponse({"depth": spool.depth, "failed": spool.failed_count, "destinations": snapshot(limit)})

    async def failed(request: Request) -> Response:
        paging = _paging(request, 100)
        if isinstance(paging, Response):
            return paging
        limit, offset = paging
        study = request.query_params.get("study")
        total, items = await asyncio.to_thread(spool.failed_list, offset, limit, study)
        return JSONResponse({"total": total, "offset": offset, "items": items})

    async def failed_studies(request: Request) -> Response:
        paging = _paging(request, 50)
        if isinstance(paging, Response):
            return paging
        limit, offset = paging
        studies, instances, groups = await asyncio.to_thread(spool.failed_studies, offset, limit)
        return JSONResponse({"studies": studies, "instances": instances, "offset": offset, "limit": limit,
                             "groups": groups})

    async def retry(request: Request) -> Response:
        failed_id = request.path_params["failed_id"]
        try:
            entry = await asyncio.to_thread(spool.restore, failed_id)
        except (SpoolError, OSError, ValueError) as e:
            return JSONResponse({"error": f"{failed_id} cannot be queued again: {e}"}, status_code=409)
        if entry is None:
            return JSONResponse({"error": f"no failed instance {failed_id}"}, status_code=404)
        enqueue(entry)
        trail.record(request, "U", [(entry.study, entry.patient_id, entry.sop_class)],
                     f"failed instance {failed_id} ({entry.sop_instance}) queued again")
        return JSONResponse({"queued": True, "seq": entry.seq, "SOPInstanceUID": entry.sop_instance})

    async def discard(request: Request) -> Response:
        failed_id = request.path_params["failed_id"]
        gone = await asyncio.to_thread(spool.discard_failed, failed_id)
        if gone is None:
            return JSONResponse({"error": f"no failed instance {failed_id}"}, status_code=404)
        trail.record(request, "D", [(gone.study, gone.patient, gone.sop_class)],
                     f"failed instance {failed_id} discarded")
        return Response(status_code=204)

    def _restore_study(study: str) -> tuple[list[SpoolEntry], list[str], int]:
        ids = spool.failed_ids(study)
        done, refused = [], []
        for failed_id in ids[:MAX_BULK]:
            try:
                entry = spool.restore(failed_id)
            except (SpoolError, OSError, ValueError) as e:
                refused.append(f"{failed_id}: {e}")
                continue
            if entry is not None:
                done.append(entry)
        return done, refused, max(0, len(ids) - MAX_BULK)

    def _discard_study(study: str) -> tuple[list[FailedSummary], int]:
        ids = spool.failed_ids(study)
        gone = [g for g in (spool.discard_failed(i) for i in ids[:MAX_BULK]) if g is not None]
        return gone, max(0, len(ids) - MAX_BULK)

    async def retry_study(request: Request) -> Response:
        study = request.path_params["study"]
        entries, refused, left = await asyncio.to_thread(_restore_study, study)
        if not entries and not refused:
            return JSONResponse({"error": f"no failed instance of study {study}"}, status_code=404)
        for entry in entries:
            enqueue(entry)
        trail.record(request, "U", [(e.study, e.patient_id, e.sop_class) for e in entries],
                     f"{len(entries)} failed instance(s) of study {study} queued again")
        return JSONResponse({"queued": len(entries), "refused": refused[:20], "left": left})

    async def discard_study(request: Request) -> Response:
        study = request.path_params["study"]
        gone, left = await asyncio.to_thread(_discard_study, study)
        if not gone:
            return JSONResponse({"error": f"no failed instance of study {study}"}, status_code=404)
        trail.record(request, "D", [(g.study, g.patient, g.sop_class) for g in gone],
                     f"{len(gone)} failed instance(s) of study {study} discarded")
        return JSONResponse({"discarded": len(gone), "left": left})

    return Router(routes=[
        Route("/dicomproxy/spool", waiting, methods=["GET"]),
        Route("/dicomproxy/spool/failed", failed, methods=["GET"]),
        Route("/dicomproxy/spool/failed/studies", failed_studies, methods=["GET"]),
        Route("/dicomproxy/spool/failed/studies/{study}/retry", retry_study, methods=["POST"]),
        Route("/dicomproxy/spool/failed/studies/{study}", discard_study, methods=["DELETE"]),
        Route("/dicomproxy/spool/failed/{failed_id}/retry", retry, methods=["POST"]),
        Route("/dicomproxy/spool/failed/{failed_id}", discard, methods=["DELETE"]),
    ])
