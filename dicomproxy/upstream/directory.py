"""``Upstreams``: the gateway's current :class:`~dicomproxy.upstream.registry.Registry`, its
health checks, and the hot reload of ``servers.json``.

Reload: once a second the file's identity (device, inode, size, mtime) is compared with the
last one seen. On a change the whole configuration is loaded again (``load``: the same layers
as at start-up) and only its ``Upstreams`` section is taken:

* valid: a new registry (unchanged servers kept, with their pools and health) replaces the old
  in one assignment — requests already running keep the member objects they picked and finish
  on their pools; a retired member's pool closes once its last request is over;
* broken (bad JSON, an unknown key, a name that resolves to nothing): the previous registry stays
  and one line is logged naming the file, the key and what was expected.

Everything runs on the event loop; ``current`` is swapped by assignment, never mutated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.loader import SERVERS_FILE
from dicomproxy.config.model import DEFAULT_UPSTREAM
from dicomproxy.config.settings import Settings
from dicomproxy.metrics import Metrics
from dicomproxy.upstream.health import Echo, check_loop
from dicomproxy.upstream.member import Member, State
from dicomproxy.upstream.registry import Registry
from dicomproxy.upstream.upstream import Upstream

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0

FileId = tuple[int, int, int, int] | None


def file_id(path: Path) -> FileId:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Upstreams:
    """The registry the proxy and the DICOM side use (``host.upstreams``), swapped on reload."""

    def __init__(self, settings: Settings, default: Upstream, metrics: Metrics, *,
                 load: Callable[[], Settings] | None = None, echo: Echo | None = None) -> None:
        self.current = Registry(settings, default)
        # the registry when Upstreams is configured; None: the proxy's single-upstream path (an
        # attribute, not a property: the proxy reads it on every request)
        self.routing: Registry | None = self.current if self.current.routes is not None else None
        self._default = default
        self._settings = settings
        self._load = load or self._reload_settings
        self.echo = echo
        self.file = settings.config_root / SERVERS_FILE
        self._seen = file_id(self.file)
        self._checks: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self.reloads = 0
        self.reload_error: str | None = None
        self.healthy = metrics.gauge("dicomproxy_upstream_healthy", "1 if the named upstream is healthy, 0 if "
                                     "ejected", labels=("upstream",))
        self.requests = metrics.counter("dicomproxy_upstream_requests_total", "Proxied requests by named "
                                        "upstream and status class (`error`: no answer)", labels=("upstream", "status"))
        self.latency = metrics.gauge("dicomproxy_upstream_check_latency_seconds", "The last active health check's "
                                     "duration, by named upstream", labels=("upstream",))
        metrics.gauge("dicomproxy_upstream_reloads_total", "servers.json reloads that took effect",
                      lambda: self.reloads)

    # -- the API the features use (see dicomproxy.upstream.registry)

    def names(self) -> frozenset[str]:
        return self.current.names()

    def pick(self, name: str, exclude: Collection[Member] = ()) -> Member | None:
        return self.current.pick(name, exclude)

    def members(self, name: str) -> tuple[Member, ...]:
        return self.current.members(name)

    def is_group(self, name: str) -> bool:
        return self.current.is_group(name)

    def federated(self, name: str) -> bool:
        return self.current.federated(name)

    def choose(self, scope: Any) -> str:
        """``request.Upstream`` before any hook: what the routes choose (``default`` without routing)."""
        routes = self.current.routes
        return routes.choose(scope) if routes is not None else DEFAULT_UPSTREAM

    # -- life cycle
    async def start(self) -> None:
        self._start_checks(self.current)
        self._watch = asyncio.get_running_loop().create_task(self._watch_file(), name="servers.json watch")

    async def stop(self) -> None:
        tasks = [t for t in (self._watch, *self._checks.values(), *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for member in self.current.servers.values():
            if member.owned:
                await member.upstream.stop()

    def _start_checks(self, registry: Registry) -> None:
        for member in registry.servers.values():
            self.observe(member)
            if member.actively_checked and id(member) not in self._checks:
                checks = check_loop(member, self.echo)
                self._checks[id(member)] = asyncio.get_running_loop().create_task(checks, name=f"check {member.name}")

    def observe(self, member: Member) -> None:
        h = member.health
        self.healthy.set(1 if h.state is State.HEALTHY else 0, upstream=member.name)
        if h.latency_ms is not None:
            self.latency.set(h.latency_ms / 1000, upstream=member.name)

    # -- reload
    def _reload_settings(self) -> Settings:
        from dicomproxy.config.loader import load_settings

        s = self._settings
        return load_settings(s.config_file, environ=os.environ, environment=s.environment or None)

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for member in self.current.servers.values():
                self.observe(member)
            seen = file_id(self.file)
            if seen == self._seen:
                continue
            self._seen = seen
            self.reload()

    def reload(self) -> bool:
        """Load the configuration again; swap the registry if valid (True), else keep it and log."""
        try:
            settings = self._load()
        except ConfigError as e:
            self.reload_error = str(e)
            log.error("%s not applied, the previous upstreams stay: %s (fix it and save again)", self.file, e)
            return False
        except Exception as e:  # e.g. the file vanished between the stat and the read
            self.reload_error = str(e)
            log.error("%s not applied, the previous upstreams stay: %s", self.file, e)
            return False
        old = self.current
        new = Registry(settings, self._default, previous=old)
        self.current = new
        self.routing = new if new.routes is not None else None
        self.reloads += 1
        self.reload_error = None
        self._start_checks(new)
        for member in old.retired_by(new):
            task = self._checks.pop(id(member), None)
            if task is not None:
                task.cancel()
            retire = asyncio.get_running_loop().create_task(self._retire(member), name=f"retire {member.name}")
            self._tasks.add(retire)
            retire.add_done_callback(self._tasks.discard)
        log.info("%s reloaded: servers %s, groups %s", self.file, ", ".join(sorted(new.servers)) or "-",
                 ", ".join(sorted(new.groups)) or "-")
        return True

    async def _retire(self, member: Member) -> None:
        """Close a member the new registry dropped, once its last request is over."""
        await member.idle()
        await member.upstream.stop()
        log.debug("upstream %s retired", member.name)

    def status(self) -> dict[str, Any]:
        out = self.current.status()
        out["reloads"] = self.reloads
        if self.reload_error:
            out["reloadError"] = self.reload_error
        return out
