"""HTTP Strict Transport Security (RFC 6797) around the app: the header on TLS responses, and the
redirect of plain requests to https.

Each listener wraps the app in what it needs (listeners.py), so nothing is checked per request:

* an ``https://`` listener with ``Https:Hsts``: :class:`Hsts` adds
  ``Strict-Transport-Security: max-age=...`` to every response (replacing one the PACS may send,
  which would name the PACS's policy, not this host's). Never on plain HTTP: RFC 6797 7.2 forbids
  it there, and a browser ignores it anyway.
* an ``http://`` listener with ``Https:RedirectHttp``: :class:`RedirectToHttps` answers 308 (the
  method and body are kept, so an upload client that follows it re-sends the same request)
  to the first ``https://`` listener, the host taken from the request's ``Host`` header.
  ``/dicomproxy/health`` and its probes (``/live``, ``/ready``) are answered over plain HTTP as
  before: load balancers, Docker's ``HEALTHCHECK`` and Kubernetes probes usually ask over plain
  HTTP and take a 3xx for health without following it, and the health document needs no
  credentials and holds no secrets, so there is nothing to protect and a real answer to give.

Both run outside every other layer, so a script's ``onHttpResponse`` cannot remove the header and
an unauthenticated request on the plain listener learns nothing but the redirect.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

HEALTH_PATHS = frozenset({"/dicomproxy/health", "/dicomproxy/health/live", "/dicomproxy/health/ready"})
HEADER = b"strict-transport-security"
_HOST = re.compile(rb"^(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")


def hsts_value(max_age: int, include_subdomains: bool) -> bytes:
    return b"max-age=%d" % max_age + (b"; includeSubDomains" if include_subdomains else b"")


class Hsts:
    """Adds ``Strict-Transport-Security`` to every HTTP response of ``app``."""

    def __init__(self, app: ASGIApp, value: bytes) -> None:
        self.app = app
        self.value = value

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != HEADER]
                headers.append((HEADER, self.value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


class RedirectToHttps:
    """Answers every request but the health check and probes with 308 to ``https://<Host>:<port><target>``."""

    def __init__(self, app: ASGIApp, https_port: int) -> None:
        self.app = app
        self.port_suffix = b"" if https_port == 443 else b":%d" % https_port

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope["headers"] if k == b"host"), b"")
        match = _HOST.match(host)
        if match is None:
            await _answer(send, 400, b"A Host header is needed to redirect to https.\n", [])
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        location = b"https://" + match["host"] + self.port_suffix + target
        await _answer(send, 308, b"This gateway is served over https: " + location + b"\n", [(b"location", location)])


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": "http.response.body", "body": body})
