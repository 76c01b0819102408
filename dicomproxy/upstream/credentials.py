"""The gateway's own credentials for the PACS: ``Upstream:Username``/``Password``, or a
``user:password@`` in ``Upstream:Url``.

They go on the gateway's own calls only (health probe, TUS import, Lua ``RestApi*``, the change
feed, DICOMweb forwarding: everything on ``Upstream.client``), and there only to the PACS's
origin: the same httpx client also carries the Lua ``HttpGet``/``HttpPost``... calls to any URL,
which must never receive the PACS's password, and a request that brings its own
``Authorization`` (``SetHttpCredentials``, a script's header) keeps it. Proxied requests go
through the pool directly and keep the client's own credentials.

The URL form is split here: :func:`split_userinfo` gives the URL without its ``user:password@``
(what logs, health and error bodies show) and the credentials.
"""

from __future__ import annotations

import base64
from collections.abc import Generator
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from dicomproxy.upstream.pool import Origin


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@`` part, and the (percent-decoded) credentials, if any."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return bare, (unquote(parts.username or ""), unquote(parts.password or ""))


class PacsAuth(httpx.Auth):
    """HTTP basic credentials, sent only to ``origin`` and only when the request has no ``Authorization``."""

    def __init__(self, origin: Origin, username: str, password: str) -> None:
        self.origin = origin
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._header = "Basic " + token

    def __repr__(self) -> str:  # never the header
        return f"PacsAuth({self.origin.label})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        if (url.scheme, url.host, port) == (self.origin.scheme, self.origin.host, self.origin.port) \
                and "authorization" not in request.headers:
            request.headers["Authorization"] = self._header
        yield request
