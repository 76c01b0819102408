"""Hypothesis strategies for DICOM upper-layer PDUs, shared by the unit fuzzer (test_pdu.py) and the
one through a gateway's DICOM port (test_dicom_port.py).

They start from what pynetdicom's PDU classes encode (:data:`VALID_RQ`, a C-ECHO and a CT
storage context) and go around the edges: items rebuilt with random lengths, dropped,
duplicated or unknown; bytes flipped, cut or inserted; P-DATA-TF items whose lengths lie and
whose message control headers carry any flag bits.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from dicomproxy.dicom.presentation import IMPLICIT, VERIFICATION
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.pdu import PduType

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VALID_RQ = pdus.associate_rq("DICOMPROXY", "FUZZER", [
    pdus.ProposedContext(1, VERIFICATION, (IMPLICIT,)),
    pdus.ProposedContext(3, CT_IMAGE_STORAGE, (EXPLICIT_LE, IMPLICIT)),
], 16384).encode()


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: its header (the true length unless ``length`` lies) and ``body``."""
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, payload: bytes, length: int | None = None) -> bytes:
    """A variable item of an A-ASSOCIATE PDU (type, reserved, 2-byte length)."""
    return struct.pack(">BBH", item_type, 0, len(payload) if length is None else length) + payload


def _uid(draw: st.DrawFn) -> bytes:
    return draw(st.sampled_from([VERIFICATION, CT_IMAGE_STORAGE, IMPLICIT, EXPLICIT_LE, "", "1.2.3" * 20]).map(
        str.encode) | st.binary(max_size=70))


def _lying(draw: st.DrawFn, payload: bytes) -> int | None:
    """None (the true length) mostly; sometimes a lie, small or large."""
    return draw(st.none() | st.none() | st.integers(0, 0xFFFF))


@st.composite
def _presentation_context(draw: st.DrawFn) -> bytes:
    subs = [item(0x30, p := _uid(draw), _lying(draw, p))]
    subs += [item(0x40, p := _uid(draw), _lying(draw, p)) for _ in range(draw(st.integers(0, 3)))]
    head = struct.pack(">BBBB", draw(st.integers(0, 255)), 0, 0, 0)
    payload = head + b"".join(draw(st.permutations(subs)))
    return item(0x20, payload, _lying(draw, payload))


@st.composite
def _user_information(draw: st.DrawFn) -> bytes:
    choices = [
        item(0x51, struct.pack(">I", draw(st.sampled_from([0, 1, 6, 16384, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)))),
        item(0x52, _uid(draw)),
        item(0x55, draw(st.binary(max_size=20))),
        item(0x53, struct.pack(">HH", draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)))),
        item(0x54, struct.pack(">H", len(u := _uid(draw))) + u
             + bytes([draw(st.integers(0, 2)), draw(st.integers(0, 2))])),
        item(0x58, bytes([draw(st.integers(0, 5)), draw(st.integers(0, 1))]) + draw(st.binary(max_size=12))),
        item(draw(st.integers(0x50, 0x5F)), draw(st.binary(max_size=16))),
    ]
    subs = draw(st.lists(st.sampled_from(choices), max_size=6))
    payload = b"".join(subs)
    return item(0x50, payload, _lying(draw, payload))


@st.composite
def _rebuilt_rq(draw: st.DrawFn) -> bytes:
    """An A-ASSOCIATE-RQ rebuilt item by item: fixed fields, then items in any order and count."""
    version = draw(st.sampled_from([1]) | st.integers(0, 0xFFFF))
    titles = st.sampled_from([b"DICOMPROXY".ljust(16), b" " * 16, b"\x00" * 16])
    called = draw(titles | st.binary(min_size=16, max_size=16))
    calling = draw(st.sampled_from([b"FUZZER".ljust(16)]) | st.binary(min_size=16, max_size=16))
    fixed = struct.pack(">HH", version, 0) + called + calling + bytes(32)
    context = item(0x10, p := draw(st.sampled_from([pdus.APPLICATION_CONTEXT.encode()]) | st.binary(max_size=70)),
                   _lying(draw, p))
    items = [context] * draw(st.integers(0, 2))
    items += draw(st.lists(_presentation_context(), max_size=3))
    items += draw(st.lists(_user_information(), max_size=2))
    items += draw(st.lists(st.builds(item, st.integers(0, 255), st.binary(max_size=10)), max_size=1))
    return pdu(PduType.ASSOCIATE_RQ, fixed + b"".join(draw(st.permutations(items))))


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, a slice cut out or bytes inserted (the header length kept)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(6, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    data[2:6] = struct.pack(">I", len(data) - 6) if draw(st.booleans()) else data[2:6]
    return bytes(data)


def associate_rqs() -> st.SearchStrategy[bytes]:
    """A-ASSOCIATE-RQ PDUs, valid and not."""
    return st.one_of(st.just(VALID_RQ), _rebuilt_rq(), _mutated(VALID_RQ))


@st.composite
def _pdv(draw: st.DrawFn) -> bytes:
    fragment = draw(st.binary(max_size=40))
    control = draw(st.sampled_from([0, 1, 2, 3]) | st.integers(0, 255))
    context_id = draw(st.sampled_from([1, 3]) | st.integers(0, 255))
    length = draw(st.none() | st.none() | st.none() | st.integers(0, 80) | st.just(0xFFFFFFFF))
    true = len(fragment) + 2
    return struct.pack(">IBB", true if length is None else length, context_id, control) + fragment


def pdata_pdus() -> st.SearchStrategy[bytes]:
    """P-DATA-TF PDUs: zero or more items, lengths mostly true, sometimes not; stray trailing bytes."""
    return st.builds(lambda pdvs, tail: pdu(PduType.P_DATA_TF, b"".join(pdvs) + tail),
                     st.lists(_pdv(), max_size=4), st.sampled_from([b""] * 4) | st.binary(max_size=5))


def other_pdus() -> st.SearchStrategy[bytes]:
    """Release, abort, reject, accept and unknown PDUs: right or wrong lengths, any bytes."""
    return st.one_of(
        st.sampled_from([pdu(PduType.RELEASE_RQ, bytes(4)), pdu(PduType.RELEASE_RP, bytes(4)),
                         pdu(PduType.ABORT, b"\x00\x00\x00\x00"), pdu(PduType.ASSOCIATE_RJ, b"\x00\x01\x01\x01")]),
        st.builds(pdu, st.sampled_from(list(PduType)) | st.integers(0, 255), st.binary(max_size=12)),
    )
