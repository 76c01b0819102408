"""Is the PACS reachable over HTTP? A periodic probe of ``Upstream:Url`` whose state health and
the status page show, and whose changes raise ``upstream.down`` / ``upstream.up``.

The probe is a ``GET /`` through the gateway's one upstream client (the proxy's pool, its TLS
and timeouts), with an overall limit of ``PROBE_TIMEOUT`` seconds; any answer counts as reachable."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from dicomproxy.notify.events import EventBus
from dicomproxy.upstream.upstream import Upstream

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0


class UpstreamMonitor:
    """Probes ``Upstream:Url`` periodically; emits ``upstream.down`` / ``upstream.up`` on changes."""

    def __init__(self, upstream: Upstream, bus: EventBus, interval: float = 10.0) -> None:
        self.upstream = upstream
        self.bus = bus
        self.interval = interval
        self.reachable: bool | None = None
        self.latency_ms: float | None = None
        self.error: str | None = None
        self.checked: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def probe(self) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.upstream.client.get(self.upstream.url("/"), follow_redirects=False)
            ok, error = True, None
        except TimeoutError:
            ok, error = False, f"no answer within {PROBE_TIMEOUT:g} s"
        except (httpx.HTTPError, OSError) as e:
            ok, error = False, str(e) or type(e).__name__
        self.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        self.checked = time.time()
        self.error = error
        if ok != self.reachable:
            if self.reachable is not None or not ok:
                bus = self.bus
                if ok:
                    bus.emit("upstream.up", "PACS reachable again", self.upstream.base, "/dicomproxy/ui")
                else:
                    bus.emit("upstream.down", "PACS unreachable", f"{self.upstream.base}: {error}",
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
        return {"ok": bool(self.reachable), "url": self.upstream.base, "reachable": self.reachable,
                "latencyMs": self.latency_ms, "error": self.error, "checked": self.checked}
