"""HTTP/1.1 framing of one exchange with the upstream, as an explicit state machine per side.

Modelled on h11 (``_state.py``, ``_writers.py``): each side of an exchange has an enum of
states, and :meth:`ExchangeState.step` is the one place that moves them, along the transition
tables below; an event a state does not allow is a protocol error, never a silent fix-up.

* **Our side** (:class:`Sending`): ``IDLE`` -> the head goes out -> ``BODY`` (the body the head
  declared is owed) or straight ``DONE``. The body goes through a writer
  (:class:`LengthWriter`, :class:`ChunkedWriter`, :class:`NoBodyWriter`) that refuses to send
  more bytes than the head promised and, at the end, fewer: either way it raises
  :class:`LocalProtocolError` before writing and the connection is dropped, so the upstream
  never sees a message whose framing lies. Nothing may be written once ``DONE``.
* **Their side** (:class:`Receiving`): ``HEAD`` (interim 1xx answers loop here) -> the final
  head -> ``BODY`` or straight ``DONE``. Anything after ``DONE`` (a second status line in the
  same read, stray body bytes) is the ``TRAILING`` event: the finished answer is left as it was
  and the connection goes ``CLOSED``.

An exchange may put its connection back in the pool only when both sides are ``DONE``.

Also here: the head writer (:func:`encode_head`), the one place request framing headers come
from. ``Host``, ``Content-Length``, ``Transfer-Encoding``, ``Connection`` and the other
hop-by-hop headers given by a caller (a client, a Lua hook, a feature) are dropped; the head
gets the ones its framing needs. Header names must be tokens and no value may hold CR, LF or
NUL, so no caller can inject a header line or a second request.
"""

from __future__ import annotations

import enum
from typing import Protocol

from dicomproxy.upstream.errors import LocalProtocolError, RemoteProtocolError

Headers = list[tuple[bytes, bytes]]

# Hop-by-hop (RFC 9110 7.6.1, plus the legacy names) and the framing headers the writer owns.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
OWNED = HOP_BY_HOP | {b"host", b"content-length"}

# Methods whose request body has no defined meaning (RFC 9110 9.3): a server may act on the
# head alone, so the proxy holds the head of such a request until its body is complete.
NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})
# Methods that may be replayed after a stale connection (RFC 9110 9.2.2), as aiohttp does.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Methods whose body has a meaning: sent with ``Content-Length: 0`` when they have none.
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class Sending(enum.Enum):
    """Our side of an exchange."""

    IDLE = "idle"  # nothing written yet
    BODY = "sending the body"  # the head is out; the body it declared is owed
    DONE = "done"  # the whole request is out; nothing more may be written
    CLOSED = "closed"  # the connection is being dropped


class Receiving(enum.Enum):
    """The upstream's side of an exchange."""

    HEAD = "waiting for the head"  # no final head yet (interim 1xx answers stay here)
    BODY = "reading the body"
    DONE = "done"  # the whole answer is in; any further byte is TRAILING
    CLOSED = "closed"


class Event(enum.Enum):
    HEAD_AND_BODY = "a head that announces a body"
    HEAD_ONLY = "a head with no body"
    INTERIM = "an interim 1xx answer"
    BODY_END = "the end of the body"
    TRAILING = "bytes after the end of the message"
    CLOSE = "a close"


_SEND: dict[tuple[Sending, Event], Sending] = {
    (Sending.IDLE, Event.HEAD_AND_BODY): Sending.BODY,
    (Sending.IDLE, Event.HEAD_ONLY): Sending.DONE,
    (Sending.BODY, Event.BODY_END): Sending.DONE,
}
_RECEIVE: dict[tuple[Receiving, Event], Receiving] = {
    (Receiving.HEAD, Event.INTERIM): Receiving.HEAD,
    (Receiving.HEAD, Event.HEAD_AND_BODY): Receiving.BODY,
    (Receiving.HEAD, Event.HEAD_ONLY): Receiving.DONE,
    (Receiving.BODY, Event.BODY_END): Receiving.DONE,
    (Receiving.DONE, Event.TRAILING): Receiving.CLOSED,
}


class ExchangeState:
    """Both sides of one exchange; :meth:`step` is the only way their states change."""

    __slots__ = ("sending", "receiving")

    def __init__(self) -> None:
        self.sending = Sending.IDLE
        self.receiving = Receiving.HEAD

    def step(self, ours: bool, event: Event) -> None:
        """Apply ``event`` to our side (``ours``) or theirs; CLOSE is allowed from any state."""
        if event is Event.CLOSE:
            if ours:
                self.sending = Sending.CLOSED
            else:
                self.receiving = Receiving.CLOSED
            return
        if ours:
            new_send = _SEND.get((self.sending, event))
            if new_send is None:
                raise LocalProtocolError(f"cannot send {event.value} while {self.sending.value}")
            self.sending = new_send
        else:
            new_receive = _RECEIVE.get((self.receiving, event))
            if new_receive is None:
                raise RemoteProtocolError(f"the upstream sent {event.value} while {self.receiving.value}")
            self.receiving = new_receive

    @property
    def reusable(self) -> bool:
        """Both messages complete and nothing after them: the connection may carry another exchange."""
        return self.sending is Sending.DONE and self.receiving is Receiving.DONE


