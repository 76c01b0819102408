"""dicomproxy.dicom.ul.pdu: PDUs built here decode with pynetdicom and back, pynetdicom's own test
vectors decode here, the hand-written P-DATA-TF framing is byte for byte pynetdicom's ``P_DATA_TF``
both ways, malformed PDUs raise InvalidPdu."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.tests import encoded_pdu_items as vectors

from dicomproxy.dicom.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.pdu import AbortReason, AbortSource, InvalidPdu, ProposedContext

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _decode(raw: bytes) -> object:
    return pdus.decode(raw[0], raw)


def test_an_associate_rq_built_here_is_what_pynetdicom_reads() -> None:
    contexts = [ProposedContext(1, CT, (EXPLICIT, IMPLICIT)), ProposedContext(3, "1.2.840.10008.1.1", (IMPLICIT,))]
    raw = pdus.associate_rq("PACS", "GATEWAY", contexts, 16384, roles=[CT]).encode()
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    assert (theirs.called_ae_title, theirs.calling_ae_title) == ("PACS", "GATEWAY")
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in theirs.presentation_context] == [
        (1, CT, [EXPLICIT, IMPLICIT]), (3, "1.2.840.10008.1.1", [IMPLICIT])]
    info = theirs.user_information
    assert info is not None and info.maximum_length == 16384
    assert (info.implementation_class_uid, info.implementation_version_name) == (
        IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)
    assert CT in info.role_selection and info.role_selection[CT].scp_role
    request = pdus.Request.of(theirs)
    assert request.proposes_roles and request.max_pdu == 16384 and request.contexts[0].transfer_syntaxes == (
        EXPLICIT, IMPLICIT)
    assert theirs.encode() == raw


def test_pynetdicoms_test_vectors_decode_here() -> None:
    rq = _decode(vectors.a_associate_rq)
    assert isinstance(rq, A_ASSOCIATE_RQ)
    request = pdus.Request.of(rq)
    assert (request.called, request.calling, request.max_pdu) == ("ANY-SCP", "ECHOSCU", 16382)
    assert request.contexts == (ProposedContext(1, "1.2.840.10008.1.1", (IMPLICIT,)),)
    assert pdus.Request.of(_decode(vectors.a_associate_rq_role)).proposes_roles  # type: ignore[arg-type]
    ac = _decode(vectors.a_associate_ac)
    assert isinstance(ac, A_ASSOCIATE_AC)
    assert pdus.accepted_contexts(ac) == {1: (0, IMPLICIT)} and pdus.peer_max_pdu(ac) == 16384
    rj = _decode(vectors.a_associate_rj)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 1)  # type: ignore[attr-defined]
    for raw in (vectors.a_release_rq, vectors.a_release_rp, vectors.a_abort, vectors.a_p_abort):
        assert _decode(raw).encode() == raw  # type: ignore[attr-defined]


def test_an_associate_ac_answers_the_request_it_is_built_from() -> None:
    contexts = [ProposedContext(1, CT, (EXPLICIT,)), ProposedContext(3, "1.2", (EXPLICIT,))]
    rq = pdus.associate_rq("GW", "MODALITY", contexts, 0)
    ac = pdus.associate_ac(rq, [(1, 0, EXPLICIT), (3, 3, EXPLICIT)], 1 << 20)
    theirs = A_ASSOCIATE_AC()
    theirs.decode(ac.encode())
    assert pdus.accepted_contexts(theirs) == {1: (0, EXPLICIT), 3: (3, EXPLICIT)}
    assert theirs.reserved_aet.strip() == "GW" and theirs.reserved_aec.strip() == "MODALITY"
    assert pdus.peer_max_pdu(theirs) == 1 << 20


def _theirs(pdvs: list[tuple[int, bytes]]) -> bytes:
    """pynetdicom's encoding of a P-DATA-TF with these (context id, control + fragment) items."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[c, v] for c, v in pdvs]
    return P_DATA_TF(primitive).encode()


