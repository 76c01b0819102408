"""App events: one place where components say what happened, and others listen.

Components (TUS import, DICOM forwarder, script host, task queue) call ``bus.emit(...)``;
the notification feed and the mail rules subscribe. Emitting never blocks and never raises:
a failing listener is logged, because telling someone about an event must not break it.

Event kinds (the names ``Notifications:Email`` rules match on):

=======================  =====================================================
``upload.imported``      a TUS upload was imported into the PACS
``import.failed``        a TUS import failed
``forward.failed``       the DICOM forwarder gave up on an instance
``script.failed``        a script failed to load or reload
``task.failed``          a background task failed
``upstream.down``        the PACS stopped answering
``upstream.up``          the PACS answers again
``mail.failed``          a mail could not be sent
``certificate.failed``   the changed HTTPS certificate files could not be
                         loaded (the previous certificate is still served)
=======================  =====================================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

EVENT_KINDS = (
    "upload.imported",
    "import.failed",
    "forward.failed",
    "script.failed",
    "task.failed",
    "upstream.down",
    "upstream.up",
    "mail.failed",
    "certificate.failed",
)


@dataclass(frozen=True)
class AppEvent:
    """``kind`` is one of :data:`EVENT_KINDS`; ``title``/``body``/``link`` are human text."""

    kind: str
    title: str
    body: str = ""
    link: str = ""
    data: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[AppEvent], Awaitable[None] | None]


def create_task_threadsafe(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    tasks: set[asyncio.Task[Any]],
    done: Callable[[asyncio.Task[Any]], None] | None = None,
) -> None:
    """Start ``coro`` as a task on ``loop`` from any thread (app events also come from the DICOM
    side's threads); the task stays in ``tasks`` until ``done`` (default: discard it) runs."""

    def create() -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(done or tasks.discard)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        create()
    else:
        loop.call_soon_threadsafe(create)


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, title: str, body: str = "", link: str = "", **data: Any) -> AppEvent:
        """Deliver to every listener; async listeners run as tasks. Safe from any thread."""
        event = AppEvent(kind, title, body, link, data)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for listener in self._listeners:
            try:
                result = listener(event)
                if asyncio.iscoroutine(result):
                    if loop is None:
                        log.warning("event %s: async listener needs an event loop; dropped", kind)
                        result.close()
                        continue
                    task = loop.create_task(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
            except Exception:
                log.exception("event listener failed for %s", kind)
        return event

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event listener failed: %r", task.exception())
