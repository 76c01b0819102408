"""The streaming reverse proxy: everything the gateway does not own goes to ``Upstream:Url``.

Pure ASGI on the PACS's keep-alive pool (:mod:`dicomproxy.upstream.pool`, measured at about
half aiohttp's CPU per request). Bodies stream both ways in the chunks they arrive in, so a
1 GB WADO-RS answer or STOW-RS upload passes with flat memory. Hop-by-hop headers are dropped,
``X-Forwarded-For`` extended (every value the client sent is kept, in order, then the client's
address), ``Forwarded`` and ``X-Forwarded-Proto``/``-Host`` set to what the gateway saw, and
URLs in answers that point at the PACS rewritten to point at the gateway (both:
:mod:`dicomproxy.http.relay`); duplicate headers are kept both ways.

Framing is never taken from headers a client or a Lua hook can edit: ``Host``,
``Content-Length``, ``Transfer-Encoding`` and ``Connection`` going upstream come from the pool's
head writer, which refuses a body longer or shorter than the length it declared and then drops
the connection (a hook that replaces the length gets a 500, the upstream an incomplete
message); going to the client, ``Content-Length`` comes from the framing the upstream's
answer was read with. A bodiless POST, PUT or PATCH goes with ``Content-Length: 0``.

Requests whose method gives a body no meaning (GET, HEAD, DELETE, OPTIONS, TRACE) but which
carry one anyway are held: the body (at most ``HELD_BODY_LIMIT`` bytes, else 413) is read in
full before the head goes upstream, then sent with its exact length. The other choice,
refusing such bodies, would break clients that send one (an empty chunked body, ``{}``) with a
DELETE; streaming them is what let a PACS execute a DELETE from its head alone while the
client's chunked body turned out invalid and the client got 400. Methods with a body meaning
stream as they come: the upstream cannot see a complete message until the last declared byte
or the last chunk, which the writer sends only after the client's body ended well.

Bytes in and out (``dicomproxy_proxy_bytes_received_total`` / ``_sent_total``, the status
page's bytes graph): the request body's chunks are summed in a local as they pass (GETs have
none), the answer's length is the upstream exchange's own count of body bytes read
(``Exchange.body_bytes``; the rewriter's output when URLs are rewritten), and each is added once
per exchange, in the ``finally``, to a plain counter (:meth:`~dicomproxy.metrics.Metrics.tally`)
read at scrape time. An answer the client left mid-way counts what was read from the upstream.
Measured with bench/proxy_instructions.py: see README "Performance".

Failures map to gateway statuses with a JSON body that names the setting involved: upstream
unreachable or broken -> 502, too slow -> 504. A client that disconnects cancels the upstream
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

from dicomproxy.http import federated
from dicomproxy.http.coding import Encoder, preferred
from dicomproxy.http.relay import Relay, Rewrite, Rewriter
from dicomproxy.metrics import HTTP_BUCKETS, LeanHistogramChild, Metrics
from dicomproxy.upstream import Upstream
from dicomproxy.upstream.connection import Body, Exchange
from dicomproxy.upstream.errors import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    UpstreamError,
)
from dicomproxy.upstream.framing import HOP_BY_HOP, IDEMPOTENT_METHODS, NO_BODY_METHODS, Framing, Headers
from dicomproxy.upstream.member import Member
from dicomproxy.upstream.registry import Registry, UnknownUpstream

if TYPE_CHECKING:
    from dicomproxy.upstream.directory import Upstreams

log = logging.getLogger("dicomproxy.http.proxy")

# Request headers the proxy itself replaces. Expect: the gateway answers "100 Continue" itself
# (uvicorn does, when the proxy reads the body); forwarded, the upstream would be asked for a
# 100 that the client has already had.
# The client's own Forwarded and X-Forwarded-Proto/-Host: the PACS hears the gateway's, not what a client claims.
_REPLACED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"expect",
                       b"host"})
# Answer headers never passed on: hop-by-hop, and the length, which the proxy writes from the framing.
_SKIP_ANSWER = HOP_BY_HOP | {b"content-length"}
_URL_HEADERS = frozenset({b"location", b"content-location"})  # what a headers-only rewrite changes
HELD_BODY_LIMIT = 64 << 10
_CHUNKED = Framing.CHUNKED
# Retried on the next member of a group when the connection cannot be made (and there is no body).
_RETRIED = IDEMPOTENT_METHODS & {b"GET", b"HEAD", b"OPTIONS"}


def _with_connection_tokens(names: frozenset[bytes], headers: Headers) -> frozenset[bytes]:
    """``names`` plus the headers a ``Connection`` header lists: those are hop-by-hop too."""
    for k, v in headers:
        if k == b"connection":
            names = names | {t.strip().lower() for t in v.split(b",")}
    return names


def _json_error(status: int, error: str, **fields: Any) -> tuple[int, bytes]:
    return status, json.dumps({"error": error, **fields}).encode()


class ClientDisconnected(Exception):
    """The client went away while its request body was being forwarded."""


# A request still running after this long gets a task that watches for the client leaving.
# Most answers come well before it, and a task per request costs more than the proxying.
WATCH_AFTER = 0.05


class _TooLarge(Exception):
    """A held body passed ``HELD_BODY_LIMIT``."""


class ReverseProxy:
    """The proxy: to ``upstream`` alone, or, when ``upstreams`` has ``Upstreams`` configured, to the
    member its routes (or a hook's ``request:SetUpstream``) choose (see :meth:`_routed`)."""

    def __init__(self, upstream: Upstream, metrics: Metrics, upstreams: Upstreams | None = None) -> None:
        self.upstream = upstream
        self.upstreams = upstreams
        self.relay = Relay(upstream.settings, upstream.pool.origin, upstream.prefix)
        self.failures = metrics.counter("dicomproxy_proxy_upstream_errors_total", "Upstream failures by kind",
                                        labels=("kind",))
        self.abandoned = metrics.counter(
            "dicomproxy_proxy_client_abandoned_total",
            "Proxied requests the client left before the end: mid-upload (its body) or mid-answer", labels=("stage",))
        # The request counter is the histogram's count (both were always bumped together): one
        # observation per request, through a child bound once per status class (metrics.py).
        self.first_byte = metrics.lean_histogram(
            "dicomproxy_proxy_first_byte_seconds",
            "Seconds from the request to the upstream answer's head sent on (time to first byte), by status class",
            labels=("status",), buckets=HTTP_BUCKETS,
            count_as=("dicomproxy_proxy_requests_total", "Proxied requests by status class"),
        )
        # Plain counters (Metrics.tally), added to once per exchange: two prometheus_client incs
        # would cost ~3 us a request (see "Bytes in and out" in the module docstring).
        self.bytes_in = metrics.tally("dicomproxy_proxy_bytes_received_total",
                                      "Request body bytes received from clients and passed on to the upstream")
        self.bytes_out = metrics.tally("dicomproxy_proxy_bytes_sent_total",
                                       "Answer body bytes read from the upstream for clients (after URL rewriting)")
        self._by_class: dict[int, LeanHistogramChild] = {}

    def _status_class(self, status: int) -> LeanHistogramChild:
        child = self._by_class.get(status // 100)
        if child is None:
            child = self._by_class[status // 100] = self.first_byte.child(f"{status // 100}xx")
        return child

    def _request_headers(self, scope: dict[str, Any], relay: Relay) -> tuple[Headers, bool, int | None, Forward]:
        """What goes upstream (forwarding headers added, :mod:`~dicomproxy.http.relay`), whether a
        body was declared, its length, and the ``Host``/rewrite decision for this request.

        Framing and hop-by-hop names are dropped here already (the pool's head writer drops
        any left, a hook's included); the declared framing says only whether to read a body.
        """
        headers: Headers = []
        host = b""
        forwarded: list[bytes] = []
        has_body = False
        length: int | None = None
        for name, v in scope["headers"]:  # lower-case: uvicorn's, and the Lua hooks' (set_header)
            if name in _REPLACED:
                if name == b"x-forwarded-for":
                    forwarded.append(v)
                elif name == b"host":
                    host = v
            elif name == b"content-length":
                if not v.strip().isdigit():
                    raise LocalProtocolError(f"invalid Content-Length {v[:40]!r} (set by a hook?)")
                length = int(v)
                has_body = has_body or length > 0
            elif name == b"transfer-encoding":
                has_body = True
            else:
                headers.append((name, v))
        added, lines, facing = relay.forwarding(scope, host, forwarded)
        if not lines:
            headers += added
        rewrite = relay.rewrite(scope["path"], facing)
        coding = _ask_identity(headers) if rewrite is not None and rewrite.body else None
        return headers, has_body, length, Forward(facing.host_for, rewrite, coding, lines)


    async def _routed(self, scope: dict[str, Any], receive: Any, send: Any, routing: Registry) -> None:
        """The upstream a hook set (``scope["upstream"]``, checked by the Lua layer) or the routes chose."""
        name = scope.get("upstream") or routing.routes.choose(scope)  # type: ignore[union-attr]
        try:
            member = routing.pick(name)
        except UnknownUpstream as e:
            await self._error(send, *_json_error(500, "unknown upstream", detail=str(e)))
            return
        if member is None:
            await self._error(send, *_json_error(502, "upstream unreachable", upstream=name))
            return
        if routing.federated(name) and federated.is_search(scope):
            await federated.search(scope, send, routing.members(name), self.upstreams)  # type: ignore[arg-type]
            return
        await self(scope, receive, send, member, routing, name)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, member: Member | None = None,
                       routing: Registry | None = None, name: str = "") -> None:
        """Proxy one exchange: to ``self.upstream`` (``member`` None, no ``Upstreams`` configured: one
        attribute check, no routing cost), or to ``member`` of ``name`` (from :meth:`_routed`), trying
        the next member of the group when an idempotent bodiless request cannot connect."""
        if member is None:
            upstreams = self.upstreams
            if upstreams is not None and upstreams.routing is not None:
                await self._routed(scope, receive, send, upstreams.routing)
                return
            upstream = self.upstream
        else:
            upstream = member.upstream
        target = upstream.prefix + (scope.get("raw_path") or scope["path"].encode())
        if scope.get("query_string"):
            target = target + b"?" + scope["query_string"]
        body_done: asyncio.Event | None = None  # made only for a request with a body: most have none
        started = finished = False
        uploaded = 0
        rewritten = -1  # the rewritten answer's length, when it is rewritten

        current = asyncio.current_task()
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[bool] | None = None

        def start_watching() -> None:
            # the watcher's coroutine function is made here, when it is needed: most requests end first
            async def watch_disconnect() -> bool:
                """After the body is read, wait for the client to go away; cancel the request if it does."""
                if body_done is not None:
                    await body_done.wait()
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        if not finished and current is not None:
                            current.cancel()
                            return True
                        return False

            nonlocal watcher
            watcher = loop.create_task(watch_disconnect())

        # perf_counter, not loop.time(): uvloop's is libuv's uv_now, cached per loop turn in whole
        # milliseconds, so a sub-millisecond answer measured 0.0 (the sum of five fast ones was 0).
        received = perf_counter()
        timer = loop.call_later(WATCH_AFTER, start_watching)
        response: Exchange | None = None
        served: _Served | None = None
        try:
            method = scope["method"].encode()
            headers, has_body, length, forward = self._request_headers(scope, self.relay if member is None
                                                                       else member.relay)
            content: Body = None
            if has_body:  # made only for a request with a body: most have none

                async def body() -> AsyncIterator[bytes]:
                    nonlocal uploaded
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            raise ClientDisconnected
                        chunk = message.get("body", b"")
                        if chunk:
                            uploaded += len(chunk)
                            yield chunk
                        if not message.get("more_body", False):
                            break
                    assert body_done is not None
                    body_done.set()

            if not has_body:
                pass
            elif method in NO_BODY_METHODS:
                body_done = asyncio.Event()
                content, length = await _held(body()), None
                body_done.set()
            else:
                body_done = asyncio.Event()
                content = body()
            if member is None:
                response = await upstream.pool.request(method, target, headers, content, length, host=forward.host,
                                                       checked=forward.lines)
            else:
                served = _Served(member)
                response = await self._connect(served, routing, name, scope, method, target, headers, forward,
                                               content, length)
                member = served.member
                upstream = member.upstream
            answer, urls = _answer_headers(response)
            rewriter: Rewriter | None = None
            encoder: Encoder | None = None
            if forward.rewrite is not None and (urls or forward.rewrite.body):  # else nothing to rewrite
                answer, rewriter = forward.rewrite.answer(response.status, answer, method == b"HEAD")
                if rewriter is not None and forward.coding is not None:
                    encoder = Encoder(forward.coding)  # the coding the client would have had direct
                    answer = [(k, v) for k, v in answer if k != b"content-encoding"]
                    answer.append((b"content-encoding", forward.coding))
            started = True
            if member is None:
                await send({"type": "http.response.start", "status": response.status, "headers": answer})
            else:  # "upstream": the Lua layer's response.Upstream (uvicorn ignores the key)
                await send({"type": "http.response.start", "status": response.status, "headers": answer,
                            "upstream": member.name})
                self._count(member, response.status, f"{response.status // 100}xx")
            child = self._by_class.get(response.status // 100)  # _status_class's lookup, in line
            (child or self._status_class(response.status)).observe(perf_counter() - received)
            if rewriter is not None and method != b"HEAD":  # a HEAD's rewriter only gave it GET's headers
                rewritten = await _send_rewritten(response, rewriter, send, encoder)
                finished = True
                return
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
            self.abandoned.inc(stage="upload")
            log.debug("client left mid-upload; upstream request to %s dropped", target)
        except asyncio.CancelledError:
            if watcher is not None and watcher.done() and not watcher.cancelled() and watcher.result():
                self.abandoned.inc(stage="answer")
                log.debug("client disconnected; upstream request to %s cancelled", target)
                return
            raise
        except _TooLarge:
            await self._error(send, *_json_error(
                413, "request body too large", detail=f"a {scope['method']} request body is held until complete "
                f"and may be at most {HELD_BODY_LIMIT} bytes"))
        except UpstreamError as e:
            await self._failed(send, e, started, (served.member.upstream if served else upstream).base)
        except OSError as e:
            self.failures.inc(kind="broken")
            base = (served.member.upstream if served else upstream).base
            log.warning("upstream %s failed mid-request: %s", base, e)
            if not started:
                await self._error(send, *_json_error(
                    502, "upstream failed", upstream=base, detail=str(e) or type(e).__name__))
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
            if uploaded:
                self.bytes_in.value += uploaded
            if response is not None:
                self.bytes_out.value += response.body_bytes if rewritten < 0 else rewritten
                response.close()
            if served is not None and served.connected:
                served.member.end()

    async def _connect(self, served: _Served, routing: Registry | None, name: str, scope: dict[str, Any],
                       method: bytes, target: bytes, headers: Headers, forward: Forward, content: Body,
                       length: int | None) -> Exchange:
        """The exchange with ``served.member``, or, when it cannot be connected to (or drops the
        connection before any byte of an answer: a PACS going down) and the request is a GET, HEAD or
        OPTIONS without a body (nothing to replay, nothing sent to the client yet), with the next
        member ``name`` picks; every failure counts against its member (passive ejection)."""
        tried: list[Member] = []
        while True:
            member = served.member
            member.begin()
            try:
                response = await member.upstream.pool.request(method, target, headers, content, length,
                                                              host=forward.host, checked=forward.lines)
            except (ConnectError, ConnectTimeout, RemoteProtocolError) as e:  # no byte of an answer yet
                member.end()
                member.failed(str(e) or type(e).__name__)
                self.upstreams.requests.inc(upstream=member.name, status="error")  # type: ignore[union-attr]
                tried.append(member)
                following = routing.pick(name, tried) if routing and content is None and method in _RETRIED else None
                if following is None:
                    raise
                log.info("upstream %s: %s; %s %s tried on %s", member.name, e, method.decode(), scope["path"],
                         following.name)
                target = following.upstream.prefix + target[len(member.upstream.prefix):]
                headers, _, _, forward = self._request_headers(scope, following.relay)
                served.member = following
                continue
            except BaseException:
                member.end()
                raise
            served.connected = True
            return response

    def _count(self, member: Member, status: int, status_class: str) -> None:
        """Per-upstream accounting of an answer: a 5xx from the upstream itself counts as a failure."""
        if status >= 500:
            member.failed(f"answered {status}")
        else:
            member.answered()
        self.upstreams.requests.inc(upstream=member.name, status=status_class)  # type: ignore[union-attr]

    async def _failed(self, send: Any, e: UpstreamError, started: bool, base: str) -> None:
        """Count and log an upstream failure; answer it with a gateway status if nothing was sent yet."""
        detail = f"{e} ({e.key})" if e.key else str(e) or type(e).__name__
        if isinstance(e, ConnectTimeout | ReadTimeout):
            kind, status, error = "timeout", 504, "upstream timeout"
        elif isinstance(e, ConnectError):
            kind, status, error = "unreachable", 502, "upstream unreachable"
        elif isinstance(e, LocalProtocolError):
            kind, status, error = "refused", 500, "request not forwarded"
        else:
            kind, status, error = "broken", 502, "upstream failed"
        self.failures.inc(kind=kind)
        if started:
            log.warning("upstream %s failed mid-request: %s", base, e)
            return
        if kind != "unreachable":
            log.warning("upstream %s: %s", base, detail)
        await self._error(send, *_json_error(status, error, upstream=base, detail=detail))

    @staticmethod
    async def _error(send: Any, status: int, body: bytes) -> None:
        with contextlib.suppress(Exception):
            await send({
                "type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            })
            await send({"type": "http.response.body", "body": body})


def _answer_headers(response: Exchange) -> tuple[Headers, bool]:
    """The answer's headers less hop-by-hop ones, with a ``Content-Length`` from its framing, and
    whether it has a header whose URL a rewrite may change (``Location``, ``Content-Location``).

    One pass over the headers (a ``Connection`` header, rare, sends it to a second one with the
    names it lists); measured with ``bench/proxy_instructions.py``, the two passes before (the
    ``Connection`` scan, then the filter) and the rewrite's own scan cost ~3,000 instructions more
    per request."""
    out: Headers = []
    urls = False
    for k, v in response.headers:
        if k in _SKIP_ANSWER:
            if k == b"connection":
                drop = _with_connection_tokens(_SKIP_ANSWER, response.headers)
                out = [(k, v) for k, v in response.headers if k not in drop]
                urls = any(k in _URL_HEADERS for k, _ in out)
                break
            continue
        if k in _URL_HEADERS:
            urls = True
        out.append((k, v))
    length = response.content_length
    # Not on a 304 either: its Content-Length names the representation it stands for, but uvicorn holds
    # the body to it and raised mid-answer ("Response content shorter than Content-Length"; tests/fuzz).
    if length is not None and response.status not in (204, 304) and response.framing is not _CHUNKED:
        out.append((b"content-length", b"%d" % length))
    return out, urls


async def _send_rewritten(response: Exchange, rewriter: Rewriter, send: Any, encoder: Encoder | None) -> int:
    """The answer's body through ``rewriter`` (:mod:`dicomproxy.http.rewrite`), chunk by chunk, and
    compressed by ``encoder`` when the client accepted a coding (:mod:`dicomproxy.http.coding`);
    returns the bytes sent."""
    sent = 0
    while chunk := await response.read():
        if response.at_end:
            body = rewriter.feed(chunk) + rewriter.flush()
            if encoder is not None:
                body = encoder.feed(body) + encoder.flush()
            await send({"type": "http.response.body", "body": body})
            return sent + len(body)
        out = rewriter.feed(chunk)
        if out and encoder is not None:
            out = encoder.feed(out)
        if out:
            sent += len(out)
            await send({"type": "http.response.body", "body": out, "more_body": True})
    body = rewriter.flush()
    if encoder is not None:
        body = encoder.feed(body) + encoder.flush()
    await send({"type": "http.response.body", "body": body})
    return sent + len(body)


def _ask_identity(headers: Headers) -> bytes | None:
    """``Accept-Encoding: identity`` instead of the client's, when the answer may be rewritten and
    its ``Accept`` admits a JSON or XML one (see :mod:`dicomproxy.http.relay` on compression); the
    coding the client accepted, for the rewritten body (:func:`.coding.preferred`)."""
    accept = next((v for k, v in headers if k == b"accept"), None)
    if not Relay.wants_identity(accept):
        return None
    client = next((v for k, v in headers if k == b"accept-encoding"), None)
    headers[:] = [(k, v) for k, v in headers if k != b"accept-encoding"]
    headers.append((b"accept-encoding", b"identity"))
    return preferred(client)


@dataclass(slots=True)
class _Served:
    """Which member a routed request ended up on, and whether it holds one of its in-flight slots."""

    member: Member
    connected: bool = False


@dataclass(slots=True)
class Forward:
    """One request's ``Host`` for the PACS (None: its own) and its answer's rewrite (None: none)."""

    host: bytes | None
    rewrite: Rewrite | None
    coding: bytes | None = None  # the client's accepted coding for a rewritten body (gzip, deflate)
    lines: bytes = b""  # the forwarding headers as checked head lines, when the relay had them cached


async def _held(body: AsyncIterator[bytes]) -> bytes:
    """The whole body, at most ``HELD_BODY_LIMIT`` bytes (:class:`_TooLarge` past it)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > HELD_BODY_LIMIT:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)
