"""One timer for the timeouts of every running exchange of a pool (:class:`Watchdog`).

Each exchange used to arm a ``loop.call_later`` of its own when it started and cancel it when
it ended: ~1.5-2 us of the ~44 us a proxied 2 KB request cost in-process (measured with the
``bench/proxy_instructions.py`` driver under ``time.process_time``, best of 5 x 3,000 requests,
the watchdog off against on), for a timer that almost never fires. Here the pool's running
exchanges are a set, and one timer handle is armed for the earliest moment any of them could
be due; when it fires, each exchange says whether it is due (and fails itself) or when to look
again (:meth:`~dicomproxy.upstream.connection.Exchange.check`), and the timer is armed for the
earliest of those. Starting an exchange is a set insertion and a comparison; the timer is
re-armed only when the new exchange could be due before it (a shorter per-request timeout) or
none is armed. A timeout fires when it is due, as with a timer per exchange: the timer is armed
for the exact moment, never a periodic tick.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Watched(Protocol):
    """What the watchdog asks of an exchange."""

    def check(self, now: float) -> float:
        """Fail if a timeout is due at ``now``; else the loop time to look again (``inf``: never)."""
        ...


class Watchdog:
    """The timeouts of a pool's running exchanges, on one timer handle."""

    __slots__ = ("_loop", "_watched", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: set[Watched] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # loop time the handle fires at

    def watch(self, exchange: Watched, first_look: float) -> None:
        """Look at ``exchange`` at loop time ``first_look`` (and then as it says)."""
        self._watched.add(exchange)
        if first_look < self._at:
            self._arm(first_look)

    def forget(self, exchange: Watched) -> None:
        """The exchange ended. The timer stays armed: it fires once, finds nothing and stops."""
        self._watched.discard(exchange)

    def __len__(self) -> int:
        return len(self._watched)

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._at = math.inf
        now = self._loop.time()
        earliest = math.inf
        done = []
        for exchange in tuple(self._watched):  # check() may fail an exchange, whose close() forgets it
            due = exchange.check(now)
            if due == math.inf:
                done.append(exchange)
            elif due < earliest:
                earliest = due
        for exchange in done:
            self._watched.discard(exchange)
        if earliest < math.inf:
            self._arm(max(earliest, now + 0.001))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._at = math.inf
        self._watched.clear()
