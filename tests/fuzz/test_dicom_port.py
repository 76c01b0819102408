"""Hostile PDUs to a real gateway's DICOM port (the acceptor), with a real Orthanc behind it.

Each example is one connection: a few PDUs (:mod:`tests.fuzz.pdu_strategies`: A-ASSOCIATE-RQs
valid and mutated, P-DATA before or after an association, release/abort/unknown PDUs, header
lengths that lie or are huge, the last PDU cut short), then the client half-closes. Properties:

* every byte the gateway sends back is part of a valid PDU (A-ASSOCIATE-AC/RJ, A-ABORT,
  A-RELEASE-RP, P-DATA-TF) that pynetdicom decodes, and then it closes;
* nothing reaches the PACS (Orthanc's instance count is unchanged: no valid C-STORE is sent);
* echoscu is answered after each example and storescu still stores (every few examples);
* the RSS stays bounded and the log holds no traceback.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.pdu import InvalidPdu, PduType
from tests import dicom_samples
from tests.fuzz.conftest import Watched
from tests.fuzz.pdu_strategies import VALID_RQ, associate_rqs, other_pdus, pdata_pdus, pdu
from tests.fuzz.profiles import fuzz_settings
from tests.peers import LOOPBACK, OrthancServer, run_dcmtk

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
STORE_EVERY = 8
_examples = itertools.count(1)


@st.composite
def connections(draw: st.DrawFn) -> list[bytes]:
    """The PDUs of one connection: maybe a valid association first, then anything."""
    out = [VALID_RQ] if draw(st.booleans()) else []
    out += draw(st.lists(st.one_of(associate_rqs(), pdata_pdus(), other_pdus()), min_size=1, max_size=4))
    if draw(st.integers(0, 4)) == 0:  # a header whose length is far past any limit
        huge = draw(st.sampled_from([70_000, 2**31, 2**32 - 1]))
        out.append(pdu(draw(st.sampled_from(list(PduType))), b"", length=huge))
    if draw(st.integers(0, 4)) == 0:  # the last PDU cut short
        out[-1] = out[-1][:draw(st.integers(0, max(0, len(out[-1]) - 1)))]
    return out


def _exchange(port: int, wire: bytes, timeout: float = 15) -> bytes:
    """Send, half-close, read until the gateway closes."""
    got = bytearray()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        try:
            sock.sendall(wire)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway hung up first (an abort): read what it sent
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        else:
            raise AssertionError(f"the gateway did not close within {timeout} s; it sent {bytes(got)[:200]!r}")
    return bytes(got)


def _check_answer(data: bytes) -> list[int]:
    """Every byte belongs to a valid PDU; the PDU types, in order."""
    types = []
    pos = 0
    while pos < len(data):
        assert pos + 6 <= len(data), f"a PDU header cut short in what the gateway sent: {data[pos:pos + 20]!r}"
        pdu_type, length = pdus.parse_header(data[pos:pos + 6])
        raw = data[pos:pos + 6 + length]
        assert len(raw) == 6 + length, f"a PDU cut short in what the gateway sent: {raw[:40]!r}"
        try:
            if pdu_type == PduType.P_DATA_TF:
                pdus.decode_pdata(memoryview(raw))
            else:
                assert pdu_type in (PduType.ASSOCIATE_AC, PduType.ASSOCIATE_RJ, PduType.ABORT, PduType.RELEASE_RP), \
                    f"the gateway (an acceptor) sent PDU type {pdu_type:#x}"
                pdus.decode(pdu_type, raw)
        except InvalidPdu as e:
            raise AssertionError(f"the gateway sent an invalid PDU ({e}): {raw[:60]!r}") from None
        types.append(pdu_type)
        pos += 6 + length
    return types


def _still_serves(watched: Watched, orthanc: OrthancServer, workdir: Path, stores: int) -> int:
    """echoscu is answered; every STORE_EVERY examples storescu stores one more instance."""
    gateway = watched.gateway
    run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), timeout=30)
    if next(_examples) % STORE_EVERY == 0:
        path, _ = dicom_samples.make_instance(workdir / f"fuzz-{stores}.dcm", patient_id="FUZZ",
                                              patient_name="Fuzz^Pdu")
        run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(path), timeout=30)
        stores += 1
        orthanc.wait_for_instances(stores)
    return stores


class _State:
    stores = 0


@fuzz_settings(40)
@given(connections())
@example([VALID_RQ, pdu(PduType.P_DATA_TF, b"\x00\x00\x00\x02\x01\x03")])  # a P-DATA item with an empty fragment
@example([pdu(PduType.P_DATA_TF, struct.pack(">IBB", 6, 1, 3) + b"\x00\x00\x00\x00")])  # P-DATA before association
@example([VALID_RQ, pdu(0x42, b"\x00" * 4)])  # an unknown PDU type
@example([VALID_RQ, pdu(PduType.P_DATA_TF, b"", length=2**32 - 1)])  # past the negotiated maximum
# Found by this fuzzer: a non-ASCII AE title made pynetdicom log a traceback (three, with the fallbacks).
@example([VALID_RQ[:10] + b"\xed" * 16 + VALID_RQ[26:]])
def test_hostile_pdus_get_valid_pdus_back_and_nothing_reaches_the_pacs(
    dicom_gateway: Watched, orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory, wire: list[bytes],
) -> None:
    before = orthanc.instance_count()
    _check_answer(_exchange(dicom_gateway.gateway.dicom_port, b"".join(wire)))
    assert orthanc.instance_count() == before, "an instance reached the PACS from a connection that stored none"
    _State.stores = _still_serves(dicom_gateway, orthanc, tmp_path_factory.getbasetemp(), _State.stores)
    dicom_gateway.check_rss()
    dicom_gateway.check_log()
