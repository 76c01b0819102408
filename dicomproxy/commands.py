"""The registry behind ``InternalCmdRun(command, args)``.

Features register named commands (the DICOM side registers ``send`` and ``echo``); scripts run
them by name. An unknown name is an error that lists the known ones, because a typo in a
script should say what would have worked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dicomproxy_middleware import LuaExportError

CommandFunc = Callable[[str], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    func: CommandFunc
    usage: str


class Commands:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self.register("help", self._help, "help  -- lists the commands and their arguments")

    def register(self, name: str, func: CommandFunc, usage: str) -> None:
        self._commands[name.lower()] = Command(name, func, usage)

    def names(self) -> list[str]:
        return sorted(self._commands)

    async def run(self, name: Any, args: Any = "") -> Any:
        if not isinstance(name, str) or name.lower() not in self._commands:
            raise LuaExportError(f"unknown command {name!r}; known commands: {', '.join(self.names())}")
        if args is None:
            args = ""
        if not isinstance(args, str):
            raise LuaExportError(f"{name}: arguments must be one string, e.g. {self._commands[name.lower()].usage}")
        return await self._commands[name.lower()].func(args)

    async def _help(self, args: str) -> dict[str, str]:
        return {c.name: c.usage for c in self._commands.values()}
