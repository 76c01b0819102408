"""The one TLS and timeout set-up of every upstream connection (the PACS's and, for the Lua
``Http*`` functions, any other origin's): what ``Upstream`` builds from the ``Upstream``
settings and hands to every pool."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from functools import cached_property

from dicomproxy.upstream.flow import BUFFER_BUDGET, READ_AHEAD


def default_tls() -> ssl.SSLContext:
    """Certificates verified against the system CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` add a private CA)."""
    return ssl.create_default_context()


@dataclass(frozen=True)
class Limits:
    """Timeouts (seconds; 0 turns one off), size caps and TLS for the connections of a pool."""

    connect_timeout: float = 10.0  # TCP (and TLS) connect
    read_timeout: float = 300.0  # longest silence while the upstream owes bytes (or room for ours)
    head_timeout: float = 30.0  # first byte of the answer to the end of its final head
    max_head_bytes: int = 64 << 10  # the answer's head, interim 1xx answers included
    pool_timeout: float = 0.0  # waiting for a free connection when all are busy (0: as long as it takes)
    keepalive_timeout: float = 30.0  # an idle connection older than this is not reused
    read_ahead: int = READ_AHEAD
    buffer_budget: int = BUFFER_BUDGET
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # None: default_tls() on first https use

    @cached_property
    def first_watch(self) -> float:
        """When an exchange's watchdog first looks: the shorter of the read timeout and the head's deadline."""
        return min((t for t in (self.read_timeout, self.head_timeout) if t > 0), default=0.0)

    def with_timeouts(self, connect: float | None, read: float | None, pool: float | None) -> Limits:
        """These limits with httpx's per-request timeouts (None: no limit); the head's deadline stays."""
        return replace(self, connect_timeout=connect or 0.0, read_timeout=read or 0.0, pool_timeout=pool or 0.0)
