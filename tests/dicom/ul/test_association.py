"""dicomproxy.dicom.ul.association, without sockets: what each role sends and indicates, and
ARTIM (time is a number passed in, so nothing sleeps)."""

from __future__ import annotations

import pytest

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.association import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    Association,
    DataReceived,
    ReleaseConfirmed,
    ReleaseRequested,
    Role,
)
from dicomproxy.dicom.ul.fsm import State
from dicomproxy.dicom.ul.pdu import InvalidPdu, ProposedContext
from tests.dicom.ul.test_pdu import _rq_with_user_items

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
RQ = pdus.associate_rq("GW", "MOD", [ProposedContext(1, CT, (EXPLICIT,))], 16384)
AC = pdus.associate_ac(RQ, [(1, 0, EXPLICIT)], 1 << 20)


def _types(out: list[bytes]) -> list[int]:
    return [raw[0] for raw in out]


def acceptor(now: float = 100.0) -> Association:
    assoc = Association(Role.ACCEPTOR, artim=30.0, max_pdu=1 << 20)
    assoc.connection_indicated(now)
    return assoc


def established_acceptor() -> Association:
    assoc = acceptor()
    assoc.receive(1, RQ.encode(), 101.0)
    assoc.accept(AC, 101.5)
    assoc.outgoing()
    return assoc


def test_acceptor_happy_path_and_artim() -> None:
    assoc = acceptor(100.0)
    assert assoc.state is State.STA2 and assoc.artim_deadline == 130.0  # AE-5 starts ARTIM
    indication = assoc.receive(1, RQ.encode(), 110.0)
    assert isinstance(indication, AssociateRequested) and indication.request.calling == "MOD"
    assert assoc.state is State.STA3 and assoc.artim_deadline is None  # AE-6 stops it
    assoc.accept(AC, 111.0)
    assert _types(assoc.outgoing()) == [0x02] and assoc.established and assoc.peer_max_pdu == 16384
    data = b"".join(pdus.p_data(1, b"\x00" * 10, command=True, max_pdu=0))
    assert isinstance(assoc.receive(4, data, 112.0), DataReceived)
    assert isinstance(assoc.receive(5, pdus.A_RELEASE_RQ().encode(), 113.0), ReleaseRequested)
    assoc.release_response(113.5)
    assert _types(assoc.outgoing()) == [0x06]
    assert assoc.state is State.STA13 and assoc.artim_deadline == 143.5  # AR-4: ARTIM until the peer closes
    assert assoc.connection_closed(114.0) is None and assoc.closed and assoc.artim_deadline is None


def test_artim_expiry_before_the_request_closes_without_a_pdu() -> None:
    assoc = acceptor(100.0)
    indication = assoc.artim_expired(130.0)
    assert isinstance(indication, Aborted) and indication.detail == "ARTIM expired"
    assert assoc.closed and assoc.outgoing() == []


def test_an_invalid_request_is_aborted_with_the_reason_and_artim_runs() -> None:
    assoc = acceptor(100.0)
    indication = assoc.receive(1, _rq_with_user_items(b"\x51\x00\x00\x03\x00\x00\x40"), 101.0)
    assert isinstance(indication, Aborted) and not indication.by_peer and "malformed" in indication.detail
    (abort,) = assoc.outgoing()
    assert abort[0] == 0x07 and abort[8] == 2 and abort[9] == 6  # service provider, invalid parameter value
    assert assoc.state is State.STA13 and assoc.artim_deadline == 131.0
    assert assoc.receive(4, b"", 102.0) is None and assoc.state is State.STA13  # AA-6: ignored
    assert assoc.artim_expired(131.0) is None and assoc.closed  # AA-2


def test_an_unsupported_protocol_version_is_rejected_by_the_provider() -> None:
    raw = bytearray(RQ.encode())
    raw[6:8] = b"\x00\x02"  # protocol version 2 only
    assoc = acceptor()
    indication = assoc.receive(1, bytes(raw), 101.0)
    assert indication == AssociateRejected(1, 2, 2)
    assert _types(assoc.outgoing()) == [0x03] and assoc.state is State.STA13


def test_the_users_reject() -> None:
    assoc = acceptor()
    assoc.receive(1, RQ.encode(), 101.0)
    assoc.reject(2, 3, 2, 102.0)
    assert assoc.outgoing() == [pdus.associate_rj(2, 3, 2).encode()]
    assert assoc.state is State.STA13 and assoc.artim_deadline == 132.0  # AE-8


@pytest.mark.parametrize("pdu_type", [2, 3, 4, 5, 6])
def test_anything_but_a_request_first_is_aborted(pdu_type: int) -> None:
    raw = {2: AC.encode(), 3: pdus.associate_rj(1, 1, 1).encode(), 4: b"".join(pdus.p_data(1, b"x", command=True,
           max_pdu=0)), 5: pdus.A_RELEASE_RQ().encode(), 6: pdus.A_RELEASE_RP().encode()}[pdu_type]
    assoc = acceptor()
    indication = assoc.receive(pdu_type, raw, 101.0)
    assert isinstance(indication, Aborted) and "unexpected" in indication.detail  # AA-1
    assert _types(assoc.outgoing()) == [0x07] and assoc.state is State.STA13


