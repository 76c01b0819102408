"""dicomproxy.dicom.ul.acceptor with real sockets on loopback: ARTIM for the whole request, what
counts towards each limit, and that nothing a connection does ends the accept loop."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.acceptor import OVER_CAP_DEADLINE, Acceptor, Admission, Limits, Pending
from dicomproxy.dicom.ul.pdu import ProposedContext
from tests.dicom.ul.test_pdu import _rq_with_user_items

RQ = pdus.associate_rq("GW", "MOD", [ProposedContext(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))], 16384).encode()


class Holder:
    """A handler that keeps each admitted association open until released (an established one)."""

    def __init__(self) -> None:
        self.pending: list[Pending] = []
        self.release = asyncio.Event()

    async def __call__(self, pending: Pending) -> None:
        self.pending.append(pending)
        sock = pending.take()
        pending.core.outgoing()
        await asyncio.get_running_loop().sock_sendall(sock, b"\x02\x00\x00\x00\x00\x00")  # "accepted" marker
        await self.release.wait()
        sock.close()
        pending.slot.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    made: list[Acceptor] = []

    async def start(limits: Limits, handler: Any) -> Acceptor:
        acceptor = Acceptor("127.0.0.1", 0, limits, handler)
        await acceptor.start()
        made.append(acceptor)
        return acceptor

    yield start
    for acceptor in made:
        await acceptor.stop()


async def _connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """The first PDU the acceptor sends (b"" if it closes first)."""
    try:
        header = await asyncio.wait_for(reader.readexactly(6), timeout)
    except asyncio.IncompleteReadError as e:
        return e.partial
    return header + await reader.readexactly(struct.unpack(">I", header[2:])[0])


async def _closed_after(reader: asyncio.StreamReader, started: float, timeout: float = 10.0) -> float:
    data = await asyncio.wait_for(reader.read(), timeout)
    assert data == b""
    return time.monotonic() - started


async def test_artim_is_one_deadline_for_the_whole_request(serve: Any) -> None:
    acceptor = await serve(Limits(artim=0.6), Holder())
    started = time.monotonic()
    reader, writer = await _connect(acceptor.port)
    closed = asyncio.ensure_future(_closed_after(reader, started))
    for byte in RQ[:20]:  # a byte every 0.1 s: each read succeeds, the request never completes
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.1)
    elapsed = await closed
    assert 0.6 <= elapsed < 1.2, elapsed  # closed at ARTIM, however the bytes trickled
    writer.close()
    assert acceptor.admission.connections == 0


async def test_only_established_associations_count(serve: Any) -> None:
    holder = Holder()
    acceptor = await serve(Limits(max_associations=2, max_per_address=64), holder)
    idle = [await _connect(acceptor.port) for _ in range(10)]  # connected, no request: not counted
    held = []
    for _ in range(2):
        reader, writer = await _connect(acceptor.port)
        writer.write(RQ)
        assert (await _answer(reader))[0] == 0x02
        held.append(writer)
    assert acceptor.admission.associations == 2 and acceptor.admission.connections == 12
    reader, writer = await _connect(acceptor.port)
    writer.write(RQ)
    assert await _answer(reader) == pdus.associate_rj(2, 3, 2).encode()  # transient, local limit exceeded
    holder.release.set()
    await asyncio.sleep(0.1)
    assert acceptor.admission.associations == 0
    for _, w in idle + [(None, w) for w in held]:
        w.close()


async def test_connections_per_address_are_capped(serve: Any) -> None:
    holder = Holder()
    acceptor = await serve(Limits(max_per_address=3), holder)
    idle = [await _connect(acceptor.port, "127.0.0.2") for _ in range(3)]
    reader, writer = await _connect(acceptor.port, "127.0.0.2")
    writer.write(RQ)
    assert await _answer(reader) == pdus.associate_rj(2, 3, 2).encode()
    silent, _ = await _connect(acceptor.port, "127.0.0.2")  # over the cap and silent: closed soon
    elapsed = await _closed_after(silent, time.monotonic())
    assert elapsed < OVER_CAP_DEADLINE + 0.5
    other_reader, other_writer = await _connect(acceptor.port, "127.0.0.3")  # another address is not affected
    other_writer.write(RQ)
    assert (await _answer(other_reader))[0] == 0x02
    holder.release.set()
    for _, w in idle:
        w.close()


async def test_beyond_max_connections_a_connection_is_closed_at_once(serve: Any) -> None:
    acceptor = await serve(Limits(max_connections=3), Holder())
    idle = [await _connect(acceptor.port, f"127.0.0.{i + 2}") for i in range(3)]
    reader, writer = await _connect(acceptor.port, "127.0.0.9")
    assert await _closed_after(reader, time.monotonic(), timeout=2) < 0.5
    for _, w in idle:
        w.close()


async def test_a_malformed_user_information_item_gets_an_a_abort(serve: Any, caplog: Any) -> None:
    acceptor = await serve(Limits(artim=2), Holder())
    reader, writer = await _connect(acceptor.port)
    writer.write(_rq_with_user_items(b"\x51\x00\x00\x03\x00\x00\x40"))
    answer = await _answer(reader)
    assert answer[0] == 0x07 and answer[8] == 2  # A-ABORT, service provider
    writer.close()
    assert "Traceback" not in caplog.text and "closed without an association" in caplog.text
    reader, writer = await _connect(acceptor.port)
    writer.write(RQ)
    assert (await _answer(reader))[0] == 0x02  # still serving


async def test_nothing_a_connection_does_ends_the_accept_loop(serve: Any, monkeypatch: Any) -> None:
    calls = 0

    async def handler(pending: Pending) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a handler")
        await pending.reject(1, 1, 1)

    acceptor = await serve(Limits(), handler)
    loop = asyncio.get_running_loop()
    real_accept = loop.sock_accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    async def flaky_accept(sock: socket.socket) -> Any:
        if failures:
            raise failures.pop()
        return await real_accept(sock)

    monkeypatch.setattr(loop, "sock_accept", flaky_accept)
    for expected in (b"", pdus.associate_rj(1, 1, 1).encode()):
        reader, writer = await _connect(acceptor.port)
        writer.write(RQ)
        assert await _answer(reader) == expected
        writer.close()
    assert acceptor.listening and acceptor.admission.connections <= 1
    await acceptor.stop()
    assert not acceptor.listening


def test_admission_counts() -> None:
    admission = Admission(Limits(max_associations=1, max_per_address=2, max_connections=3))
    assert admission.connect("a") is True and admission.connect("a") is True
    assert admission.connect("a") is False  # over the per-address cap, still counted
    assert admission.connect("b") is None  # MaxConnections
    assert admission.reserve() and not admission.reserve()
    admission.release()
    for _ in range(3):
        admission.disconnect("a")
    assert admission.connections == 0 and admission.from_address("a") == 0
