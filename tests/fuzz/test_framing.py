"""Unit fuzzer of the upstream client's response parsing (:mod:`dicomproxy.upstream.connection`,
:mod:`dicomproxy.upstream.framing`) through the socket-pair rig of :mod:`tests.upstream.wire`.

For any answer an upstream writes (:func:`tests.fuzz.http_strategies.responses`), the client
either raises an :class:`UpstreamError` (the proxy's 502/504) or delivers an answer that h11,
an independent parser, reads the same way: the same status and exactly the first message's body
(never a byte of what follows it). Nothing else may escape.
"""

from __future__ import annotations

import asyncio
import contextlib

from hypothesis import example, given

from dicomproxy.upstream.errors import UpstreamError
from dicomproxy.upstream.limits import Limits
from tests.fuzz.http_strategies import INTERIM, first_response, responses
from tests.fuzz.profiles import fuzz_settings
from tests.fuzz.upstreams import Plan
from tests.upstream.wire import PairPool, read_all


async def _play(plan: Plan) -> tuple[int, bytes] | UpstreamError:
    pool = PairPool(Limits(read_timeout=1, head_timeout=1, max_head_bytes=65536))
    try:
        task = asyncio.ensure_future(pool.request(b"GET", b"/x", []))
        wire = await pool.wire()
        await wire.head()
        with contextlib.suppress(OSError):  # the client may hang up first (a head too large, a bad status)
            for step in plan.steps:
                if isinstance(step, bytes):
                    await wire.send(step)
                else:
                    await asyncio.sleep(step / 10)
        if plan.end == "close":
            wire.close()
        try:
            exchange = await task
            body = await read_all(exchange)
        except UpstreamError as e:
            return e
        status = exchange.status
        exchange.close()
        return status, body
    finally:
        await pool.close()
        pool.close_wires()


@fuzz_settings(250)
@given(responses())
@example(Plan((b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond",)))
@example(Plan((b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\nabc",)))
@example(Plan((INTERIM[2] * 3 + b"HTTP/1.1 204 No Content\r\ntransfer-encoding: gzip\r\n\r\n",)))  # no body at all
@example(Plan((b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",)))
# Found by the fuzzers: another transfer coding was dropped with the hop-by-hop header and its coded
# bytes forwarded as the body (now a RemoteProtocolError: the proxy's 502).
@example(Plan((b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
               b"2\r\n\x1f\x8b\r\n0\r\n\r\n")))
@example(Plan((b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n\x1f\x8b",), "close"))
def test_the_client_reads_an_answer_as_h11_does_or_fails_cleanly(plan: Plan) -> None:
    outcome = asyncio.run(_play(plan))
    if isinstance(outcome, UpstreamError):
        return
    status, body = outcome
    reference = first_response(plan.wire, closed=plan.end == "close")
    assert not reference.error, f"the client accepted what h11 refuses ({reference.error}): {plan.wire[:300]!r}"
    assert reference.complete, f"the client finished an answer h11 reads as cut off: {plan.wire[:300]!r}"
    assert (status, body) == (reference.status, reference.body), plan.wire[:300]
