"""Hypothesis strategies for HTTP/1.1 messages around the edges, and h11's reading of them.

* :func:`responses`: what a hostile or broken upstream answers (1xx storms, bad status lines,
  conflicting or lying framing, chunk extensions and bad chunk sizes, huge heads, a second message
  in the same write, an early close), as a :class:`~tests.fuzz.upstreams.Plan`;
  :func:`first_response` is h11's reading of its first final answer, the reference the gateway
  is held to.
* :func:`requests`: what a hostile client sends (see :class:`ClientRequest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
from hypothesis import strategies as st

from tests.fuzz.upstreams import MAX_HEAD, Plan

CRLF = b"\r\n"
HUGE = b"h" * 10_000
STORM = b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n" * 200
TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
ODD_BYTES = [b"\x00", b"\r", b"\n", b"\t", b" ", b"\x7f", b"\x80", b"\xff", b"\xc3\xa9", b":", b";", b",", b'"']


def _odd_text(max_size: int = 12) -> st.SearchStrategy[bytes]:
    """Mostly printable, sometimes the bytes parsers disagree about."""
    plain = st.binary(max_size=max_size).map(lambda b: bytes(0x61 + x % 26 for x in b))
    return st.lists(plain | st.sampled_from(ODD_BYTES), max_size=4).map(b"".join)


def _chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` as chunks: sizes in any case and with leading zeros, extensions, sometimes a lie,
    sometimes no last chunk, sometimes trailers."""
    out = bytearray()
    pos = 0
    while pos < len(body):
        n = draw(st.integers(1, max(1, len(body) - pos)))
        lie = b"%x" % (n + draw(st.integers(-2, 2)))
        size = draw(st.sampled_from([b"%x" % n, b"%X" % n, b"00%x" % n]) | st.just(lie))
        ext = draw(st.sampled_from([b"", b"", b";a=b", b";a", b' ;q="x"', b";" + b"e" * 200]))
        out += size + ext + CRLF + body[pos:pos + n] + CRLF
        pos += n
    end = draw(st.sampled_from([b"0\r\n\r\n"] * 4 + [b"0\r\nx-trailer: 1\r\n\r\n", b"000;z=1\r\n\r\n", b"", b"0\r\n"]))
    return bytes(out + end)


# --------------------------------------------------------------------------- responses
STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 500 Oops", b"HTTP/1.1 204 No Content",
                b"HTTP/1.1 304 Not Modified", b"HTTP/1.0 200 OK", b"HTTP/1.1 200 ", b"HTTP/1.1 200",
                b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 999 Weird", b"HTTP/1.1 600 Beyond", b"HTTP/1.1 099 Low",
                b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/2 200 OK", b"http/1.1 200 OK", b"HTTP/1.1  200 OK",
                b"HTTP/1.1 200 \xff\xfe", b"ICY 200 OK", b""]
INTERIM = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n",
           b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n", b"HTTP/1.1 199 Odd\r\nx: y\r\n\r\n"]


@st.composite
def _response_head_and_body(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from(STATUS_LINES[:5]) | st.sampled_from(STATUS_LINES))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "lying-length", "both", "two-lengths",
                                    "bad-te", "te-list"]))
    headers = [b"content-type: application/octet-stream", b"x-up: 1"]
    odd_names = st.sampled_from([b"x-odd", b"x y", b"x:y", b"\xff", b""])
    headers += draw(st.lists(st.builds(lambda n, v: n + b": " + v, odd_names,
                                       _odd_text()), max_size=2))
    if draw(st.integers(0, 9)) == 0:
        headers.append(b"x-huge: " + HUGE * draw(st.sampled_from([6, 7])))
    if draw(st.integers(0, 9)) == 0:
        headers += [b"x-folded: a", b" continued"]
    wire_body = body
    if framing == "length":
        headers.append(b"content-length: %d" % len(body))
    elif framing == "lying-length":
        headers.append(b"content-length: %d" % draw(st.sampled_from([len(body) + 5, max(0, len(body) - 5), 0])))
    elif framing == "two-lengths":
        headers += [b"content-length: %d" % len(body), b"content-length: %d" % (len(body) + 1)]
    elif framing in ("chunked", "both"):
        headers.append(b"transfer-encoding: chunked")
        if framing == "both":
            headers.append(b"content-length: %d" % len(body))
        wire_body = _chunked(draw, body)
    elif framing == "bad-te":
        headers.append(b"transfer-encoding: " + draw(st.sampled_from([b"gzip", b"chunked, gzip", b"identity",
                                                                      b" chunked",
                                                                      b"chunked\x00", b"xchunked"])))
    elif framing == "te-list":
        headers += [b"transfer-encoding: gzip", b"transfer-encoding: chunked"]
        wire_body = _chunked(draw, body)
    if draw(st.booleans()):
        headers.append(b"connection: " + draw(st.sampled_from([b"close", b"keep-alive", b"upgrade", b"x-up"])))
    return status + CRLF + CRLF.join(draw(st.permutations(headers))) + CRLF + CRLF + wire_body


