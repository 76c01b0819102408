"""The gateway's own API: ``/dicomproxy/health``, ``/dicomproxy/metrics``, ``/dicomproxy/tasks``,
and the load-balancer probes ``/dicomproxy/health/live`` and ``/dicomproxy/health/ready``.

Tasks: ``GET /dicomproxy/tasks?state=`` (``queued``, ``running``, ``done``, ``failed``,
``quarantined``; the list leaves each task's log out and says ``logLines``), ``GET
/dicomproxy/tasks/{id}`` (with the log), ``POST /dicomproxy/tasks/{id}/rerun`` (a failed task,
by an admin or the task's owner; 409 when it has not failed; audited as a Security Alert, Use of
Restricted Function, success). A task another user owns is 404 to a non-admin, as if it did not
exist. Without authentication in front (``Authentication`` off) every caller may re-run, as the
rest of the gateway's API is open then.

The probes are plain ASGI answered before the front door, authentication, CORS and the Lua hooks
(``Gateway.__call__``): a probe every second must cost next to nothing, must not depend on a
script or the PACS (live), and says nothing but the phase, so it is open to anyone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from dicomproxy import __version__
from dicomproxy.audit import codes, events
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.cluster.redis import ClusterUnavailable
from dicomproxy.host import HealthCheck
from dicomproxy.metrics import CONTENT_TYPE, Metrics
from dicomproxy.scripting.host import ScriptHost
from dicomproxy.tasks import STATES, NotFailed, Queue, listed, matches, visible_to
from dicomproxy.upstream.monitor import UpstreamMonitor

log = logging.getLogger("dicomproxy.http.api")


class ApiSource(Protocol):
    """What the API reads: the gateway's state, not the gateway module."""

    started_at: float
    monitor: UpstreamMonitor
    lua: ScriptHost
    tasks: Queue
    metrics: Metrics
    audit: AuditTrail

    @property
    def health_checks(self) -> Mapping[str, HealthCheck]: ...


LIVE_PATH = "/dicomproxy/health/live"
READY_PATH = "/dicomproxy/health/ready"
PROBE_PATHS = frozenset({LIVE_PATH, READY_PATH})


class ReadySource(Protocol):
    def ready(self) -> tuple[bool, str]: ...


def probes(gateway: ReadySource) -> Any:
    """The ASGI app of both probes. live: 200 while the event loop answers. ready: 200 while the
    gateway serves (and, with ``Server:ReadyRequiresUpstream``, the PACS is up), else 503 with why."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == LIVE_PATH:
            status, body = 200, {"status": "live"}
        else:
            ok, why = gateway.ready()
            status, body = (200 if ok else 503), {"status": why}
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, {"error": "GET or HEAD only"}
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else raw})

    return app


def build_api(gateway: ApiSource) -> Router:
    async def health(request: Request) -> Response:
        if request.query_params.get("probe") in ("1", "true"):
            await gateway.monitor.probe()
        checks: dict[str, Any] = {"upstream": gateway.monitor.status()}
        for name, fn in gateway.health_checks.items():
            try:
                checks[name] = fn()
            except Exception as e:  # a broken check is a degraded gateway, not a 500
                checks[name] = {"ok": False, "error": str(e)}
        degraded = [n for n, c in checks.items() if isinstance(c, dict) and c.get("ok") is False]
        if request.scope.get("anonymous"):  # auth is on and no user: no paths, scripts or errors
            return JSONResponse({"status": "degraded" if degraded else "ok", "degraded": degraded,
                                 "version": __version__})
        scripts = gateway.lua.status()
        return JSONResponse({
            "status": "degraded" if degraded else "ok",
            "degraded": degraded,
            "version": __version__,
            "uptimeSeconds": round(time.time() - gateway.started_at, 1),
            "scripts": scripts,
            "tasks": gateway.tasks.counts(),
            **checks,
        })

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    async def tasks(request: Request) -> Response:
        state = request.query_params.get("state")
        if state and state not in STATES:
            return JSONResponse({"error": f"state: one of {', '.join(STATES)}"}, status_code=400)
        try:
            every = gateway.tasks.list()
        except ClusterUnavailable as e:  # Cluster:Redis down: say so, not a 500
            return JSONResponse({"error": str(e)}, status_code=503)
        items = [listed(t) for t in every if _visible(request, t) and (not state or matches(t, state))]
        return JSONResponse(items)

    async def rerun(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        item = gateway.tasks.get(task_id)
        if item is None or not _visible(request, item):
            return JSONResponse({"error": "no such task"}, status_code=404)
        if not may_rerun(request.scope, item):
            return JSONResponse({"error": "a task is run again by an admin or its owner"}, status_code=403)
        try:
            again = gateway.tasks.rerun(task_id)
        except NotFailed as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        user = str(request.scope.get("user") or "anonymous")
        log.warning("task %s (%s) run again by %s", task_id, item["title"], user)
        client = request.scope.get("client")
        gateway.audit.alert(codes.USE_OF_RESTRICTED_FUNCTION, events.task_object(task_id, item["title"]),
                            f"task {task_id} ({item['title']}) run again by {user}",
                            events.peer(user, client[0] if client else "", requestor=True), ok=True)
        return JSONResponse(listed(again) if again is not None else {}, status_code=202)

    async def task(request: Request) -> Response:
        try:
            item = gateway.tasks.get(request.path_params["task_id"])
        except ClusterUnavailable as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        if item is None or not _visible(request, item):  # someone else's: as if it did not exist
            return JSONResponse({"error": "no such task"}, status_code=404)
        return JSONResponse(item)

    def _visible(request: Request, task: dict[str, Any]) -> bool:
        return visible_to(task, request.scope.get("user"), "admin" in request.scope.get("roles", ()))

    return Router(routes=[
        Route("/dicomproxy/health", health),
        Route("/dicomproxy/metrics", metrics),
        Route("/dicomproxy/tasks", tasks),
        Route("/dicomproxy/tasks/{task_id}", task),
        Route("/dicomproxy/tasks/{task_id}/rerun", rerun, methods=["POST"]),
    ])


def may_rerun(scope: Mapping[str, Any], task: Mapping[str, Any]) -> bool:
    """An admin, the task's owner, or anyone when no authentication runs (no ``roles`` in the scope)."""
    roles = scope.get("roles")
    if roles is None:
        return True
    return "admin" in roles or (task.get("owner") is not None and task.get("owner") == scope.get("user"))