@pytest.mark.parametrize("size", [0, 1, 200, 16378, 16379, 50000])
def test_p_data_bytes_equal_pynetdicoms(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ours = b"".join(pdus.p_data(5, payload, command=False, max_pdu=16384))
    limit = 16384 - 6
    chunks = [payload[i:i + limit] for i in range(0, len(payload), limit)] or [b""]
    theirs = b"".join(_theirs([(5, bytes([0x02 if i == len(chunks) - 1 else 0x00]) + c)])
                      for i, c in enumerate(chunks))
    assert ours == theirs
    command = b"".join(pdus.p_data(1, b"abc", command=True, max_pdu=0))
    assert command == _theirs([(1, b"\x03abc")])
    assert b"".join(pdus.p_data(1, b"x", command=False, max_pdu=0, last=False)) == _theirs([(1, b"\x00x")])


@pytest.mark.parametrize(
    "items",
    [[(1, b"\x03" + b"c" * 40)], [(1, b"\x01cmd"), (1, b"\x00" + b"d" * 300), (3, b"\x02")], [(7, b"\x02")]],
)
def test_p_data_decodes_as_pynetdicom_does(items: list[tuple[int, bytes]]) -> None:
    raw = _theirs(items)
    theirs = P_DATA_TF()
    theirs.decode(raw)
    expected = [(i.presentation_context_id, i.presentation_data_value) for i in theirs.presentation_data_value_items]
    ours = pdus.decode_pdata(memoryview(raw))
    assert [(c, bytes([m]) + bytes(f)) for c, m, f in ours] == expected
    vector = pdus.decode_pdata(memoryview(vectors.p_data_tf))
    assert [(c, m, len(f)) for c, m, f in vector] == [(1, 3, 0x50 - 2)]


def test_p_data_fragments_are_views_of_the_received_buffer() -> None:
    raw = bytearray(b"".join(pdus.p_data(1, b"fragment", command=False, max_pdu=0)))
    ((_, _, fragment),) = pdus.decode_pdata(memoryview(raw))
    raw[-1:] = b"!"
    assert bytes(fragment) == b"fragmen!"


def test_pdvs_may_be_views_and_are_not_copied_when_sent() -> None:
    payload = b"p" * 100
    out = pdus.p_data(1, payload, command=False, max_pdu=0)
    assert isinstance(out[1], memoryview) and out[1].obj is payload


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack(">BBIIBB", 4, 0, 12, 9, 1, 2) + b"abcdef", "does not fit"),  # PDV longer than the PDU
        (struct.pack(">BBIIB", 4, 0, 5, 1, 1), "ends inside"),  # PDV too short for its header
        (struct.pack(">BBIIBB", 4, 0, 6, 1, 1, 2), "does not fit"),  # item length 1: no control header
        (struct.pack(">BBI", 4, 0, 0), "without a presentation data value"),  # no PDV at all
        (struct.pack(">BBIIBB", 4, 0, 14, 8, 1, 2) + b"abcdef\0\0", "ends inside"),  # trailing bytes
    ],
)
def test_malformed_p_data_raises_invalid_pdu(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidPdu, match=match):
        pdus.decode_pdata(memoryview(raw))


def test_an_unknown_pdu_type_is_invalid() -> None:
    with pytest.raises(InvalidPdu, match="unknown PDU type"):
        _decode(b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00")


def _rq_with_user_items(user_items: bytes) -> bytes:
    """pynetdicom's test A-ASSOCIATE-RQ with its user information item replaced."""
    good = vectors.a_associate_rq
    start = good.index(b"\x50\x00")  # the user information item comes last
    body = good[6:start] + b"\x50\x00" + struct.pack(">H", len(user_items)) + user_items
    return b"\x01\x00" + struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "user_items",
    [
        b"\x51\x00\x00\x03\x00\x00\x40",  # maximum length sub-item of 3 bytes
        b"\x51\x00\x00\x08\x00\x00\x40\x00",  # a sub-item longer than the item
        b"\x54\x00\x00\x02\x00\x09",  # role selection with a UID length past the item
        b"\x51\x00\x00\x04\x00\x00\x40\x00\x58\x00\x00\x01\x01",  # user identity cut short
    ],
    ids=["short-max-length", "sub-item-overrun", "role-overrun", "user-identity-cut"],
)
def test_a_malformed_user_information_item_is_invalid_not_a_traceback(user_items: bytes) -> None:
    with pytest.raises(InvalidPdu):
        _decode(_rq_with_user_items(user_items))


def test_abort_pdus() -> None:
    assert pdus.abort(AbortSource.SERVICE_PROVIDER, AbortReason.UNEXPECTED_PDU).encode() == (
        b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02")
    assert pdus.abort(AbortSource.SERVICE_USER, AbortReason.UNEXPECTED_PDU).encode() == vectors.a_abort
    assert pdus.associate_rj(2, 3, 2).encode() == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