@st.composite
def responses(draw: st.DrawFn) -> Plan:
    """One upstream answer: interim heads, the answer, maybe a second message in the same write,
    written in pieces with pauses, then kept, closed (maybe early) or hung."""
    interim = draw(st.lists(st.sampled_from(INTERIM), max_size=3))
    if draw(st.integers(0, 9)) == 0:
        interim.append(STORM * draw(st.sampled_from([1, 10])))  # 1xx storms of ~9 and ~90 KiB (past 64 KiB: 502)
    wire = b"".join(interim) + draw(_response_head_and_body())
    if draw(st.integers(0, 3)) == 0:
        wire += draw(st.sampled_from([b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond", b"junk", b"\r\n"]))
    end = draw(st.sampled_from(["keep", "keep", "close", "early-close", "hang"]))
    if end == "early-close":
        wire, end = wire[:draw(st.integers(0, max(0, len(wire) - 1)))], "close"
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=3, unique=True)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if b > a]
    steps: list[bytes | float] = []
    for piece in pieces:
        steps.append(piece)
        if draw(st.integers(0, 3)) == 0:
            steps.append(draw(st.sampled_from([0.01, 0.05, 0.2])))
    return Plan(tuple(steps), end)


@dataclass
class Reading:
    """h11's reading of the first final answer in some bytes (a GET's answer)."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # h11 read its end
    error: str = ""  # h11 found the bytes malformed before the answer's end


def first_response(wire: bytes, closed: bool) -> Reading:
    """h11 (client role, after a GET) on ``wire``, then the close if ``closed``."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(wire)
    if closed:
        conn.receive_data(b"")
    out = Reading()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return out
            if isinstance(event, h11.Response):
                out.status, out.headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                out.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.complete = True
                return out
    except h11.RemoteProtocolError as e:
        out.error = str(e)
        return _bodiless(wire) or out


def _bodiless(wire: bytes) -> Reading | None:
    """A 204 or 304 answer after any 1xx heads: no body "regardless of the header fields" (RFC 9112
    6.3), where h11 still vets its Transfer-Encoding. None for any other answer."""
    rest = wire
    while True:
        head, sep, rest = rest.partition(CRLF + CRLF)
        if not sep or not head.startswith(b"HTTP/1.1 1"):
            break
    parts = head.split(CRLF, 1)[0].split(b" ")
    if sep and len(parts) >= 2 and parts[0] == b"HTTP/1.1" and parts[1] in (b"204", b"304"):
        return Reading(int(parts[1]), [], b"", complete=True)
    return None


# --------------------------------------------------------------------------- requests
@dataclass
class ClientRequest:
    """One request a fuzzing client sends, and what the gateway should make of it."""

    fuzz_id: bytes
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    wire: bytes  # the exact bytes
    body: bytes  # the body as meant (before framing)
    truncated: bool = False  # the wire stops before the message's end (the client then half-closes)
    exact_body: bool = False  # the framing is honest: if the upstream gets a body, it is exactly ``body``
    effective: bytes = b""  # the method the upstream must see (after an override), when one is expected

    @property
    def head_method(self) -> bytes:
        return self.effective or self.method


METHODS = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS"]
ODD_METHODS = [b"TRACE", b"CONNECT", b"get", b"PROPFIND", b"G\xc3\xa9T", b"GE T", b"", b"M" * 40]
PATH_PIECES = [b"a", b"fuzz", b"/", b"//", b".", b"..", b"%2e", b"%2E%2e", b"%2f", b"%5C", b"\\", b"%25", b"%00",
               b"%", b"%zz", b"\xc3\xa9", b"%c3%a9", b"%ff", b"\xff", b";x=1", b"~", b"@", b"+", b"*", b"#frag",
               b"%20", b"\t", b'"', b"<", b"{"]
QUERIES = [b"", b"?a=1", b"?_method=DELETE", b"?_method=delete&x=1", b"?x=_method", b"?_method=HEAD", b"?%00=1",
           b"?a=%zz", b"??", b"?a=1#f", b"?_method=PUT&_method=DELETE"]
OVERRIDES = [b"x-http-method-override", b"x-http-method", b"x-method-override", b"X-HTTP-Method-Override"]
OVERRIDE_VALUES = [b"DELETE", b"PUT", b"patch", b"HEAD", b"OPTIONS", b"CONNECT", b" DELETE ", b"GET", b""]
HOP = [b"connection: close", b"connection: keep-alive", b"connection: x-secret", b"x-secret: 1", b"keep-alive: 5",
       b"te: trailers", b"te: chunked", b"trailer: x", b"upgrade: h2c", b"proxy-connection: keep-alive",
       b"proxy-authorization: Basic eDp5", b"expect: 100-continue", b"host: evil.example", b"host: a, host: b"]
ODD_NAMES = [b"x odd", b"x\x00y", b"\xffx", b"x:y", b"x\ty", b"", b"x-" + b"n" * 300]


@st.composite
def request_target(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["path"] * 6 + ["absolute", "star", "authority", "empty", "long"]))
    if kind == "absolute":
        return b"http://evil.example/fuzz/a"
    if kind == "star":
        return b"*"
    if kind == "authority":
        return b"evil.example:80"
    if kind == "empty":
        return b""
    if kind == "long":
        return b"/fuzz/" + b"l" * draw(st.sampled_from([9000, 70_000]))
    pieces = draw(st.lists(st.sampled_from(PATH_PIECES), max_size=6))
    return b"/fuzz/" + b"".join(pieces) + draw(st.sampled_from(QUERIES))


