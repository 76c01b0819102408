"""dicomproxy.dicom.ul.pdu: PDUs built here decode with pynetdicom and back, pynetdicom's own test
vectors decode here, P-DATA-TF bytes equal pynetdicom's, malformed PDUs raise InvalidPdu."""

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
    for raw in (vectors.a_release_rq, vectors.a_release_rp, vectors.a_abort, vectors.a_p_abort, vectors.p_data_tf):
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


@pytest.mark.parametrize("size", [0, 1, 200, 16378, 16379, 50000])
def test_p_data_bytes_equal_pynetdicoms(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ours = list(pdus.p_data(5, payload, command=False, max_pdu=16384))
    theirs = []
    limit = 16384 - 6
    chunks = [payload[i:i + limit] for i in range(0, len(payload), limit)] or [b""]
    for i, chunk in enumerate(chunks):
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[5, bytes([0x02 if i == len(chunks) - 1 else 0x00]) + chunk]]
        theirs.append(P_DATA_TF(primitive).encode())
    assert ours == theirs
    assert all(len(p) - 6 <= 16384 for p in ours)
    command = list(pdus.p_data(1, b"abc", command=True, max_pdu=0))
    assert [list(pdus.pdvs(_decode(p))) for p in command] == [[(1, 0x03, memoryview(b"abc"))]]  # type: ignore[arg-type]
    assert list(pdus.pdvs(_decode(list(pdus.p_data(1, b"x", command=False, max_pdu=0, last=False))[0])))[0][1] == 0


def test_p_data_fragments_are_views_of_the_received_buffer() -> None:
    raw = bytearray(list(pdus.p_data(1, b"fragment", command=False, max_pdu=0))[0])
    pdu = pdus.decode(4, memoryview(raw))
    (_, _, fragment), = pdus.pdvs(pdu)  # type: ignore[arg-type]
    raw[-1:] = b"!"
    assert bytes(fragment) == b"fragmen!"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack(">BBIIBB", 4, 0, 12, 9, 1, 2) + b"abcdef", "P_DATA_TF"),  # PDV longer than the PDU
        (struct.pack(">BBII", 4, 0, 4, 0), "P_DATA_TF|message control"),  # PDV without its header byte
        (struct.pack(">BBI", 4, 0, 0), "do not add up"),  # no PDV at all
        (struct.pack(">BBIIBB", 4, 0, 14, 8, 1, 2) + b"abcdef\0\0", "P_DATA_TF|add up"),  # trailing bytes
        (b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00", "unknown PDU type"),
    ],
)
def test_malformed_pdus_raise_invalid_pdu(raw: bytes, match: str) -> None:
    with pytest.raises(InvalidPdu, match=match):
        _decode(raw)


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
