"""QIDO-RS, WADO-RS and STOW-RS on the proxied path, as audit events.

A request is DICOMweb when its path is under ``Upstream:DicomWebRoot`` (one ``startswith`` for
every other request: the proxy is the hot path). What it is follows from the method and the
path (PS3.18 resources):

* GET ``/studies``, ``/series``, ``/instances`` and the same under a study or series: a Query
  (QIDO-RS), its object the search (``SearchForStudies``...) with the URL and its query string;
* any other GET under ``/studies/{study}``: a retrieve (WADO-RS), DICOM Instances Transferred
  (action R) of that study to the user;
* POST ``/studies[/{study}]``: a store (STOW-RS), DICOM Instances Transferred (action C).

The event is recorded when the response ends, with its outcome (a status below 400 is a
success) and the time the request started; the user is ``scope["user"]`` (authentication runs
outside this layer), the address the client's. The request pays for recognising the path and
queueing plain values (``AuditTrail.defer``): the event and its XML are built on the audit
writer's thread. Measured in tests/audit/test_web.py: building the event in the request cost
~7 µs, deferring it ~1-2 µs per QIDO-RS request.
"""

from __future__ import annotations

import time
from typing import Any

from dicomproxy.audit import codes, events
from dicomproxy.audit.events import SELF, AuditEvent, Participant, Study
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.host import Host

_SEARCHES = {
    ("studies",): "SearchForStudies",
    ("series",): "SearchForSeries",
    ("instances",): "SearchForInstances",
    ("studies", "series"): "SearchForStudySeries",
    ("studies", "instances"): "SearchForStudyInstances",
    ("studies", "series", "instances"): "SearchForStudySeriesInstances",
}


def install(host: Host) -> None:
    """The audit's health section, and (when the trail is on) the DICOMweb recogniser."""
    audit = host.audit
    host.add_health("audit", audit.health)
    if audit.enabled:
        root = host.settings.upstream.dicomweb_root
        host.add_middleware(lambda app: DicomWebAudit(app, audit, root))


def classify(method: str, rest: str) -> tuple[str, str, str] | None:
    """``(kind, search or study UID, series UID)`` of a DICOMweb path below the root, or None.

    ``kind`` is ``query``, ``retrieve`` or ``store``."""
    parts = tuple(rest.strip("/").split("/"))
    if parts[0] not in ("studies", "series", "instances") or "" in parts:
        return None
    study = parts[1] if len(parts) > 1 and parts[0] == "studies" else ""
    series = parts[3] if len(parts) > 3 and parts[2] == "series" else ""
    if method == "POST":
        return ("store", study, "") if parts[0] == "studies" and len(parts) <= 2 else None
    if method not in ("GET", "HEAD"):
        return None
    resources = parts[0::2]
    if len(parts) % 2 == 1 and resources in _SEARCHES:
        return "query", _SEARCHES[resources], study
    if study:
        return "retrieve", study, series
    return None


class DicomWebAudit:
    """ASGI layer: records a QIDO-RS / WADO-RS / STOW-RS request when its response ends."""

    def __init__(self, app: Any, audit: AuditTrail, root: str) -> None:
        self.app = app
        self.audit = audit
        self.prefix = root.rstrip("/") + "/"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        what = classify(scope["method"], path[len(self.prefix) - 1:])
        if what is None:
            await self.app(scope, receive, send)
            return
        started = time.time()
        status = 0

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            client = scope.get("client")
            self.audit.defer(request_event, what, scope.get("user"), client[0] if client else "", path,
                             scope.get("query_string", b""), status, started)


def request_event(what: tuple[str, str, str], user_name: str | None, address: str, path: str, query: bytes,
                  status: int, started: float) -> AuditEvent:
    """The audit event of one DICOMweb request (built on the audit writer's thread)."""
    kind, first, _series = what
    user = events.peer(str(user_name or "anonymous"), address, requestor=True)
    ok = 0 < status < 400
    reason = "" if ok else f"HTTP {status or 'no response'}"
    gateway = Participant(SELF, False)
    if kind == "query":
        url = path + ("?" + query.decode("latin-1") if query else "")
        user.role, gateway.role = codes.SOURCE, codes.DESTINATION
        event = events.query(user, gateway, events.qido_query(first, url), ok=ok, reason=reason)
    elif kind == "retrieve":
        user.role, gateway.role = codes.DESTINATION, codes.SOURCE
        event = events.instances_transferred([Study(first)], gateway, user, action="R", ok=ok, reason=reason)
    else:
        user.role, gateway.role = codes.SOURCE, codes.DESTINATION
        studies = [Study(first)] if first else []
        event = events.instances_transferred(studies, user, gateway, action="C", ok=ok, reason=reason)
    event.time = started
    return event
