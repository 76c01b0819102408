"""What a feature may use of the gateway: the typed interface every ``install(host)`` receives.

Features (TUS, the DICOM side, notifications, mail, the status page, the Orthanc layer) depend
on this protocol, never on the app module that implements it, so the arrows between packages
point one way: ``app`` knows the features, the features know only this interface and the
shared services it names (config, events, metrics, commands, tasks, scripting, upstream, hooks, audit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from dicomproxy.audit.trail import AuditTrail
from dicomproxy.commands import Commands
from dicomproxy.config.settings import Settings
from dicomproxy.hooks import Hooks
from dicomproxy.lifecycle import Lifecycle
from dicomproxy.metrics import Metrics
from dicomproxy.notify.events import EventBus
from dicomproxy.scripting.host import ScriptHost
from dicomproxy.tasks import Queue
from dicomproxy.upstream import Upstream
from dicomproxy.upstream.member import Member
from dicomproxy.workers import WorkerInfo

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
HealthCheck = Callable[[], dict[str, Any]]


class Component(Protocol):
    """Something with a life: started in install order, stopped in reverse. It may also have a
    ``drain()`` (sync): called when shutdown begins, to stop taking new work (close a port, end
    live streams), and an ``async settle(until)``: wait for work in flight to end by itself until
    ``until`` (``time.monotonic()``), called for all such components at once before any stops."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class UpstreamDirectory(Protocol):
    """The named upstreams (``Upstreams``/``servers.json``, and ``default``), current after every
    reload (:mod:`dicomproxy.upstream.registry`). A :class:`Member` has ``name``, ``upstream``
    (its HTTP ``Upstream``: pool, client, ``base``), ``dicom`` (its ``PacsAe`` or None) and
    ``dicom_host``, ``health``, ``available(now)`` (may a group pick it: healthy, or half-open after
    ``time.monotonic()`` ``now``), and ``begin()``/``end()``/``failed(reason)``/``answered()`` for the
    traffic it serves (passive ejection). Hold a member only for one operation: a reload may retire it."""

    def names(self) -> frozenset[str]:
        """Every server and group name, ``default`` included."""

    def pick(self, name: str, exclude: Collection[Member] = ()) -> Member | None:
        """Who serves ``name`` now (a group: its balancer among available members); None when every
        member is in ``exclude``; ``UnknownUpstream`` (a ``LookupError``) for an unknown name."""

    def members(self, name: str) -> tuple[Member, ...]:
        """A server alone, or a group's members in order (fan-out, federated queries)."""

    def is_group(self, name: str) -> bool: ...

    def federated(self, name: str) -> bool: ...


class Host(Protocol):
    """The gateway as a feature sees it."""

    settings: Settings
    bus: EventBus
    metrics: Metrics
    commands: Commands
    tasks: Queue
    lua: ScriptHost
    upstream: Upstream
    audit: AuditTrail  # host.audit.record(event): never blocks, never raises
    hooks: Hooks  # typed events one feature offers others (e.g. the DICOM side's "instance stored")
    life: Lifecycle  # the phase and, once SIGTERM came, what is left of the shutdown deadline
    worker: WorkerInfo  # which of Server:Workers this process is; .owner: runs the single-owner roles

    @property
    def upstreams(self) -> UpstreamDirectory:
        """The named upstreams; ``upstreams.pick("default").upstream is upstream``."""

    def mount(self, prefix: str, app: Any) -> None:
        """Route paths under ``prefix`` (``/files/`` also matches ``/files``) to the ASGI ``app``."""

    def add_middleware(self, wrap: Callable[[Any], Any]) -> None:
        """``wrap(app) -> app``: an ASGI layer inside authentication, outside the Lua HTTP hooks."""

    def add_component(self, component: Component) -> None:
        """``await component.start()`` at start-up, ``await component.stop()`` at shutdown."""

    def add_health(self, name: str, check: HealthCheck) -> None:
        """A section of ``/dicomproxy/health``; ``{"ok": False}`` marks the gateway degraded."""
