"""Unit fuzzer of the PDU decoders (:mod:`dicomproxy.dicom.ul.pdu`) against pynetdicom's (no network).

Properties:

* for any bytes behind any PDU header, :func:`pdus.decode` returns a PDU or raises
  :class:`InvalidPdu` (the association turns that into an A-ABORT), never anything else;
* an A-ASSOCIATE-RQ it accepts can be read (:meth:`Request.of`) and answered
  (:func:`pdus.associate_ac`, encoded) without an exception, whatever its items said;
* :func:`pdus.decode_pdata` agrees with pynetdicom's ``P_DATA_TF`` on every well-formed P-DATA-TF
  and refuses (``InvalidPdu``) every one whose item lengths do not fill the PDU exactly.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pynetdicom.pdu import P_DATA_TF

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.pdu import InvalidPdu, PduType
from tests.fuzz.pdu_strategies import VALID_RQ, associate_rqs, pdata_pdus, pdu
from tests.fuzz.profiles import fuzz_settings

# pydicom warns about each malformed UID it reads; malformed is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


@fuzz_settings(300)
@given(st.one_of(associate_rqs(), st.tuples(st.sampled_from(list(PduType)) | st.integers(0, 255),
                                            st.binary(max_size=300)).map(lambda t: pdu(*t))))
@example(VALID_RQ)
@example(pdu(PduType.ASSOCIATE_RQ, b""))
@example(pdu(PduType.ABORT, b"\x00"))
def test_decode_returns_a_pdu_or_invalid(raw: bytes) -> None:
    pdu_type = raw[0]
    if pdu_type == PduType.P_DATA_TF:
        return  # test_pdata_agrees_with_pynetdicom
    try:
        decoded = pdus.decode(pdu_type, raw)
    except InvalidPdu:
        return
    if isinstance(decoded, pdus.A_ASSOCIATE_RQ):
        request = pdus.Request.of(decoded)
        results = [(cx.context_id, 0, (cx.transfer_syntaxes or ("1.2.840.10008.1.2",))[0]) for cx in request.contexts]
        answer = pdus.associate_ac(decoded, results, 16384).encode()
        again = pdus.A_ASSOCIATE_AC()
        again.decode(answer)
    else:
        decoded.encode()


def _pynetdicom_pdvs(raw: bytes) -> list[tuple[int, int, bytes]] | None:
    theirs = P_DATA_TF()
    try:
        theirs.decode(raw)
    except Exception:
        return None
    return [(pdv.context_id, pdv.presentation_data_value[0], pdv.presentation_data_value[1:])
            for pdv in theirs.presentation_data_value_items]


def _fills_exactly(raw: bytes) -> bool:
    pos = 6
    while pos < len(raw):
        if pos + 6 > len(raw):
            return False
        length = struct.unpack_from(">I", raw, pos)[0]
        if length < 2 or pos + 4 + length > len(raw):
            return False
        pos += 4 + length
    return pos == len(raw) and len(raw) > 6


@fuzz_settings(300)
@given(pdata_pdus())
@example(pdu(PduType.P_DATA_TF, b""))
@example(pdu(PduType.P_DATA_TF, b"\x00\x00\x00\x01\x01"))
def test_pdata_agrees_with_pynetdicom(raw: bytes) -> None:
    try:
        ours = [(cid, control, bytes(fragment)) for cid, control, fragment in pdus.decode_pdata(memoryview(raw))]
    except InvalidPdu:
        assert not _fills_exactly(raw), f"refused a well-formed P-DATA-TF: {raw[:64]!r}"
        return
    assert _fills_exactly(raw), f"accepted a P-DATA-TF whose items do not fill it: {raw[:64]!r}"
    theirs = _pynetdicom_pdvs(raw)
    assert theirs is not None and ours == theirs
