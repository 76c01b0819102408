"""One budget for the upload bytes all requests hold in memory (``Tus:WriteBufferMB``).

The body writer gathers a request's body into batches of up to 4 MB before handing them to a
thread (see :mod:`.writer`); double-buffered, one request may hold 8 MB. Without a common
budget, 40 PATCHes whose clients stalled after 3 MB held 120 MB until their read timeout.
With it, every message a request keeps counts against the budget; a request that finds no room
first writes out what it holds (that frees its share), then waits in line for room, up to
``Tus:WriteBufferWaitSeconds``. Under load the batches get smaller, never the memory larger.

Waiters are served first come, first served, and :meth:`try_take` refuses while anyone waits,
so a busy request cannot overtake one that has been waiting. Hand-written (60 lines):
``asyncio.Semaphore`` and anyio's ``CapacityLimiter`` count one token per acquire, and a byte
budget needs a take of any size (a 64 KB message would be 65,536 acquires).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class BufferBudget:
    """A byte count shared by the requests of one event loop (not thread-safe: loop only)."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = max(1, limit)
        self.wait = wait
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes now if there is room and nobody is waiting."""
        if self._waiters or not self._fits(n):
            return False
        self._add(n)
        return True

    async def take(self, n: int) -> bool:
        """Take ``n`` bytes, waiting up to ``self.wait`` s for room; False if none came."""
        if self.try_take(n):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.wait):
                await fut
        except TimeoutError:
            pass
        except BaseException:  # cancelled while waiting: leave the line, return what came
            if fut.done() and not fut.cancelled():
                self.give_back(n)
            else:
                self._withdraw(entry)
            raise
        if fut.done() and not fut.cancelled():
            return True
        self._withdraw(entry)
        return False

    def give_back(self, n: int) -> None:
        self.in_use = max(0, self.in_use - n)
        self._wake()

    def _withdraw(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        entry[1].cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(entry)
        self._wake()  # the next in line may fit now that this one left

    def _fits(self, n: int) -> bool:
        # A message larger than the whole budget is let through when nothing else is held.
        return self.in_use + n <= self.limit or self.in_use == 0

    def _add(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._add(n)
            fut.set_result(None)
