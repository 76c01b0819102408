"""Hostile HTTP requests through a real gateway process to a recording upstream.

Each example is one connection: one to three requests (:func:`tests.fuzz.http_strategies.requests`:
overrides, encoded targets, odd header bytes, conflicting framing, chunk extensions, truncated
bodies), pipelined in one write or delivered in pieces with pauses. Properties:

* the gateway answers each request with well-formed HTTP/1.1 (read by h11) or closes;
* what reached the upstream (read by h11, an independent parser) is one well-formed request per
  client request, never more (nothing smuggled, nothing without its ``x-fuzz-id``), with a
  canonical path, its framing honest (h11 checks ``Content-Length`` against the body, and chunking),
  no hop-by-hop or method-override header, no ``_method`` parameter, the effective method;
* nothing reached the upstream for a request the gateway itself answered 4xx;
* afterwards a normal request from another client is served, the RSS stays bounded and the log
  holds no traceback.
"""

from __future__ import annotations

import itertools
from urllib.parse import parse_qsl

from hypothesis import example, given
from hypothesis import strategies as st

from dicomproxy.http.target import BadTarget, canonical_path
from dicomproxy.upstream.framing import HOP_BY_HOP
from tests.fuzz.client import Answers, RawClient, request_once
from tests.fuzz.conftest import Watched
from tests.fuzz.http_strategies import OVERRIDES, ClientRequest, requests
from tests.fuzz.profiles import fuzz_settings
from tests.fuzz.upstreams import RecordingUpstream, Seen
from tests.peers import wait_until

PLACEHOLDER = b"@@@@@@@@"  # the x-fuzz-id in a drawn request; a unique id of the same length replaces it
_ids = itertools.count(1)


def _unique() -> bytes:
    return b"f%07d" % next(_ids)


@st.composite
def connections(draw: st.DrawFn) -> tuple[list[ClientRequest], list[bytes], list[float]]:
    """Up to three requests (a truncated one ends the connection), the wire cut into pieces and the
    pause after each."""
    batch: list[ClientRequest] = []
    for _ in range(draw(st.integers(1, 3))):
        batch.append(draw(requests(PLACEHOLDER)))
        if batch[-1].truncated:
            break
    total = sum(len(r.wire) for r in batch)
    cuts = sorted(draw(st.lists(st.integers(1, max(1, total - 1)), max_size=4, unique=True))) if total > 1 else []
    pauses = [draw(st.sampled_from([0.0, 0.0, 0.02, 0.1])) for _ in range(len(cuts) + 1)]
    return batch, cuts, pauses


def _send(port: int, batch: list[ClientRequest], cuts: list[int], pauses: list[float]) -> Answers:
    wire = b"".join(r.wire.replace(PLACEHOLDER, r.fuzz_id, 1) for r in batch)
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    answers = Answers([r.head_method for r in batch], last_cut=batch[-1].truncated)
    with RawClient(port, timeout=10) as client:
        if client.send(pieces, pauses) and batch[-1].truncated:
            client.finish()  # the rest never comes: the gateway sees the end of the stream
        client.read(answers)
    return answers


