"""The named upstreams at run time: one :class:`~dicomproxy.upstream.member.Member` (an
``Upstream``: its own pool and client) per ``Upstreams:Servers`` entry plus ``default`` (the
pair ``Upstream`` + ``Dicom:Upstream``: the gateway's own ``Upstream`` object), the groups with
their balancers, and the compiled HTTP routes.

A :class:`Registry` is immutable once built: a reload of ``servers.json`` builds a new one
(:mod:`~dicomproxy.upstream.directory` swaps it in) that reuses every member whose settings did
not change (its pool, connections and health carry over), so an edit that adds a server does not
reset the others.

The API the DICOM side and the proxy use (:class:`~dicomproxy.host.UpstreamDirectory`):

* ``pick(name, exclude=())`` — the member that serves ``name`` now: a server is itself (healthy
  or not: asked by name, it is tried), a group asks its balancer among its available members,
  or, when every member is ejected, among all of them in order (trying beats refusing); None
  only when every member is in ``exclude`` (the ones already tried);
* ``members(name)`` — a server alone, or a group's members in ``Members`` order (fan-out,
  federated queries);
* ``names()``, ``is_group(name)``, ``federated(name)``.

An unknown name raises :class:`UnknownUpstream`, whose message lists the known names.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from dicomproxy.config.model import DEFAULT_UPSTREAM, HealthCheckSettings, ServerEntry
from dicomproxy.config.settings import Settings
from dicomproxy.http.routes import Routes
from dicomproxy.upstream.balance import Balancer, balancer
from dicomproxy.upstream.member import Member, State
from dicomproxy.upstream.upstream import Upstream


class UnknownUpstream(LookupError):
    """A name that is neither a server nor a group (the message names the known ones)."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(f"{name!r} is neither an upstream server nor a group (known: {', '.join(sorted(known))})")
        self.name = name


@dataclass
class Group:
    name: str
    mode: str
    members: tuple[Member, ...]
    federated: bool
    balancer: Balancer

    def pick(self, exclude: Collection[Member] = ()) -> Member | None:
        now = time.monotonic()
        candidates = [m for m in self.members if m.available(now) and m not in exclude]
        if not candidates:  # all ejected (or tried): try the rest in order rather than refuse
            candidates = [m for m in self.members if m not in exclude]
            return candidates[0] if candidates else None
        return self.balancer.choose(candidates)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"mode": self.mode, "federated": self.federated, "members": [m.name for m in self.members],
                "available": [m.name for m in self.members if m.available(now)]}


def _server_member(name: str, entry: ServerEntry) -> Member:
    dicom = entry.dicom if entry.dicom.port else None
    return Member(name, Upstream(entry), dicom=dicom, dicom_host=entry.dicom_host, weight=entry.weight,
                  check=entry.health_check, owned=True)


class Registry:
    """Servers, groups and routes of one configuration (see the module docstring)."""

    def __init__(self, settings: Settings, default: Upstream, previous: Registry | None = None) -> None:
        config = settings.upstreams
        old = previous.servers if previous is not None else {}
        self.entries: dict[str, ServerEntry] = dict(config.servers)
        old_default = old.get(DEFAULT_UPSTREAM)
        if old_default is not None and old_default.dicom == settings.dicom.upstream:
            self.default = old_default
        else:
            self.default = Member(DEFAULT_UPSTREAM, default, dicom=settings.dicom.upstream,
                                  dicom_host=settings.dicom.upstream.host, weight=1, check=HealthCheckSettings(),
                                  owned=False)
        self.servers: dict[str, Member] = {DEFAULT_UPSTREAM: self.default}
        for name, entry in config.servers.items():
            kept = old.get(name)
            same = kept is not None and previous is not None and previous.entries.get(name) == entry
            self.servers[name] = kept if same and kept is not None else _server_member(name, entry)
        self.groups: dict[str, Group] = {
            name: Group(name, g.mode, tuple(self.servers[m] for m in g.members), g.federated, balancer(g.mode))
            for name, g in config.groups.items()
        }
        configured = bool(config.servers or config.groups or config.routes or config.default)
        # None: no Upstreams configured, and the proxy takes its one-upstream path (no routing cost)
        self.routes: Routes | None = Routes(config.routes, config.default or DEFAULT_UPSTREAM) if configured else None

    # -- the API (see the module docstring)
    def names(self) -> frozenset[str]:
        return frozenset(self.servers) | frozenset(self.groups)

    def is_group(self, name: str) -> bool:
        return name in self.groups

    def federated(self, name: str) -> bool:
        group = self.groups.get(name)
        return group is not None and group.federated

    def pick(self, name: str, exclude: Collection[Member] = ()) -> Member | None:
        server = self.servers.get(name)
        if server is not None:
            return None if server in exclude else server
        group = self.groups.get(name)
        if group is None:
            raise UnknownUpstream(name, self.names())
        return group.pick(exclude)

    def members(self, name: str) -> tuple[Member, ...]:
        server = self.servers.get(name)
        if server is not None:
            return (server,)
        group = self.groups.get(name)
        if group is None:
            raise UnknownUpstream(name, self.names())
        return group.members

    def retired_by(self, new: Registry) -> list[Member]:
        """The members of this registry that ``new`` no longer uses (to close once idle)."""
        kept = {id(m) for m in new.servers.values()}
        return [m for m in self.servers.values() if id(m) not in kept and m.owned]

    def status(self) -> dict[str, Any]:
        servers = {name: m.status() for name, m in self.servers.items()}
        ejected = [name for name, m in self.servers.items() if m.health.state is State.EJECTED]
        return {"ok": not ejected, "ejected": ejected, "servers": servers,
                "groups": {name: g.status() for name, g in self.groups.items()},
                "default": self.routes.default if self.routes else DEFAULT_UPSTREAM,
                "routes": len(self.routes.rules) if self.routes else 0}
