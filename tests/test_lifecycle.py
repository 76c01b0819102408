"""The phase machine and the shutdown budget (dicomproxy/lifecycle.py)."""

from __future__ import annotations

import time

from dicomproxy.lifecycle import MIN_STEP_SECONDS, STOP_SHARE, Lifecycle, Phase


def test_phases_move_only_forward() -> None:
    life = Lifecycle(30)
    assert life.phase is Phase.STARTING and life.deadline is None
    assert life.move(Phase.SERVING)
    assert not life.move(Phase.STARTING)
    assert not life.move(Phase.SERVING)  # not a move from serving to itself
    assert life.move(Phase.DRAINING)
    assert not life.move(Phase.DRAINING)  # a second SIGTERM does not restart the drain
    assert not life.move(Phase.SERVING)
    assert life.move(Phase.STOPPING)
    assert all(not life.move(p) for p in Phase)


def test_a_sigterm_while_starting_drains_and_a_failed_start_stops() -> None:
    assert Lifecycle(30).move(Phase.DRAINING)
    assert Lifecycle(30).move(Phase.STOPPING)


def test_the_deadline_starts_with_the_drain_and_is_shared() -> None:
    life = Lifecycle(20, drain_delay=2)
    assert life.remaining() == 20 and life.http_grace() == 20 - STOP_SHARE * 20
    before = time.monotonic()
    life.move(Phase.SERVING)
    assert life.deadline is None
    life.move(Phase.DRAINING)
    assert life.deadline is not None and before + 20 <= life.deadline <= time.monotonic() + 20
    first = life.deadline
    life.move(Phase.STOPPING)
    assert life.deadline == first  # one deadline for the whole process
    life.deadline = time.monotonic() - 1  # overrun
    assert life.remaining() == 0
    assert life.http_grace() == 0.5
    assert life.step_budget() == MIN_STEP_SECONDS
