"""The gateway's own API: ``/dicomproxy/health``, ``/dicomproxy/metrics``, ``/dicomproxy/tasks``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, Router

from dicomproxy import __version__

if TYPE_CHECKING:
    from dicomproxy.app import Gateway

log = logging.getLogger("dicomproxy.api")


class UpstreamMonitor:
    """Probes ``Upstream:Url`` periodically; emits ``upstream.down`` / ``upstream.up`` on changes."""

    def __init__(self, gateway: Gateway, interval: float = 10.0) -> None:
        self.gateway = gateway
        self.interval = interval
        self.reachable: bool | None = None
        self.latency_ms: float | None = None
        self.error: str | None = None
        self.checked: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def probe(self) -> bool:
        session = await self.gateway.upstream.session()
        started = time.perf_counter()
        try:
            async with session.get(self.gateway.upstream.url("/"), allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
            ok, error = True, None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, error = False, str(e) or type(e).__name__
        self.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        self.checked = time.time()
        self.error = error
        if ok != self.reachable:
            if self.reachable is not None or not ok:
                bus = self.gateway.bus
                if ok:
                    bus.emit("upstream.up", "PACS reachable again", self.gateway.upstream.base, "/dicomproxy/ui")
                else:
                    bus.emit("upstream.down", "PACS unreachable", f"{self.gateway.upstream.base}: {error}",
                             "/dicomproxy/ui")
            self.reachable = ok
        return ok

    async def _run(self) -> None:
        while True:
            try:
                await self.probe()
            except Exception:
                log.exception("upstream probe failed")
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def status(self) -> dict[str, Any]:
        return {"ok": bool(self.reachable), "url": self.gateway.upstream.base, "reachable": self.reachable,
                "latencyMs": self.latency_ms, "error": self.error, "checked": self.checked}


def build_api(gateway: Gateway) -> Router:
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
        scripts = gateway.host.status()
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
        return PlainTextResponse(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    async def tasks(request: Request) -> Response:
        items = gateway.tasks.list()
        state = request.query_params.get("state")
        if state:
            items = [t for t in items if t["state"] == state]
        return JSONResponse(items)

    async def task(request: Request) -> Response:
        item = gateway.tasks.get(request.path_params["task_id"])
        if item is None:
            return JSONResponse({"error": "no such task"}, status_code=404)
        return JSONResponse(item)

    return Router(routes=[
        Route("/dicomproxy/health", health),
        Route("/dicomproxy/metrics", metrics),
        Route("/dicomproxy/tasks", tasks),
        Route("/dicomproxy/tasks/{task_id}", task),
    ])
