"""The framing state machine as data (every allowed transition, every refused one), the head
writer (owned headers, injection) and the body writers (never more or fewer bytes than declared),
in the style of h11's ``test_state.py`` / ``test_io.py``."""

from __future__ import annotations

import itertools

import pytest

from dicomproxy.upstream.errors import LocalProtocolError, RemoteProtocolError
from dicomproxy.upstream.framing import (
    _RECEIVE,
    _RECEIVE_ROWS,
    _SEND,
    _SEND_ROWS,
    ChunkedWriter,
    Event,
    ExchangeState,
    Framing,
    HeadWriter,
    LengthWriter,
    NoBodyWriter,
    Receiving,
    Sending,
    checked_lines,
    chosen_framing,
    encode_head,
)


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


# --------------------------------------------------------------------------- states
SEND_PATHS = {
    (Sending.IDLE, Event.HEAD_AND_BODY): Sending.BODY,
    (Sending.IDLE, Event.HEAD_ONLY): Sending.DONE,
    (Sending.BODY, Event.BODY_END): Sending.DONE,
}
RECEIVE_PATHS = {
    (Receiving.HEAD, Event.INTERIM): Receiving.HEAD,
    (Receiving.HEAD, Event.HEAD_AND_BODY): Receiving.BODY,
    (Receiving.HEAD, Event.HEAD_ONLY): Receiving.DONE,
    (Receiving.BODY, Event.BODY_END): Receiving.DONE,
    (Receiving.DONE, Event.TRAILING): Receiving.CLOSED,
}


def state_at(sending: Sending = Sending.IDLE, receiving: Receiving = Receiving.HEAD) -> ExchangeState:
    state = ExchangeState()
    state.sending, state.receiving = sending, receiving
    return state


def test_the_tables_are_exactly_the_documented_transitions() -> None:
    assert _SEND == SEND_PATHS
    assert _RECEIVE == RECEIVE_PATHS


def test_the_rows_step_reads_are_the_tables() -> None:
    for rows, table, states in ((_SEND_ROWS, _SEND, Sending), (_RECEIVE_ROWS, _RECEIVE, Receiving)):
        for state, event in itertools.product(states, Event):
            assert rows[state][event] is table.get((state, event))


@pytest.mark.parametrize(("start", "event"), list(itertools.product(Sending, Event)))
def test_every_sending_transition(start: Sending, event: Event) -> None:
    state = state_at(sending=start)
    if event is Event.CLOSE:
        state.step(True, event)
        assert state.sending is Sending.CLOSED
    elif (start, event) in SEND_PATHS:
        state.step(True, event)
        assert state.sending is SEND_PATHS[start, event]
    else:
        with pytest.raises(LocalProtocolError, match="cannot send"):
            state.step(True, event)
        assert state.sending is start  # a refused event changes nothing
    assert state.receiving is Receiving.HEAD  # one side never moves the other


@pytest.mark.parametrize(("start", "event"), list(itertools.product(Receiving, Event)))
def test_every_receiving_transition(start: Receiving, event: Event) -> None:
    state = state_at(receiving=start)
    if event is Event.CLOSE:
        state.step(False, event)
        assert state.receiving is Receiving.CLOSED
    elif (start, event) in RECEIVE_PATHS:
        state.step(False, event)
        assert state.receiving is RECEIVE_PATHS[start, event]
    else:
        with pytest.raises(RemoteProtocolError, match="the upstream sent"):
            state.step(False, event)
        assert state.receiving is start
    assert state.sending is Sending.IDLE


def test_reusable_only_when_both_sides_are_done() -> None:
    for sending, receiving in itertools.product(Sending, Receiving):
        assert state_at(sending, receiving).reusable == (sending is Sending.DONE and receiving is Receiving.DONE)


def test_a_second_message_after_done_closes_and_nothing_reopens_it() -> None:
    state = state_at(Sending.DONE, Receiving.DONE)
    state.step(False, Event.TRAILING)
    assert state.receiving is Receiving.CLOSED and not state.reusable
    for event in (Event.HEAD_AND_BODY, Event.HEAD_ONLY, Event.INTERIM, Event.BODY_END, Event.TRAILING):
        with pytest.raises(RemoteProtocolError):
            state.step(False, event)


# --------------------------------------------------------------------------- the head
def test_head_drops_owned_and_hop_by_hop_headers_and_writes_its_own() -> None:
    given = [
        (b"Host", b"evil"), (b"Content-Length", b"999"), (b"Transfer-Encoding", b"chunked"), (b"connection", b"close"),
        (b"keep-alive", b"timeout=5"), (b"te", b"trailers"), (b"upgrade", b"h2c"), (b"proxy-connection", b"x"),
        (b"trailer", b"x"), (b"x-kept", b"1"), (b"X-Dup", b"a"), (b"X-Dup", b"b"),
    ]
    head = encode_head(b"POST", b"/p?q=1", b"pacs:8042", given, Framing.LENGTH, 5)
    assert head == (b"POST /p?q=1 HTTP/1.1\r\nhost: pacs:8042\r\nx-kept: 1\r\nX-Dup: a\r\nX-Dup: b\r\n"
                    b"content-length: 5\r\n\r\n")
    head = encode_head(b"PUT", b"/", b"h", [(b"content-length", b"3")], Framing.CHUNKED, -1)
    assert head == b"PUT / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
    assert encode_head(b"GET", b"/", b"h", [], Framing.NONE, 0) == b"GET / HTTP/1.1\r\nhost: h\r\n\r\n"


