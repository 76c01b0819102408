"""The PACS as the gateway reaches it over HTTP: the proxy's connection pool and the session
the features share for their own calls."""

from __future__ import annotations

import aiohttp

from dicomproxy.config.settings import UpstreamSettings
from dicomproxy.upstream.client import ConnectionPool

CHUNK = 256 * 1024


class Upstream:
    """The PACS: the proxy's connection pool, and the aiohttp session the features share."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self.pool = ConnectionPool(
            self.base, max_connections=settings.max_connections,
            connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
        )

    def url(self, path: str) -> str:
        return self.base + (path if path.startswith("/") else "/" + path)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.settings.max_connections, limit_per_host=self.settings.max_connections,
                keepalive_timeout=30, ttl_dns_cache=300, enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
                ),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                read_bufsize=CHUNK,
            )
        return self._session

    async def start(self) -> None:
        await self.session()

    async def stop(self) -> None:
        await self.pool.close()
        if self._session is not None:
            await self._session.close()
