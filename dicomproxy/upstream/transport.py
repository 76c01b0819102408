"""httpx over the gateway's own pools: :class:`PoolTransport` is an ``httpx.AsyncBaseTransport``,
so the features keep httpx's API (``await client.get(url)``, auth, redirects, JSON) while their
requests share the proxy's connections, TLS set-up, timeouts and framing checks.

httpx's per-request ``timeout`` maps onto the pool's: ``connect``, ``read`` (the upstream's
silence; it also covers a stalled body upload, so ``write`` is not separate) and ``pool``
(waiting for a free connection). The answer's head keeps its own deadline and size cap.
Errors come back as httpx's own exceptions (``httpx.ConnectError``, ``httpx.ReadTimeout``,
``httpx.RemoteProtocolError``...), all subclasses of ``httpx.TransportError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import httpx

from dicomproxy.upstream import errors
from dicomproxy.upstream.connection import Body, Exchange
from dicomproxy.upstream.pool import Pools

_ERRORS: tuple[tuple[type[errors.UpstreamError], type[httpx.TransportError]], ...] = (
    (errors.ConnectTimeout, httpx.ConnectTimeout),
    (errors.ConnectError, httpx.ConnectError),
    (errors.PoolTimeout, httpx.PoolTimeout),
    (errors.ReadTimeout, httpx.ReadTimeout),
    (errors.LocalProtocolError, httpx.LocalProtocolError),
    (errors.RemoteProtocolError, httpx.RemoteProtocolError),
)


def as_httpx(error: errors.UpstreamError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for one of the pool's."""
    for ours, theirs in _ERRORS:
        if isinstance(error, ours):
            return theirs(str(error), request=request)
    return httpx.TransportError(str(error))


class PoolTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through :class:`~dicomproxy.upstream.pool.Pools` (a pool per origin)."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"only http:// and https:// URLs are supported, not {url}", request=request)
        pool = self.pools.get(url.scheme, url.host, url.port)
        timeout = request.extensions.get("timeout", {})
        limits = pool.limits.with_timeouts(timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
        body, length = _request_body(request)
        try:
            exchange = await pool.request(
                request.method.encode("ascii"), url.raw_path, list(request.headers.raw), body, length, limits
            )
        except errors.UpstreamError as e:
            raise as_httpx(e, request) from e
        return httpx.Response(
            exchange.status, headers=exchange.headers, stream=_AnswerStream(exchange, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self.pools.close()


def _request_body(request: httpx.Request) -> tuple[Body, int | None]:
    """The body and its declared length: bytes as they are, a stream with its ``Content-Length`` if any."""
    declared = request.headers.get("content-length")
    if isinstance(request.stream, httpx.ByteStream):
        content = request.content
        return (content if content or declared is not None else None), None
    stream = request.stream
    assert isinstance(stream, AsyncIterable)
    length = int(declared) if declared is not None and declared.isdigit() else None
    return stream, length


class _AnswerStream(httpx.AsyncByteStream):
    def __init__(self, exchange: Exchange, request: httpx.Request) -> None:
        self.exchange = exchange
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await self.exchange.read():
                yield chunk
        except errors.UpstreamError as e:
            raise as_httpx(e, self.request) from e

    async def aclose(self) -> None:
        self.exchange.close()