def test_names_a_connection_header_lists_are_dropped_too() -> None:
    given = [(b"Connection", b"keep-alive, X-Secret"), (b"x-secret", b"1"), (b"x-other", b"2")]
    head = encode_head(b"GET", b"/", b"h", given, Framing.NONE, 0)
    assert head == b"GET / HTTP/1.1\r\nhost: h\r\nx-other: 2\r\n\r\n"


def test_checked_lines_are_written_after_the_headers_as_they_are() -> None:
    lines = checked_lines([(b"x-forwarded-for", b"10.0.0.7"), (b"forwarded", b"for=10.0.0.7;proto=http")])
    assert lines == b"x-forwarded-for: 10.0.0.7\r\nforwarded: for=10.0.0.7;proto=http\r\n"
    head = HeadWriter(b"pacs").encode(b"POST", b"/s", [(b"accept", b"*/*")], Framing.LENGTH, 2, checked=lines)
    assert head == (b"POST /s HTTP/1.1\r\nhost: pacs\r\naccept: */*\r\nx-forwarded-for: 10.0.0.7\r\n"
                    b"forwarded: for=10.0.0.7;proto=http\r\ncontent-length: 2\r\n\r\n")


def test_the_second_pass_for_connection_listed_names_keeps_host_and_checked_lines() -> None:
    given = [(b"connection", b"x-secret"), (b"x-secret", b"1")]
    head = HeadWriter(b"pacs").encode(b"GET", b"/", given, Framing.NONE, 0, b"gw.example:443", b"x-f: 1\r\n")
    assert head == b"GET / HTTP/1.1\r\nhost: gw.example:443\r\nx-f: 1\r\n\r\n"


@pytest.mark.parametrize("header", [(b"x-a", b"1\r\nx-injected: 1"), (b"x-a", b"1\n"), (b"host", b"h"),
                                    (b"Content-Length", b"1"), (b"connection", b"close"), (b"bad name", b"1")])
def test_checked_lines_refuse_what_the_writer_would(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(LocalProtocolError):
        checked_lines([header])


@pytest.mark.parametrize("value", [b"a\r\nX-Injected: 1", b"a\nb", b"a\rb", b"\r\n\r\nGET /admin HTTP/1.1"])
def test_no_header_value_may_inject_a_line(value: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="x-hook"):
        encode_head(b"GET", b"/", b"h", [(b"x-hook", value)], Framing.NONE, 0)


@pytest.mark.parametrize("name", [b"content-length ", b"x a", b"x:y", b"", b"x\r\ny", b"caf\xc3\xa9"])
def test_header_names_must_be_tokens(name: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="invalid header name"):
        encode_head(b"GET", b"/", b"h", [(name, b"1")], Framing.NONE, 0)


@pytest.mark.parametrize(("method", "target"), [(b"GE T", b"/"), (b"", b"/"), (b"GET", b"/a b"), (b"GET", b""),
                                                 (b"GET", b"/\r\nX: 1")])
def test_the_request_line_is_checked(method: bytes, target: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        encode_head(method, target, b"h", [], Framing.NONE, 0)


def test_chosen_framing() -> None:
    assert chosen_framing(b"POST", 10, True) == (Framing.LENGTH, 10)
    assert chosen_framing(b"PUT", None, True) == (Framing.CHUNKED, -1)
    for method in (b"POST", b"PUT", b"PATCH"):  # bodiless: Content-Length: 0 all the same
        assert chosen_framing(method, None, False) == (Framing.LENGTH, 0)
        assert chosen_framing(method, 0, False) == (Framing.LENGTH, 0)
    assert chosen_framing(b"GET", None, False) == (Framing.NONE, 0)
    assert chosen_framing(b"DELETE", 0, True) == (Framing.LENGTH, 0)


# --------------------------------------------------------------------------- body writers
def test_length_writer_refuses_more_before_writing_it() -> None:
    sink = Sink()
    writer = LengthWriter(sink, 5)
    writer.data(b"abc")
    with pytest.raises(LocalProtocolError, match="longer than its Content-Length"):
        writer.data(b"def")
    assert sink.data == b"abc"  # the chunk that would pass the length was not written at all
    writer.data(b"de")
    writer.end()
    assert sink.data == b"abcde"


def test_length_writer_refuses_to_end_short() -> None:
    writer = LengthWriter(Sink(), 5)
    writer.data(b"abc")
    with pytest.raises(LocalProtocolError, match="2 bytes short"):
        writer.end()


def test_chunked_writer_frames_each_chunk_and_skips_empty_ones() -> None:
    sink = Sink()
    writer = ChunkedWriter(sink)
    writer.data(b"hello")
    writer.data(b"")  # an empty chunk would end the body: never written
    writer.data(b"x" * 5000)
    assert sink.data == b"5\r\nhello\r\n" + b"1388\r\n" + b"x" * 5000 + b"\r\n"
    writer.end()
    assert sink.data.endswith(b"\r\n0\r\n\r\n") and writer.sent == 5005


def test_no_body_writer_refuses_any_byte() -> None:
    writer = NoBodyWriter(Sink())
    writer.data(b"")
    writer.end()
    with pytest.raises(LocalProtocolError, match="announces none"):
        writer.data(b"x")
