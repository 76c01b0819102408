"""The spool's API under ``/dicomproxy/spool`` (mounted through the Host interface; the built-in
role rules reserve the prefix for ``admin``, :mod:`dicomproxy.auth.policy`):

* ``GET /dicomproxy/spool``: what waits to be forwarded, per destination and study (waiting,
  in backoff, being sent, the next attempt), the failed count; ``?limit=`` studies (<= 1000);
* ``GET /dicomproxy/spool/failed``: the failed instances, oldest first, each with its ``id``,
  reason, attempts, first and last error, origin AE titles and address, study/series/SOP UIDs;
  ``?offset=`` and ``?limit=`` (<= 1000);
* ``POST /dicomproxy/spool/failed/{id}/retry``: back into the queue, attempts from zero
  (``409`` when the file is not a spool file the gateway can read);
* ``DELETE /dicomproxy/spool/failed/{id}``: the instance and its note are deleted (``204``).

An unknown id is ``404``. With ``Authentication`` off the gateway's whole API is open (as the
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

from dicomproxy.dicom.spool import Spool, SpoolEntry, SpoolError

log = logging.getLogger(__name__)

MAX_LIMIT = 1000


def _number(request: Request, name: str, default: int, most: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > most:
        return None
    return int(raw)


def _bad(name: str, most: int) -> Response:
    return JSONResponse({"error": f"{name} must be a whole number from 0 to {most}"}, status_code=400)


def build_spool_api(
    spool: Spool, snapshot: Callable[[int], list[dict[str, Any]]], enqueue: Callable[[SpoolEntry], None]
) -> Router:
    async def waiting(request: Request) -> Response:
        limit = _number(request, "limit", 100, MAX_LIMIT)
        if limit is None:
            return _bad("limit", MAX_LIMIT)
        return JSONResponse({"depth": spool.depth, "failed": spool.failed_count, "destinations": snapshot(limit)})

    async def failed(request: Request) -> Response:
        limit = _number(request, "limit", 100, MAX_LIMIT)
        offset = _number(request, "offset", 0, 1 << 31)
        if limit is None:
            return _bad("limit", MAX_LIMIT)
        if offset is None:
            return _bad("offset", 1 << 31)
        total, items = await asyncio.to_thread(spool.failed_list, offset, limit)
        return JSONResponse({"total": total, "offset": offset, "items": items})

    async def retry(request: Request) -> Response:
        failed_id = request.path_params["failed_id"]
        try:
            entry = await asyncio.to_thread(spool.restore, failed_id)
        except (SpoolError, OSError, ValueError) as e:
            return JSONResponse({"error": f"{failed_id} cannot be queued again: {e}"}, status_code=409)
        if entry is None:
            return JSONResponse({"error": f"no failed instance {failed_id}"}, status_code=404)
        enqueue(entry)
        log.info("failed instance %s (%s) queued again by %s", failed_id, entry.sop_instance,
                 request.scope.get("user") or "an anonymous caller")
        return JSONResponse({"queued": True, "seq": entry.seq, "SOPInstanceUID": entry.sop_instance})

    async def discard(request: Request) -> Response:
        failed_id = request.path_params["failed_id"]
        if not await asyncio.to_thread(spool.discard_failed, failed_id):
            return JSONResponse({"error": f"no failed instance {failed_id}"}, status_code=404)
        log.warning("failed instance %s discarded by %s", failed_id, request.scope.get("user") or "an anonymous caller")
        return Response(status_code=204)

    return Router(routes=[
        Route("/dicomproxy/spool", waiting, methods=["GET"]),
        Route("/dicomproxy/spool/failed", failed, methods=["GET"]),
        Route("/dicomproxy/spool/failed/{failed_id}/retry", retry, methods=["POST"]),
        Route("/dicomproxy/spool/failed/{failed_id}", discard, methods=["DELETE"]),
    ])
