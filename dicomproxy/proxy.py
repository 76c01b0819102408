"""The streaming reverse proxy: everything the gateway does not own goes to ``Upstream:Url``.

Pure ASGI on top of one pooled ``aiohttp`` session (measured: aiohttp holds up under
concurrency where httpx's pool collapses). Bodies stream both ways in the chunks they arrive
in, so a 1 GB WADO-RS response or STOW-RS upload passes with flat memory. Hop-by-hop headers
are dropped and ``X-Forwarded-For/-Proto/-Host`` added; duplicate headers are kept.

Failures map to gateway statuses with a JSON body: upstream unreachable -> 502, upstream too
slow -> 504. A client that disconnects cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from dicomproxy.metrics import Metrics
from dicomproxy.settings import UpstreamSettings

log = logging.getLogger("dicomproxy.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)
# Expect: the gateway answers "100 Continue" itself (uvicorn does, when the proxy reads the body);
# forwarded, it made aiohttp wait for a 100 that Orthanc never sends: curl uploads hung.
_SKIP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect"}
CHUNK = 256 * 1024


class Upstream:
    """Owns the pooled client session to the PACS; shared by the proxy and the features."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

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
        if self._session is not None:
            await self._session.close()


def _json_error(status: int, error: str, **fields: Any) -> tuple[int, bytes]:
    return status, json.dumps({"error": error, **fields}).encode()


class ReverseProxy:
    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self.upstream = upstream
        self.requests = metrics.counter("dicomproxy_proxy_requests_total", "Proxied requests by status class")
        self.failures = metrics.counter("dicomproxy_proxy_upstream_errors_total", "Upstream failures by kind")

    def _request_headers(self, scope: dict[str, Any]) -> tuple[CIMultiDict[str], bool]:
        raw = scope["headers"]
        connection_tokens: set[str] = set()
        for k, v in raw:
            if k == b"connection":
                connection_tokens.update(t.strip().lower() for t in v.decode("latin-1").split(","))
        headers: CIMultiDict[str] = CIMultiDict()
        host = ""
        forwarded_for = ""
        has_body = False
        for k, v in raw:
            name = k.decode("latin-1").lower()
            if name == "host":
                host = v.decode("latin-1")
            elif name == "content-length":
                has_body = has_body or v != b"0"
                headers.add("Content-Length", v.decode("latin-1"))
                continue
            elif name == "transfer-encoding":
                has_body = True
            elif name == "x-forwarded-for":
                forwarded_for = v.decode("latin-1")
                continue
            if name in _SKIP_REQUEST or name in connection_tokens:
                continue
            headers.add(name, v.decode("latin-1"))
        client = scope.get("client")
        ip = client[0] if client else ""
        headers["X-Forwarded-For"] = f"{forwarded_for}, {ip}" if forwarded_for else ip
        headers["X-Forwarded-Proto"] = scope.get("scheme", "http")
        if host:
            headers["X-Forwarded-Host"] = host
        return headers, has_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        url = self.upstream.base + path.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        headers, has_body = self._request_headers(scope)
        body_done = asyncio.Event()
        started = False

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise asyncio.CancelledError("client disconnected")
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
            body_done.set()

        if not has_body:
            body_done.set()
        current = asyncio.current_task()
        finished = False

        async def watch_disconnect() -> bool:
            """After the body is read, wait for the client to go away; cancel the request if it does."""
            await body_done.wait()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished and current is not None:
                        current.cancel()
                        return True
                    return False

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            session = await self.upstream.session()
            async with session.request(  # encoded=True: the path and query go out byte for byte
                scope["method"], URL(url, encoded=True), headers=headers, data=body() if has_body else None,
                allow_redirects=False, compress=None, auto_decompress=False,
            ) as resp:
                drop = HOP_BY_HOP if "Connection" not in resp.headers else HOP_BY_HOP.union(
                    t.strip().lower() for v in resp.headers.getall("Connection") for t in v.split(",")
                )
                out = [(k.lower(), v) for k, v in resp.raw_headers if k.decode("latin-1").lower() not in drop]
                started = True
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                self.requests.inc(status=f"{resp.status // 100}xx")
                if scope["method"] == "HEAD" or resp.status in (204, 304):
                    finished = True
                    await send({"type": "http.response.body", "body": b""})
                    return
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finished = True
                await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                log.debug("client disconnected; upstream request to %s cancelled", url)
                return
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self.failures.inc(kind="timeout")
            if not started:
                await self._error(send, *_json_error(
                    504, "upstream timeout", upstream=self.upstream.base,
                    detail=f"no answer within {self.upstream.settings.read_timeout:g} s (Upstream:ReadTimeoutSeconds)",
                ))
        except aiohttp.ClientConnectorError as e:
            self.failures.inc(kind="unreachable")
            await self._error(send, *_json_error(
                502, "upstream unreachable", upstream=self.upstream.base, detail=str(e.os_error or e)))
        except (aiohttp.ClientError, OSError) as e:
            self.failures.inc(kind="broken")
            log.warning("upstream %s failed mid-request: %s", url, e)
            if not started:
                await self._error(send, *_json_error(
                    502, "upstream failed", upstream=self.upstream.base, detail=str(e) or type(e).__name__))
        finally:
            watcher.cancel()

    @staticmethod
    async def _error(send: Any, status: int, body: bytes) -> None:
        with contextlib.suppress(Exception):
            await send({
                "type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            })
            await send({"type": "http.response.body", "body": body})