def _framed_body(draw: st.DrawFn, method: bytes) -> tuple[list[bytes], bytes, bytes, bool]:
    """(framing header lines, the body as sent on the wire, the body as meant, truncated)."""
    body = draw(st.sampled_from([b""]) | st.binary(min_size=1, max_size=200))
    kind = draw(st.sampled_from(["length", "length", "none", "chunked", "chunked", "lying", "two-lengths", "same-twice",
                                 "both", "te-odd", "te-list", "length-odd", "truncated"]))
    if kind == "none":
        return [], b"", b"", False
    if kind == "length":
        return [b"content-length: %d" % len(body)], body, body, False
    if kind == "same-twice":
        return [b"content-length: %d" % len(body)] * 2, body, body, False
    if kind == "two-lengths":
        return [b"content-length: %d" % len(body), b"content-length: %d" % (len(body) + 1)], body, body, False
    if kind == "lying":  # says more than comes, then the client half-closes
        return [b"content-length: %d" % (len(body) + draw(st.integers(1, 50)))], body, body, True
    if kind == "truncated":
        wire = _chunked(draw, body)
        return [b"transfer-encoding: chunked"], wire[:draw(st.integers(0, max(0, len(wire) - 1)))], body, True
    if kind == "length-odd":
        value = draw(st.sampled_from([b"+%d", b"-%d", b"0%d", b" %d ", b"%d,%d", b"0x%x", b"%d.0", b"%da"]))
        n = len(body)
        return [b"content-length: " + (value % ((n, n) if value.count(b"%") == 2 else n))], body, body, False
    chunked = _chunked(draw, body)
    truncated = not chunked.endswith(b"\r\n\r\n")
    if kind == "chunked":
        return [b"transfer-encoding: chunked"], chunked, body, truncated
    if kind == "both":
        return [b"transfer-encoding: chunked", b"content-length: %d" % len(body)], chunked, body, truncated
    if kind == "te-list":
        return [b"transfer-encoding: gzip", b"transfer-encoding: chunked"], chunked, body, truncated
    te = draw(st.sampled_from([b"Chunked", b" chunked", b"chunked, chunked", b"gzip, chunked", b"chunked, gzip",
                               b"identity", b"chunked\x0b", b"xchunked", b"chunked;q=1"]))
    return [b"transfer-encoding: " + te], chunked, body, truncated


@st.composite
def requests(draw: st.DrawFn, fuzz_id: bytes) -> ClientRequest:
    method = draw(st.sampled_from(METHODS) | st.sampled_from(ODD_METHODS))
    target = draw(request_target())
    headers: list[bytes] = [b"host: gateway", b"x-fuzz-id: " + fuzz_id]
    override = b""
    if draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 2))):
            headers.append(draw(st.sampled_from(OVERRIDES)) + b": " + draw(st.sampled_from(OVERRIDE_VALUES)))
    headers += draw(st.lists(st.sampled_from(HOP), max_size=3, unique=True))
    headers += draw(st.lists(st.builds(lambda n, v: n + b": " + v, st.sampled_from(ODD_NAMES) | st.just(b"x-v"),
                                       _odd_text()), max_size=2))
    if draw(st.integers(0, 14)) == 0:
        headers.append(b"x-big: " + b"b" * 70_000)
    if draw(st.integers(0, 14)) == 0:
        headers += [b"x-folded: a", b"\tcontinued"]
    framing, wire_body, body, truncated = _framed_body(draw, method)
    lines = draw(st.permutations(headers[2:] + framing))
    lines = headers[:2] + lines
    versions = [b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "]
    version = draw(st.sampled_from(versions))
    head = method + b" " + target + b" " + version + CRLF + CRLF.join(lines) + CRLF + CRLF
    parsed = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(b":") for ln in headers)]
    asked = {v.upper() for k, v in parsed if k in {o.lower() for o in OVERRIDES}}
    if b"_method=" in target:
        asked |= {p.split(b"=", 1)[1].split(b"#")[0].upper() for p in target.split(b"?", 1)[1].split(b"&")
                  if p.startswith(b"_method=")}
    allowed = (b"GET", b"PUT", b"PATCH", b"DELETE", b"POST")
    if method == b"POST" and len(asked) == 1 and (only := next(iter(asked))) in allowed:
        override = only
    exact = framing in ([], [b"content-length: %d" % len(body)], [b"content-length: %d" % len(body)] * 2)
    return ClientRequest(fuzz_id, method, target, [], head + wire_body, body, truncated, exact, override)
