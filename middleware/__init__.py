"""Reusable Lua scripting for ASGI apps (Lua 5.4 through lupa).

Depends on nothing in ``dicomproxy``: wrap any ASGI app with :class:`LuaHttpMiddleware` and a
:class:`ScriptSet` pointed at a folder holding ``main.lua`` (singleton) and/or
``main-transient.lua`` (one engine per request).
"""

from .asgi import LuaHttpMiddleware
from .http import HttpExchange, call_request_hook, call_response_hook, check_header
from .runtime import (
    Export,
    LuaEngine,
    LuaError,
    LuaExportError,
    LuaLibrary,
    LuaMemoryError,
    LuaTimeoutError,
    Watchdog,
    compile_chunk,
)
from .scripts import Dispatch, EngineOptions, ScriptSet, TransientScope

__all__ = [
    "Dispatch",
    "EngineOptions",
    "Export",
    "HttpExchange",
    "LuaEngine",
    "LuaError",
    "LuaExportError",
    "LuaHttpMiddleware",
    "LuaLibrary",
    "LuaMemoryError",
    "LuaTimeoutError",
    "ScriptSet",
    "TransientScope",
    "Watchdog",
    "call_request_hook",
    "call_response_hook",
    "check_header",
    "compile_chunk",
]
