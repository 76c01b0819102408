"""``os.execute`` and ``io.popen`` for full-library mode, as awaited exports.

Lua's own versions call ``system()``/``popen()`` and block the thread until the program ends:
``os.execute("sleep 3")`` stopped every HTTP and DICOM client of the gateway for 3 s. Here the
program runs as an asyncio subprocess and the script's coroutine waits for it (the event loop
serves everyone else meanwhile), under the call's time budget: when the budget ends the wait is
cancelled and the program killed. The child gets no standard input (``/dev/null``: a program
waiting on the gateway's stdin would never end) and an environment without the variables named
by ``hidden_env`` (the gateway's ``DICOMPROXY__*`` secrets). It runs in a process group of its
own, killed whole when the call ends: killing only the shell would leave ``sleep 10`` holding
the output pipe, and asyncio waits for the pipe to close (measured: a 300 ms budget ended after
10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from .errors import LuaExportError

SHELL = "/bin/sh"


def child_environment(hidden_prefix: str) -> dict[str, str] | None:
    """The environment for a program a script starts: the gateway's, minus ``hidden_prefix*``."""
    if not hidden_prefix:
        return None
    prefix = hidden_prefix.upper()
    return {k: v for k, v in os.environ.items() if not k.upper().startswith(prefix)}


def _status(returncode: int) -> tuple[str, int]:
    """os.execute's ("exit", code) or ("signal", number) from asyncio's return code."""
    if returncode < 0:
        return "signal", -returncode
    return "exit", returncode


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the process and everything it started (its process group), and wait for it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    await proc.wait()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str) or not value:
        raise LuaExportError("expects a command, e.g. os.execute(\"ls -l /tmp\")")
    return value


async def shell(command: Any, *, hidden_env: str = "") -> tuple[str, int]:
    """``os.execute(command)``: run it with ``/bin/sh -c``; its output goes where the gateway's goes."""
    proc = await asyncio.create_subprocess_exec(
        SHELL, "-c", _text(command), stdin=asyncio.subprocess.DEVNULL, env=child_environment(hidden_env),
        start_new_session=True,
    )
    try:
        return _status(await proc.wait())
    except BaseException:
        await reap(proc)
        raise


async def popen(
    command: Any, mode: Any = "r", data: Any = None, *, hidden_env: str = "", max_output: int = 64 * 1024 * 1024
) -> tuple[bytes, str, int]:
    """``io.popen(command, mode)`` run to its end: mode "r" returns what it wrote (at most
    ``max_output`` bytes), mode "w" feeds it ``data`` on its standard input."""
    reading = mode != "w"
    proc = await asyncio.create_subprocess_exec(
        SHELL, "-c", _text(command),
        stdin=asyncio.subprocess.DEVNULL if reading else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE if reading else None,
        env=child_environment(hidden_env), start_new_session=True,
    )
    try:
        if not reading:
            payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data or b"")
            await proc.communicate(payload)
            return b"", *_status(proc.returncode or 0)
        assert proc.stdout is not None
        output = await proc.stdout.read(max_output + 1)
        if len(output) > max_output:
            await reap(proc)
            raise LuaExportError(f"the program wrote more than {max_output} bytes (the engine's memory cap)")
        return output, *_status(await proc.wait())
    except BaseException:
        await reap(proc)
        raise
