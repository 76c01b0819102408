"""The gateway's own API: ``/dicomproxy/health``, ``/dicomproxy/metrics``, ``/dicomproxy/tasks``,
and the load-balancer probes ``/dicomproxy/health/live`` and ``/dicomproxy/health/ready``.

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
from dicomproxy.host import HealthCheck
from dicomproxy.metrics import CONTENT_TYPE, Metrics
from dicomproxy.scripting.host import ScriptHost
from dicomproxy.tasks import TaskQueue, visible_to
from dicomproxy.upstream.monitor import UpstreamMonitor

log = logging.getLogger("dicomproxy.http.api")


class ApiSource(Protocol):
    """What the API reads: the gateway's state, not the gateway module."""

    started_at: float
    monitor: UpstreamMonitor
    lua: ScriptHost
    tasks: TaskQueue
    metrics: Metrics

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
        items = [t for t in gateway.tasks.list() if _visible(request, t)]
        state = request.query_params.get("state")
        if state:
            items = [t for t in items if t["state"] == state]
        return JSONResponse(items)

    async def task(request: Request) -> Response:
        item = gateway.tasks.get(request.path_params["task_id"])
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
    ])
