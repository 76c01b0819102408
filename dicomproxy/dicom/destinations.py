"""Names to DICOM peers: the one place the DICOM side turns a destination or upstream name
(``default``, an ``Upstreams:Servers`` entry with a DICOM side, an ``Upstreams:Groups`` entry of
them, a ``Dicom:Modalities`` entry) into the peers to try, in order.

Why one module: the runtime upstream registry (health checks, ejection, least connections) is
written elsewhere; when it lands, :meth:`Destinations.peers` is the only function that has to ask
it for the healthy members. Until then the order is the group's mode applied to configuration
only: ``Failover`` the members in ``Members`` order, ``RoundRobin`` the members rotated by one at
each call (weights repeat a member), ``LeastConnections`` the ``Members`` order (no connection
counts without the registry). A caller tries the peers in that order and treats "cannot connect
or associate" as "down, try the next" (:mod:`.forwarder`, :mod:`.qr`).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from dicomproxy.config.model import DEFAULT_UPSTREAM, RemoteAe, Settings


@dataclass(frozen=True)
class Peer:
    """One DICOM peer to associate with: ``name`` is its server (or modality) name."""

    name: str
    ae: RemoteAe  # Aet, Host, Port, Tls*; Host already filled in from the server's Url


class UnknownDestination(KeyError):
    """A name that is no destination; ``str()`` names the known ones (the fix)."""

    def __init__(self, name: str, known: frozenset[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return (f"{self.name!r} is no DICOM destination (known: {', '.join(sorted(self.known))}; "
                "see Upstreams:Servers, Upstreams:Groups and Dicom:Modalities)")


class Destinations:
    """Immutable view of the settings plus a round-robin cursor per group (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        up = settings.upstreams
        self._servers: dict[str, Peer] = {DEFAULT_UPSTREAM: Peer(DEFAULT_UPSTREAM, settings.dicom.upstream)}
        for name, server in up.servers.items():
            if server.dicom.port:
                ae = server.dicom.model_copy(update={"host": server.dicom_host})
                self._servers[name] = Peer(name, ae)
        self._modalities = {name: Peer(name, ae) for name, ae in settings.dicom.modalities.items()}
        self._groups = {name: g for name, g in up.groups.items() if all(m in self._servers for m in g.members)}
        self._cursors: dict[str, itertools.count[int]] = {name: itertools.count() for name in self._groups}
        self._lock = threading.Lock()
        self.known: frozenset[str] = frozenset(self._servers) | frozenset(self._groups) | frozenset(self._modalities)

    def __contains__(self, name: object) -> bool:
        return name in self.known

    def check(self, name: str) -> str:
        """``name`` if it is a destination, else :class:`UnknownDestination`."""
        if name not in self.known:
            raise UnknownDestination(name, self.known)
        return name

    def is_group(self, name: str) -> bool:
        return name in self._groups

    def federated(self, name: str) -> bool:
        group = self._groups.get(name)
        return group is not None and group.federated

    def members(self, name: str) -> list[Peer]:
        """Every member of a group in ``Members`` order (a server or modality: itself)."""
        group = self._groups.get(name)
        if group is None:
            return [self._single(name)]
        return [self._servers[m] for m in group.members]

    def peers(self, name: str) -> list[Peer]:
        """The peers to try for ``name``, best first (module docstring)."""
        group = self._groups.get(name)
        if group is None:
            return [self._single(name)]
        members = [self._servers[m] for m in group.members]
        if group.mode == "RoundRobin" and len(members) > 1:
            weighted = [p for p in members for _ in range(self._weight(p.name))]
            with self._lock:
                start = next(self._cursors[name]) % len(weighted)
            first = weighted[start]
            return [first, *(p for p in members if p is not first)]
        return members

    def _single(self, name: str) -> Peer:
        peer = self._servers.get(name) or self._modalities.get(name)
        if peer is None:
            raise UnknownDestination(name, self.known)
        return peer

    def _weight(self, name: str) -> int:
        server = self._settings.upstreams.servers.get(name)
        return server.weight if server is not None else 1
