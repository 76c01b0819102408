"""The system exports of the DicomProxy Lua API, available in every engine.

``Config``, ``requireNative``, ``OsExecute``, ``LogDebug``/``LogInfo``/``LogError``,
``LuaBackgroundWorker``, ``InternalCmdRun`` — names and arguments exactly as the API reference
gives them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomproxy_middleware import LuaEngine, LuaExportError
from dicomproxy_middleware.shell import child_environment, reap

if TYPE_CHECKING:
    from dicomproxy.tasks import Queue

lua_log = logging.getLogger("dicomproxy.lua")

TASK_SCRIPT = "main-task.lua"

# A Lua library (compiled in an engine on its first call): returns its functions. Native modules
# come only from Lua:NativePath (the prelude's native_module), whatever package.cpath says.
REQUIRE_NATIVE_LUA = r"""
local private = ...
local native_module, loaded, error, type = private.native_module, package.loaded, error, type
local function requireNative(name)
  if type(name) ~= "string" then
    error("requireNative expects a module name, e.g. requireNative(\"socket.core\")", 2)
  end
  if loaded[name] ~= nil then return loaded[name] end
  local loader, path = native_module(name, 3)
  if not loader then
    error("requireNative: native module '" .. name .. "' not found (install it, e.g. apt-get install lua-socket"
      .. " for socket.core; searched Lua:NativePath)" .. path, 2)
  end
  local module = loader(name, path)
  if module == nil then module = true end
  loaded[name] = module
  return module
end
return { requireNative = requireNative }
"""


class ConfigView(dict[str, Any]):
    """``Config["Section:Key"]`` for scripts: case-insensitive, nil for a missing key."""

    def __init__(self, flat: dict[str, Any]) -> None:
        super().__init__(flat)
        self._lower = {k.lower(): v for k, v in flat.items()}

    def __missing__(self, key: Any) -> Any:
        return self._lower.get(key.lower()) if isinstance(key, str) else None


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def format_message(message: Any, args: tuple[Any, ...]) -> str:
    """Fill ``{0}``-style (by index) and ``{Name}``-style (in order) placeholders.

    Like .NET message templates: named placeholders take the extra arguments in the order they
    appear; ``{{`` and ``}}`` are literal braces; extra arguments are appended.
    """
    text = str(message)
    if not args:
        return text
    values = [("nil" if a is None else str(a)) for a in args]
    used = set()
    order = iter(range(len(values)))

    def fill(m: re.Match[str]) -> str:
        name = m.group(1).split(":")[0].strip()
        if name.isdigit():
            i = int(name)
        else:
            i = next(order, -1)
        if 0 <= i < len(values):
            used.add(i)
            return values[i]
        return m.group(0)

    out = _PLACEHOLDER.sub(fill, text.replace("{{", "\0").replace("}}", "\1"))
    out = out.replace("\0", "{").replace("\1", "}")
    rest = [v for i, v in enumerate(values) if i not in used]
    return out + (" " + " ".join(rest) if rest else "")


def _logger(level: int) -> Callable[..., None]:
    name = logging.getLevelName(level).lower()

    def log_func(engine: LuaEngine, message: Any = "", *args: Any) -> None:
        logged = lua_log.isEnabledFor(level)
        if logged or engine.output is not None:
            text = format_message(message, args)
            if logged:
                lua_log.log(level, "[%s %s] %s", engine.name, Path(engine.script).name, text)
            if engine.output is not None:
                engine.output(name, text)

    return log_func


log_debug = _logger(logging.DEBUG)
log_info = _logger(logging.INFO)
log_error = _logger(logging.ERROR)


async def os_execute(
    command: Any, arguments: Any = "", *, timeout: float = 60.0, hidden_env: str = ""
) -> tuple[int, str, str]:
    """Run a program without a shell; arguments are split shell-style. Returns code, stdout, stderr.
    The program's environment is the gateway's without the ``hidden_env*`` variables (its secrets)."""
    if not isinstance(command, str) or not command.strip():
        raise LuaExportError("expects a program, e.g. OsExecute(\"ls\", \"-l /tmp\")")
    if arguments is None:
        arguments = ""
    if isinstance(arguments, list):
        argv = [str(a) for a in arguments]
    else:
        try:
            argv = shlex.split(str(arguments))
        except ValueError as e:
            raise LuaExportError(f"cannot split arguments {arguments!r}: {e}") from None
    try:
        proc = await asyncio.create_subprocess_exec(
            command, *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_environment(hidden_env),
            start_new_session=True,  # killed with what it started (see dicomproxy_middleware.shell)
        )
    except OSError as e:
        raise LuaExportError(f"cannot run {command!r}: {e.strerror or e}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        await reap(proc)
        if isinstance(e, asyncio.CancelledError):
            raise
        raise LuaExportError(
            f"{command} ran past {timeout:g} s and was killed (Lua:OsExecuteTimeoutSeconds)"
        ) from None
    return proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def background_worker(tasks: Queue, scripts_root: Path) -> Callable[..., str]:
    def submit(script: Any = "", entry: Any = "", args: Any = "") -> str:
        """``LuaBackgroundWorker(luaScriptPath, entryFunc, args)``: queue a Type 3 engine run."""
        name = str(script or TASK_SCRIPT)
        path = (scripts_root / name).resolve()
        if not path.is_file():
            raise LuaExportError(f"script {name!r} not found in {scripts_root}")
        if not isinstance(entry, str) or not entry:
            raise LuaExportError("expects an entry function name, e.g. LuaBackgroundWorker(\"main-task.lua\", "
                                 "\"run\", \"args\")")
        return tasks.submit("lua", {"script": str(path), "entry": entry, "args": args},
                            title=f"{path.name}:{entry}")

    return submit
