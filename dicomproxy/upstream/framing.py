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

Also here: the head writer (:class:`HeadWriter`), the one place request framing headers come
from. ``Host``, ``Content-Length``, ``Transfer-Encoding``, ``Connection`` and the other
hop-by-hop headers given by a caller (a client, a Lua hook, a feature) are dropped; the head
gets the ones its framing needs. Header names must be tokens and no value may hold CR or LF,
so no caller can inject a header line or a second request.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Protocol

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


# IntEnums: hashing one (a transition table lookup) is C-level, a plain Enum's is a Python
# call; with the member lookups bound once as module names below (in CPython 3.11 each
# ``Enum.MEMBER`` costs ~0.4 µs), the state machine adds ~1 µs to a proxied request.
class Sending(enum.IntEnum):
    """Our side of an exchange."""

    IDLE = 1  # nothing written yet
    BODY = 2  # the head is out; the body it declared is owed
    DONE = 3  # the whole request is out; nothing more may be written
    CLOSED = 4  # the connection is being dropped


class Receiving(enum.IntEnum):
    """The upstream's side of an exchange."""

    HEAD = 1  # no final head yet (interim 1xx answers stay here)
    BODY = 2
    DONE = 3  # the whole answer is in; any further byte is TRAILING
    CLOSED = 4


class Event(enum.IntEnum):
    HEAD_AND_BODY = 1  # a head that announces a body
    HEAD_ONLY = 2  # a head with no body
    INTERIM = 3  # an interim 1xx answer
    BODY_END = 4
    TRAILING = 5  # bytes after the end of the message
    CLOSE = 6


def words(member: enum.Enum) -> str:
    """A state or event in words, for error messages."""
    return member.name.lower().replace("_", " ")


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


# The same tables as rows indexed by state, then by event (None: not allowed): two C-level
# subscripts per step, where a dict.get on a (state, event) tuple built per step cost ~500
# instructions more (three steps per proxied request).
def _rows(table: dict[Any, Any], states: int) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(table.get((s, e)) for e in range(len(Event) + 1)) for s in range(states + 1))


_SEND_ROWS = _rows(_SEND, len(Sending))
_RECEIVE_ROWS = _rows(_RECEIVE, len(Receiving))

_CLOSE, _SENDING_CLOSED, _RECEIVING_CLOSED = Event.CLOSE, Sending.CLOSED, Receiving.CLOSED
_SENDING_DONE, _RECEIVING_DONE = Sending.DONE, Receiving.DONE


class ExchangeState:
    """Both sides of one exchange; :meth:`step` is the only way their states change."""

    __slots__ = ("sending", "receiving")

    def __init__(self) -> None:
        self.sending = Sending.IDLE
        self.receiving = Receiving.HEAD

    def step(self, ours: bool, event: Event) -> None:
        """Apply ``event`` to our side (``ours``) or theirs; CLOSE is allowed from any state."""
        if event is _CLOSE:
            if ours:
                self.sending = _SENDING_CLOSED
            else:
                self.receiving = _RECEIVING_CLOSED
            return
        if ours:
            new_send = _SEND_ROWS[self.sending][event]
            if new_send is None:
                raise LocalProtocolError(f"cannot send {words(event)} while {words(self.sending)}")
            self.sending = new_send
        else:
            new_receive = _RECEIVE_ROWS[self.receiving][event]
            if new_receive is None:
                raise RemoteProtocolError(f"the upstream sent {words(event)} while {words(self.receiving)}")
            self.receiving = new_receive

    @property
    def reusable(self) -> bool:
        """Both messages complete and nothing after them: the connection may carry another exchange."""
        return self.sending is _SENDING_DONE and self.receiving is _RECEIVING_DONE


class Framing(enum.IntEnum):
    """How a message's body is delimited."""

    NONE = 1  # no body
    LENGTH = 2  # Content-Length
    CHUNKED = 3
    UNTIL_CLOSE = 4  # the end of the connection (answers only)


_NONE, _LENGTH, _CHUNKED = Framing.NONE, Framing.LENGTH, Framing.CHUNKED


# --------------------------------------------------------------------------- the head
_KEEP, _DROP, _CONNECTION = 0, 1, 2
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"})
# A Host value: a reg-name or IPv4 address, or a bracketed IPv6 address, and an optional port.
HOST_VALUE = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_HOST = HOST_VALUE


