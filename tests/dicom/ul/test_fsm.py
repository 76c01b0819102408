"""dicomproxy.dicom.ul.fsm against PS3.8 table 9-10, written out here on its own (not read from
pynetdicom, which the module takes its table from): every one of the 19 x 13 cells, and the
state each action leads to (tables 9-6 to 9-9)."""

from __future__ import annotations

import pytest

from dicomproxy.dicom.ul.fsm import NEXT_STATES, TRANSITIONS, Action, Event, InvalidEvent, State, StateMachine

# PS3.8 table 9-10; columns Sta1..Sta13, "." where the event is not valid in that state.
STANDARD = """
Evt1   AE-1 .    .    .    .    .    .    .    .    .     .    .    .
Evt2   .    .    .    AE-2 .    .    .    .    .    .     .    .    .
Evt3   .    AA-1 AA-8 .    AE-3 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt4   .    AA-1 AA-8 .    AE-4 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt5   AE-5 .    .    .    .    .    .    .    .    .     .    .    .
Evt6   .    AE-6 AA-8 .    AA-8 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-7
Evt7   .    .    AE-7 .    .    .    .    .    .    .     .    .    .
Evt8   .    .    AE-8 .    .    .    .    .    .    .     .    .    .
Evt9   .    .    .    .    .    DT-1 .    AR-7 .    .     .    .    .
Evt10  .    AA-1 AA-8 .    AA-8 DT-2 AR-6 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt11  .    .    .    .    .    AR-1 .    .    .    .     .    .    .
Evt12  .    AA-1 AA-8 .    AA-8 AR-2 AR-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt13  .    AA-1 AA-8 .    AA-8 AA-8 AR-3 AA-8 AA-8 AR-10 AR-3 AA-8 AA-6
Evt14  .    .    .    .    .    .    .    AR-4 AR-9 .     .    AR-4 .
Evt15  .    .    AA-1 AA-2 AA-1 AA-1 AA-1 AA-1 AA-1 AA-1  AA-1 AA-1 .
Evt16  .    AA-2 AA-3 .    AA-3 AA-3 AA-3 AA-3 AA-3 AA-3  AA-3 AA-3 AA-2
Evt17  .    AA-5 AA-4 AA-4 AA-4 AA-4 AA-4 AA-4 AA-4 AA-4  AA-4 AA-4 AR-5
Evt18  .    AA-2 .    .    .    .    .    .    .    .     .    .    AA-2
Evt19  .    AA-1 AA-8 .    AA-8 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-7
"""

# PS3.8 tables 9-6 to 9-9: the next state of each action.
NEXT = {
    "AE-1": ("Sta4",), "AE-2": ("Sta5",), "AE-3": ("Sta6",), "AE-4": ("Sta1",), "AE-5": ("Sta2",),
    "AE-6": ("Sta3", "Sta13"), "AE-7": ("Sta6",), "AE-8": ("Sta13",),
    "DT-1": ("Sta6",), "DT-2": ("Sta6",),
    "AR-1": ("Sta7",), "AR-2": ("Sta8",), "AR-3": ("Sta1",), "AR-4": ("Sta13",), "AR-5": ("Sta1",),
    "AR-6": ("Sta7",), "AR-7": ("Sta8",), "AR-8": ("Sta9", "Sta10"), "AR-9": ("Sta11",), "AR-10": ("Sta12",),
    "AA-1": ("Sta13",), "AA-2": ("Sta1",), "AA-3": ("Sta1",), "AA-4": ("Sta1",), "AA-5": ("Sta1",),
    "AA-6": ("Sta13",), "AA-7": ("Sta13",), "AA-8": ("Sta13",),
}


def _cells() -> list[tuple[str, str, str | None]]:
    out = []
    for line in STANDARD.strip().splitlines():
        event, *actions = line.split()
        assert len(actions) == 13, line
        for i, action in enumerate(actions, start=1):
            out.append((event, f"Sta{i}", None if action == "." else action))
    return out


CELLS = _cells()


def test_the_table_has_every_cell_of_the_standard_and_no_other() -> None:
    assert len(CELLS) == 19 * 13
    expected = {(Event(e), State(s)): Action(a) for e, s, a in CELLS if a is not None}
    assert expected == TRANSITIONS


@pytest.mark.parametrize(("event", "state", "action"), CELLS, ids=[f"{e}-{s}" for e, s, _ in CELLS])
def test_each_cell(event: str, state: str, action: str | None) -> None:
    if action is None:
        machine = StateMachine(State(state))
        assert not machine.allows(Event(event))
        with pytest.raises(InvalidEvent, match=f"{event} .* is not valid in {state}"):
            machine.fire(Event(event))
        assert machine.state is State(state)  # an invalid event moves nothing
        return
    for nxt in NEXT[action]:
        machine = StateMachine(State(state))
        branch = State(nxt) if len(NEXT[action]) > 1 else None
        assert machine.fire(Event(event), branch) is Action(action)
        assert machine.state is State(nxt)


def test_next_states_match_the_standard() -> None:
    assert {a.value: tuple(s.value for s in states) for a, states in NEXT_STATES.items()} == NEXT


def test_a_two_way_action_needs_its_branch() -> None:
    machine = StateMachine(State.STA2)
    with pytest.raises(ValueError, match="AE-6"):
        machine.fire(Event.ASSOCIATE_RQ_PDU)
    with pytest.raises(ValueError, match="AR-8"):
        StateMachine(State.STA7).fire(Event.RELEASE_RQ_PDU, State.STA13)


def test_names_carry_the_standard_descriptions() -> None:
    assert State.STA13.description.startswith("Awaiting Transport Connection Close")
    assert Event.ARTIM_EXPIRED.description.startswith("ARTIM timer expired")
    assert "A-ABORT" in Action.AA_1.description
