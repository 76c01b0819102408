"""What Orthanc's Lua prelude (``OrthancServer/Resources/Toolbox.lua``) gives every script,
written anew for the gateway (Orthanc is GPLv3: none of its code is copied here).

* ``_InitializeJob()`` / ``_AccessJob()``: Orthanc's prelude keeps the routing operations of the
  running callback in a global table ``_job``; scripts that call these two get the same table
  protocol (a fresh ``_job = {}``, then that table). The gateway's routing helpers run at once
  instead of being queued, so they do not add entries to it.
* ``ModifyResource(...)``: the prelude's name behind ``ModifyInstance`` (same function).
* ``CallSystem(resourceId, command, args)``: Orthanc's prelude queues a ``call-system`` step: the
  instance's DICOM file is written to a temporary file and ``command args... <file>`` runs; a
  non-zero exit ends the chain. Here the file comes from the PACS (``GET /instances/{id}/file``,
  streamed to disk) and the program runs through ``OsExecute``'s machinery (no shell, off the
  event loop, killed after ``Lua:OsExecuteTimeoutSeconds``). The issue's short form
  ``CallSystem(command, args)`` (no instance) runs the program and returns its exit code.
* The transfer-syntax callbacks Orthanc removed in 1.9.0 (``IsJpegTransferSyntaxAccepted`` ...,
  listed in its 1.8.2 sample ``TransferSyntaxEnable.lua``): a script may still define them; it
  loads, and one warning per name says they are ignored (the gateway's DICOM side negotiates its
  transfer syntaxes itself, ``Dicom:*``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dicomproxy_middleware import LuaExportError

from dicomproxy.scripting.orthanc.pacs import Pacs, PacsError

log = logging.getLogger("dicomproxy.orthanc")

TOOLBOX_LUA = r"""
function _InitializeJob()
  _job = {}
end

function _AccessJob()
  return _job
end
"""

# Orthanc <= 1.8.2 asked these at each C-STORE association; 1.9.0 removed them.
REMOVED_IN_1_9 = (
    "IsDeflatedTransferSyntaxAccepted",
    "IsJpegTransferSyntaxAccepted",
    "IsJpeg2000TransferSyntaxAccepted",
    "IsJpegLosslessTransferSyntaxAccepted",
    "IsJpipTransferSyntaxAccepted",
    "IsMpeg2TransferSyntaxAccepted",
    "IsMpeg4TransferSyntaxAccepted",
    "IsRleTransferSyntaxAccepted",
    "IsUnknownSopClassAccepted",
)


class RemovedCallbacks:
    """Warns once per process and name when a script defines a callback Orthanc 1.9.0 removed."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def check(self, defined: Callable[[str], bool], script: str) -> None:
        for name in REMOVED_IN_1_9:
            if name not in self.warned and defined(name):
                self.warned.add(name)
                log.warning("%s defines %s(): Orthanc removed the transfer-syntax callbacks in 1.9.0 and the gateway "
                            "ignores them (its DICOM side accepts the transfer syntaxes of its Dicom:* settings)",
                            script, name)


def _argv(args: Any) -> list[str]:
    """Orthanc's ``Arguments``: an array of strings or numbers (integral numbers without ``.0``)."""
    if args is None:
        return []
    if isinstance(args, dict):
        if args:  # a Lua table that is not a sequence
            raise LuaExportError("CallSystem: the arguments must be an array, e.g. {'-v', 'x'}")
        return []
    items = args if isinstance(args, list) else [args]
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, str | int | float):
            raise LuaExportError(f"CallSystem: an argument must be a string or a number, got {type(a).__name__}")
        out.append(str(int(a)) if isinstance(a, float) and a.is_integer() else str(a))
    return out


class CallSystem:
    """``CallSystem(resourceId, command, args)`` (Orthanc) and ``CallSystem(command, args)``."""

    def __init__(self, pacs: Pacs, execute: Callable[..., Awaitable[tuple[int, str, str]]], temp_dir: Path) -> None:
        self.pacs = pacs
        self.execute = execute  # exports.os_execute with Lua:OsExecuteTimeoutSeconds
        self.temp_dir = temp_dir

    async def __call__(self, first: Any = None, second: Any = None, third: Any = None) -> Any:
        if isinstance(second, str):  # Orthanc's form: an instance, a program, its arguments
            return await self.on_instance(first, second, third)
        if not isinstance(first, str) or not first:
            raise LuaExportError("expects CallSystem(instanceId, command, args) or CallSystem(command, args)")
        code, out, err = await self.execute(first, _argv(second))
        log.info("Lua: System call %r exited with %d", first, code)
        return code

    async def on_instance(self, resource: Any, command: str, args: Any) -> Any:
        if resource is None:
            raise LuaExportError("Cannot execute a system call on a nonexistent resource")
        if not command:
            raise LuaExportError("No command was specified for system call")
        argv = _argv(args)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="callsystem-", suffix=".dcm", dir=self.temp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    await self.pacs.download(f"/instances/{resource}/file", f)
                except PacsError as e:
                    raise LuaExportError(f"CallSystem: cannot read instance {resource}: {e}") from None
            code, out, err = await self.execute(command, [*argv, name])
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)
        line = " ".join([command, *argv, name])
        if code != 0:
            detail = (err or out).strip()[-500:]
            tail = f": {detail}" if detail else ""
            raise LuaExportError(f"Failed system call - \"{line}\": exit code {code}{tail}")
        log.info("Lua: System call: \"%s\"", line)
        return resource
