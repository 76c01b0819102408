"""One Lua 5.4 runtime (lupa), driven from asyncio.

Every call into a script runs as a Lua coroutine on the event-loop thread. When the script calls
an *async* export (an HTTP request, a process, a DICOM send) the coroutine yields an await
token; :meth:`LuaEngine.run` awaits the matching Python awaitable and resumes the coroutine with
the answer. So a hook that waits on I/O never blocks the loop, and Lua code itself never runs on
two threads at once — the OpenResty cosocket model.

Limits, enforced per call:

* time: a count hook (every ``hook_count`` VM instructions) checks a monotonic deadline, and
  awaited exports get the remaining time. ``pcall``/``xpcall``/``coroutine.resume`` are wrapped so
  a script cannot swallow the budget error (see ``prelude.lua``); a :class:`Watchdog` makes the
  hook fire at once when one instruction is slow (``watchdog.py``); C functions whose work the
  script controls are bounded or done in steps the hook reaches (``sandbox.lua``);
* memory: lupa's ``max_memory`` caps the runtime's allocator.

Trust: scripts reach nothing of Python. lupa's ``python`` table is removed (``sandbox.lua``) and
every attribute of every Python object that reaches Lua (an exception raised into a ``pcall``,
a value an export returns) is refused by the runtime's ``attribute_filter``: from Lua a Python
object can be called or indexed as a mapping, never walked (``f.__globals__``, ``__class__``).
What else a script can reach is the README's "Lua trust model".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import shell
from .errors import LuaError, LuaExportError, LuaMemoryError, LuaTimeoutError
from .watchdog import NO_DEADLINE, Watchdog, thread_address

log = logging.getLogger("dicomproxy_middleware.lua")

__all__ = ["Export", "LuaEngine", "LuaError", "LuaExportError", "LuaLibrary", "LuaMemoryError", "LuaTimeoutError",
           "Watchdog", "build_prelude", "compile_chunk", "lupa"]


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
_HERE = Path(__file__).parent
_PRELUDE_SOURCE = (_HERE / "prelude.lua").read_text()
_SANDBOX_SOURCE = (_HERE / "stdlib" / "sandbox.lua").read_text()
STDLIB_PARTS = ("kernel", "base", "strings", "patterns", "tables", "coroutines", "chunks", "full")


def compile_chunk(source: str, name: str, strip: bool = True) -> bytes:
    """Compile Lua source to bytecode once, to load cheaply into many runtimes. ``strip=False``
    keeps the line numbers (errors then say ``name:line:``)."""
    compiler = lupa.LuaRuntime(encoding=None)
    fn = compiler.globals().load(source.encode(), ("=" + name).encode(), b"t")
    if isinstance(fn, tuple):
        raise RuntimeError(f"{name} does not compile: {fn[1]!r}")
    return bytes(compiler.globals().string.dump(fn, strip))


def _no_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    """lupa's attribute_filter: no attribute of a Python object is reachable from Lua."""
    raise AttributeError("Python attributes are not reachable from Lua scripts")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class LuaLibrary:
    """Lua helpers compiled on first use, for the many engines that never call them.

    ``source`` is a chunk that returns a table holding each function named in ``functions``; it
    is called with a table of the private exports (those named ``_...``, which are not globals).
    Each name becomes a global at once, as a stub that loads the library on its first call and
    tail-calls the real function (so ``error(msg, 2)`` in it still names the script's line).
    """

    name: str
    source: str
    functions: tuple[str, ...]


def _lua_string(data: bytes) -> str:
    """A Lua string literal holding ``data`` (bytecode) exactly."""
    safe = {c for c in range(32, 127)} - {ord('"'), ord("\\")}
    return '"' + "".join(chr(c) if c in safe else f"\\{c:03d}" for c in data) + '"'