class Framing(enum.Enum):
    """How a message's body is delimited."""

    NONE = "no body"
    LENGTH = "Content-Length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "the end of the connection"  # answers only


# --------------------------------------------------------------------------- the head
def encode_head(method: bytes, target: bytes, host: bytes, headers: Headers, framing: Framing, length: int) -> bytes:
    """The request head: ``headers`` less the hop-by-hop and framing names, plus the framing's own.

    Raises :class:`LocalProtocolError` for a method or header name that is not a token, a
    target with a space, or any CR, LF or NUL outside the line ends the writer puts there.
    """
    if not method or method.translate(None, _TCHAR) or b" " in target or not target:
        raise LocalProtocolError(f"invalid request line {method!r} {target!r}")
    lines = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    listed: set[bytes] = set()
    count = 3  # request line, host, blank line
    for name, value in headers:
        low = name.lower()
        if low in OWNED:
            if low == b"connection":
                listed.update(t.strip().lower() for t in value.split(b","))
            continue
        if not name or name.translate(None, _TCHAR):
            raise LocalProtocolError(f"invalid header name {name!r}")
        lines += (name, b": ", value, b"\r\n")
        count += 1
    listed -= {b"keep-alive", b"close", b""}
    if listed:  # names a Connection header lists are hop-by-hop too (rare: a second pass)
        kept = [(n, v) for n, v in headers if n.lower() not in listed and n.lower() != b"connection"]
        return encode_head(method, target, host, kept, framing, length)
    if framing is Framing.LENGTH:
        lines += (b"content-length: ", b"%d" % length, b"\r\n")
        count += 1
    elif framing is Framing.CHUNKED:
        lines.append(b"transfer-encoding: chunked\r\n")
        count += 1
    lines.append(b"\r\n")
    head = b"".join(lines)
    if head.count(b"\n") != count or head.count(b"\r") != count or b"\0" in head:
        bad = next((n for n, v in headers if b"\r" in v or b"\n" in v or b"\0" in v), b"?")
        raise LocalProtocolError(f"the value of header {bad.decode('latin-1')!r} holds CR, LF or NUL")
    return head


def chosen_framing(method: bytes, length: int | None, has_body: bool) -> tuple[Framing, int]:
    """How a request body goes: its length when known, else chunked; ``Content-Length: 0`` for a
    bodiless POST, PUT or PATCH (RFC 9110 8.6: the method defines a meaning for content)."""
    if length is not None:
        return Framing.LENGTH, length
    if has_body:
        return Framing.CHUNKED, -1
    if method in BODY_METHODS:
        return Framing.LENGTH, 0
    return Framing.NONE, 0


# --------------------------------------------------------------------------- body writers
class Writer(Protocol):
    """Where a body writer puts bytes: the connection."""

    def write(self, data: bytes) -> None: ...


class BodyWriter:
    """Writes one body as its framing says; :meth:`data` per chunk, :meth:`end` once."""

    def __init__(self, out: Writer) -> None:
        self.out = out
        self.sent = 0

    def data(self, chunk: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class LengthWriter(BodyWriter):
    """Exactly ``length`` bytes: a chunk that would pass it is refused, an end before it too."""

    def __init__(self, out: Writer, length: int) -> None:
        super().__init__(out)
        self.remaining = length

    def data(self, chunk: bytes) -> None:
        size = len(chunk)
        if size > self.remaining:
            declared = self.sent + self.remaining
            raise LocalProtocolError(f"the request body is longer than its Content-Length ({declared})")
        self.remaining -= size
        self.sent += size
        self.out.write(chunk)

    def end(self) -> None:
        if self.remaining:
            raise LocalProtocolError(
                f"the request body ended {self.remaining} bytes short of its Content-Length "
                f"({self.sent} of {self.sent + self.remaining})"
            )


class ChunkedWriter(BodyWriter):
    """``Transfer-Encoding: chunked``: one chunk per piece, the last chunk only at :meth:`end`."""

    def data(self, chunk: bytes) -> None:
        size = len(chunk)
        if not size:
            return  # an empty chunk would end the body
        self.sent += size
        if size < 4096:  # one write for a small chunk; no copy of a large one
            self.out.write(b"%x\r\n%b\r\n" % (size, chunk))
        else:
            self.out.write(b"%x\r\n" % size)
            self.out.write(chunk)
            self.out.write(b"\r\n")

    def end(self) -> None:
        self.out.write(b"0\r\n\r\n")


class NoBodyWriter(BodyWriter):
    """A request without a body: any byte is refused."""

    def data(self, chunk: bytes) -> None:
        if chunk:
            raise LocalProtocolError("a body was given for a request whose head announces none")

    def end(self) -> None:
        return None


def body_writer(out: Writer, framing: Framing, length: int) -> BodyWriter:
    if framing is Framing.LENGTH:
        return LengthWriter(out, length)
    if framing is Framing.CHUNKED:
        return ChunkedWriter(out)
    return NoBodyWriter(out)
