"""The fuzzers' HTTP client side: raw bytes out over a socket (in pieces, with pauses), and the
gateway's answers read back with h11 as an independent parser (:class:`Answers`).

h11 is told only what it needs to frame each answer (whether the request was a ``HEAD``); it
then checks every answer is well-formed HTTP/1.1, that nothing follows an answer that said
``connection: close``, and that no byte comes that is not part of an answer.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11

from tests.fuzz.upstreams import MAX_HEAD

HOST = "127.0.0.1"


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    interim: list[int] = field(default_factory=list)  # 1xx statuses before it

    def value(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def recorded(self) -> bytes | None:
        """The ``x-fuzz-id`` the recording upstream named (None: the gateway answered itself)."""
        return self.value(b"x-recorded")


class MalformedAnswer(AssertionError):
    """The gateway sent bytes that are not well-formed HTTP/1.1 answers."""


class Answers:
    """Feeds a connection's bytes to h11 (client role), one request after the other."""

    def __init__(self, methods: Sequence[bytes], last_cut: bool = False) -> None:
        self.methods = list(methods)
        self.last_cut = last_cut  # the client never finished its last request (it half-closed instead)
        self.answers: list[Answer] = []
        self.closed = False  # the gateway closed the connection
        self.raw = bytearray()
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._current: Answer | None = None
        self._interim: list[int] = []
        self._next_request()

    @property
    def done(self) -> bool:
        """Every request has its whole answer, or no more can come."""
        return self.closed or len([a for a in self.answers if a.complete]) >= len(self.methods)

    def _next_request(self) -> None:
        index = len(self.answers)
        if index >= len(self.methods):
            return
        method = b"HEAD" if self.methods[index] == b"HEAD" else b"GET"
        self._h11.send(h11.Request(method=method, target="/", headers=[("host", "gateway")]))
        self._h11.send(h11.EndOfMessage())

    def feed(self, data: bytes) -> None:
        self.raw += data
        if not data:
            self.closed = True
        if self._h11.their_state is h11.MUST_CLOSE and data:
            raise MalformedAnswer(f"bytes after an answer with connection: close: {data[:200]!r}")
        if self._h11.their_state in (h11.MUST_CLOSE, h11.CLOSED):
            return
        self._h11.receive_data(data)
        try:
            self._events()
        except h11.RemoteProtocolError as e:
            if not data and "closed" in str(e):
                return  # an answer cut off by the close (what a proxy does when its upstream failed mid-body)
            if not data and self.last_cut and (self._current is None or self._current.complete):
                # The client half-closed after a request it cut off: uvicorn takes the end of its
                # stream as the client leaving (http.disconnect), so what it has not answered yet
                # (pipelined requests before the cut one included) gets no answer: a close, never
                # a partial or malformed one.
                return
            raise MalformedAnswer(f"{e}; the connection's bytes: {bytes(self.raw)[:600]!r}") from None

    def _events(self) -> None:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.InformationalResponse):
                self._interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                self._current = Answer(event.status_code, list(event.headers), interim=self._interim)
                self._interim = []
                self.answers.append(self._current)
            elif isinstance(event, h11.Data) and self._current is not None:
                self._current.body += event.data
            elif isinstance(event, h11.EndOfMessage) and self._current is not None:
                self._current.complete = True
                if self._h11.their_state is h11.DONE and self._h11.our_state is h11.DONE:
                    self._h11.start_next_cycle()
                    self._next_request()
                else:
                    return


class RawClient:
    """One connection to the gateway with exact bytes on the wire."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.peer_closed = False

    def send(self, pieces: Sequence[bytes], pauses: Sequence[float] = ()) -> bool:
        """Send ``pieces`` with ``pauses[i]`` seconds after piece ``i``; False if the gateway hung up first."""
        for i, piece in enumerate(pieces):
            try:
                self.sock.sendall(piece)
            except OSError:
                self.peer_closed = True
                return False
            if i < len(pauses) and pauses[i] > 0:
                time.sleep(pauses[i])
        return True

    def read(self, answers: Answers, timeout: float | None = None) -> Answers:
        """Read until every request has its answer or the gateway closes; raise on a timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not answers.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer within {timeout or self.timeout:g} s; got "
                                   f"{bytes(answers.raw)[:300]!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            answers.feed(data)
        return answers

    def finish(self) -> None:
        """Half-close and read to the end (the gateway's close is the positive sign it is done)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_once(port: int, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
                 body: bytes = b"", timeout: float = 10) -> Answer:
    """One well-formed request on a new connection; its whole answer."""
    lines = [method + b" " + target + b" HTTP/1.1", b"host: gateway"]
    lines += [k + b": " + v for k, v in headers]
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"content-length: %d" % len(body))
    with RawClient(port, timeout) as client:
        client.send([b"\r\n".join(lines) + b"\r\n\r\n" + body])
        answers = client.read(Answers([method]))
    if not answers.answers or not answers.answers[0].complete:
        raise AssertionError(f"no complete answer to {method!r} {target!r}: {bytes(answers.raw)[:300]!r}")
    return answers.answers[0]
