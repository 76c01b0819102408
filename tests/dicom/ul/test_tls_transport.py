"""dicomproxy.dicom.ul.tls_transport: asyncio streams on the SSLSocket the TLS acceptor shook
hands on (real sockets, real TLS): megabytes both ways with the write buffer's back-pressure,
bytes already decrypted inside the SSLSocket before the stream starts, the peer's end of the
connection, and a plain socket still going through asyncio's own transport."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dicomproxy.dicom.ul import tls, tls_transport
from tests.tls_certs import TestCa


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = TestCa.create(tmp_path / "pki")
    server_cert, client_cert = ca.issue("server", ["127.0.0.1"]), ca.issue("modality", client=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert.cert_path, server_cert.key_path)
    server.load_verify_locations(cafile=ca.cert_path)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    client.load_cert_chain(client_cert.cert_path, client_cert.key_path)
    return server, client


@asynccontextmanager
async def tls_pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], first: bytes = b""
) -> AsyncIterator[tuple[ssl.SSLSocket, asyncio.StreamReader, asyncio.StreamWriter]]:
    """(the server's handshaken SSLSocket, as the acceptor has it; the client's streams), the
    client having sent ``first`` right after its handshake."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def accept() -> ssl.SSLSocket:
        raw, _ = await loop.sock_accept(listener)
        raw.setblocking(False)
        return await tls.handshake(contexts[0], raw, loop.time() + 10)

    accepted = loop.create_task(accept())
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1], ssl=contexts[1],
                                                   server_hostname="127.0.0.1")
    if first:
        writer.write(first)
        await writer.drain()
    server = await accepted
    if first:  # wait until the record is in (the acceptor reads only once bytes are there)
        await tls._ready(loop, server, write=False)
    try:
        yield server, reader, writer
    finally:
        writer.close()
        server.close()
        listener.close()


async def test_megabytes_both_ways_with_back_pressure(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    payload = os.urandom(16 << 20)  # more than the kernel buffers on loopback take
    async with tls_pair(contexts) as (sock, client_reader, client_writer):
        reader, writer = await tls_transport.open_stream(sock)
        transport: Any = writer.transport
        assert isinstance(transport, tls_transport.SslSocketTransport)
        assert transport.get_extra_info("peercert")["subject"]  # the client's verified certificate
        writer.write(payload)  # nobody reads yet: the protocol is paused, drain waits
        assert transport.get_write_buffer_size() > tls_transport.HIGH_WATER
        drained = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        received = await client_reader.readexactly(len(payload))
        await asyncio.wait_for(drained, 10)
        assert received == payload and transport.get_write_buffer_size() == 0
        client_writer.write(payload)  # and back, through the reader (its limit pauses reading)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        assert await asyncio.wait_for(client_reader.read(), 5) == b""  # the client sees the end


async def test_bytes_already_decrypted_in_the_socket_are_read(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    async with tls_pair(contexts, first=b"A-ASSOCIATE-RQ and more") as (sock, _reader, _writer):
        got = b""
        while len(got) < 14:  # as the acceptor reads the request: exactly its length
            got += await tls.recv(asyncio.get_running_loop(), sock, 14 - len(got))
        assert got == b"A-ASSOCIATE-RQ"  # the rest of the record waits inside the SSLSocket, not on the fd
        reader, _ = await tls_transport.open_stream(sock)
        assert await asyncio.wait_for(reader.readexactly(9), 5) == b" and more"


async def test_the_peer_closing_ends_the_stream(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async with tls_pair(contexts, first=b"last") as (sock, _reader, client_writer):
        reader, writer = await tls_transport.open_stream(sock)
        client_writer.close()
        assert await asyncio.wait_for(reader.read(), 5) == b"last"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        assert sock.fileno() == -1  # closed with the transport


async def test_a_plain_socket_gets_asyncio_s_own_transport() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    reader, writer = await tls_transport.open_stream(a)
    assert not isinstance(writer.transport, tls_transport.SslSocketTransport)
    b.sendall(b"plain")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"plain"
    writer.close()
    b.close()
