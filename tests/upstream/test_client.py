"""Unit tests of the proxy's HTTP/1.1 client (``dicomproxy.upstream.client``) against scripted upstreams.

The proxy tests (``test_proxy.py``) run it through the real stack, in front of Orthanc and
``tests/local_upstream.py``; here each test scripts the upstream's bytes on a raw socket to
reach the edge cases a well-behaved server never shows: stale keep-alive connections, early
answers, interim answers, bodies delimited by the connection's end, silence, TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dicomproxy.upstream.client import (
    BrokenResponse,
    ConnectError,
    ConnectionPool,
    ReadTimeout,
    Response,
)
from tests.peers import require_binary

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server on loopback whose every connection runs ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
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

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, **self.server_kwargs())
        return self

    def server_kwargs(self) -> dict:
        return {}

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The request line, headers (lower-case names) and body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *rest = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(b":", 1) for h in rest)}
    body = b""
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    return line, headers, body


def answer(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body


async def read_all(response: Response) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


async def get(pool: ConnectionPool, target: bytes = b"/", method: bytes = b"GET") -> tuple[Response, bytes]:
    response = await pool.request(method, target, [(b"x-test", b"1")])
    try:
        return response, await read_all(response)
    finally:
        response.close()


# --------------------------------------------------------------------------- bodies
async def test_fixed_length_bodies_stream_and_the_connection_is_reused() -> None:
    big = bytes(range(256)) * 12_000  # ~3 MB, sent in pieces

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, headers, _ = await read_request(reader)
        assert line == b"GET /prefix/one?q=1 HTTP/1.1" and headers[b"x-test"] == b"1"
        assert headers[b"host"].startswith(b"127.0.0.1:")
        writer.write(answer(b"first"))
        line, _, _ = await read_request(reader)
        assert line == b"GET /prefix/two HTTP/1.1"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big))
        for i in range(0, len(big), 100_000):
            writer.write(big[i:i + 100_000])
            await writer.drain()
        await read_request(reader)

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url + "/prefix/")
        response, body = await get(pool, b"/one?q=1")
        assert (response.status, body) == (200, b"first")
        assert response.headers == [(b"content-length", b"5")]
        response, body = await get(pool, b"/two")
        assert body == big
        assert up.connections == 1 and pool.connections_made == 1
        await pool.close()


async def test_chunked_body_is_decoded() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await read_request(reader)
        writer.write(answer(b"again"))
        await asyncio.sleep(1)

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        assert (await get(pool))[1] == b"hello world"
        assert (await get(pool))[1] == b"again"
        assert up.connections == 1


async def test_body_delimited_by_the_end_of_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        writer.write(b"the end")

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        assert (await get(pool))[1] == b"until the end"
        assert (await get(pool))[1] == b"until the end"  # not reused: a new connection
        assert up.connections == 2


async def test_head_204_304_and_interim_answers_have_no_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")  # HEAD: length, no body
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + answer(b"final"))
        await asyncio.sleep(1)

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        response, body = await get(pool, method=b"HEAD")
        assert (response.status, body, response.headers) == (200, b"", [(b"content-length", b"1000")])
        assert [(await get(pool))[0].status for _ in range(2)] == [204, 304]
        response, body = await get(pool)
        assert (response.status, body, response.headers) == (200, b"final", [(b"content-length", b"5")])
        assert up.connections == 1


async def test_truncated_and_invalid_answers_raise_broken_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if b"truncated" in line:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 40000)
        else:
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        response = await pool.request(b"GET", b"/truncated", [])
        with pytest.raises(BrokenResponse, match="mid-body"):
            await read_all(response)
        response.close()
        with pytest.raises(BrokenResponse, match="invalid HTTP"):
            await pool.request(b"GET", b"/garbage", [])


async def slow_reads(pool: ConnectionPool, count: int, size: int) -> tuple[list[int], int]:
    """Read ``count`` answers at once, pausing after each chunk: the peak bytes each held, and
    the peak the pool held for all of them together."""
    pool_peak = 0

    async def one(target: bytes) -> int:
        nonlocal pool_peak
        response = await pool.request(b"GET", target, [])
        got = peak = 0
        while chunk := await response.read():
            got += len(chunk)
            peak = max(peak, response._buffered)
            pool_peak = max(pool_peak, pool.buffered)
            await asyncio.sleep(0.002)
        response.close()
        assert got == size
        return peak

    peaks = await asyncio.gather(*(one(b"/%d" % i) for i in range(count)))
    return peaks, pool_peak


def big_answers(size: int) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    return handler


async def test_reading_pauses_while_the_consumer_is_slow() -> None:
    read_ahead = 1 << 20
    size = 16 * read_ahead
    async with Scripted(big_answers(size)) as up:
        pool = ConnectionPool(up.url, read_ahead=read_ahead)
        [peak], _ = await slow_reads(pool, 1, size)
        assert read_ahead // 2 < peak < read_ahead + 512 * 1024, f"{peak} bytes were buffered for a slow reader"
        assert pool.buffered == 0


async def test_past_the_buffer_budget_every_answer_reads_ahead_less() -> None:
    read_ahead, size = 2 << 20, 12 << 20
    async with Scripted(big_answers(size)) as up:
        unbounded = ConnectionPool(up.url, read_ahead=read_ahead, buffer_budget=1 << 40)
        _, unbounded_peak = await slow_reads(unbounded, 4, size)
        pool = ConnectionPool(up.url, read_ahead=read_ahead, buffer_budget=3 << 20)
        _, pool_peak = await slow_reads(pool, 4, size)
        # past 3 MB each answer is held to 256 KB: at most the budget plus ~2 chunks per answer
        assert unbounded_peak > 6 << 20, f"without a budget four answers held only {unbounded_peak} bytes"
        assert pool_peak < (3 << 20) + 4 * (512 << 10), f"the pool held {pool_peak} bytes past a 3 MB budget"
        assert pool.buffered == 0


# --------------------------------------------------------------------------- request bodies
async def body_of(*parts: bytes, delay: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if delay:
            await asyncio.sleep(delay)
        yield part


async def test_request_bodies_fixed_and_chunked() -> None:
    seen: list[tuple[dict[bytes, bytes], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            _, headers, body = await read_request(reader)
            seen.append((headers, body))
            writer.write(answer(b"ok"))
        await asyncio.sleep(1)

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        for kwargs in ({"content_length": 11}, {}):
            response = await pool.request(b"POST", b"/", [], body_of(b"hello", b" ", b"world"), **kwargs)
            assert await read_all(response) == b"ok"
            response.close()
        assert seen[0][0][b"content-length"] == b"11" and seen[0][1] == b"hello world"
        assert seen[1][0][b"transfer-encoding"] == b"chunked" and seen[1][1] == b"hello world"
        assert up.connections == 1


async def test_an_early_answer_ends_the_request_and_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: refuse before reading the body
        writer.write(answer(b"too large", b"413 Content Too Large", b"connection: close\r\n"))
        await writer.drain()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        response = await asyncio.wait_for(pool.request(b"PUT", b"/", [], endless()), 5)
        assert response.status == 413 and await read_all(response) == b"too large"
        response.close()
        assert pool._open == 0 and not pool._idle


async def test_a_stale_kept_alive_connection_is_retried_only_without_a_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"first"))
        await read_request(reader)  # the next request on this connection: hang up without a word

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url)
        assert (await get(pool))[1] == b"first"
        assert (await get(pool))[1] == b"first"  # retried on a new connection
        assert up.connections == 2
        with pytest.raises(BrokenResponse, match="kept-alive"):  # a body can't be replayed
            await pool.request(b"POST", b"/", [], body_of(b"data"), content_length=4)


# --------------------------------------------------------------------------- timeouts, limits, errors
async def test_read_timeout_counts_the_upstream_silence_only() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        if b"silent" in line:
            await asyncio.sleep(5)
        writer.write(answer(b"done"))
        await asyncio.sleep(1)

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url, read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ReadTimeout, match="0.3 s"):
            await pool.request(b"GET", b"/silent", [])
        assert 0.25 < time.monotonic() - started < 1.5
        # a client sending its body slowly (1 s in all) is not the upstream's silence
        response = await pool.request(b"POST", b"/", [], body_of(*[b"x"] * 5, delay=0.2), content_length=5)
        assert await read_all(response) == b"done"
        response.close()


async def test_max_connections_queues_requests() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(answer(b"ok"))

    async with Scripted(handler) as up:
        pool = ConnectionPool(up.url, max_connections=2)
        results = await asyncio.gather(*(get(pool) for _ in range(8)))
        assert [body for _, body in results] == [b"ok"] * 8
        assert up.connections == 2 and pool._open == 2
        await pool.close()


async def test_unreachable_upstream_names_host_and_port() -> None:
    async with Scripted(read_request) as up:
        url = up.url
    await asyncio.sleep(0.05)
    pool = ConnectionPool(url)
    with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1:\d+"):
        await pool.request(b"GET", b"/", [])
    assert pool._open == 0


def test_bad_upstream_url_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        ConnectionPool("ftp://pacs")


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
        await read_request(reader)
        writer.write(answer(b"secret"))
        await writer.drain()

    class TlsScripted(Scripted):
        def server_kwargs(self) -> dict:
            return {"ssl": server_ctx}

    async with TlsScripted(handler) as up:
        url = up.url.replace("http://", "https://")
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # verified by default
            await ConnectionPool(url).request(b"GET", b"/", [])
        trusting = ssl.create_default_context(cafile=str(cert))
        response, body = await get(ConnectionPool(url, ssl_context=trusting))
        assert (response.status, body) == (200, b"secret")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the README's way to trust a private CA
        response, body = await get(ConnectionPool(url))
        assert (response.status, body) == (200, b"secret")