def test_peer_abort_and_local_abort() -> None:
    assoc = established_acceptor()
    indication = assoc.receive(7, pdus.abort(pdus.AbortSource.SERVICE_USER).encode(), 102.0)
    assert isinstance(indication, Aborted) and indication.by_peer and assoc.closed  # AA-3
    assoc = established_acceptor()
    assoc.abort(102.0)
    (raw,) = assoc.outgoing()
    assert raw == pdus.abort(pdus.AbortSource.SERVICE_USER).encode() and assoc.state is State.STA13
    assoc.abort(103.0)  # nothing left to abort: a no-op
    assert assoc.outgoing() == []


def test_a_second_request_on_an_association_is_a_provider_abort() -> None:
    assoc = established_acceptor()
    indication = assoc.receive(1, RQ.encode(), 102.0)
    assert isinstance(indication, Aborted) and not indication.by_peer  # AA-8
    assert _types(assoc.outgoing()) == [0x07] and assoc.state is State.STA13


def test_the_connection_dropping_is_an_a_p_abort() -> None:
    assoc = established_acceptor()
    indication = assoc.connection_closed(102.0)
    assert isinstance(indication, Aborted) and indication.detail == "connection closed" and assoc.closed


def test_header_limits() -> None:
    assoc = established_acceptor()
    with pytest.raises(InvalidPdu, match="exceeds the negotiated maximum"):
        assoc.check_header(4, (1 << 20) + 1)
    assoc.check_header(4, 1 << 20)
    with pytest.raises(InvalidPdu, match="unknown PDU type"):
        assoc.check_header(0x0A, 4)
    with pytest.raises(InvalidPdu, match="4 expected"):
        assoc.check_header(5, 100)
    with pytest.raises(InvalidPdu, match="at most"):
        assoc.check_header(1, 1 << 20)


def _requestor() -> Association:
    assoc = Association(Role.REQUESTOR, artim=30.0, max_pdu=0)
    assoc.request_association(RQ, 0.0)
    assert assoc.state is State.STA4
    assoc.connection_confirmed(0.1)
    assert assoc.outgoing() == [RQ.encode()] and assoc.state is State.STA5
    return assoc


def test_requestor_accept_release() -> None:
    assoc = _requestor()
    indication = assoc.receive(2, AC.encode(), 0.2)
    assert isinstance(indication, AssociateAccepted) and assoc.peer_max_pdu == 1 << 20 and assoc.max_pdu == 16384
    assoc.release(1.0)
    assert assoc.outgoing() == [pdus.A_RELEASE_RQ().encode()] and assoc.state is State.STA7
    data = b"".join(pdus.p_data(1, b"late", command=True, max_pdu=0))
    assert isinstance(assoc.receive(4, data, 1.1), DataReceived)  # AR-6: data may still arrive
    assert isinstance(assoc.receive(6, pdus.A_RELEASE_RP().encode(), 1.2), ReleaseConfirmed) and assoc.closed


def test_requestor_rejected() -> None:
    assoc = _requestor()
    assert assoc.receive(3, pdus.associate_rj(1, 1, 3).encode(), 0.2) == AssociateRejected(1, 1, 3)
    assert assoc.closed  # AE-4


def test_release_collision_requestor_side() -> None:
    assoc = _requestor()
    assoc.receive(2, AC.encode(), 0.2)
    assoc.release(1.0)
    assoc.outgoing()
    indication = assoc.receive(5, pdus.A_RELEASE_RQ().encode(), 1.1)
    assert indication == ReleaseRequested(collision=True) and assoc.state is State.STA9  # AR-8
    assoc.release_response(1.2)
    assert assoc.outgoing() == [pdus.A_RELEASE_RP().encode()] and assoc.state is State.STA11  # AR-9
    assert isinstance(assoc.receive(6, pdus.A_RELEASE_RP().encode(), 1.3), ReleaseConfirmed) and assoc.closed


def test_release_collision_acceptor_side() -> None:
    assoc = established_acceptor()
    assoc.release(102.0)  # the acceptor may release too (Evt11 is valid in Sta6 whatever the role)
    assoc.outgoing()
    assert assoc.receive(5, pdus.A_RELEASE_RQ().encode(), 102.1) == ReleaseRequested(collision=True)
    assert assoc.state is State.STA10
    assert isinstance(assoc.receive(6, pdus.A_RELEASE_RP().encode(), 102.2), ReleaseConfirmed)
    assert assoc.state is State.STA12  # AR-10
    assoc.release_response(102.3)
    assert assoc.outgoing() == [pdus.A_RELEASE_RP().encode()] and assoc.state is State.STA13  # AR-4
