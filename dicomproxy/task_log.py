"""What a background task's script wrote: its ``print``, ``LogInfo``/``LogDebug``/``LogError``
lines (and Orthanc's ``print``, ``PrintRecursive``), kept with the task for the status page.

Bounded per task run: the last :data:`MAX_LINES` lines within :data:`MAX_BYTES` bytes of text,
each line cut at :data:`MAX_LINE` characters; older lines give way to newer ones (the end of a
failed run says why) and the count of those dropped is kept (``logDropped``). A task's log is
saved in its JSON file with the task (at most ~32 KB more per task; ``Lua:TaskKeep``-style
pruning keeps the 500 latest finished tasks) and shown by ``GET /dicomproxy/tasks/{id}``, not in
the list. A re-run starts a new log.

The lines reach the log through the engine (``LuaEngine.output``), not through Python logging,
so a gateway logging at WARNING still keeps a task's INFO lines. The queue makes the log of the
task it runs current (:func:`current`, a context variable: the handler and the Lua exports it
calls run in the task's asyncio task).
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

MAX_LINES = 200
MAX_BYTES = 32 * 1024
MAX_LINE = 2000


class TaskLog:
    """The lines of one task run: ``lines`` is the list saved with the task (``{"t", "level", "text"}``)."""

    def __init__(self, lines: list[dict[str, Any]] | None = None) -> None:
        self.lines: list[dict[str, Any]] = lines if lines is not None else []
        self.size = sum(len(line["text"]) for line in self.lines)
        self.dropped = 0

    def add(self, level: str, text: str) -> None:
        if len(text) > MAX_LINE:
            text = text[: MAX_LINE - 1] + "\u2026"
        self.lines.append({"t": round(time.time(), 3), "level": level, "text": text})
        self.size += len(text)
        while len(self.lines) > MAX_LINES or (self.size > MAX_BYTES and len(self.lines) > 1):
            self.size -= len(self.lines.pop(0)["text"])
            self.dropped += 1


_current: contextvars.ContextVar[TaskLog | None] = contextvars.ContextVar("dicomproxy_task_log", default=None)


def current() -> TaskLog | None:
    """The log of the task running in this context (None outside a task)."""
    return _current.get()


def use(log: TaskLog) -> contextvars.Token[TaskLog | None]:
    return _current.set(log)


def done(token: contextvars.Token[TaskLog | None]) -> None:
    _current.reset(token)
