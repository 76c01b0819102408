"""One Lua 5.4 runtime (lupa), driven from asyncio.

Every call into a script runs as a Lua coroutine on the event-loop thread. When the script calls
an *async* export (an HTTP request, a process, a DICOM send) the coroutine yields an await
token; :meth:`LuaEngine.run` awaits the matching Python awaitable and resumes the coroutine with
the answer. So a hook that waits on I/O never blocks the loop, and Lua code itself never runs on
two threads at once — the OpenResty cosocket model.

Limits, enforced per call:

* time: a count hook (every ``hook_count`` VM instructions) checks a monotonic deadline, and
  awaited exports get the remaining time. ``pcall``/``xpcall``/``coroutine.resume`` are wrapped so
  a script cannot swallow the budget error (see ``prelude.lua``);
* memory: lupa's ``max_memory`` caps the runtime's allocator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("middleware.lua")


def _import_lupa() -> Any:
    """Import ``lupa.lua54`` with RTLD_GLOBAL.

    Native Lua modules (``socket.core``) are built without linking liblua: they expect the
    ``lua_*`` symbols from the host process, so the Lua inside lupa must be loaded globally.
    """
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        import lupa.lua54 as lupa
    finally:
        sys.setdlopenflags(flags)
    return lupa


lupa = _import_lupa()
_PRELUDE_SOURCE = (Path(__file__).with_name("prelude.lua")).read_bytes()


def _compile_prelude() -> bytes:
    """The prelude as Lua bytecode: loading it is ~4x cheaper than parsing it per runtime."""
    compiler = lupa.LuaRuntime(encoding=None)
    fn = compiler.globals().load(_PRELUDE_SOURCE, b"=prelude", b"t")
    if isinstance(fn, tuple):
        raise RuntimeError(f"prelude.lua does not compile: {fn[1]!r}")
    return bytes(compiler.globals().string.dump(fn, True))


_PRELUDE = _compile_prelude()


def compile_chunk(source: str, name: str) -> bytes:
    """Compile Lua source to bytecode once, to load cheaply into many runtimes."""
    compiler = lupa.LuaRuntime(encoding=None)
    fn = compiler.globals().load(source.encode(), ("=" + name).encode(), b"t")
    if isinstance(fn, tuple):
        raise RuntimeError(f"{name} does not compile: {fn[1]!r}")
    return bytes(compiler.globals().string.dump(fn, True))


class LuaError(Exception):
    """A script failed. ``str(err)`` is ``file:line: message``; ``traceback`` has the rest."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback or message


class LuaTimeoutError(LuaError):
    """The call ran past its time budget (``Lua:TimeoutMs``)."""


class LuaMemoryError(LuaError):
    """The runtime went over its memory cap (``Lua:MaxMemoryMB``)."""


class LuaExportError(Exception):
    """Raised by an export to make a clean Lua error at the script's call site."""


@dataclass(frozen=True)
class Export:
    """A Python function visible to scripts as a global.

    ``is_async``: ``func`` is a coroutine function; the script's coroutine yields while it runs.
    ``pass_engine``: ``func`` receives the calling :class:`LuaEngine` as its first argument.
    ``raw``: arguments are passed as lupa objects, not converted to Python dicts/lists.
    """

    func: Callable[..., Any]
    is_async: bool = False
    pass_engine: bool = False
    raw: bool = False


def _export_names(exports: Mapping[str, Export]) -> tuple[str, str]:
    """Comma-joined names of the sync and of the async exports, for the prelude's binder."""
    return (
        ",".join(n for n, e in exports.items() if not e.is_async),
        ",".join(n for n, e in exports.items() if e.is_async),
    )


def _split(message: str, path: str = "") -> LuaError:
    message = full_chunk_path(message, path)
    first, _, _rest = message.partition("\n")
    return LuaError(first, message)


