"""One named upstream as the registry serves it (:class:`Member`): its HTTP client and pool, its
DICOM side, and its health as an explicit two-state machine.

States and transitions (``HealthCheck`` settings of the server):

* ``healthy`` -> ``ejected``: ``Failures`` consecutive failures, counted from active checks and
  from traffic alike (a proxied request that could not connect, or got a 5xx from the upstream
  itself; an association with its DICOM side that failed, :meth:`.dicom.destinations.Destinations.report`);
* ``ejected`` -> ``healthy``: ``Successes`` consecutive good active checks. A server without any
  active check (no ``Path``, no ``Echo``, and ``default``) cannot be checked, so it is tried again
  ``IntervalSeconds`` after its ejection (half-open): one good answer brings it back, one more
  failure ejects it for another interval.

Groups only pick ``available`` members; everything here runs on the event loop (no locks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dicomproxy.config.model import HealthCheckSettings, PacsAe
from dicomproxy.http.relay import Relay
from dicomproxy.upstream.upstream import Upstream

log = logging.getLogger(__name__)


class State(Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"


@dataclass
class Health:
    """What health and metrics show of a member; counters since the member was built."""

    state: State = State.HEALTHY
    failures_in_a_row: int = 0
    successes_in_a_row: int = 0
    requests: int = 0
    errors: int = 0  # failed requests and failed checks
    in_flight: int = 0
    latency_ms: float | None = None  # of the last active check
    last_error: str | None = None
    checked: float | None = None  # epoch seconds of the last active check
    changed: float = field(default_factory=time.time)  # epoch seconds of the last state change
    retry_at: float = 0.0  # monotonic: when an ejected member without active checks is tried again


class Member:
    """A server of ``Upstreams:Servers`` (or ``default``): ``upstream`` (pool + client), ``dicom``
    (its DICOM side, None when it has none), ``weight`` and its :class:`Health`."""

    def __init__(self, name: str, upstream: Upstream, *, dicom: PacsAe | None, dicom_host: str, weight: int,
                 check: HealthCheckSettings, owned: bool) -> None:
        self.name = name
        self.upstream = upstream
        self.dicom = dicom
        self.dicom_host = dicom_host
        self.weight = weight
        self.check = check
        self.owned = owned  # the registry built its Upstream (and closes it); ``default``'s is the gateway's
        self.health = Health()
        self._idle: asyncio.Event | None = None
        self.actively_checked = bool(check.path) or (check.echo and dicom is not None)
        self.relay = Relay(  # forwarding headers and URL rewriting, per upstream
            upstream.settings, upstream.pool.origin, upstream.prefix)

    # -- what groups ask
    def available(self, now: float) -> bool:
        h = self.health
        if h.state is State.HEALTHY:
            return True
        return not self.actively_checked and now >= h.retry_at

    # -- traffic (the proxy)
    def begin(self) -> None:
        self.health.in_flight += 1
        self.health.requests += 1

    def end(self) -> None:
        h = self.health
        h.in_flight -= 1
        if self._idle is not None and h.in_flight <= 0:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no request is in flight (a retired member, before its pool closes)."""
        if self.health.in_flight <= 0:
            return
        self._idle = asyncio.Event()
        await self._idle.wait()

    def failed(self, reason: str) -> None:
        """A failure seen in traffic or by a check: may eject."""
        h = self.health
        h.errors += 1
        h.last_error = reason
        h.failures_in_a_row += 1
        h.successes_in_a_row = 0
        if h.state is State.HEALTHY and h.failures_in_a_row >= self.check.failures:
            self._move(State.EJECTED)
        if h.state is State.EJECTED:
            h.retry_at = time.monotonic() + self.check.interval

    def answered(self) -> None:
        """A good answer in traffic: the failures in a row end; a half-open member is back."""
        h = self.health
        h.failures_in_a_row = 0
        if h.state is State.EJECTED and not self.actively_checked:
            self._move(State.HEALTHY)

    # -- active checks (:mod:`~dicomproxy.upstream.health`)
    def checked(self, ok: bool, latency_ms: float, error: str | None) -> None:
        h = self.health
        h.latency_ms = latency_ms
        h.checked = time.time()
        if not ok:
            self.failed(error or "check failed")
            return
        h.failures_in_a_row = 0
        h.successes_in_a_row += 1
        if h.state is State.EJECTED and h.successes_in_a_row >= self.check.successes:
            self._move(State.HEALTHY)

    def _move(self, state: State) -> None:
        h = self.health
        h.state = state
        h.changed = time.time()
        h.successes_in_a_row = 0
        log.warning(
            "upstream %s (%s) is %s%s", self.name, self.upstream.base, state.value,
            f": {h.last_error}" if state is State.EJECTED and h.last_error else "")

    def status(self) -> dict[str, Any]:
        """For ``/dicomproxy/health`` and the status page: no credentials (``base`` has none)."""
        h = self.health
        return {
            "url": self.upstream.base, "state": h.state.value, "healthy": h.state is State.HEALTHY,
            "inFlight": h.in_flight, "requests": h.requests, "errors": h.errors,
            "failuresInARow": h.failures_in_a_row, "latencyMs": h.latency_ms, "lastError": h.last_error,
            "checked": h.checked, "changed": h.changed, "weight": self.weight,
            "dicom": f"{self.dicom.aet}@{self.dicom_host}:{self.dicom.port}" if self.dicom else None,
        }