def _check_seen(seen: Seen, sent: dict[bytes, ClientRequest]) -> None:
    assert not seen.error, f"a malformed request reached the upstream: {seen.error}"
    request = sent.get(seen.fuzz_id or b"")
    assert request is not None, f"a request the client never sent reached the upstream: {seen}"
    if not seen.complete:
        assert request.truncated, f"a request the client completed reached the upstream cut off: {seen}"
        return
    path, _, query = seen.target.partition(b"?")
    try:
        assert canonical_path(path)[1] == path, f"not a canonical path upstream: {seen.target!r}"
    except BadTarget as e:
        raise AssertionError(f"the upstream got a target the gateway refuses ({e}): {seen.target!r}") from None
    assert "_method" not in {k for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)}, seen.target
    names = {k for k, _ in seen.headers}
    overrides = {o.lower() for o in OVERRIDES}
    assert not names & overrides, f"a method override reached the upstream: {seen.headers}"
    hop = (names & HOP_BY_HOP) - {b"transfer-encoding"}
    assert not hop, f"a hop-by-hop header reached the upstream: {seen.headers}"
    assert seen.values(b"transfer-encoding") in ([], [b"chunked"]), seen.headers
    assert len(seen.values(b"host")) == 1, seen.headers
    if request.effective or request.method in (b"GET", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"):
        assert seen.method == request.head_method, (seen.method, request)
    if request.exact_body:
        assert seen.body == request.body, "the body the upstream got is not the one the client sent"


def _check_answers(answers: Answers, batch: list[ClientRequest], seen: list[Seen]) -> None:
    for request, answer in zip(batch, answers.answers, strict=False):
        reached = [s for s in seen if s.fuzz_id == request.fuzz_id]
        if answer.recorded is not None:
            assert answer.recorded == request.fuzz_id, "the client got the answer to another request"
            assert reached, "an answer from the upstream to a request it did not see"
        elif 400 <= answer.status < 500:
            assert not reached, f"the gateway answered {answer.status} yet the upstream got the request: {reached}"


def _own(seen: Seen) -> bool:
    """The gateway's own request (its upstream health check), not a client's."""
    return seen.fuzz_id is None and any(v.startswith(b"DicomProxy/") for v in seen.values(b"user-agent"))


def _probe(watched: Watched, recording: RecordingUpstream) -> None:
    """Another client's normal request is served (and reaches the upstream intact)."""
    probe = _unique()
    answer = request_once(watched.gateway.http_port, b"GET", b"/fuzz/probe", [(b"x-fuzz-id", probe)])
    assert (answer.status, answer.recorded) == (200, probe), answer


def run_example(watched: Watched, recording: RecordingUpstream, batch: list[ClientRequest], cuts: list[int],
                pauses: list[float]) -> None:
    recording.reset()
    for request in batch:
        request.fuzz_id = _unique()
    answers = _send(watched.gateway.http_port, batch, cuts, pauses)
    wait_until(lambda: recording.settled, timeout=10, what="no request left mid-way on the upstream")
    _probe(watched, recording)
    seen, _ = recording.snapshot()
    sent = {r.fuzz_id: r for r in batch}
    seen = [s for s in seen if not _own(s)]
    for s in seen:
        if s.target != b"/fuzz/probe":
            _check_seen(s, sent)
    assert len({s.fuzz_id for s in seen}) == len(seen), f"a request reached the upstream twice: {seen}"
    _check_answers(answers, batch, seen)
    watched.check_rss()
    watched.check_log()


def _plain(method: bytes, target: bytes, extra: bytes = b"") -> ClientRequest:
    head = method + b" " + target + b" HTTP/1.1\r\nhost: gateway\r\nx-fuzz-id: " + PLACEHOLDER + b"\r\n"
    head += extra + b"\r\n"
    return ClientRequest(PLACEHOLDER, method, target, [], head, b"", exact_body=True)


# Found by this fuzzer: behind a pipelined request still being proxied, uvicorn wrote its 400 for
# the next, malformed request at once, so the client read "400" as the answer to the DELETE the
# upstream had executed (fixed in dicomproxy/http/server.py, GuardedHttpToolsProtocol._refuse_in_order).
PIPELINED_THEN_BROKEN = ([_plain(b"DELETE", b"/fuzz/a"), _plain(b"GET", b"/fuzz/b", b"x\x00y: 1\r\n")], [], [0.0])
TOO_BIG = b"x-big: %s\r\n" % (b"b" * 70_000)
PIPELINED_THEN_TOO_BIG = ([_plain(b"DELETE", b"/fuzz/a"), _plain(b"GET", b"/fuzz/b", TOO_BIG)], [], [0.0])


# Found by a long campaign: a CONNECT with a body went upstream and hung there (llhttp stops parsing
# after a CONNECT head); the request behind it on the connection was never answered.
CONNECT_THEN_GET = ([_plain(b"CONNECT", b"/fuzz/a", b"content-length: 1\r\n"), _plain(b"GET", b"/fuzz/b")], [], [0.0])
CONNECT_THEN_GET[0][0].wire += b"x"  # the body its Content-Length announces
CONNECT_THEN_GET[0][0].body = b"x"


@fuzz_settings(100)
@given(connections())
@example(CONNECT_THEN_GET)
@example(PIPELINED_THEN_BROKEN)
@example(PIPELINED_THEN_TOO_BIG)
def test_hostile_requests_never_reach_the_upstream_malformed(
    recorded_gateway: Watched, recording: RecordingUpstream,
    connection: tuple[list[ClientRequest], list[int], list[float]],
) -> None:
    run_example(recorded_gateway, recording, *connection)
