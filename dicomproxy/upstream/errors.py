"""What the upstream client raises: one hierarchy, each error worded for a log line and, where
a setting governs it, naming that setting (``key``) so the proxy's error answer can say which
one to change."""

from __future__ import annotations


class UpstreamError(Exception):
    """Base of everything the client raises; ``str()`` says what went wrong in words fit for a log."""

    key = ""  # the configuration key that governs this failure, if one does


class ConnectError(UpstreamError):
    """The upstream could not be reached (refused, no route, DNS, TLS handshake)."""


class ConnectTimeout(UpstreamError):
    """No connection within the connect timeout."""

    key = "Upstream:ConnectTimeoutSeconds"


class PoolTimeout(UpstreamError):
    """Every connection of the pool stayed busy for longer than the caller would wait."""

    key = "Upstream:MaxConnections"


class ReadTimeout(UpstreamError):
    """The upstream said nothing for the read timeout while an answer (or room for the body) was due."""

    key = "Upstream:ReadTimeoutSeconds"


class HeadTimeout(ReadTimeout):
    """The answer's head (interim answers included) took longer than its deadline to arrive in full."""

    key = "Upstream:ResponseHeadTimeoutSeconds"


class RemoteProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1: invalid bytes, a bad status, a connection lost mid-answer."""


class HeadTooLarge(RemoteProtocolError):
    """The answer's head (interim answers included) is larger than the cap."""

    key = "Upstream:MaxResponseHeadBytes"


class Stale(RemoteProtocolError):
    """A kept-alive connection closed before any byte of the answer came: the request may be
    replayed on a new connection if it is idempotent and none of its body was consumed."""


class LocalProtocolError(UpstreamError):
    """The request itself cannot be sent as HTTP/1.1: an invalid header name or value, a body
    longer or shorter than the length it declared. Nothing more is written; the connection is dropped."""
