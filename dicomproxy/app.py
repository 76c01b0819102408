"""The Gateway: the ASGI app that ties the features together.

Request path: the front door (canonical path, method override) -> CORS -> authentication and
role rules (``dicomproxy.auth``, when configured) -> feature middleware -> Lua HTTP hooks -> a mounted feature app
(``/files/``, ``/dicomproxy/...``) or the streaming proxy for everything else. Routing is a
prefix scan over a handful of mounts, not a router, because the proxy is the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dicomproxy_middleware import LuaHttpMiddleware

from dicomproxy import dicom, tus, ui
from dicomproxy.audit import web as audit_web
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.auth.setup import build_auth
from dicomproxy.cluster.redis import connect, connect_calls, connect_sync
from dicomproxy.cluster.tasks import LOCAL_KINDS, RedisTaskQueue
from dicomproxy.commands import Commands
from dicomproxy.config.settings import Settings
from dicomproxy.dicom import storage_scu
from dicomproxy.dicom.ul import tls as dicom_tls
from dicomproxy.hooks import Hooks
from dicomproxy.host import Component, HealthCheck, Host
from dicomproxy.http.api import PROBE_PATHS, build_api, probes
from dicomproxy.http.cors import GatewayCors, cors_policy
from dicomproxy.http.guard import RequestGuard
from dicomproxy.http.proxy import ReverseProxy
from dicomproxy.lifecycle import MIN_STEP_SECONDS, Lifecycle, Phase
from dicomproxy.metrics import HOOK_BUCKETS, LeanHistogram, LeanHistogramChild, Metrics
from dicomproxy.notify import mail, notifications
from dicomproxy.notify.events import EventBus
from dicomproxy.scripting import orthanc
from dicomproxy.scripting.host import ScriptHost
from dicomproxy.scripting.shared import AsyncSharedStore, SharedStore
from dicomproxy.scripting.shared_lmdb import LmdbStore
from dicomproxy.scripting.shared_redis import RedisStore
from dicomproxy.tasks import Queue, TaskQueue
from dicomproxy.upstream import Upstream
from dicomproxy.upstream.directory import Upstreams
from dicomproxy.upstream.health import Echo
from dicomproxy.upstream.member import Member
from dicomproxy.upstream.monitor import UpstreamMonitor
from dicomproxy.workers import WorkerInfo

log = logging.getLogger("dicomproxy")

START_WAIT_SECONDS = 30.0  # a request that comes while the gateway starts waits this long, then 503


def make_task_queue(settings: Settings, bus: EventBus, worker: WorkerInfo) -> Queue:
    """On this machine's disk (run by worker 0 of ``Server:Workers``), or shared by the replicas
    and their workers on Redis (``Cluster:Redis``: any worker takes a task, under a lease)."""
    lua = settings.lua
    here = TaskQueue(settings.data_folder / "tasks", workers=lua.background_workers, bus=bus,
                     max_restarts=lua.task_max_restarts, runs=worker.owner, shared=worker.multi)
    if settings.cluster.redis:
        # TUS imports of the file store stay on this replica's disk queue (the file is here);
        # with Tus:Store s3 any replica reads the object, so they go through the cluster's queue.
        local_kinds = frozenset() if settings.tus.store == "s3" else LOCAL_KINDS
        return RedisTaskQueue(settings.cluster.redis, connect(settings), connect_sync(settings),
                              workers=lua.background_workers, bus=bus, keep=settings.cluster.task_keep,
                              max_restarts=lua.task_max_restarts, lease=settings.cluster.lease_seconds, local=here,
                              local_kinds=local_kinds)
    return here


class Gateway:
    """The application object: owns every component; features attach through ``install``.
    It implements :class:`dicomproxy.host.Host`, the only face of it that features see."""

    def __init__(self, settings: Settings, worker: WorkerInfo | None = None) -> None:
        self.settings = settings
        self.worker = worker or WorkerInfo()
        self.started_at = time.time()
        self.bus = EventBus()
        self.metrics = Metrics()
        self.audit = AuditTrail(settings, self.bus, self.metrics, self.worker.index)
        self.commands = Commands()
        self.hooks = Hooks()
        self.tasks = make_task_queue(settings, self.bus, self.worker)
        # Observed twice per proxied request with hooks: a LeanHistogram child per callback (metrics.py).
        hook_seconds = self.metrics.lean_histogram(
            "dicomproxy_lua_hook_seconds", "Seconds a Lua callback ran (awaits included), by callback",
            labels=("callback",), buckets=HOOK_BUCKETS,
        )
        self.lua = ScriptHost(settings, bus=self.bus, tasks=self.tasks, commands=self.commands,
                              audit=self.audit, shared=self._shared_store(),
                              on_call=_observer(hook_seconds))
        self.upstream = Upstream(settings.upstream)
        self.upstreams = Upstreams(settings, self.upstream, self.metrics, echo=_echo(settings))
        self.proxy = ReverseProxy(self.upstream, self.metrics, self.upstreams)
        self.monitor = UpstreamMonitor(self.upstream, self.bus)
        self.health_checks: dict[str, HealthCheck] = {}
        if isinstance(self.tasks, RedisTaskQueue):
            shared = self.tasks
            self.health_checks["cluster"] = shared.status
            self.metrics.gauge("dicomproxy_cluster_redis_up", "1 while Cluster:Redis answers this replica, else 0",
                               lambda: 0 if shared.error else 1)
            self.metrics.gauge("dicomproxy_cluster_tasks_reclaimed",
                               "Tasks this replica took over from a replica that died holding them",
                               lambda: shared.reclaimed)
        self.auth = build_auth(settings)
        self._mounts: list[tuple[str, str, Any]] = []
        self._mounted: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())  # every prefix, every exact path
        self._middleware: list[Callable[[Any], Any]] = []
        self._components: list[Component] = [self.audit, self.upstream, self.upstreams, self.tasks, self.lua,
                                              self.monitor]
        if isinstance(self.lua.shared, RedisStore):  # started before the engines, its client closed after them
            self._components.insert(self._components.index(self.lua), self.lua.shared)
        self.health_checks["upstreams"] = self.upstreams.status
        self._started: list[Component] = []
        if self.auth is not None and self.auth.keys is not None:
            self._components.append(self.auth.keys)
            self.health_checks["oidc"] = self.auth.keys.status
        api = build_api(self)
        for path in ("/dicomproxy/health", "/dicomproxy/metrics", "/dicomproxy/tasks"):
            self.mount(path, api)
        if self.worker.owner:  # the queue's state is worker 0's (it runs the tasks)
            self.metrics.gauge("dicomproxy_tasks_queued", "Background tasks waiting or running", self._tasks_pending)
        self.health_checks["workers"] = self.worker.status
        self._app: Any = None
        srv = settings.server
        self.life = Lifecycle(srv.shutdown_timeout, srv.drain_delay)
        self.start_failed = False
        self.on_start_failed: Callable[[], None] | None = None  # set by ``serve``: end the process
        # set by ``serve``: run once started, before the requests held meanwhile are let through
        self.on_serving: Callable[[], None] | None = None
        self._up = asyncio.Event()  # set once the start is over (serving, or failed) or a SIGTERM came
        self._serving = False  # every component started: requests reach the app
        self._starting: asyncio.Task[None] | None = None
        self._accepting = True
        self._probes = probes(self)

    def _shared_store(self) -> SharedStore | AsyncSharedStore | None:
        """``SharedDict``: with ``Cluster:Redis`` in Redis, shared by every replica and worker;
        else with several workers in LMDB, shared by every worker of this host; else None (one
        process: the in-memory store)."""
        lua = self.settings.lua
        if self.settings.cluster.redis:
            return RedisStore(connect_calls(self.settings), self.settings.cluster.redis, lua.shared_dict_max_keys,
                              int(lua.shared_dict_max_mb * (1 << 20)))
        if not self.worker.multi:
            return None
        return LmdbStore(self.settings.data_folder / "run" / "shared", lua.shared_dict_max_keys,
                         int(lua.shared_dict_max_mb * (1 << 20)))

    def _tasks_pending(self) -> int:
        counts = self.tasks.counts()
        return counts["queued"] + counts["running"]

    # ------------------------------------------------------------------ feature API
    def mount(self, prefix: str, app: Any) -> None:
        """Route paths under ``prefix`` (``/files/`` also matches ``/files``) to ``app``."""
        exact = prefix.rstrip("/") or "/"
        self._mounts.append((prefix, exact, app))
        self._mounts.sort(key=lambda m: len(m[0]), reverse=True)
        self._mounted = (tuple(m[0] for m in self._mounts), frozenset(m[1] for m in self._mounts))

    def add_middleware(self, wrap: Callable[[Any], Any]) -> None:
        """``wrap(app) -> app``: an ASGI layer inside authentication, outside the Lua HTTP hooks."""
        self._middleware.append(wrap)

    def add_component(self, component: Component) -> None:
        """``await component.start()`` at startup and ``await component.stop()`` at shutdown."""
        self._components.append(component)

    def add_health(self, name: str, check: HealthCheck) -> None:
        self.health_checks[name] = check

    # ------------------------------------------------------------------ ASGI
    def build(self) -> Any:
        lua = self.settings.lua
        app: Any = LuaHttpMiddleware(self._route, self.lua.scripts, fail_open=lua.fail_open or lua.fail_open_hooks,
                                     upstreams=self.upstreams)
        for wrap in self._middleware:
            app = wrap(app)
        if self.auth is not None:
            app = self.auth.wrap(app, audit=self.audit if self.audit.enabled else None)
        app = GatewayCors(app, cors_policy(self.settings.cors))
        return RequestGuard(app)

    def _route(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        # Any: the Lua middleware hands on a MutableMapping scope, the proxy is typed for a dict.
        # Not a coroutine, like the pass-through layers (http/guard.py): no frame of its own.
        path = scope["path"]
        prefixes, exacts = self._mounted
        if not path.startswith(prefixes) and path not in exacts:  # one C call for the proxied paths, not
            return self.proxy(scope, receive, send)  # a startswith per mount (7 of them: ~1,000 instructions)
        for prefix, exact, app in self._mounts:
            if path.startswith(prefix) or path == exact:
                return app(scope, receive, send)
        return self.proxy(scope, receive, send)

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # Not a coroutine on the way of a request once serving (as the pass-through layers,
        # http/guard.py): no coroutine of its own nor a frame on each resume of the ones inside.
        app = self._app
        if app is not None and self._serving and scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
            return app(scope, receive, send)
        return self._call(scope, receive, send)

    async def _call(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "http" and scope["path"] in PROBE_PATHS:  # before auth, Lua and the rest: cheap
            await self._probes(scope, receive, send)
            return
        if not self._serving:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(START_WAIT_SECONDS):
                    await self._up.wait()
            if not self._serving:  # still starting, the start failed, or a SIGTERM came first
                await _unavailable(send, self.life.phase.value)
                return
        if self._app is None:
            self._app = self.build()
        await self._app(scope, receive, send)

    # ------------------------------------------------------------------ life cycle
    def ready(self) -> tuple[bool, str]:
        """What ``/dicomproxy/health/ready`` says: serving (and the PACS up, per config), or why not."""
        if self.life.phase is not Phase.SERVING:
            return False, self.life.phase.value
        if self.settings.server.ready_requires_upstream and self.monitor.reachable is False:
            return False, "upstream down"
        return True, "ready"

    async def start(self) -> None:
        for component in self._components:
            await component.start()
            self._started.append(component)
        self.audit.started()
        log.info("DicomProxy listening on %s, proxying %s", ", ".join(e.url for e in self.settings.endpoints),
                 self.upstream.base)

    async def _start(self) -> None:
        """The lifespan start-up, in a task of its own: the HTTP listener (live, ready: 503) is up meanwhile."""
        try:
            await self.start()
        except asyncio.CancelledError:
            log.warning("stopped while starting (%d of %d components were up)",
                        len(self._started), len(self._components))
            raise
        except Exception:
            log.exception("startup failed")
            self.start_failed = True
            self.life.move(Phase.STOPPING)
            await self.stop()
            if self.on_start_failed is not None:
                self.on_start_failed()
        else:
            self._serving = True
            self.life.move(Phase.SERVING)
            if self.on_serving is not None:
                self.on_serving()
        finally:
            self._up.set()

    def drain(self) -> bool:
        """SIGTERM: ``/dicomproxy/health/ready`` turns 503 at once; everything else is still served
        (``Server:DrainDelaySeconds``) until :meth:`stop_accepting`. False when already draining."""
        if not self.life.move(Phase.DRAINING):
            return False
        self._up.set()  # requests held while starting get their 503 now, so the shutdown need not wait for them
        log.info("shutdown requested: draining (ready answers 503; exit within %gs, Server:ShutdownTimeoutSeconds)",
                 self.life.shutdown_timeout)
        return True

    def stop_accepting(self) -> None:
        """Close the DICOM listener and end the live streams; what is in flight goes on (HTTP
        listeners: uvicorn closes them right after this)."""
        if not self._accepting:
            return
        self._accepting = False
        for component in reversed(self._started):
            drain = getattr(component, "drain", None)
            if drain is None:
                continue
            try:
                drain()
            except Exception:
                log.exception("draining %s failed", type(component).__name__)

    async def stop(self) -> None:
        """Let in-flight work settle (components with ``settle(until)``, at once, until the stop
        share of the deadline), then stop the components in reverse order, each bounded by what
        is left of the deadline."""
        self.life.move(Phase.STOPPING)
        if self._started:
            self.audit.stopping()
        self.stop_accepting()
        await self._settle()
        while self._started:
            component = self._started.pop()
            name = type(component).__name__
            budget = self.life.step_budget()
            began = time.monotonic()
            try:
                async with asyncio.timeout(budget):
                    await component.stop()
            except TimeoutError:
                log.error("stopping %s cut short after %.1fs (Server:ShutdownTimeoutSeconds)", name,
                          time.monotonic() - began)
            except Exception:
                log.exception("stopping %s failed", name)
            else:
                log.debug("stopped %s in %.2fs", name, time.monotonic() - began)

    async def _settle(self) -> None:
        until = time.monotonic() + self.life.http_grace()
        waits = [settle(until) for c in self._started if (settle := getattr(c, "settle", None)) is not None]
        if not waits:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.monotonic()) + MIN_STEP_SECONDS):
                results = await asyncio.gather(*waits, return_exceptions=True)
                for result in results:
                    if isinstance(result, Exception):
                        log.error("waiting for in-flight work failed: %r", result)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._starting = asyncio.create_task(self._start(), name="gateway-start")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                starting, self._starting = self._starting, None
                if starting is not None and not starting.done():
                    starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    if starting is not None:
                        await starting
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _unavailable(send: Any, phase: str) -> None:
    body = b'{"error": "the gateway is %s; retry shortly"}' % phase.encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"2"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

def _echo(settings: Settings) -> Echo:
    """A member's ``HealthCheck:Echo``: C-ECHO its DICOM side through the gateway's own upper layer,
    calling with ``Dicom:Aet``, over TLS when the server's ``Dicom:Tls`` says so."""

    async def echo(member: Member, timeout: float) -> None:
        assert member.dicom is not None
        tls = dicom_tls.client_context(member.dicom, settings.dicom.tls)  # Dicom:Tls of the server, if set
        status = await storage_scu.echo(member.dicom_host, member.dicom.port, called_aet=member.dicom.aet,
                                        calling_aet=settings.dicom.aet, timeout=timeout, tls=tls)
        if status.status != 0:
            raise RuntimeError(f"status 0x{status.status:04X} {status.comment}".rstrip())

    return echo


Feature = Callable[[Host], object]

# Installed in this order (each ``install(host)`` mounts routes, adds components, exports, health).
FEATURES: tuple[Feature, ...] = (
    tus.install,
    dicom.install,
    notifications.install,
    mail.install,
    ui.install,
    orthanc.install,
    audit_web.install,  # last: its DICOMweb layer is outermost, so refused requests are recorded too
)


def build_gateway(settings: Settings, features: tuple[Feature, ...] = FEATURES,
                  worker: WorkerInfo | None = None) -> Gateway:
    """The gateway with every feature installed (``worker``: which of ``Server:Workers`` this is)."""
    gateway = Gateway(settings, worker)
    for install in features:
        install(gateway)
    return gateway


def _observer(histogram: LeanHistogram) -> Callable[[str, float], None]:
    """``on_call`` for the engines: each callback's duration into its own child of ``histogram``,
    bound on first use (``child()`` per call, its label check and lookup, cost ~1,200 instructions)."""
    children: dict[str, LeanHistogramChild] = {}

    def observe(callback: str, seconds: float) -> None:
        child = children.get(callback)
        if child is None:
            child = children[callback] = histogram.child(callback)
        child.observe(seconds)

    return observe
