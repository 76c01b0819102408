"""Names to DICOM peers: the one place the DICOM side turns a destination or upstream name
(``default``, an ``Upstreams:Servers`` entry with a DICOM side, an ``Upstreams:Groups`` entry of
them, a ``Dicom:Modalities`` entry) into the peers to try, in order.

Why one module: :meth:`Destinations.peers` is the only function that asks the upstream registry
(``host.upstreams``, the :class:`~dicomproxy.host.UpstreamDirectory` protocol: health checks,
ejection, balancing) for a group's order. With the registry: first the member its ``pick`` chooses
(the group's mode among the available members: ``Failover`` the first healthy one, ``RoundRobin``
smooth weighted, ``LeastConnections`` the fewest in flight), then the other available members in
``Members`` order, then the ejected ones (last, not dropped: when every healthy one fails, trying
beats refusing, as the registry's own ``pick`` does). One ``pick`` per call, so the round robin
advances once per operation, as it does for an HTTP request.

Without the registry (unit tests, ``Destinations(settings)``) the order is the group's mode over
configuration only: ``Failover`` the ``Members`` order, ``RoundRobin`` the members rotated by one
at each call (weights repeat a member), ``LeastConnections`` the ``Members`` order. A caller tries
the peers in that order and treats "cannot connect or associate" as "down, try the next"
(:mod:`.forwarder`, :mod:`.qr`).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from dicomproxy.config.model import DEFAULT_UPSTREAM, RemoteAe, Settings
from dicomproxy.dicom.ul.errors import AssociationRejected, UpperLayerError
from dicomproxy.host import UpstreamDirectory


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
    """Immutable view of the settings plus, with ``upstreams``, the registry's health and balancers
    (then :meth:`peers` runs on the event loop, as the registry does; without it a round-robin
    cursor per group, thread-safe)."""

    def __init__(self, settings: Settings, upstreams: UpstreamDirectory | None = None) -> None:
        self._settings = settings
        self._upstreams = upstreams
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
        if self._upstreams is not None:
            return self._by_health(name, members, self._upstreams)
        if group.mode == "RoundRobin" and len(members) > 1:
            weighted = [p for p in members for _ in range(self._weight(p.name))]
            with self._lock:
                start = next(self._cursors[name]) % len(weighted)
            first = weighted[start]
            return [first, *(p for p in members if p is not first)]
        return members

    @staticmethod
    def _by_health(name: str, members: list[Peer], upstreams: UpstreamDirectory) -> list[Peer]:
        """The registry's pick first, the other available members, the ejected last (module
        docstring). A name the registry no longer knows (a reload dropped it): ``members`` as is."""
        try:
            first = upstreams.pick(name)
            now = time.monotonic()
            available = {m.name: m.available(now) for m in upstreams.members(name)}
        except LookupError:
            return members
        chosen = [p for p in members if first is not None and p.name == first.name]
        rest = [p for p in members if p not in chosen]
        return [*chosen, *(p for p in rest if available.get(p.name, True)),
                *(p for p in rest if not available.get(p.name, True))]

    def report(self, name: str, error: UpperLayerError | None) -> None:
        """An association with the server ``name``'s DICOM side worked (``error`` None) or failed:
        fed to the registry's passive ejection like a proxied HTTP request's outcome, so that
        :meth:`peers` (and the registry's ``pick``) stop choosing a member whose DICOM side is down
        although its HTTP side answers. Counted as a failure: the connection refused, reset or
        timed out, an abort during the association request, an A-ASSOCIATE-RJ, except a permanent
        one for the AE titles (calling or called AE title, application context: PS3.8 source 1,
        reasons 2, 3, 7), which is the peer answering that it does not know these titles (with
        ``AeTitles`` ``Modality``, one modality's), not that it is down. A name the registry does not
        hold (a ``Dicom:Modalities`` entry) or no registry: nothing. On the event loop."""
        if self._upstreams is None or name not in self._servers:
            return
        try:
            (member,) = self._upstreams.members(name)
        except (LookupError, ValueError):
            return
        if error is None:
            member.answered()
        elif not _about_titles(error):
            member.failed(f"DICOM: {error}")

    def _single(self, name: str) -> Peer:
        peer = self._servers.get(name) or self._modalities.get(name)
        if peer is None:
            raise UnknownDestination(name, self.known)
        return peer

    def _weight(self, name: str) -> int:
        server = self._settings.upstreams.servers.get(name)
        return server.weight if server is not None else 1


def _about_titles(error: UpperLayerError) -> bool:
    """A permanent rejection by the service user for the AE titles or application context."""
    return isinstance(error, AssociationRejected) and error.result == 1 and error.source == 1 \
        and error.reason in (2, 3, 7)
