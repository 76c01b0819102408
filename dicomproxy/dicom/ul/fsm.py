"""The DICOM upper layer state machine (PS3.8 section 9.2): states, events, actions and the
transition table as data, and one place that moves between states (:meth:`StateMachine.fire`).

The table is pynetdicom's (``pynetdicom.fsm.TRANSITION_TABLE`` and ``ACTIONS``, PS3.8 tables
9-6 to 9-10), read into enums here so the rest of the upper layer is typed; pynetdicom's action
functions are not used (they drive pynetdicom's own DUL threads). The effects of an action (send
a PDU, start ARTIM, close the connection) belong to :mod:`.association`, which performs the
action :meth:`StateMachine.fire` returns. ``tests/dicom/test_ul_fsm.py`` checks every cell of
the 19 x 13 table against the standard's table written out on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from pynetdicom import fsm as _pynetdicom_fsm


class State(enum.StrEnum):
    """PS3.8 table 9-1 (the value is the standard's name, the description its meaning).

    String enums: their hash and equality are ``str``'s (C), not ``Enum.__hash__`` (Python), which
    the state table is looked up with a few times per PDU."""

    STA1 = "Sta1"
    STA2 = "Sta2"
    STA3 = "Sta3"
    STA4 = "Sta4"
    STA5 = "Sta5"
    STA6 = "Sta6"
    STA7 = "Sta7"
    STA8 = "Sta8"
    STA9 = "Sta9"
    STA10 = "Sta10"
    STA11 = "Sta11"
    STA12 = "Sta12"
    STA13 = "Sta13"

    @property
    def description(self) -> str:
        return _pynetdicom_fsm.STATES[self.value]


class Event(enum.StrEnum):
    """PS3.8 table 9-2."""

    ASSOCIATE_REQUEST = "Evt1"  # A-ASSOCIATE request (local user)
    CONNECT_CONFIRM = "Evt2"  # transport connect confirmation
    ASSOCIATE_AC_PDU = "Evt3"
    ASSOCIATE_RJ_PDU = "Evt4"
    CONNECT_INDICATION = "Evt5"  # transport connection indication (acceptor)
    ASSOCIATE_RQ_PDU = "Evt6"
    ASSOCIATE_ACCEPT = "Evt7"  # A-ASSOCIATE response primitive (accept), local user
    ASSOCIATE_REJECT = "Evt8"  # A-ASSOCIATE response primitive (reject), local user
    PDATA_REQUEST = "Evt9"
    PDATA_PDU = "Evt10"
    RELEASE_REQUEST = "Evt11"
    RELEASE_RQ_PDU = "Evt12"
    RELEASE_RP_PDU = "Evt13"
    RELEASE_RESPONSE = "Evt14"
    ABORT_REQUEST = "Evt15"
    ABORT_PDU = "Evt16"
    CONNECTION_CLOSED = "Evt17"
    ARTIM_EXPIRED = "Evt18"
    INVALID_PDU = "Evt19"

    @property
    def description(self) -> str:
        return _pynetdicom_fsm.EVENTS[self.value]


class Action(enum.StrEnum):
    """PS3.8 tables 9-6 to 9-9."""

    AE_1 = "AE-1"
    AE_2 = "AE-2"
    AE_3 = "AE-3"
    AE_4 = "AE-4"
    AE_5 = "AE-5"
    AE_6 = "AE-6"
    AE_7 = "AE-7"
    AE_8 = "AE-8"
    DT_1 = "DT-1"
    DT_2 = "DT-2"
    AR_1 = "AR-1"
    AR_2 = "AR-2"
    AR_3 = "AR-3"
    AR_4 = "AR-4"
    AR_5 = "AR-5"
    AR_6 = "AR-6"
    AR_7 = "AR-7"
    AR_8 = "AR-8"
    AR_9 = "AR-9"
    AR_10 = "AR-10"
    AA_1 = "AA-1"
    AA_2 = "AA-2"
    AA_3 = "AA-3"
    AA_4 = "AA-4"
    AA_5 = "AA-5"
    AA_6 = "AA-6"
    AA_7 = "AA-7"
    AA_8 = "AA-8"

    @property
    def description(self) -> str:
        return _pynetdicom_fsm.ACTIONS[self.value][0]


def _next_states(spec: str | Sequence[str]) -> tuple[State, ...]:
    return tuple(State(s) for s in ((spec,) if isinstance(spec, str) else spec))


TRANSITIONS: dict[tuple[Event, State], Action] = {
    (Event(e), State(s)): Action(a) for (e, s), a in _pynetdicom_fsm.TRANSITION_TABLE.items()
}
"""(event, current state) -> action; a pair not in the table is an invalid event for that state."""

NEXT_STATES: dict[Action, tuple[State, ...]] = {
    Action(name): _next_states(spec[2]) for name, spec in _pynetdicom_fsm.ACTIONS.items()
}
"""The state each action leads to; AE-6 and AR-8 have two, chosen by the caller (see ``fire``)."""


class InvalidEvent(Exception):
    """An event the table has no entry for in the current state (a bug of the caller)."""

    def __init__(self, event: Event, state: State) -> None:
        super().__init__(f"{event.value} ({event.description}) is not valid in {state.value} ({state.description})")
        self.event = event
        self.state = state


class StateMachine:
    """The current state of one association; :meth:`fire` is the only way to change it."""

    __slots__ = ("state",)

    def __init__(self, state: State = State.STA1) -> None:
        self.state = state

    def fire(self, event: Event, branch: State | None = None) -> Action:
        """Look up ``event`` in the current state, move to the action's next state, return the
        action for the caller to perform. ``branch`` picks the next state of the two-way actions:
        AE-6 (Sta3 if the request is acceptable, Sta13 if the DUL rejects it) and AR-8 (Sta9 for
        the association requestor, Sta10 for the acceptor)."""
        action = TRANSITIONS.get((event, self.state))
        if action is None:
            raise InvalidEvent(event, self.state)
        nexts = NEXT_STATES[action]
        if len(nexts) == 1:
            self.state = nexts[0]
        elif branch in nexts:
            self.state = branch
        else:
            raise ValueError(f"{action.value} leads to one of {[s.value for s in nexts]}; branch {branch} given")
        return action

    def allows(self, event: Event) -> bool:
        return (event, self.state) in TRANSITIONS