class HeadWriter:
    """Writes the request heads for one origin (``host``).

    It remembers what it decided for each header name (keep, drop, or a ``Connection``
    header), at most ``MEMO`` names, so a proxied request costs one dict lookup per header
    rather than a case fold, a set lookup and a token check: measured, that made the head
    writer ~4 µs cheaper per request.
    """

    MEMO = 512

    def __init__(self, host: bytes) -> None:
        self.host = host
        self._verdicts: dict[bytes, int] = {}

    def encode(self, method: bytes, target: bytes, headers: Headers, framing: Framing, length: int,
               host: bytes | None = None, checked: bytes = b"") -> bytes:
        """The request head: ``headers`` less the hop-by-hop and framing names, plus the framing's own.

        ``host``: the ``Host`` to send instead of the origin's. ``checked``: header lines made by
        :func:`checked_lines`, written after ``headers`` as they are. Raises :class:`LocalProtocolError`
        for a method or header name that is not a token, a target with a space, CR or LF (or
        none), a header value with CR or LF, or a ``host`` that is not ``host[:port]``.
        """
        if (method not in _METHODS and not _is_token(method)) or not target or 32 in target or 10 in target \
                or 13 in target:
            raise LocalProtocolError(f"invalid request line {method!r} {target!r}")
        if host is not None and not _HOST.fullmatch(host):
            raise LocalProtocolError(f"invalid Host {host[:60]!r}")
        lines = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host or self.host, b"\r\n"]
        verdicts = self._verdicts
        listed: bytes | None = None  # what Connection headers list
        for name, value in headers:
            try:
                verdict = verdicts[name]  # a subscript, not .get: ~350 instructions less a header
            except KeyError:
                verdict = self._judge(name)
            if verdict:
                if verdict == _CONNECTION:
                    listed = value if listed is None else listed + b"," + value
                continue
            lines += (name, b": ", value, b"\r\n")
        values = b"".join(lines[8::4])  # every kept value (name, ": ", value, CRLF from index 6 on)
        if 10 in values or 13 in values:  # an int needle: no buffer protocol, ~5x cheaper than b"\n"
            bad = next((n for n, v in headers if 10 in v or 13 in v), b"?")
            raise LocalProtocolError(f"the value of header {bad.decode('latin-1')!r} holds CR or LF")
        if listed is not None:
            names = {t.strip().lower() for t in listed.split(b",")} - {b"keep-alive", b"close", b""}
            if names:  # the names a Connection header lists are hop-by-hop too (rare: a second pass)
                kept = [(n, v) for n, v in headers if n.lower() not in names and n.lower() != b"connection"]
                return self.encode(method, target, kept, framing, length, host, checked)
        if checked:
            lines.append(checked)
        if framing is _LENGTH:
            lines += (b"content-length: ", b"%d" % length, b"\r\n\r\n")
        elif framing is _CHUNKED:
            lines.append(b"transfer-encoding: chunked\r\n\r\n")
        else:
            lines.append(b"\r\n")
        return b"".join(lines)

    def _judge(self, name: bytes) -> int:
        low = name.lower()
        if low in OWNED:
            verdict = _CONNECTION if low == b"connection" else _DROP
        elif _is_token(name):
            verdict = _KEEP
        else:
            raise LocalProtocolError(f"invalid header name {name!r}")
        if len(self._verdicts) < self.MEMO:
            self._verdicts[name] = verdict
        return verdict


def checked_lines(headers: Headers) -> bytes:
    """``headers`` as head lines, checked once as :meth:`HeadWriter.encode` checks each request's
    (token names, none the writer owns, no CR or LF in a value), for a caller that sends the same
    headers many times: the relay's forwarding headers, the same for every request of a client.
    Written as they are, they cost a request one list item rather than four headers' checks and
    sixteen pieces of the head (~3,000 instructions, bench/proxy_instructions.py)."""
    for name, value in headers:
        if name.lower() in OWNED or not _is_token(name):
            raise LocalProtocolError(f"header {name!r} cannot be sent as a checked line")
        if 10 in value or 13 in value:
            raise LocalProtocolError(f"the value of header {name.decode('latin-1')!r} holds CR or LF")
    return b"".join(b"%b: %b\r\n" % (name, value) for name, value in headers)


def encode_head(method: bytes, target: bytes, host: bytes, headers: Headers, framing: Framing, length: int) -> bytes:
    """One head, without a writer's memory (see :class:`HeadWriter`)."""
    return HeadWriter(host).encode(method, target, headers, framing, length)


def _is_token(name: bytes) -> bool:
    """RFC 9110 token; the common case (letters, digits, dashes) without building a table."""
    return name.replace(b"-", b"").isalnum() or (bool(name) and not name.translate(None, _TCHAR))


def chosen_framing(method: bytes, length: int | None, has_body: bool) -> tuple[Framing, int]:
    """How a request body goes: its length when known, else chunked; ``Content-Length: 0`` for a
    bodiless POST, PUT or PATCH (RFC 9110 8.6: the method defines a meaning for content)."""
    if length is not None:
        return _LENGTH, length
    if has_body:
        return _CHUNKED, -1
    if method in BODY_METHODS:
        return _LENGTH, 0
    return _NONE, 0


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
    if framing is _LENGTH:
        return LengthWriter(out, length)
    if framing is _CHUNKED:
        return ChunkedWriter(out)
    return NoBodyWriter(out)