def build_prelude(
    exports: Mapping[str, Export], setup: Sequence[str] = (), libraries: Sequence[LuaLibrary] = ()
) -> bytes:
    """The prelude as bytecode, with the exports bound and the setup Lua run inline.

    Built once per set of exports (a :class:`ScriptSet` caches it) and loaded into every engine:
    the export names become bytecode constants and each setup chunk a ``do ... end`` block of the
    prelude, instead of strings passed and parsed per engine and one ``load`` per setup chunk;
    a library is one string constant (its bytecode) and a stub per function until first used.
    Loading bytecode is ~4x cheaper than parsing the source per runtime.
    """
    exports = with_builtins(exports)
    names = [*exports, *(f for lib in libraries for f in lib.functions)]
    for name in names:
        if not _IDENTIFIER.match(name):
            raise ValueError(f"Lua global name {name!r} is not an identifier")
    for i, source in enumerate(setup):
        compile_chunk(source, f"setup chunk {i + 1}")  # names the chunk that does not compile
    lines = [
        f'{"PRIVATE" if name.startswith("_") else "G"}.{name} = '
        f'{"async_export" if e.is_async else "sync_export"}("{name}")'
        for name, e in exports.items()
    ]
    for i, lib in enumerate(libraries):
        code = compile_chunk(lib.source, lib.name)
        lines.append(f'local lib{i} = library({_lua_string(code)}, "={lib.name}")')
        lines.extend(f'G.{f} = lazy(lib{i}, "{f}")' for f in lib.functions)
    blocks = "\n".join(f"do\n{source}\nend" for source in setup)
    sandbox = _SANDBOX_SOURCE
    source = _PRELUDE_SOURCE.replace("--@EXPORTS\n", "\n".join(lines) + "\n", 1)
    source = source.replace("--@SANDBOX\n", sandbox + "\n", 1)
    return compile_chunk(source.replace("--@SETUP\n", blocks + "\n", 1), "prelude")


@functools.cache
def stdlib_code(name: str) -> bytes:
    """A part of the standard library's wrappers (``stdlib/<name>.lua``) as bytecode, loaded by an
    engine the first time a script calls one of its functions. patterns.lua keeps its line
    numbers: errors of native calls made there are raised again at the script's line."""
    if name not in STDLIB_PARTS:
        raise LuaExportError(f"no standard library part {name!r}")
    return compile_chunk((_HERE / "stdlib" / f"{name}.lua").read_text(), name, strip=name != "patterns")


@functools.cache
def stock_lua_path() -> str:
    """Lua's own module path without its ``./`` entries (the current folder is nobody's choice)."""
    path = str(lupa.LuaRuntime().eval("package.path"))
    return ";".join(entry for entry in path.split(";") if entry and not entry.startswith("./"))


@dataclass(frozen=True)
class Export:
    """A Python function visible to scripts as a global.

    ``is_async``: ``func`` is a coroutine function; the script's coroutine yields while it runs.
    ``pass_engine``: ``func`` receives the calling :class:`LuaEngine` as its first argument.
    ``raw``: arguments are passed as lupa objects, not converted to Python dicts/lists.
    ``label``: how its errors name it (``SharedDict:get`` for the private ``_SharedGet``); default its name.
    """

    func: Callable[..., Any]
    is_async: bool = False
    pass_engine: bool = False
    raw: bool = False
    label: str = ""


def _lua_print(engine: LuaEngine, text: Any = "") -> None:
    """``print(...)``: a log line (INFO), not the process's stdout (a full pipe would block)."""
    log.info("[%s %s] %s", engine.name, Path(engine.script).name, text)
    if engine.output is not None:
        engine.output("info", str(text))


def _full_mode_only(engine: LuaEngine, name: str) -> None:
    """The standard library binds these two only in full-library mode, and no script reaches the
    private exports; this refuses them anyway should a way to them ever open."""
    if not engine.full_libraries:
        raise LuaExportError(f"{name} is available in full-library mode only")


async def _lua_shell(engine: LuaEngine, command: Any = None) -> tuple[str, int]:
    _full_mode_only(engine, "os.execute")
    return await shell.shell(command, hidden_env=engine.hidden_env)


async def _lua_popen(engine: LuaEngine, command: Any = None, mode: Any = "r", data: Any = None) -> tuple[Any, ...]:
    _full_mode_only(engine, "io.popen")
    cap = engine.max_memory_mb * 1024 * 1024 or 64 * 1024 * 1024
    return await shell.popen(command, mode, data, hidden_env=engine.hidden_env, max_output=cap)


# The exports every engine has, for the standard library's own use (private: not globals).
BUILTIN_EXPORTS: Mapping[str, Export] = {
    "_StdlibCode": Export(stdlib_code),
    "_Print": Export(_lua_print, pass_engine=True),
    "_Shell": Export(_lua_shell, is_async=True, pass_engine=True),
    "_Popen": Export(_lua_popen, is_async=True, pass_engine=True),
}


