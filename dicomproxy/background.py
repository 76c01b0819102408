"""One long-running asyncio task owned by a component (:class:`BackgroundTask`): started once,
and at stop cancelled and awaited, so nothing of it runs after ``stop()`` returns. The
certificate watch (http/renewal.py) and the metrics history (ui/history.py) had this start/stop
pair word for word; :func:`every` is the loop of the periodic jobs (the tus expiry sweeps, the S3
quota recount), which each wrote the same sleep-then-round loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class BackgroundTask:
    """A named task: :meth:`start` runs ``body()`` (once: a second start while it runs does
    nothing), :meth:`stop` cancels it and waits for its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(body(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def every(interval: float, round_: Callable[[], Awaitable[object]], failed: Callable[[Exception], None]) -> None:
    """Run ``round_()`` every ``interval`` seconds (the first after one interval), until cancelled.

    A round that raises is handed to ``failed`` (called inside the ``except``, so
    ``log.exception`` there has the traceback) and the loop goes on: a peer away for one round
    must not end a job that runs for the process's life. Cancellation is not an ``Exception``
    and ends the loop, also in the middle of a round (that is how :meth:`BackgroundTask.stop`
    ends it)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await round_()
        except Exception as e:
            failed(e)
