"""One long-running asyncio task owned by a component (:class:`BackgroundTask`): started once,
and at stop cancelled and awaited, so nothing of it runs after ``stop()`` returns. The
certificate watch (http/renewal.py) and the metrics history (ui/history.py) had this start/stop
pair word for word."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
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
