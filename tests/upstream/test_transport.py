"""httpx over the gateway's pools (``PoolTransport``): the requests the features make arrive on
the wire framed by the pool, httpx's timeouts map onto the pool's, failures come back as httpx's
exceptions, and ``Upstream.client`` reaches the PACS and any other origin with one set-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from dicomproxy.config.settings import UpstreamSettings
from dicomproxy.upstream import Upstream
from dicomproxy.upstream.limits import Limits
from dicomproxy.upstream.pool import Pools
from dicomproxy.upstream.transport import PoolTransport
from tests.upstream.wire import PairPool, ok

PACS = "http://pacs.test:8042"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PairPool, httpx.AsyncClient]]:
    pool = PairPool(Limits(read_timeout=5))
    client = httpx.AsyncClient(transport=PoolTransport(Pools(pool.limits, pinned=(pool,))), base_url=PACS)
    yield pool, client
    await client.aclose()
    pool.close_wires()


async def test_bytes_body_goes_with_its_length_and_host_is_the_pools(pair: tuple[PairPool, httpx.AsyncClient]) -> None:
    pool, client = pair
    task = asyncio.ensure_future(client.post("/tools/find", content=b'{"Level":"Study"}',
                                             headers={"Host": "evil", "Connection": "close"}))
    wire = await pool.wire()
    head = await wire.head()
    assert head.startswith(b"POST /tools/find HTTP/1.1\r\nhost: pacs.test:8042\r\n")
    assert b"evil" not in head and b"onnection" not in head and b"content-length: 17\r\n" in head
    assert await wire.exactly(17) == b'{"Level":"Study"}'
    await wire.send(ok(b"[]", extra=b"content-type: application/json\r\n"))
    response = await task
    assert response.status_code == 200 and response.json() == []
    assert response.headers["content-type"] == "application/json"


async def test_streamed_body_with_declared_length_is_sent_exactly(pair: tuple[PairPool, httpx.AsyncClient]) -> None:
    pool, client = pair

    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"de"

    task = asyncio.ensure_future(client.post("/s", content=parts(), headers={"Content-Length": "5"}))
    wire = await pool.wire()
    head = await wire.head()
    assert b"content-length: 5\r\n" in head and b"transfer-encoding" not in head
    assert await wire.exactly(5) == b"abcde"
    await wire.send(ok())
    assert (await task).content == b"ok"


async def test_a_lying_streamed_body_is_a_local_protocol_error(pair: tuple[PairPool, httpx.AsyncClient]) -> None:
    pool, client = pair

    async def parts() -> AsyncIterator[bytes]:
        yield b"abcdef"

    task = asyncio.ensure_future(client.post("/s", content=parts(), headers={"Content-Length": "5"}))
    wire = await pool.wire()
    await wire.head()
    with pytest.raises(httpx.LocalProtocolError, match="longer than its Content-Length"):
        await task
    assert await wire.rest() == b""


async def test_streamed_answer_and_errors_as_httpx_exceptions(pair: tuple[PairPool, httpx.AsyncClient]) -> None:
    pool, client = pair
    task = asyncio.ensure_future(client.get("/bad"))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 700 Weird\r\n\r\n")
    with pytest.raises(httpx.RemoteProtocolError, match="outside 100-599"):
        await task
    request = client.build_request("GET", "/big")
    task2 = asyncio.ensure_future(client.send(request, stream=True))
    wire = await pool.wire()  # a new connection: the bad one was dropped
    await wire.head()
    await wire.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
    streaming = await task2
    chunks = streaming.aiter_raw()
    assert await anext(chunks) == b"hello"
    wire.close()
    with pytest.raises(httpx.RemoteProtocolError, match="mid-body"):
        await anext(chunks)
    await streaming.aclose()


async def test_httpx_read_timeout_maps_onto_the_pools(pair: tuple[PairPool, httpx.AsyncClient]) -> None:
    pool, client = pair
    task = asyncio.ensure_future(client.get("/slow", timeout=httpx.Timeout(0.3)))
    wire = await pool.wire()
    await wire.head()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout, match="within 0.3 s"):
        await task
    assert time.monotonic() - started < 1.0


async def test_unreachable_is_httpx_connect_error() -> None:
    settings = UpstreamSettings(url="http://127.0.0.1:9", connect_timeout=2, read_timeout=5, max_connections=4)
    upstream = Upstream(settings)
    with pytest.raises(httpx.ConnectError, match="cannot connect to 127.0.0.1:9"):
        await upstream.client.get(upstream.url("/system"))
    await upstream.stop()


async def test_upstream_client_pacs_through_the_proxys_pool_others_through_their_own() -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            seen.append(head)
            writer.write(ok(b"pong"))
            await writer.drain()

    servers = [await asyncio.start_server(serve, "127.0.0.1", 0) for _ in range(2)]
    pacs, other = (f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers)
    upstream = Upstream(UpstreamSettings(url=pacs + "/orthanc", connect_timeout=2, read_timeout=5, max_connections=4))
    try:
        for _ in range(3):
            assert (await upstream.client.get(upstream.url("/system"))).content == b"pong"
        assert (await upstream.client.get(other + "/x")).content == b"pong"
        assert upstream.pool.connections_made == 1  # the features' PACS calls share the proxy's pool
        assert seen[0].startswith(b"GET /orthanc/system HTTP/1.1\r\n")
        assert b"accept-encoding" not in seen[0].lower()  # bodies as the PACS stores them
        assert b"User-Agent: DicomProxy/" in seen[0]
        assert seen[-1].startswith(b"GET /x HTTP/1.1\r\n")
    finally:
        await upstream.stop()
        for s in servers:
            s.close()