def full_chunk_path(message: str, path: str) -> str:
    """Lua shortens a chunk name over LUA_IDSIZE (60) to ``...<tail>``: put the whole path back,
    so an error names the script's file as it is on disk."""
    if len(path) < 30 or "..." not in message:
        return message
    for cut in range(1, len(path) - 29):
        short = "..." + path[cut:]
        if short in message:
            return message.replace(short, path)
    return message


class LuaEngine:
    """A Lua runtime with the prelude, the exports and one loaded script."""

    _ids = itertools.count(1)

    def __init__(
        self,
        name: str,
        *,
        exports: Mapping[str, Export] | None = None,
        globals: Mapping[str, Any] | None = None,
        timeout_ms: int = 5000,
        max_memory_mb: int = 64,
        native_path: str | None = None,
        hook_count: int = 100_000,
        setup: tuple[bytes, ...] = (),
        search_path: str | None = None,
    ) -> None:
        self.name = name
        self.timeout_ms = timeout_ms
        self.script: str = ""
        self.lua = lupa.LuaRuntime(
            unpack_returned_tuples=True,
            register_eval=False,
            register_builtins=False,
            max_memory=max_memory_mb * 1024 * 1024 if max_memory_mb else None,
        )
        g = self.lua.globals()
        (self._call, self._resume, self._drop, self._defines, self.ci_table, self.http_object,
         init) = g.load(_PRELUDE, "=prelude", "b")(time.monotonic, hook_count)
        self._table_from = self.lua.table_from
        self._lua_type = lupa.lua_type
        self._pending: dict[int, Awaitable[Any]] = {}
        self._next = itertools.count(1)
        self.exports = exports if exports is not None else {}
        names = _export_names(self.exports)
        flat_globals = [part for item in (globals or {}).items() for part in item]
        init(names[0], names[1], self._py_call, self._py_start, native_path or "", search_path or "",
             len(setup), *setup, *flat_globals)
        self.globals = g

    # ------------------------------------------------------------------ conversions
    def to_lua(self, value: Any) -> Any:
        """Python -> Lua: dicts and lists become tables (recursively); the rest passes as is."""
        if isinstance(value, dict | list | tuple):
            return self._table_from(value, recursive=True)
        return value

    def from_lua(self, value: Any, depth: int = 0) -> Any:
        """Lua -> Python: a 1..n table becomes a list, any other table a dict."""
        if self._lua_type(value) != "table":
            return value
        if depth > 64:
            raise LuaExportError("table nested too deeply (over 64 levels)")
        items = list(value.items())
        if items and all(isinstance(k, int) for k, _ in items):
            keys = sorted(k for k, _ in items)
            if keys == list(range(1, len(keys) + 1)):
                return [self.from_lua(value[k], depth + 1) for k in keys]
        return {k: self.from_lua(v, depth + 1) for k, v in items}

    def _args(self, export: Export, args: tuple[Any, ...]) -> list[Any]:
        out = list(args) if export.raw else [self.from_lua(a) for a in args]
        if export.pass_engine:
            out.insert(0, self)
        return out

    def _results(self, value: Any) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return tuple(self.to_lua(v) for v in value)
        return (self.to_lua(value),)

    def _py_call(self, name: str, *args: Any) -> Any:
        export = self.exports[name]
        try:
            return (True, *self._results(export.func(*self._args(export, args))))
        except LuaExportError as e:
            return (False, f"{name}: {e}")
        except Exception as e:
            log.exception("export %s failed", name)
            return (False, f"{name}: {type(e).__name__}: {e}")

    def _py_start(self, name: str, *args: Any) -> int:
        export = self.exports[name]
        token = next(self._next)
        try:
            self._pending[token] = _named(name, export.func(*self._args(export, args)))
        except Exception as e:  # bad arguments: fail at the await, with the message
            self._pending[token] = _failed(name, e)
        return token

    # ------------------------------------------------------------------ loading and calling
    def compile(self, source: str | bytes, chunkname: str) -> Any:
        """Compile (text or bytecode) into a Lua function; LuaError on a syntax error."""
        fn = self.globals.load(source, "@" + chunkname, "bt")
        if isinstance(fn, tuple):
            raise _split(str(fn[1]), chunkname)
        return fn

    async def load(self, source: str | bytes, chunkname: str) -> None:
        """Compile and run a script's top level (which may await exports)."""
        self.script = chunkname
        await self.run(self.compile(source, chunkname))

    def defines(self, name: str) -> bool:
        return bool(self._defines(name))

    async def call(self, name: str, *args: Any, timeout_ms: int | None = None) -> tuple[Any, ...]:
        """Call global function ``name``; returns all its return values (lupa objects)."""
        return await self.run(self.globals[name], *args, timeout_ms=timeout_ms)

    async def run(self, fn: Any, *args: Any, timeout_ms: int | None = None) -> tuple[Any, ...]:
        budget = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1000.0
        deadline = time.monotonic() + budget if budget > 0 else float("inf")
        tid = 0
        try:
            r = self._call(fn, deadline, *args)
            while True:
                if not isinstance(r, tuple):
                    r = (r,)
                status = r[0]
                if status == "await":
                    tid = r[2]
                    send = await self._await(r[1], deadline)
                    r = self._resume(tid, deadline, *send)
                    continue
                tid = 0
                if status == "done":
                    if r[1]:
                        return r[2:]
                    raise self._script_error(str(r[2]))
                if status == "budget":
                    raise LuaTimeoutError(
                        f"{self.script}: script ran past its time budget of {budget * 1000:.0f} ms"
                        " (Lua:TimeoutMs)"
                    )
                raise self._script_error(str(r[1]))
        except lupa.LuaMemoryError:
            raise LuaMemoryError(f"{self.script}: out of memory (Lua:MaxMemoryMB)") from None
        finally:
            if tid:
                self._drop(tid)

    def _script_error(self, message: str) -> LuaError:
        if "not enough memory" in message.partition("\n")[0]:
            return LuaMemoryError(f"{self.script}: out of memory (Lua:MaxMemoryMB)", message)
        return _split(message, self.script)

    async def _await(self, token: int, deadline: float) -> tuple[Any, ...]:
        awaitable = self._pending.pop(token)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _close(awaitable)
            raise LuaTimeoutError(f"{self.script}: script ran past its time budget (Lua:TimeoutMs)")
        try:
            if deadline == float("inf"):
                value = await awaitable
            else:
                value = await asyncio.wait_for(awaitable, remaining)
        except TimeoutError:
            raise LuaTimeoutError(
                f"{self.script}: script ran past its time budget while waiting (Lua:TimeoutMs)"
            ) from None
        except LuaExportError as e:
            return (False, str(e))
        except Exception as e:
            return (False, f"{type(e).__name__}: {e}")
        return (True, *self._results(value))

    def memory_used(self) -> int:
        return int(self.lua.get_memory_used() or 0)

    def close(self) -> None:
        for aw in self._pending.values():
            _close(aw)
        self._pending.clear()

    def release(self) -> None:
        """Close and free the runtime now, for an engine that will not be called again.

        The runtime holds this engine's dispatchers (``_py_call``/``_py_start``), so engine and
        runtime form a reference cycle that only Python's cycle collector would free — measured
        at 60-140 us per transient engine. Dropping every lupa reference here lets reference
        counting free the runtime at once.
        """
        self.close()
        for attr in ("_call", "_resume", "_drop", "_defines", "ci_table", "http_object", "_table_from",
                     "globals", "lua"):
            setattr(self, attr, None)


async def _named(name: str, awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except LuaExportError as e:
        raise LuaExportError(f"{name}: {e}") from None
    except (TimeoutError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise LuaExportError(f"{name}: {type(e).__name__}: {e}") from None


async def _failed(name: str, error: Exception) -> Any:
    raise LuaExportError(f"{name}: {error}")


def _close(aw: Awaitable[Any]) -> None:
    if asyncio.iscoroutine(aw):
        aw.close()
