"""The exceptions of the Lua runtime (a module of their own: the runtime and the exports it
builds in both raise them)."""

from __future__ import annotations


class LuaError(Exception):
    """A script failed. ``str(err)`` is ``file:line: message``; ``traceback`` has the rest."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback or message


class LuaTimeoutError(LuaError):
    """The call ran past its time budget (the engine's ``timeout_ms``)."""


class LuaMemoryError(LuaError):
    """The runtime went over its memory cap (the engine's ``max_memory_mb``)."""


class LuaExportError(Exception):
    """Raised by an export to make a clean Lua error at the script's call site."""
