"""The gateway process's phases and its one shutdown deadline.

``Lifecycle.move`` is the only place the phase changes, and only along ``MOVES``: starting ->
serving -> draining -> stopping (a start can fail, a SIGTERM can come while starting). What a
load balancer sees follows the phase (``/dicomproxy/health/ready`` is 200 only while serving).

The deadline: the first SIGTERM starts ``Server:ShutdownTimeoutSeconds`` for the whole process.
It is spent in order: ``Server:DrainDelaySeconds`` still serving (ready already 503), then
in-flight HTTP requests and TUS PATCHes (uvicorn's graceful period), then the components stop
in reverse order, each bounded by what is left. Components keep at least ``STOP_SHARE`` of the
deadline, so a slow client cannot eat the time the spool and the task queue need to close.
"""

from __future__ import annotations

import enum
import logging
import time

log = logging.getLogger("dicomproxy.lifecycle")

STOP_SHARE = 0.25  # of Server:ShutdownTimeoutSeconds, kept for the components' stop()
MIN_STEP_SECONDS = 1.0  # even past the deadline, each component's stop() gets this much


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"


MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.SERVING, Phase.DRAINING, Phase.STOPPING}),
    Phase.SERVING: frozenset({Phase.DRAINING, Phase.STOPPING}),
    Phase.DRAINING: frozenset({Phase.STOPPING}),
    Phase.STOPPING: frozenset(),
}


class Lifecycle:
    """The phase and, once shutdown began, the deadline (``time.monotonic()`` seconds)."""

    def __init__(self, shutdown_timeout: float, drain_delay: float = 0.0) -> None:
        self.shutdown_timeout = shutdown_timeout
        self.drain_delay = drain_delay
        self.phase = Phase.STARTING
        self.deadline: float | None = None

    def move(self, to: Phase) -> bool:
        """Go to ``to``; False (and nothing changes) when that is not a move from here."""
        if to not in MOVES[self.phase]:
            return False
        log.debug("phase %s -> %s", self.phase.value, to.value)
        self.phase = to
        if to in (Phase.DRAINING, Phase.STOPPING) and self.deadline is None:
            self.deadline = time.monotonic() + self.shutdown_timeout
        return True

    def remaining(self) -> float:
        """Seconds left before the deadline (the whole timeout while none is running)."""
        if self.deadline is None:
            return self.shutdown_timeout
        return max(0.0, self.deadline - time.monotonic())

    def http_grace(self) -> float:
        """What in-flight HTTP requests may still take once the listeners are closed."""
        return max(0.5, self.remaining() - STOP_SHARE * self.shutdown_timeout)

    def step_budget(self) -> float:
        """What the next component's ``stop()`` may take."""
        return max(MIN_STEP_SECONDS, self.remaining())
