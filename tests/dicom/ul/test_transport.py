"""dicomproxy.dicom.ul.transport's blocking driver on a socket pair: its read-ahead hands over
whole PDUs however the bytes arrive, and what it handed over stays valid after later reads (the
relay and the spool writer keep views of received fragments)."""

from __future__ import annotations

import socket
import threading

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.association import Aborted, DataReceived
from dicomproxy.dicom.ul.transport import GATHER_BYTES, IOV_BATCH, READ_AHEAD, SocketAssociation
from tests.dicom.ul.test_association import established_acceptor


def _pdata(payload: bytes, *, last: bool = True) -> bytes:
    return b"".join(bytes(p) for p in pdus.p_data(1, payload, command=False, max_pdu=1 << 20, last=last))


def test_pdus_in_one_segment_split_and_large_come_whole_and_stay_valid() -> None:
    ours, theirs = socket.socketpair()
    try:
        link = SocketAssociation(established_acceptor(), ours, idle=5.0)
        small = [bytes([i]) * (100 + i) for i in range(3)]
        large = bytes(range(256)) * ((READ_AHEAD * 2) // 256)  # longer than one read-ahead buffer
        wire = b"".join(_pdata(s) for s in small) + _pdata(large)
        theirs.sendall(wire[:3])  # a header split across reads
        theirs.sendall(wire[3:])
        got = []
        for _ in range(4):
            indication = link.receive()
            assert isinstance(indication, DataReceived)
            got.append(indication.pdvs[0][2])
        assert [bytes(v) for v in got] == [*small, large]
        theirs.sendall(_pdata(b"next"))  # another read into a new buffer: the old views are unchanged
        indication = link.receive()
        assert isinstance(indication, DataReceived) and bytes(indication.pdvs[0][2]) == b"next"
        assert [bytes(v) for v in got] == [*small, large]
        theirs.close()  # the end of the connection in the middle of nothing: an A-P-ABORT
        assert isinstance(link.receive(), Aborted)
    finally:
        ours.close()
        theirs.close()


def test_a_large_write_goes_out_unjoined_byte_for_byte() -> None:
    ours, theirs = socket.socketpair()
    try:
        link = SocketAssociation(established_acceptor(), ours, idle=5.0)
        payload = bytes(range(256)) * (GATHER_BYTES * 40 // 256)  # ~2.6 MB: more than the socket buffers hold
        encoded = pdus.p_data(1, payload, command=False, max_pdu=4096)
        assert len(encoded) > IOV_BATCH  # several sendmsg calls, some of them partial
        expected = b"".join(bytes(p) for p in encoded)
        received = bytearray()

        def read() -> None:
            while len(received) < len(expected):
                chunk = theirs.recv(1 << 16)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        link.send_pdata(encoded)
        reader.join(10)
        assert bytes(received) == expected
    finally:
        ours.close()
        theirs.close()


def test_a_header_past_the_maximum_is_aborted_once_and_the_connection_closed() -> None:
    """A P-DATA header announcing 4 GiB, then the peer's half-close: one A-ABORT, then the close
    (the read-ahead once kept the bad header and parsed it again and again, never closing)."""
    ours, theirs = socket.socketpair()
    try:
        link = SocketAssociation(established_acceptor(), ours, idle=5.0)
        theirs.sendall(bytes([pdus.PduType.P_DATA_TF, 0]) + (2**32 - 1).to_bytes(4, "big"))
        theirs.shutdown(socket.SHUT_WR)
        theirs.settimeout(5)
        done = threading.Event()

        def drive() -> None:
            while not link.core.closed:
                link.receive()
            done.set()

        threading.Thread(target=drive, daemon=True).start()
        answer = bytearray()
        while chunk := theirs.recv(1 << 16):
            answer += chunk
        assert bytes(answer[:1]) == bytes([pdus.PduType.ABORT]) and len(answer) == 10, bytes(answer)
        assert done.wait(5), "the driver did not reach the association's end"
    finally:
        ours.close()
        theirs.close()
