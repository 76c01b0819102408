"""The status page at ``/dicomproxy/ui``: the gateway, live, for a person.

The page is static HTML/JS/CSS from ``static/`` (no build step, no CDN: tus-js-client's
browser build is vendored there with its license). Its script reads the gateway's own API
from the browser: ``/dicomproxy/health`` (upstream HTTP reachability, scripts and the last
reload error, the DICOM spool depth), ``/dicomproxy/tasks``, ``/dicomproxy/notifications``
(+ its SSE stream) and ``/dicomproxy/ui/status.json``, which adds what no other route says:
whether the PACS answers a C-ECHO on ``Dicom:Upstream`` (through the ``echo`` command of the
DICOM side, at most every ``ECHO_INTERVAL`` seconds however many pages poll). Uploads go to
the TUS endpoint.

The operator's view adds, under the same prefix:

* ``history?since=SEQ``: the last hour of the gateway's metrics for the graphs, deltas only
  (:mod:`.history`; drawn with the vendored uPlot, MIT, ``static/uPlot.*``);
* ``scripts/source?script=NAME`` (admin): a script's source, read-only, for the error's line;
* ``check`` (POST, admin, same origin only): ``dicomproxy check`` run in the gateway;
* ``audit?limit=N`` (admin): the latest audit events, from memory (``AuditTrail.recent``).

The spool panel (``static/panels.js``) reads ``/dicomproxy/spool`` (admin only: a viewer's page
says so and shows no buttons) and acts through it; the tasks panel reads ``/dicomproxy/tasks``
(filter, log, re-run). ``status.json`` says who the page is for (``you``: user, roles, admin), so
that it shows only the buttons the API would accept.

The admin routes are gated by the built-in rules of :mod:`dicomproxy.auth.policy`.

Authentication is the gateway's: every mounted route is behind it, so the page, its API calls
and the uploads all use the credentials the browser already sent for the page.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

import dicomproxy
from dicomproxy.host import Host
from dicomproxy.http.mount import mount_subpath
from dicomproxy.ui import scripts as script_view
from dicomproxy.ui.history import History

log = logging.getLogger(__name__)

PREFIX = "/dicomproxy/ui"
ECHO_INTERVAL = 15.0  # seconds a C-ECHO answer is reused
ECHO_TIMEOUT = 10.0
AUDIT_LIMIT = 200
NO_STORE = {"Cache-Control": "no-store"}
STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# The page loads nothing from elsewhere and runs no inline script: a notification text that
# slipped through as HTML still could not execute.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class DicomEcho:
    """C-ECHO to the upstream PACS through ``InternalCmdRun``'s ``echo``, cached: the status page
    polls every few seconds and several may be open, the PACS should not feel it."""

    def __init__(self, commands: Any, target: str, interval: float = ECHO_INTERVAL) -> None:
        self.commands = commands
        self.target = target
        self.interval = interval
        self._last: dict[str, Any] | None = None
        self._at = 0.0
        self._running: asyncio.Task[dict[str, Any]] | None = None

    async def status(self) -> dict[str, Any]:
        if self._last is not None and time.monotonic() - self._at < self.interval:
            return self._last
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._echo())
        try:
            return await asyncio.shield(self._running)
        finally:
            if self._running is not None and self._running.done():
                self._running = None

    async def _echo(self) -> dict[str, Any]:
        try:
            answer = await asyncio.wait_for(self.commands.run("echo", self.target), ECHO_TIMEOUT)
            ok = bool(answer.get("Success"))
            result = {"ok": ok, "target": answer.get("Destination", self.target),
                      "latencyMs": answer.get("Milliseconds"), "error": answer.get("Error")}
        except Exception as e:  # refused, timed out, no DICOM side: unreachable, and why
            result = {"ok": False, "target": self.target, "latencyMs": None,
                      "error": str(e) or type(e).__name__}
        result["checked"] = time.time()
        self._last, self._at = result, time.monotonic()
        return result


class StatusPage:
    """ASGI app for ``/dicomproxy/ui``: the page, its static files and ``status.json``."""

    def __init__(self, host: Any, tus_endpoint: str, prefix: str = PREFIX,
                 health_url: str = "/dicomproxy/health", tasks_url: str = "/dicomproxy/tasks",
                 notifications_url: str = "/dicomproxy/notifications",
                 echo: DicomEcho | None = None, history: History | None = None, audit: Any = None,
                 scripts_root: Path | None = None) -> None:
        self.host = host
        self.echo = echo
        self.history = history
        self.audit = audit
        self.scripts_root = scripts_root
        self.prefix = prefix.rstrip("/")
        self.static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.name != "index.html"}
        values = {
            "static": f"{self.prefix}/static",
            "tus_endpoint": tus_endpoint,
            "health_url": health_url,
            "tasks_url": tasks_url,
            "status_url": f"{self.prefix}/status.json",
            "history_url": f"{self.prefix}/history",
            "source_url": f"{self.prefix}/scripts/source",
            "check_url": f"{self.prefix}/check",
            "audit_url": f"{self.prefix}/audit",
            "spool_url": "/dicomproxy/spool",
            "notifications_url": notifications_url,
            "stream_url": f"{notifications_url.rstrip('/')}/stream",
            "version": f"v{dicomproxy.__version__}",
        }
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        for key, value in values.items():
            page = page.replace("{{" + key + "}}", html.escape(value, quote=True))
        self.page = page

    def _subpath(self, scope: Scope) -> str:
        return mount_subpath(scope, self.prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.route(request, self._subpath(scope))
        await response(scope, receive, send)

    async def route(self, request: Request, sub: str) -> Response:
        if sub == "/check":
            return await self.check(request)
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("use GET\n", 405, headers={"Allow": "GET, HEAD"})
        if sub in ("/", "/index.html"):
            return HTMLResponse(self.page, headers=SECURITY_HEADERS)
        if sub == "/status.json":
            return JSONResponse({**await self.status(), "you": you(request.scope)}, headers=NO_STORE)
        if sub == "/history":
            return self.history_json(request)
        if sub == "/scripts/source":
            return await self.source(request)
        if sub == "/audit":
            return self.audit_json(request)
        if sub.startswith("/static/"):
            file = self.static.get(sub[len("/static/"):])  # names only: no path traversal
            if file is not None:
                media = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
                return FileResponse(file, media_type=media, headers={
                    "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
        return PlainTextResponse(f"not found; the status page is {self.prefix}\n", 404)

    def history_json(self, request: Request) -> Response:
        if self.history is None:
            return JSONResponse({"error": "no metric history in this gateway"}, 404)
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return JSONResponse({"error": "since: the seq of the previous answer, a whole number"}, 400)
        return JSONResponse(self.history.since(since), headers=NO_STORE)

    async def source(self, request: Request) -> Response:
        name = request.query_params.get("script", "")
        status = self._script_status()
        files = script_view.script_files(self.scripts_root, status) if self.scripts_root is not None else {}
        path = files.get(name)
        if path is None:
            return JSONResponse({"error": f"no script {name!r} in the scripts folder (ExtraConfig:ScriptsRoot)"}, 404)
        try:
            answer = await asyncio.to_thread(script_view.read_source, path)
        except OSError as e:
            return JSONResponse({"error": f"{name}: cannot read: {e.strerror}"}, 404)
        entries = status.get("scripts", [])
        entry: dict[str, Any] = next((s for s in entries if Path(s.get("script", "")).name == name), {})
        answer["error"] = entry.get("error")
        answer["location"] = script_view.error_location(entry.get("error"))
        return JSONResponse(answer, headers=NO_STORE)

    async def check(self, request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("use POST\n", 405, headers={"Allow": "POST"})
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
            return JSONResponse({"error": "check runs the scripts: only from the status page itself"}, 403)
        results = script_view.with_locations(await self.host.check())
        return JSONResponse({"ok": all(r["ok"] for r in results), "results": results}, headers=NO_STORE)

    def audit_json(self, request: Request) -> Response:
        if self.audit is None or not self.audit.enabled:
            return JSONResponse({"enabled": False, "events": []}, headers=NO_STORE)
        try:
            limit = min(AUDIT_LIMIT, max(0, int(request.query_params.get("limit", "50"))))
        except ValueError:
            return JSONResponse({"error": f"limit: a whole number up to {AUDIT_LIMIT}"}, 400)
        return JSONResponse({"enabled": True, "events": self.audit.recent(limit)}, headers=NO_STORE)

    def _script_status(self) -> dict[str, Any]:
        try:
            status: dict[str, Any] = json.loads(json.dumps(self.host.status(), default=str))
        except Exception as e:  # the page must load even if the host cannot say
            log.exception("ScriptHost.status() failed")
            return {"error": f"{type(e).__name__}: {e}"}
        for entry in status.get("scripts", []):
            entry["location"] = script_view.error_location(entry.get("error"))
        return status

    async def status(self) -> dict[str, Any]:
        scripts = self._script_status()
        echo = await self.echo.status() if self.echo is not None else None
        return {"version": dicomproxy.__version__, "scripts": scripts, "dicomUpstream": echo}


def you(scope: Scope) -> dict[str, Any]:
    """Who the page is for, so that it shows only the buttons that would work: ``admin`` when the
    caller has the role, or when no authentication runs (the API is open then). The API checks
    again: a hidden button is a courtesy, not the protection."""
    roles = scope.get("roles")
    return {"user": scope.get("user"), "roles": list(roles or ()), "admin": roles is None or "admin" in roles}


def install(gateway: Host) -> StatusPage:
    """Mount the page at ``/dicomproxy/ui``."""
    dicom = gateway.settings.dicom
    echo = None
    if "echo" in gateway.commands.names():  # the DICOM side is installed
        up = dicom.upstream
        echo = DicomEcho(gateway.commands, f"{dicom.aet}:{up.aet}@{up.host}:{up.port}")
    history = History(gateway.metrics.exposed,  # several workers: every worker's series
                      before=gateway.metrics.sample_gauges if gateway.metrics.shared else None)
    gateway.add_component(history)
    gateway.add_health("ui", history.health)
    page = StatusPage(gateway.lua, gateway.settings.tus.base_path, echo=echo, history=history, audit=gateway.audit,
                      scripts_root=gateway.settings.lua.scripts_root)
    gateway.mount(PREFIX, page)
    return page
