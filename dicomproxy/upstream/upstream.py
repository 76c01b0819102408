"""The PACS as the gateway reaches it over HTTP: one connection pool for the proxy and for the
features' own calls, and one httpx client on it (and on a pool per other origin, for the Lua
``Http*`` functions), all with one TLS and timeout set-up taken from the ``Upstream`` settings."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from dicomproxy import __version__
from dicomproxy.config.settings import UpstreamSettings
from dicomproxy.upstream.credentials import PacsAuth, split_userinfo
from dicomproxy.upstream.limits import Limits, default_tls
from dicomproxy.upstream.pool import ConnectionPool, Origin, Pools
from dicomproxy.upstream.transport import PoolTransport


class Upstream:
    """The PACS at ``Upstream:Url``.

    * ``pool`` — its keep-alive connections; the streaming proxy uses it directly (``prefix``
      is the URL's path, to put in front of every proxied target);
    * ``client`` — an ``httpx.AsyncClient`` for the features (health probe, TUS import,
      ``RestApi*``, the change feed, STOW-RS forwarding): requests to the PACS go through
      ``pool`` with the gateway's own credentials (:mod:`~dicomproxy.upstream.credentials`),
      requests to any other URL (``HttpGet`` & co.) through a pool for that origin, without them;
    * ``base`` — ``Upstream:Url`` without any ``user:password@`` (what may be shown);
    * ``url(path)`` — ``base`` joined with ``path``.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        # without a user:password@ it may hold: base is what logs, health and error bodies show
        self.base, in_url = split_userinfo(settings.url.rstrip("/"))
        credentials = (settings.username, settings.password) if settings.username else in_url
        self.prefix = urlsplit(self.base).path.rstrip("/").encode("latin-1")
        self.limits = Limits(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            head_timeout=settings.head_timeout,
            max_head_bytes=settings.max_head_bytes,
            tls=default_tls() if self.base.startswith("https:") else None,
        )
        self.pool = ConnectionPool(Origin.of(self.base), self.limits, settings.max_connections)
        self.client = httpx.AsyncClient(
            transport=PoolTransport(Pools(self.limits, pinned=(self.pool,))),
            base_url=self.base,
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout, pool=None),
            headers={"User-Agent": f"DicomProxy/{__version__}"},
            auth=PacsAuth(self.pool.origin, *credentials) if credentials else None,
        )
        # bodies as the PACS stores them: no compression asked for, none undone
        del self.client.headers["Accept-Encoding"]

    def url(self, path: str) -> str:
        return self.base + (path if path.startswith("/") else "/" + path)

    async def session(self) -> httpx.AsyncClient:
        """``client``, for the callers that take a factory (the DICOM side's STOW-RS forwarder)."""
        return self.client

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.client.aclose()