def with_builtins(exports: Mapping[str, Export]) -> dict[str, Export]:
    """``exports`` plus :data:`BUILTIN_EXPORTS` (an export of the same name wins)."""
    return {**BUILTIN_EXPORTS, **exports}


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


# The prelude's entry operations (see the end of prelude.lua).
CALL, CALL_GLOBAL, RESUME, DROP, DEFINES, HTTP, LOAD, PART = range(1, 9)


class LuaEngine:
    """A Lua runtime with the prelude, the exports and one loaded script.

    Python holds two Lua objects of it: the runtime and the prelude's entry function, through
    which every call goes (one crossing per call; a transient engine is made per request, and
    each Lua object Python holds costs a reference to make and to free).
    """

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
        timeout_setting: str = "timeout_ms",
        memory_setting: str = "max_memory_mb",
        setup: Sequence[str] = (),
        search_path: str | None = None,
        prelude: bytes | None = None,
        libraries: Sequence[LuaLibrary] = (),
        script_root: str | Path | None = None,
        full_libraries: bool = False,
        hidden_env: str = "",
        watchdog: Watchdog | None = None,
        on_call: Callable[[str, float], None] | None = None,
    ) -> None:
        """``setup``: Lua sources run after the exports are bound (helpers written in Lua).
        ``prelude``: :func:`build_prelude` of ``exports``, ``setup`` and ``libraries``, when the caller keeps one
        for many engines (else it is built here). ``timeout_setting`` / ``memory_setting``: what the
        embedding application calls these two limits, named in the errors so that they say which knob to turn.
        ``native_path``: where native modules are loaded from (``requireNative``, ``require``);
        ``search_path``: Lua module folders searched first (``root/?.lua;root/?/init.lua``);
        ``script_root``: the only folder ``dofile``/``loadfile`` read from (none: they read nothing);
        ``full_libraries``: the standard library's process, file and environment functions too
        (``sandbox.lua``); ``hidden_env``: a prefix of environment variables scripts and the programs
        they start never see; ``watchdog``: interrupts a call past its budget mid-instruction.
        ``on_call(callback, seconds)``: told how long each named call (:meth:`call`, :meth:`run_op`) took,
        failed ones included, awaits included; unset, a call pays one attribute test for it."""
        self.name = name
        self.on_call = on_call
        self.timeout_ms = timeout_ms
        self.timeout_setting = timeout_setting
        self.memory_setting = memory_setting
        self.max_memory_mb = max_memory_mb
        self.hidden_env = hidden_env.upper()
        self.full_libraries = full_libraries
        self.script: str = ""
        # told each line the script prints or logs, ``(level, text)`` (a background task's log)
        self.output: Callable[[str, str], None] | None = None
        self.lua = lupa.LuaRuntime(
            unpack_returned_tuples=True,
            register_eval=False,
            register_builtins=False,
            attribute_filter=_no_attributes,
            max_memory=max_memory_mb * 1024 * 1024 if max_memory_mb else None,
        )
        self._pending: dict[int, Awaitable[Any]] = {}
        self._next = 0
        exports = exports if exports is not None else {}
        self.exports = exports if "_Print" in exports else with_builtins(exports)
        if prelude is None:
            prelude = build_prelude(self.exports, setup, libraries)
        flat_globals = [part for item in (globals or {}).items() for part in item]
        # The Lua threads the script runs on (their addresses), for the watchdog; see interrupt().
        self.lua_deadline = NO_DEADLINE  # while Lua runs a call: its deadline
        self._threads: set[int] = set()
        self._threads_lock = threading.Lock()
        self._watchdog = watchdog
        # A fresh state starts with a zero GC debt, so Lua would run collection steps all
        # through the setup, over objects that all live: stopped here, restarted by the prelude
        # with room to allocate as much again before the first step (as after a full cycle).
        self.lua.nogc().__enter__()
        self._entry, first_thread = self.lua.execute(
            prelude, time.monotonic, hook_count, self._py_call, self._py_start, self._py_thread,
            full_libraries, max_memory_mb * 1024 * 1024, str(script_root or "").rstrip("/"),
            f"{search_path};{stock_lua_path()}" if search_path else stock_lua_path(), native_path or "",
            self.hidden_env, *flat_globals, mode="b",
        )
        self._threads.add(thread_address(first_thread))
        if watchdog is not None:
            watchdog.add(self)
        self._globals: Any = None

    # ------------------------------------------------------------------ the watchdog's side
    def _py_thread(self, name: str, add: bool) -> None:
        """The prelude reports each Lua thread a script runs on, and forgets it before Lua may free it."""
        address = thread_address(name)
        with self._threads_lock:
            if add:
                self._threads.add(address)
            else:
                self._threads.discard(address)

    def interrupt(self) -> None:
        """From the watchdog's thread: make the count hook of every thread of this engine fire at
        its next instruction (the hook then sees the deadline has passed)."""
        if self._watchdog is None:
            return
        with self._threads_lock:
            self._watchdog.poke(self._threads)

    @property
    def globals(self) -> Any:
        """The runtime's global table (a lupa table)."""
        if self._globals is None:
            self._globals = self.lua.globals()
        return self._globals

    # ------------------------------------------------------------------ conversions
    def to_lua(self, value: Any) -> Any:
        """Python -> Lua: dicts and lists become tables (recursively); the rest passes as is."""
        if isinstance(value, dict | list | tuple):
            return self.lua.table_from(value, recursive=True)
        return value

    def from_lua(self, value: Any, depth: int = 0) -> Any:
        """Lua -> Python: a 1..n table becomes a list, any other table a dict."""
        if lupa.lua_type(value) != "table":
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
            return (False, f"{export.label or name}: {e}")
        except Exception as e:
            log.exception("export %s failed", name)
            return (False, f"{export.label or name}: {type(e).__name__}: {e}")

    def _py_start(self, name: str, *args: Any) -> int:
        export = self.exports[name]
        self._next += 1
        token = self._next
        try:
            self._pending[token] = _named(export.label or name, export.func(*self._args(export, args)))
        except Exception as e:  # bad arguments: fail at the await, with the message
            self._pending[token] = _failed(export.label or name, e)
        return token

    # ------------------------------------------------------------------ loading and calling
    def compile(self, source: str | bytes, chunkname: str) -> Any:
        """Compile (text or bytecode) into a Lua function; LuaError on a syntax error. The host's
        own loader: it does not go through the ``load`` scripts see (which takes text only)."""
        try:
            return self.lua.compile(source, name="@" + chunkname, mode="bt")
        except lupa.LuaMemoryError:
            raise self._out_of_memory() from None
        except lupa.LuaSyntaxError as e:
            raise _split(str(e), chunkname) from None

    async def load(self, source: str | bytes, chunkname: str) -> None:
        """Compile and run a script's top level (which may await exports)."""
        pending = self.load_begin(source, chunkname)
        if pending is not None:
            await pending

    def load_begin(self, source: str | bytes, chunkname: str) -> Awaitable[Any] | None:
        """Compile and start the top level: None when it ran to the end without awaiting (no
        event-loop round trip needed), else an awaitable that finishes it."""
        self.script = chunkname
        return self._begin(LOAD, None, source, "@" + chunkname)

    def defines(self, name: str) -> bool:
        return bool(self._entry(DEFINES, name))

    def stdlib_part(self, name: str) -> Any:
        """The table of functions of ``stdlib/<name>.lua`` in this engine (loaded if need be), for
        tests that call the wrappers' slow paths directly."""
        return self._entry(PART, name)

    async def call(self, name: str, *args: Any, timeout_ms: int | None = None) -> tuple[Any, ...]:
        """Call global function ``name``; returns all its return values (lupa objects)."""
        if self.on_call is None:
            return await self._run(CALL_GLOBAL, timeout_ms, name, *args)
        return await self._timed(name, CALL_GLOBAL, timeout_ms, name, *args)

    async def run(self, fn: Any, *args: Any, timeout_ms: int | None = None) -> tuple[Any, ...]:
        """Call Lua function ``fn`` under the time budget; returns all its return values."""
        return await self._run(CALL, timeout_ms, fn, *args)

    async def run_op(self, op: int, *args: Any, timeout_ms: int | None = None) -> tuple[Any, ...]:
        """Run one of the prelude's call operations (``HTTP``: an HTTP hook) to its end.
        ``args[0]`` is the callback's name (what ``on_call`` is told)."""
        # In line, not through _run and _timed: two coroutines fewer per hook call (~2,500
        # instructions each under callgrind, two hook calls per request with both HTTP hooks).
        on_call = self.on_call
        started = time.perf_counter() if on_call is not None else 0.0
        try:
            r, deadline, budget = self._enter(op, timeout_ms, *args)
            if r[0] == "await":
                r = await self._drive(r, deadline)
            return self._outcome(r, budget)
        finally:
            if on_call is not None:
                on_call(str(args[0]), time.perf_counter() - started)

    async def _timed(self, callback: str, op: int, timeout_ms: int | None, *args: Any) -> tuple[Any, ...]:
        started = time.perf_counter()
        try:
            return await self._run(op, timeout_ms, *args)
        finally:
            if self.on_call is not None:
                self.on_call(callback, time.perf_counter() - started)

    def _enter(self, op: int, timeout_ms: int | None, *args: Any) -> tuple[tuple[Any, ...], float, float]:
        """The first step of a call under its budget: (what Lua returned, deadline, budget in s)."""
        budget = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1000.0
        deadline = time.monotonic() + budget if budget > 0 else math.inf
        previous, self.lua_deadline = self.lua_deadline, deadline
        if self._watchdog is not None:
            self._watchdog.wake_for(deadline)
        try:
            return self._entry(op, deadline, *args), deadline, budget
        except lupa.LuaMemoryError:
            raise self._out_of_memory() from None
        finally:
            self.lua_deadline = previous

    async def _run(self, op: int, timeout_ms: int | None, *args: Any) -> tuple[Any, ...]:
        r, deadline, budget = self._enter(op, timeout_ms, *args)
        if r[0] == "await":
            r = await self._drive(r, deadline)
        return self._outcome(r, budget)

    def _begin(self, op: int, timeout_ms: int | None, *args: Any) -> Awaitable[Any] | None:
        """Synchronous start of :meth:`_run`: None when done, else an awaitable for the rest."""
        r, deadline, budget = self._enter(op, timeout_ms, *args)
        if r[0] != "await":
            self._outcome(r, budget)
            return None
        return self._finish(r, deadline, budget)

    async def _finish(self, r: tuple[Any, ...], deadline: float, budget: float) -> tuple[Any, ...]:
        return self._outcome(await self._drive(r, deadline), budget)

    async def _drive(self, r: tuple[Any, ...], deadline: float) -> tuple[Any, ...]:
        """Await what the script waits on and resume it, until it stops awaiting."""
        tid = r[2]
        try:
            while r[0] == "await":
                tid = r[2]
                send = await self._await(r[1], deadline)
                r = self._resume(deadline, tid, send)
            tid = 0
            return r
        except lupa.LuaMemoryError:
            raise self._out_of_memory() from None
        finally:
            if tid and self._entry is not None:
                self._entry(DROP, tid)

    def _resume(self, deadline: float, tid: int, send: tuple[Any, ...]) -> Any:
        previous, self.lua_deadline = self.lua_deadline, deadline
        if self._watchdog is not None:
            self._watchdog.wake_for(deadline)
        try:
            return self._entry(RESUME, deadline, tid, *send)
        finally:
            self.lua_deadline = previous

    def _outcome(self, r: Any, budget: float) -> tuple[Any, ...]:
        """The values of a finished call, or the error it ended with."""
        status = r if isinstance(r, str) else r[0]
        if status == "done":
            if r[1]:
                return tuple(r[2:])
            raise self._script_error(str(r[2]))
        if status == "budget":
            raise LuaTimeoutError(
                f"{self.script}: script ran past its time budget of {budget * 1000:.0f} ms ({self.timeout_setting})"
            )
        if status == "compile":
            message = str(r[1])
            raise _split(message, self.script)
        raise self._script_error(str(r[1]))

    def _out_of_memory(self, traceback: str = "") -> LuaMemoryError:
        return LuaMemoryError(f"{self.script}: out of memory ({self.memory_setting})", traceback)

    def _script_error(self, message: str) -> LuaError:
        if "not enough memory" in message.partition("\n")[0]:
            return self._out_of_memory(message)
        return _split(message, self.script)

    async def _await(self, token: int, deadline: float) -> tuple[Any, ...]:
        awaitable = self._pending.pop(token)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _close(awaitable)
            raise LuaTimeoutError(f"{self.script}: script ran past its time budget ({self.timeout_setting})")
        try:
            if deadline == math.inf:
                value = await awaitable
            else:
                value = await asyncio.wait_for(awaitable, remaining)
        except TimeoutError:
            raise LuaTimeoutError(
                f"{self.script}: script ran past its time budget while waiting ({self.timeout_setting})"
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
        with self._threads_lock:  # lua_close frees every thread: the watchdog must not reach one
            self._threads.clear()
            self._watchdog = None
        self._entry = self._globals = self.lua = None


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
