"""The pools: which requests are replayed after a stale connection (only idempotent ones whose
body was not consumed), connection limits and waiting, a pool per origin, read-ahead within a
budget, TLS, unreachable upstreams. Socket pairs where the bytes matter, a loopback TCP server
where the pool's own connecting does."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dicomproxy.upstream.errors import ConnectError, PoolTimeout, Stale
from dicomproxy.upstream.limits import Limits
from dicomproxy.upstream.pool import ConnectionPool, Origin, Pools
from tests.peers import require_binary
from tests.upstream.wire import PairPool, Wire, ok, read_all

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server on loopback whose every connection runs ``handler``; counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def body_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def used_then_closed(pool: PairPool) -> Wire:
    """One exchange on a first connection, then the upstream closes it as it sits idle... just as
    the next request goes out (the FIN arrives after the pool picked the connection)."""
    task = asyncio.ensure_future(pool.request(b"GET", b"/first", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(ok())
    exchange = await task
    await read_all(exchange)
    exchange.close()
    return wire


async def stale_attempt(pool: PairPool, method: bytes, body: object = None, length: int | None = None):
    wire = await used_then_closed(pool)
    task = asyncio.ensure_future(pool.request(method, b"/x", [], body, length))  # type: ignore[arg-type]
    await wire.head()  # it reached the old connection ...
    wire.close()  # ... which the upstream closes without a word
    return task


@pytest.mark.parametrize(("method", "body", "length"), [
    (b"GET", None, None), (b"HEAD", None, None), (b"DELETE", None, None), (b"OPTIONS", None, None),
    (b"PUT", b"replayable bytes", None),
])
async def test_stale_idempotent_requests_are_replayed_once(method: bytes, body: bytes | None, length: None) -> None:
    pool = PairPool()
    task = await stale_attempt(pool, method, body, length)
    fresh = await pool.wire()
    head = await fresh.head()
    assert head.startswith(method + b" /x ")
    if body:
        assert await fresh.exactly(len(body)) == body
    await fresh.send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    exchange = await task
    assert exchange.status == 200 and pool.connections_made == 2
    exchange.close()
    pool.close_wires()


@pytest.mark.parametrize(("method", "body", "length"), [
    (b"POST", None, None), (b"PATCH", None, None), (b"POST", b"data", None),  # never, even bodiless
    (b"PUT", "stream", 4),  # idempotent, but its streamed body was consumed
])
async def test_stale_non_idempotent_or_consumed_requests_are_not_replayed(method: bytes, body: object,
                                                                         length: int | None) -> None:
    pool = PairPool()
    task = await stale_attempt(pool, method, body_of(b"data") if body == "stream" else body, length)
    with pytest.raises(Stale, match="closed a kept-alive connection"):
        await task
    assert pool.wires.empty() and pool.connections_made == 1  # no second connection: nothing replayed
    pool.close_wires()


async def test_max_connections_queue_requests_and_pool_timeout() -> None:
    pool = PairPool(Limits(pool_timeout=0.2), max_connections=1)
    first = asyncio.ensure_future(pool.request(b"GET", b"/1", []))
    wire = await pool.wire()
    await wire.head()
    with pytest.raises(PoolTimeout, match="all 1 connections to pacs.test:8042 stayed busy for 0.2 s"):
        await pool.request(b"GET", b"/2", [])
    queued = asyncio.ensure_future(pool.request(b"GET", b"/3", [], limits=Limits()))
    await wire.send(ok())
    (await first).close()
    assert (await wire.head()).startswith(b"GET /3 ")  # the waiting request got the same connection
    await wire.send(ok())
    (await queued).close()
    assert pool.connections_made == 1
    pool.close_wires()


async def test_pools_per_origin_are_bounded_and_the_pinned_one_stays() -> None:
    pacs = ConnectionPool("http://pacs:8042")
    pools = Pools(Limits(), pinned=(pacs,), max_origins=2, per_origin=3)
    assert pools.get("http", "pacs", 8042) is pacs
    a = pools.get("https", "a.example", None)
    assert a.origin == Origin("https", "a.example", 443) and a.max_connections == 3
    assert pools.get("https", "a.example", 443) is a
    b = pools.get("http", "b.example", 80)
    pools.get("https", "a.example", 443)  # a is now the most recently used
    c = pools.get("http", "c.example", 80)  # evicts b
    assert len(pools) == 2 and b.closed and not a.closed and not c.closed
    assert pools.get("http", "pacs", 8042) is pacs and not pacs.closed


def test_origin_parsing_and_host_header() -> None:
    assert Origin.of("https://pacs.example/orthanc").host_header == b"pacs.example"
    assert Origin.of("http://[::1]:8042").host_header == b"[::1]:8042"
    with pytest.raises(ValueError, match="http://host:port"):
        Origin.of("ftp://pacs")


# --------------------------------------------------------------------------- read-ahead
def big_answers(size: int) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    return handler


async def slow_reads(pool: ConnectionPool, count: int, size: int) -> tuple[list[int], int]:
    """Read ``count`` answers at once, pausing after each chunk: the peak bytes each held, and
    the peak the pool held for all of them together."""
    pool_peak = 0

    async def one(target: bytes) -> int:
        nonlocal pool_peak
        exchange = await pool.request(b"GET", target, [])
        got = peak = 0
        while chunk := await exchange.read():
            got += len(chunk)
            peak = max(peak, exchange._buffered)
            pool_peak = max(pool_peak, pool.budget.held)
            await asyncio.sleep(0.002)
        exchange.close()
        assert got == size
        return peak

    peaks = await asyncio.gather(*(one(b"/%d" % i) for i in range(count)))
    return peaks, pool_peak


async def test_reading_pauses_while_the_consumer_is_slow() -> None:
    read_ahead = 1 << 20
    size = 16 * read_ahead
    async with Scripted(big_answers(size)) as up:
        pool = ConnectionPool(up.url, Limits(read_ahead=read_ahead))
        [peak], _ = await slow_reads(pool, 1, size)
        assert read_ahead // 2 < peak < read_ahead + 512 * 1024, f"{peak} bytes were buffered for a slow reader"
        assert pool.budget.held == 0


async def test_past_the_buffer_budget_every_answer_reads_ahead_less() -> None:
    read_ahead, size = 2 << 20, 12 << 20
    async with Scripted(big_answers(size)) as up:
        unbounded = ConnectionPool(up.url, Limits(read_ahead=read_ahead, buffer_budget=1 << 40))
        _, unbounded_peak = await slow_reads(unbounded, 4, size)
        pool = ConnectionPool(up.url, Limits(read_ahead=read_ahead, buffer_budget=3 << 20))
        _, pool_peak = await slow_reads(pool, 4, size)
        # past 3 MB each answer is held to 256 KB: at most the budget plus ~2 chunks per answer
        assert unbounded_peak > 6 << 20, f"without a budget four answers held only {unbounded_peak} bytes"
        assert pool_peak < (3 << 20) + 4 * (512 << 10), f"the pool held {pool_peak} bytes past a 3 MB budget"
        assert pool.budget.held == 0


# --------------------------------------------------------------------------- connecting
async def test_unreachable_upstream_names_host_and_port() -> None:
    async with Scripted(big_answers(0)) as up:
        url = up.url
    pool = ConnectionPool(url)
    with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1:\d+"):
        await pool.request(b"GET", b"/", [])
    assert pool._open == 0


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (key, cert), made with Debian's openssl."""
    openssl = require_binary("/usr/bin/openssl", "run scripts/install.sh (apt-get install openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


async def test_tls_upstream(tls_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok(b"secret"))
        await writer.drain()

    async def get(pool: ConnectionPool) -> bytes:
        exchange = await pool.request(b"GET", b"/", [])
        try:
            return await read_all(exchange)
        finally:
            exchange.close()

    async with Scripted(handler, tls=server_ctx) as up:
        url = up.url.replace("http://", "https://")
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # verified by default
            await get(ConnectionPool(url))
        assert await get(ConnectionPool(url, Limits(tls=ssl.create_default_context(cafile=str(cert))))) == b"secret"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the README's way to trust a private CA
        assert await get(ConnectionPool(url)) == b"secret"
