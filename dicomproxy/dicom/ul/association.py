"""One association's upper-layer protocol, without I/O (PS3.8 section 9): both roles, the state
machine of :mod:`.fsm`, the ARTIM timer, PDU limits.

The object is fed what happened on the transport (a PDU arrived, the connection opened or
closed, ARTIM expired) and what the local user asks for (request, accept, reject, send data,
release, abort); it answers with an :class:`Indication` for the user and queues the bytes to
send (:meth:`Association.outgoing`). Time is a number the caller passes in (a monotonic clock),
so ARTIM is testable without sleeping. The drivers of :mod:`.transport` do the I/O: a blocking
socket on its own thread (the storage acceptor's fast path) or asyncio streams (the requestor,
and any acceptor that wants the event loop, such as a future relay mode). In Sta1 the transport
must be closed; :attr:`Association.closed` says so.

ARTIM (PS3.8 9.1.5): started when a connection is accepted (AE-5), it is *one* deadline for the
whole A-ASSOCIATE-RQ PDU, however slowly its bytes arrive; it runs again in Sta13 (after a
reject, a release response or an abort) until the peer closes. Its expiry closes the connection
(AA-2).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from pynetdicom.pdu import PDU

from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.fsm import Action, Event, State, StateMachine
from dicomproxy.dicom.ul.pdu import AbortReason, AbortSource, InvalidPdu, PduType


class Role(enum.Enum):
    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


# --------------------------------------------------------------------------- indications
@dataclass(frozen=True, slots=True)
class Indication:
    """Something the local user is told (PS3.8 primitives)."""


@dataclass(frozen=True, slots=True)
class AssociateRequested(Indication):
    pdu: pdus.A_ASSOCIATE_RQ
    request: pdus.Request


@dataclass(frozen=True, slots=True)
class AssociateAccepted(Indication):
    pdu: pdus.A_ASSOCIATE_AC


@dataclass(frozen=True, slots=True)
class AssociateRejected(Indication):
    result: int
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class DataReceived(Indication):
    pdvs: list[pdus.Pdv]


@dataclass(frozen=True, slots=True)
class ReleaseRequested(Indication):
    collision: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseConfirmed(Indication):
    pass


@dataclass(frozen=True, slots=True)
class Aborted(Indication):
    """A-ABORT from the peer (``by_peer``) or an A-P-ABORT (the provider gave up: invalid or
    unexpected PDU, connection closed, ARTIM)."""

    by_peer: bool
    source: int
    reason: int
    detail: str = ""


CONNECTION_CLOSED = "connection closed"
ARTIM_EXPIRED = "ARTIM expired"
"""``Aborted.detail`` when the peer closed the connection / when ARTIM expired before the request."""

_EVENT_OF_PDU: dict[int, Event] = {
    PduType.ASSOCIATE_RQ: Event.ASSOCIATE_RQ_PDU,
    PduType.ASSOCIATE_AC: Event.ASSOCIATE_AC_PDU,
    PduType.ASSOCIATE_RJ: Event.ASSOCIATE_RJ_PDU,
    PduType.P_DATA_TF: Event.PDATA_PDU,
    PduType.RELEASE_RQ: Event.RELEASE_RQ_PDU,
    PduType.RELEASE_RP: Event.RELEASE_RP_PDU,
    PduType.ABORT: Event.ABORT_PDU,
}
_BRANCHING = frozenset({Event.ASSOCIATE_RQ_PDU, Event.RELEASE_RQ_PDU})
_ARTIM_STARTS = frozenset({Action.AE_5, Action.AE_8, Action.AR_4, Action.AA_1, Action.AA_7, Action.AA_8})
_ARTIM_STOPS = frozenset({Action.AE_6, Action.AA_2, Action.AA_5, Action.AR_5})


class Association:
    """The protocol state of one association (see the module docstring)."""

    def __init__(self, role: Role, *, artim: float, max_pdu: int) -> None:
        self.role = role
        self.fsm = StateMachine()
        self.artim = artim
        self.artim_deadline: float | None = None
        self.max_pdu = max_pdu  # what we receive (announced in our RQ/AC)
        self.peer_max_pdu = 0  # what the peer receives; 0: no limit
        self.request: pdus.Request | None = None
        self._out: list[bytes | memoryview] = []
        self._pending_rq: pdus.A_ASSOCIATE_RQ | None = None
        self._previous = State.STA1

    # -- state ----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.fsm.state

    @property
    def established(self) -> bool:
        return self.fsm.state is State.STA6

    @property
    def closed(self) -> bool:
        """Sta1: the transport must be (or already is) closed."""
        return self.fsm.state is State.STA1

    def outgoing(self) -> list[bytes | memoryview]:
        """The PDUs to write, in order (the list is handed over and emptied)."""
        out, self._out = self._out, []
        return out

    # -- transport events -----------------------------------------------------------------
    def connection_indicated(self, now: float) -> None:
        """Acceptor: a transport connection was accepted (Evt5; AE-5 starts ARTIM)."""
        self._fire(Event.CONNECT_INDICATION, now)

    def connection_confirmed(self, now: float) -> None:
        """Requestor: the transport connection is open (Evt2; AE-2 sends the A-ASSOCIATE-RQ)."""
        self._fire(Event.CONNECT_CONFIRM, now)

    def connection_closed(self, now: float) -> Indication | None:
        """The peer closed the transport connection (Evt17)."""
        if self.closed:
            return None
        return self._fire(Event.CONNECTION_CLOSED, now)

    def artim_expired(self, now: float) -> Indication | None:
        """The caller saw ``now >= artim_deadline`` (Evt18)."""
        return self._fire(Event.ARTIM_EXPIRED, now)

    def check_header(self, pdu_type: int, length: int) -> None:
        """Raise :class:`InvalidPdu` for a PDU that must not be read at all (unknown type, or
        longer than we announced / than any such PDU can be)."""
        if pdu_type not in _EVENT_OF_PDU:
            raise InvalidPdu(f"unknown PDU type 0x{pdu_type:02x}", AbortReason.UNRECOGNIZED_PDU)
        if pdu_type == PduType.P_DATA_TF:
            if self.max_pdu and length > self.max_pdu:
                raise InvalidPdu(f"P-DATA PDU of {length} bytes exceeds the negotiated maximum {self.max_pdu}")
        elif pdu_type in (PduType.ASSOCIATE_RQ, PduType.ASSOCIATE_AC):
            if length > pdus.MAX_ASSOCIATE_PDU:
                raise InvalidPdu(f"A-ASSOCIATE PDU of {length} bytes (at most {pdus.MAX_ASSOCIATE_PDU} are read)")
        elif length != 4:
            raise InvalidPdu(f"{PduType(pdu_type).name} PDU of {length} bytes (4 expected)")

    def receive(self, pdu_type: int, raw: bytes | bytearray | memoryview, now: float) -> Indication | None:
        """A whole PDU (header included) arrived."""
        event = _EVENT_OF_PDU.get(pdu_type, Event.INVALID_PDU)
        if self.fsm.state is State.STA13:
            return self._fire(event, now)  # AA-6, AA-2, AA-7: nothing to decode
        pdu: PDU | list[pdus.Pdv]
        try:
            if pdu_type == PduType.P_DATA_TF:
                pdu = pdus.decode_pdata(memoryview(raw))
                if self.fsm.state is State.STA6:  # the hot path (DT-2): nothing else to do
                    self.fsm.fire(event)
                    return DataReceived(pdu)
            else:
                pdu = pdus.decode(pdu_type, raw)
        except InvalidPdu as e:
            return self.invalid(e, now)
        return self._fire(event, now, pdu)

    def invalid(self, error: InvalidPdu, now: float) -> Indication | None:
        """Evt19: an unrecognised or invalid PDU (A-ABORT with the error's reason)."""
        return self._fire(Event.INVALID_PDU, now, detail=str(error), reason=error.reason)

    # -- local user primitives -------------------------------------------------------------
    def request_association(self, rq: pdus.A_ASSOCIATE_RQ, now: float) -> None:
        """Requestor: Evt1 (AE-1: the caller opens the connection, then calls connection_confirmed)."""
        self._pending_rq = rq
        self.max_pdu = pdus.peer_max_pdu(rq)
        self._fire(Event.ASSOCIATE_REQUEST, now)

    def accept(self, ac: pdus.A_ASSOCIATE_AC, now: float) -> None:
        """Acceptor, Sta3: send the A-ASSOCIATE-AC (Evt7, AE-7)."""
        self.max_pdu = pdus.peer_max_pdu(ac)
        self._fire(Event.ASSOCIATE_ACCEPT, now, ac)

    def reject(self, result: int, source: int, reason: int, now: float) -> None:
        """Acceptor, Sta3: send an A-ASSOCIATE-RJ (Evt8, AE-8: ARTIM until the peer closes)."""
        self._fire(Event.ASSOCIATE_REJECT, now, pdus.associate_rj(result, source, reason))

    def send_data(self, encoded: Iterable[bytes | memoryview], now: float) -> None:
        """P-DATA-TF PDUs built by :func:`.pdu.p_data` (Evt9; one event for the batch)."""
        if self.fsm.state is State.STA6:
            self.fsm.fire(Event.PDATA_REQUEST)  # DT-1, the hot path: nothing else to do
        else:
            self._fire(Event.PDATA_REQUEST, now)
        self._out.extend(encoded)

    def release(self, now: float) -> None:
        """Requestor: A-RELEASE-RQ (Evt11, AR-1)."""
        self._fire(Event.RELEASE_REQUEST, now)

    def release_response(self, now: float) -> None:
        """Answer the peer's A-RELEASE-RQ (Evt14: AR-4, or AR-9 in a collision)."""
        self._fire(Event.RELEASE_RESPONSE, now)

    def abort(self, now: float) -> None:
        """A-ABORT from the local user (Evt15); a no-op when no association is left to abort."""
        if self.fsm.allows(Event.ABORT_REQUEST):
            self._fire(Event.ABORT_REQUEST, now)

    # -- the one place that moves -----------------------------------------------------------
    def _fire(
        self,
        event: Event,
        now: float,
        pdu: PDU | list[pdus.Pdv] | None = None,
        *,
        detail: str = "",
        reason: AbortReason = AbortReason.UNEXPECTED_PDU,
    ) -> Indication | None:
        self._previous = self.fsm.state
        branch = self._branch(event, pdu) if event in _BRANCHING else None
        action = self.fsm.fire(event, branch)
        if action in _ARTIM_STOPS:
            self.artim_deadline = None
        if action in _ARTIM_STARTS or (action is Action.AE_6 and branch is State.STA13):
            self.artim_deadline = now + self.artim
        return self._perform(action, event, pdu, detail, reason)

    def _branch(self, event: Event, pdu: object) -> State | None:
        state = self.fsm.state
        if event is Event.ASSOCIATE_RQ_PDU and state is State.STA2:
            acceptable = isinstance(pdu, pdus.A_ASSOCIATE_RQ) and pdu.protocol_version & 0x0001
            return State.STA3 if acceptable else State.STA13
        if event is Event.RELEASE_RQ_PDU and state is State.STA7:
            return State.STA9 if self.role is Role.REQUESTOR else State.STA10
        return None

    def _perform(
        self, action: Action, event: Event, pdu: PDU | list[pdus.Pdv] | None, detail: str, reason: AbortReason
    ) -> Indication | None:
        if action is Action.DT_2 or action is Action.AR_6:
            assert isinstance(pdu, list)
            return DataReceived(pdu)
        if action is Action.DT_1 or action is Action.AR_7:
            return None
        if action is Action.AE_2:
            assert self._pending_rq is not None
            self._send(self._pending_rq)
            return None
        if action is Action.AE_3:
            assert isinstance(pdu, pdus.A_ASSOCIATE_AC)
            self.peer_max_pdu = pdus.peer_max_pdu(pdu)
            return AssociateAccepted(pdu)
        if action is Action.AE_4:
            assert isinstance(pdu, pdus.A_ASSOCIATE_RJ)
            return AssociateRejected(int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0))
        if action is Action.AE_6:
            return self._associate_indication(pdu)
        if action in (Action.AE_7, Action.AE_8):
            assert isinstance(pdu, PDU)
            self._send(pdu)
            return None
        return self._perform_release_or_abort(action, event, pdu, detail, reason)

    def _associate_indication(self, pdu: object) -> Indication | None:
        assert isinstance(pdu, pdus.A_ASSOCIATE_RQ)
        request = pdus.Request.of(pdu)
        self.request = request
        self.peer_max_pdu = request.max_pdu
        if self.fsm.state is State.STA13:  # not acceptable by the DUL: protocol version
            self._send(pdus.associate_rj(1, 2, 2))
            return AssociateRejected(1, 2, 2)
        return AssociateRequested(pdu, request)

    def _perform_release_or_abort(
        self, action: Action, event: Event, pdu: object, detail: str, reason: AbortReason
    ) -> Indication | None:
        if action is Action.AR_1:
            self._send(pdus.A_RELEASE_RQ())
        elif action in (Action.AR_2, Action.AR_8):
            return ReleaseRequested(collision=action is Action.AR_8)
        elif action in (Action.AR_3, Action.AR_10):
            return ReleaseConfirmed()
        elif action in (Action.AR_4, Action.AR_9):
            self._send(pdus.A_RELEASE_RP())
        elif action is Action.AA_1:
            user = event is Event.ABORT_REQUEST
            self._send_abort(AbortSource.SERVICE_USER if user else AbortSource.SERVICE_PROVIDER, reason)
            if not user:
                return Aborted(False, AbortSource.SERVICE_PROVIDER, reason, detail or _unexpected(event))
        elif action is Action.AA_3:
            assert isinstance(pdu, pdus.A_ABORT_RQ)
            return Aborted(True, int(pdu.source or 0), int(pdu.reason_diagnostic or 0))
        elif action is Action.AA_4:
            return Aborted(False, AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, CONNECTION_CLOSED)
        elif action is Action.AA_7:
            self._send_abort(AbortSource.SERVICE_PROVIDER, reason)
        elif action is Action.AA_8:
            self._send_abort(AbortSource.SERVICE_PROVIDER, reason)
            return Aborted(False, AbortSource.SERVICE_PROVIDER, reason, detail or _unexpected(event))
        elif action is Action.AA_2 and event is Event.ARTIM_EXPIRED and self._previous is State.STA2:
            return Aborted(False, AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED, ARTIM_EXPIRED)
        return None  # AE-1, AE-5, DT-1, AR-5, AR-7, AA-2, AA-5, AA-6: nothing to tell or send

    def _send(self, pdu: PDU) -> None:
        self._out.append(pdu.encode())

    def _send_abort(self, source: AbortSource, reason: AbortReason) -> None:
        self._send(pdus.abort(source, reason))


def _unexpected(event: Event) -> str:
    return f"unexpected {event.description}"
