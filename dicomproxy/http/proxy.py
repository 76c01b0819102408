"""The streaming reverse proxy: everything the gateway does not own goes to ``Upstream:Url``.

Pure ASGI on top of the keep-alive pool of ``http_client`` (chosen by measurement: about half
the CPU of aiohttp per request, which itself holds up under concurrency where httpx's pool
collapses; the features' own calls to the PACS still use the pooled aiohttp session). Bodies
stream both ways in the chunks they arrive in, so a 1 GB WADO-RS response or STOW-RS upload
passes with flat memory. Hop-by-hop headers
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

from dicomproxy.metrics import HTTP_BUCKETS, Metrics
from dicomproxy.upstream import Upstream
from dicomproxy.upstream.client import (
    ConnectError,
    ConnectTimeout,
    Headers,
    ReadTimeout,
    UpstreamError,
)

log = logging.getLogger("dicomproxy.http.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    }
)
# Expect: the gateway answers "100 Continue" itself (uvicorn does, when the proxy reads the body);
# forwarded, the upstream would be asked for a 100 that the client has already had.
_SKIP_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect"}


def _with_connection_tokens(names: frozenset[bytes], headers: Headers) -> frozenset[bytes]:
    """``names`` plus the headers a ``Connection`` header lists: those are hop-by-hop too."""
    for k, v in headers:
        if k.lower() == b"connection":
            names = names | {t.strip().lower() for t in v.split(b",")}
    return names


def _json_error(status: int, error: str, **fields: Any) -> tuple[int, bytes]:
    return status, json.dumps({"error": error, **fields}).encode()


class ClientDisconnected(Exception):
    """The client went away while its request body was being forwarded."""


# A request still running after this long gets a task that watches for the client leaving.
# Most answers come well before it, and a task per request costs more than the proxying.
WATCH_AFTER = 0.05


class ReverseProxy:
    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self.upstream = upstream
        self.requests = metrics.counter("dicomproxy_proxy_requests_total", "Proxied requests by status class",
                                        labels=("status",))
        self.failures = metrics.counter("dicomproxy_proxy_upstream_errors_total", "Upstream failures by kind",
                                        labels=("kind",))
        self.first_byte = metrics.histogram(
            "dicomproxy_proxy_first_byte_seconds",
            "Seconds from the request to the upstream answer's head sent on (time to first byte), by status class",
            labels=("status",), buckets=HTTP_BUCKETS,
        )

    @staticmethod
    def _request_headers(scope: dict[str, Any]) -> tuple[Headers, bool, int | None]:
        """What goes upstream: hop-by-hop and framing headers dropped, ``X-Forwarded-*`` added."""
        raw = scope["headers"]
        drop = _with_connection_tokens(_SKIP_REQUEST, raw)
        headers: Headers = []
        host = b""
        forwarded_for = b""
        has_body = False
        content_length: int | None = None
        for k, v in raw:
            name = k.lower()
            if name in drop:
                if name == b"host":
                    host = v
                elif name == b"content-length":
                    content_length = int(v)
                    has_body = has_body or content_length > 0
                elif name == b"transfer-encoding":
                    has_body = True
                continue
            if name == b"x-forwarded-for":
                forwarded_for = v
                continue
            headers.append((name, v))
        client = scope.get("client")
        ip = client[0].encode() if client else b""
        headers.append((b"x-forwarded-for", forwarded_for + b", " + ip if forwarded_for else ip))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        if host:
            headers.append((b"x-forwarded-host", host))
        return headers, has_body, content_length

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target = target + b"?" + scope["query_string"]
        headers, has_body, content_length = self._request_headers(scope)
        body_done = asyncio.Event()
        started = finished = False

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
            body_done.set()

        if not has_body:
            body_done.set()
        current = asyncio.current_task()
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[bool] | None = None

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

        def start_watching() -> None:
            nonlocal watcher
            watcher = loop.create_task(watch_disconnect())

        received = loop.time()
        timer = loop.call_later(WATCH_AFTER, start_watching)
        pool = self.upstream.pool
        response = None
        try:
            response = await pool.request(
                scope["method"].encode(), target, headers,
                body() if has_body else None, content_length if has_body else None,
            )
            drop = _with_connection_tokens(HOP_BY_HOP, response.headers)
            out = [(k, v) for k, v in response.headers if k not in drop]
            started = True
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            status_class = f"{response.status // 100}xx"
            self.requests.inc(status=status_class)
            self.first_byte.observe(loop.time() - received, status=status_class)
            while True:
                chunk = await response.read()
                if not chunk:
                    break
                if response.at_end:  # the whole (rest of the) body is in: one message, not two
                    finished = True
                    await send({"type": "http.response.body", "body": chunk})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b""})
        except ClientDisconnected:
            log.debug("client left mid-upload; upstream request to %s dropped", target)
        except asyncio.CancelledError:
            if watcher is not None and watcher.done() and not watcher.cancelled() and watcher.result():
                log.debug("client disconnected; upstream request to %s cancelled", target)
                return
            raise
        except (ConnectTimeout, ReadTimeout) as e:
            self.failures.inc(kind="timeout")
            setting = "ConnectTimeoutSeconds" if isinstance(e, ConnectTimeout) else "ReadTimeoutSeconds"
            if started:
                log.warning("upstream %s failed mid-request: %s", self.upstream.base, e)
            else:
                await self._error(send, *_json_error(
                    504, "upstream timeout", upstream=self.upstream.base, detail=f"{e} (Upstream:{setting})"))
        except ConnectError as e:
            self.failures.inc(kind="unreachable")
            await self._error(send, *_json_error(502, "upstream unreachable", upstream=self.upstream.base,
                                                 detail=str(e)))
        except (UpstreamError, OSError) as e:
            self.failures.inc(kind="broken")
            log.warning("upstream %s failed mid-request: %s", self.upstream.base, e)
            if not started:
                await self._error(send, *_json_error(
                    502, "upstream failed", upstream=self.upstream.base, detail=str(e) or type(e).__name__))
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
            if response is not None:
                response.close()

    @staticmethod
    async def _error(send: Any, status: int, body: bytes) -> None:
        with contextlib.suppress(Exception):
            await send({
                "type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            })
            await send({"type": "http.response.body", "body": body})
