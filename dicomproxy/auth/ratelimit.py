"""Failed authentication attempts per source address: a token bucket each, in a bounded table.

Every address starts with ``burst`` tokens; each failed attempt (a wrong password, an unknown
API key, a refused token) takes one, and tokens come back at ``per_minute``. An address with
less than one token left gets ``429 Too Many Requests`` with ``Retry-After`` (the seconds until
its next token) for every request that needs authentication, before any credential is looked
at: a blocked client learns nothing, right or wrong, and costs no password hash.

An IPv6 client is counted by its /64 (what one host or site usually gets), an IPv4 client by its
address. The table holds at most ``max_addresses`` entries (~200 bytes each: 10,000 ~ 2 MB);
when full the address that failed longest ago goes first (it has refilled the most). Successful
requests never touch the table, so the hot path pays one dict lookup for the address.

The address is the TCP peer's (``scope["client"]``): behind a load balancer every client shares
its address, so put the limits on the load balancer instead, or raise ``burst`` there.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable


def address_key(host: str) -> str:
    """The table key for a peer address (IPv6: its /64)."""
    if ":" not in host:
        return host
    try:
        net = ipaddress.IPv6Network((host.split("%")[0], 64), strict=False)
    except ValueError:
        return host
    mapped = ipaddress.IPv6Address(host.split("%")[0]).ipv4_mapped
    return str(mapped) if mapped is not None else str(net)


class FailureLimiter:
    """See the module docstring. ``burst`` 0 turns the limiter off."""

    def __init__(self, burst: int = 10, per_minute: float = 6, max_addresses: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.rate = per_minute / 60.0
        self.max_addresses = max_addresses
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        tokens, at = entry
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def retry_after(self, host: str) -> int:
        """Seconds this address must wait (0: it may try now)."""
        if not self.burst or not self._buckets:
            return 0
        key = address_key(host)
        if key not in self._buckets:
            return 0
        tokens = self._tokens(key, self.clock())
        if tokens >= 1:
            return 0
        return max(1, math.ceil((1 - tokens) / self.rate)) if self.rate > 0 else 86400

    def failed(self, host: str) -> None:
        """Count one failed attempt from ``host``."""
        if not self.burst:
            return
        key = address_key(host)
        now = self.clock()
        tokens = self._tokens(key, now)
        self._buckets[key] = (max(0.0, tokens - 1), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
