"""What a feature may use of the gateway: the typed interface every ``install(host)`` receives.

Features (TUS, the DICOM side, notifications, mail, the status page, the Orthanc layer) depend
on this protocol, never on the app module that implements it, so the arrows between packages
point one way: ``app`` knows the features, the features know only this interface and the
shared services it names (config, events, metrics, commands, tasks, scripting, upstream, hooks, audit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
HealthCheck = Callable[[], dict[str, Any]]


class Component(Protocol):
    """Something with a life: started in install order, stopped in reverse. It may also have a
    ``drain()`` (sync): called when shutdown begins, to stop taking new work (close a port, end
    live streams), and an ``async settle(until)``: wait for work in flight to end by itself until
    ``until`` (``time.monotonic()``), called for all such components at once before any stops."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


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

    def mount(self, prefix: str, app: Any) -> None:
        """Route paths under ``prefix`` (``/files/`` also matches ``/files``) to the ASGI ``app``."""

    def add_middleware(self, wrap: Callable[[Any], Any]) -> None:
        """``wrap(app) -> app``: an ASGI layer inside authentication, outside the Lua HTTP hooks."""

    def add_component(self, component: Component) -> None:
        """``await component.start()`` at start-up, ``await component.stop()`` at shutdown."""

    def add_health(self, name: str, check: HealthCheck) -> None:
        """A section of ``/dicomproxy/health``; ``{"ok": False}`` marks the gateway degraded."""
