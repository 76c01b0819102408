"""The exchange on one connection, byte for byte through a socket pair (:mod:`tests.upstream.wire`):
what the client writes, each state transition an answer drives, and each way a broken or
hostile upstream could try to fool it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dicomproxy.upstream.errors import (
    HeadTimeout,
    HeadTooLarge,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
)
from dicomproxy.upstream.framing import Framing, Receiving, Sending
from dicomproxy.upstream.limits import Limits
from tests.upstream.wire import PairPool, Wire, ok, read_all


async def answer(pool: PairPool, wire_bytes: bytes, method: bytes = b"GET", wire: Wire | None = None):
    """Send one request, answer it with ``wire_bytes`` on the wire; (exchange, body, wire)."""
    task = asyncio.ensure_future(pool.request(method, b"/x", []))
    wire = wire or await pool.wire()
    await wire.head()
    await wire.send(wire_bytes)
    exchange = await task
    body = await read_all(exchange)
    return exchange, body, wire


async def trickle(wire: Wire, pieces: list[bytes], until: asyncio.Future[object], gap: float) -> None:
    """Send ``pieces`` one by one, ``gap`` seconds apart, until ``until`` is done or the client hangs up."""
    for piece in pieces:
        if until.done():
            return
        try:
            await wire.send(piece)
        except OSError:
            return
        await asyncio.sleep(gap)


async def body_of(*parts: bytes, delay: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if delay:
            await asyncio.sleep(delay)
        yield part


@pytest.fixture
async def pool() -> AsyncIterator[PairPool]:
    p = PairPool(Limits(read_timeout=5, head_timeout=5))
    yield p
    await p.close()
    p.close_wires()


# --------------------------------------------------------------------------- transitions
async def test_get_with_length_body_idle_to_done_and_reused(pool: PairPool) -> None:
    exchange, body, wire = await answer(pool, ok(b"hello", extra=b"x-a: 1\r\n"))
    assert (exchange.status, body, exchange.framing, exchange.content_length) == (200, b"hello", Framing.LENGTH, 5)
    assert exchange.headers == [(b"content-length", b"5"), (b"x-a", b"1")]
    assert (exchange.sending, exchange.receiving) == (Sending.DONE, Receiving.DONE)
    exchange.close()
    exchange, body, _ = await answer(pool, ok(b"again"), wire=wire)  # the same connection
    assert body == b"again" and pool.connections_made == 1
    exchange.close()


async def test_request_with_length_body_goes_idle_body_done(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"PUT", b"/p", [(b"x-t", b"1")], body_of(b"abc", b"de"), 5))
    wire = await pool.wire()
    assert await wire.head() == b"PUT /p HTTP/1.1\r\nhost: pacs.test:8042\r\nx-t: 1\r\ncontent-length: 5\r\n\r\n"
    assert await wire.exactly(5) == b"abcde"
    await wire.send(ok())
    exchange = await task
    assert exchange.sending is Sending.DONE
    assert await read_all(exchange) == b"ok"
    exchange.close()
    assert pool._idle  # both sides done: kept


async def test_chunked_request_body_is_framed_exactly(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"POST", b"/p", [], body_of(b"hello", b"", b" world")))
    wire = await pool.wire()
    assert b"transfer-encoding: chunked\r\n" in await wire.head()
    assert await wire.until(b"0\r\n\r\n") == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    await wire.send(ok())
    (await task).close()


async def test_bodiless_post_put_patch_send_content_length_zero(pool: PairPool) -> None:
    wire = None
    for method in (b"POST", b"PUT", b"PATCH"):
        task = asyncio.ensure_future(pool.request(method, b"/x", []))
        wire = wire or await pool.wire()
        assert await wire.head() == method + b" /x HTTP/1.1\r\nhost: pacs.test:8042\r\ncontent-length: 0\r\n\r\n"
        await wire.send(ok())
        exchange = await task
        await read_all(exchange)
        exchange.close()


async def test_interim_answers_are_skipped(pool: PairPool) -> None:
    exchange, body, _ = await answer(
        pool, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"final")
    )
    assert (exchange.status, body, exchange.headers) == (200, b"final", [(b"content-length", b"5")])
    exchange.close()


async def test_head_204_304_have_no_body_and_keep_the_connection(pool: PairPool) -> None:
    exchange, body, wire = await answer(pool, b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n", method=b"HEAD")
    assert (exchange.status, body, exchange.framing, exchange.content_length) == (200, b"", Framing.NONE, 1000)
    exchange.close()
    for status in (b"204 No Content", b"304 Not Modified"):
        exchange, body, _ = await answer(pool, b"HTTP/1.1 " + status + b"\r\netag: x\r\n\r\n", wire=wire)
        assert body == b"" and exchange.receiving is Receiving.DONE
        exchange.close()
    assert pool.connections_made == 1


async def test_chunked_answer_is_decoded_and_trailers_dropped(pool: PairPool) -> None:
    exchange, body, _ = await answer(
        pool, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n"
              b"x-trailer: 1\r\n\r\n"
    )
    assert body == b"hello world" and exchange.framing is Framing.CHUNKED
    assert exchange.headers == [(b"transfer-encoding", b"chunked")]
    exchange.close()
    assert pool._idle


async def test_body_until_the_connection_ends_is_never_reused(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
    exchange = await task
    assert exchange.framing is Framing.UNTIL_CLOSE
    await wire.send(b"the end")
    wire.close()
    assert await read_all(exchange) == b"until the end"
    exchange.close()
    assert not pool._idle


# --------------------------------------------------------------------------- a hostile upstream
async def test_a_second_answer_in_the_same_read_never_touches_the_first(pool: PairPool) -> None:
    evil = b"HTTP/1.1 302 Found\r\nlocation: http://evil/\r\nset-cookie: session=stolen\r\ncontent-length: 0\r\n\r\n"
    for first in (ok(b"fine"), b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n"):
        exchange, body, wire = await answer(pool, first + evil)
        assert (exchange.status, body) == (200, b"fine")
        assert all(name not in (b"location", b"set-cookie") for name, _ in exchange.headers)
        exchange.close()
        assert await wire.rest() == b""  # the connection was dropped
    assert not pool._idle and pool.connections_made == 2


async def test_bytes_after_a_complete_answer_drop_the_connection(pool: PairPool) -> None:
    cases = [
        (b"GET", ok(b"fine") + b"garbage"),  # bytes past the Content-Length
        (b"HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"),  # a body after a HEAD answer
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\nxyz"),  # after an answer that has none
    ]
    for method, data in cases:
        exchange, body, wire = await answer(pool, data, method=method)
        assert body == (b"fine" if method == b"GET" and b"fine" in data else b""), data
        exchange.close()
        assert await wire.rest() == b"", data
    assert not pool._idle


async def test_bytes_in_a_later_read_after_the_end_drop_the_connection(pool: PairPool) -> None:
    exchange, body, wire = await answer(pool, ok(b"fine"))
    await wire.send(b"HTTP/1.1 200 OK\r\n")
    assert await wire.rest() == b""
    assert body == b"fine"
    exchange.close()
    assert not pool._idle


@pytest.mark.parametrize("status", [b"700 Weird", b"099 Early", b"000 Zero", b"999 Max"])
async def test_a_status_outside_100_599_is_refused(pool: PairPool, status: bytes) -> None:
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="outside 100-599"):
        await task


@pytest.mark.parametrize("extra", [b"", b"upgrade: websocket\r\nconnection: upgrade\r\n"])
async def test_101_switching_protocols_is_refused(pool: PairPool, extra: bytes) -> None:
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 101 Switching Protocols\r\n" + extra + b"\r\nraw bytes")
    with pytest.raises(RemoteProtocolError, match="101 Switching Protocols"):
        await task
    assert await wire.rest() == b""


@pytest.mark.parametrize("shape", ["one write", "trickled", "many interim answers"])
async def test_the_head_is_capped_in_bytes(shape: str) -> None:
    pool = PairPool(Limits(max_head_bytes=4096, read_timeout=5))
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    if shape == "one write":
        await wire.send(b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-%d: %s\r\n" % (i, b"v" * 100) for i in range(100)))
    elif shape == "trickled":  # one header line that never ends
        await trickle(wire, [b"HTTP/1.1 200 OK\r\nx-long: ", *[b"v" * 1000] * 10], task, 0.01)
    else:
        await trickle(wire, [b"HTTP/1.1 100 Continue\r\nx-pad: " + b"p" * 60 + b"\r\n\r\n"] * 100, task, 0)
    with pytest.raises(HeadTooLarge, match="larger than 4096 bytes"):
        await asyncio.wait_for(task, 5)
    await pool.close()
    pool.close_wires()


async def test_a_trickle_of_interim_answers_meets_the_head_deadline() -> None:
    pool = PairPool(Limits(head_timeout=0.4, read_timeout=5))
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    started = time.monotonic()
    await trickle(wire, [b"HTTP/1.1 102 Processing\r\n\r\n"] * 100, task, 0.05)  # each well within the read timeout
    with pytest.raises(HeadTimeout, match="took more than 0.4 s"):
        await task
    assert 0.35 < time.monotonic() - started < 1.0
    await pool.close()
    pool.close_wires()


async def test_a_trickled_head_meets_the_head_deadline() -> None:
    pool = PairPool(Limits(head_timeout=0.3, read_timeout=5))
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    head = b"HTTP/1.1 200 OK\r\n" + b"x-slow: 1\r\n" * 100
    await trickle(wire, [bytes([byte]) for byte in head], task, 0.01)
    with pytest.raises(HeadTimeout):
        await task
    await pool.close()
    pool.close_wires()


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1 2"])
async def test_an_invalid_content_length_answer_is_refused(pool: PairPool, value: bytes) -> None:
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 200 OK\r\ncontent-length: " + value + b"\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        await task


async def test_content_length_with_transfer_encoding_is_refused(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    with pytest.raises(RemoteProtocolError, match="invalid HTTP"):
        await task


async def test_truncated_answer_and_silent_close(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40)
    exchange = await task
    wire.close()
    with pytest.raises(RemoteProtocolError, match="mid-body"):
        await read_all(exchange)
    exchange.close()
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    wire.close()
    with pytest.raises(RemoteProtocolError, match="without answering"):
        await task


# --------------------------------------------------------------------------- the request side
async def test_a_streamed_body_longer_than_declared_is_never_sent_in_full(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"PUT", b"/x", [], body_of(b"abc", b"defgh"), 5))
    wire = await pool.wire()
    await wire.head()
    with pytest.raises(LocalProtocolError, match="longer than its Content-Length"):
        await task
    assert await wire.rest() == b"abc"  # the upstream saw an incomplete message, then the close


async def test_a_streamed_body_shorter_than_declared_drops_the_connection(pool: PairPool) -> None:
    task = asyncio.ensure_future(pool.request(b"PUT", b"/x", [], body_of(b"abc"), 5))
    wire = await pool.wire()
    await wire.head()
    with pytest.raises(LocalProtocolError, match="2 bytes short"):
        await task
    assert await wire.rest() == b"abc"


async def test_header_injection_is_refused_before_any_byte_is_written(pool: PairPool) -> None:
    with pytest.raises(LocalProtocolError, match="x-hook"):
        await pool.request(b"GET", b"/x", [(b"x-hook", b"1\r\nContent-Length: 5")])
    assert pool.connections_made == 0


async def test_an_early_answer_ends_the_request_and_the_connection(pool: PairPool) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    task = asyncio.ensure_future(pool.request(b"PUT", b"/x", [], endless()))
    wire = await pool.wire()
    await wire.head()
    await wire.send(ok(b"too large", b"413 Content Too Large", b"connection: close\r\n"))
    exchange = await asyncio.wait_for(task, 5)
    assert exchange.status == 413 and await read_all(exchange) == b"too large"
    assert exchange.sending is Sending.BODY  # the body never ended
    exchange.close()
    assert pool._open == 0 and not pool._idle


# --------------------------------------------------------------------------- timeouts
async def test_the_read_timeout_fires_when_configured_not_twice_that() -> None:
    pool = PairPool(Limits(read_timeout=0.4, head_timeout=0))
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    started = time.monotonic()
    with pytest.raises(ReadTimeout, match="within 0.4 s"):
        await task
    assert 0.35 < time.monotonic() - started < 0.65  # the first watchdog tick must not re-arm
    await pool.close()
    pool.close_wires()


async def test_one_pool_timer_fires_each_exchanges_timeout_at_its_own_time() -> None:
    """The pool's one watchdog timer (upstream/watchdog.py): an exchange with a shorter per-request
    timeout, started after a long one has armed the timer, still fails on time; the long one later,
    on its own time; an exchange that ended is not watched any more."""
    pool = PairPool(Limits(read_timeout=1.2, head_timeout=0), max_connections=4)
    done = asyncio.ensure_future(pool.request(b"GET", b"/done", []))
    wire_done = await pool.wire()
    await wire_done.head()
    await wire_done.send(ok(b"fine"))
    finished = await done
    assert await read_all(finished) == b"fine"
    finished.close()
    long = asyncio.ensure_future(pool.request(b"GET", b"/long", []))
    await wire_done.head()  # the kept-alive connection carries it
    started = time.monotonic()
    short = asyncio.ensure_future(pool.request(b"GET", b"/short", [], limits=Limits(read_timeout=0.3, head_timeout=0)))
    wire_short = await pool.wire()
    await wire_short.head()
    with pytest.raises(ReadTimeout, match="within 0.3 s"):
        await short
    assert 0.25 < time.monotonic() - started < 0.6
    assert not long.done()
    with pytest.raises(ReadTimeout, match="within 1.2 s"):
        await long
    assert 1.1 < time.monotonic() - started < 1.6
    assert len(pool.watchdog) == 0
    await pool.close()
    pool.close_wires()


async def test_the_read_timeout_counts_silence_after_the_last_byte() -> None:
    pool = PairPool(Limits(read_timeout=0.4, head_timeout=0))
    task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
    wire = await pool.wire()
    await wire.head()
    await wire.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    exchange = await task
    await asyncio.sleep(0.3)
    await wire.send(b"def")  # 0.3 s of silence: fine
    started = time.monotonic()
    with pytest.raises(ReadTimeout):
        await read_all(exchange)
    assert 0.35 < time.monotonic() - started < 0.65
    exchange.close()
    await pool.close()
    pool.close_wires()


async def test_a_slow_client_body_is_not_the_upstreams_silence() -> None:
    pool = PairPool(Limits(read_timeout=0.3, head_timeout=0))
    task = asyncio.ensure_future(pool.request(b"POST", b"/x", [], body_of(*[b"x"] * 5, delay=0.15), 5))
    wire = await pool.wire()
    await wire.head()
    assert await wire.exactly(5, timeout=3) == b"xxxxx"  # 0.75 s in all, each gap under the timeout
    await wire.send(ok(b"done"))
    exchange = await task
    assert await read_all(exchange) == b"done"
    exchange.close()
    await pool.close()
    pool.close_wires()
