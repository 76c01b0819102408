"""The scripts of one folder: a singleton engine and a factory of transient engines.

* ``main.lua`` runs in one engine for the whole process (the *singleton*): state kept in its
  globals lives as long as the process (or until the file is edited).
* ``main-transient.lua`` runs in a fresh engine per request/association/upload (*transient*):
  nothing survives into the next one. The chunk is compiled once to bytecode and a small pool of
  ready engines is kept warm, so a request pays for a call, not for a compile.

Which callbacks each script defines is read once at load and cached: dispatching an event no
script defines costs a set lookup. Files are polled for changes; an edit that fails to compile
or to run keeps the previous version and reports why.

``extra_singleton`` scripts (Orthanc's ``LuaScripts``) run in the singleton engine after
``main.lua``, in order, so a later definition wins; an edit of any of them reloads the singleton.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runtime import (
    Export,
    LuaEngine,
    LuaError,
    LuaLibrary,
    Watchdog,
    build_prelude,
    full_chunk_path,
    lupa,
    with_builtins,
)

log = logging.getLogger("dicomproxy_middleware.lua")

SINGLETON_SCRIPT = "main.lua"
TRANSIENT_SCRIPT = "main-transient.lua"


@dataclass(frozen=True)
class EngineOptions:
    timeout_ms: int = 5000
    max_memory_mb: int = 64
    native_path: str | None = None
    hook_count: int = 100_000
    # What the embedding application calls the two limits; errors name them.
    timeout_setting: str = "timeout_ms"
    memory_setting: str = "max_memory_mb"
    # The standard library's process, file and environment functions too (see sandbox.lua).
    full_libraries: bool = False
    # Environment variables scripts and the programs they start never see (a name prefix).
    hidden_env: str = ""
    # How often the watchdog looks for a call past its budget (seconds); 0 turns it off.
    watchdog_interval: float = 0.01


@dataclass
class Dispatch:
    """What an event's delivery gave: see ``docs/ARCHITECTURE.md``."""

    results: list[Any] = field(default_factory=list)
    args: tuple[Any, ...] = ()

    @property
    def handled(self) -> bool:
        return any(r is True for r in self.results)

    @property
    def rejected(self) -> bool:
        return any(r is False for r in self.results)


@dataclass
class ScriptState:
    """What the status page shows about one script file."""

    path: Path
    loaded: bool = False
    callbacks: frozenset[str] = frozenset()
    error: str | None = None
    mtime: tuple[Any, ...] | None = None  # (mtime_ns, size); the singleton's: one per file
    reloaded: float | None = None  # wall time of the last load attempt (ok or not)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class ScriptSet:
    """Loads, reloads and dispatches to the scripts in ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        exports: Mapping[str, Export] | None = None,
        globals: Mapping[str, Any] | None = None,
        options: EngineOptions | None = None,
        reload_interval: float = 1.0,
        pool_size: int = 4,
        on_error: Callable[[Path, str], None] | None = None,
        on_loaded: Callable[[LuaEngine], Awaitable[None]] | None = None,
        on_changed: Callable[[Path, str], None] | None = None,
        singleton_script: str = SINGLETON_SCRIPT,
        transient_script: str = TRANSIENT_SCRIPT,
        setup: tuple[str, ...] = (),
        libraries: tuple[LuaLibrary, ...] = (),
        on_call: Callable[[str, float], None] | None = None,
        extra_singleton: tuple[Path, ...] = (),
        extra_setting: str = "",
    ) -> None:
        """``on_call(callback, seconds)``: every engine made here reports each callback's duration
        to it (a latency histogram, say); None costs nothing. ``extra_singleton``: scripts loaded
        into the singleton after main.lua (``extra_setting`` names their setting in errors)."""
        self.root = Path(root)
        self.extra_singleton = tuple(Path(p) for p in extra_singleton)
        self.extra_setting = extra_setting
        self.on_call = on_call
        self.exports: dict[str, Export] = with_builtins(exports or {})
        self.globals: dict[str, Any] = dict(globals or {})
        self.options = options or EngineOptions()
        self.reload_interval = reload_interval
        self.pool_size = pool_size
        self.on_error = on_error
        self.on_loaded = on_loaded
        self.on_changed = on_changed  # (path, "loaded" | "reloaded" | "removed"): a script took effect
        self._setup = tuple(setup)
        self._libraries = tuple(libraries)
        self._prelude: bytes | None = None
        self._baseline: frozenset[str] | None = None
        self.singleton: LuaEngine | None = None
        self.singleton_state = ScriptState(self.root / singleton_script)
        self.transient_state = ScriptState(self.root / transient_script)
        self._transient_chunk: bytes | None = None
        self._pool: list[LuaEngine] = []
        self._refilling = False
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        interval = self.options.watchdog_interval
        self.watchdog = Watchdog(lupa, interval) if interval > 0 else None

    # ------------------------------------------------------------------ engines
    def new_engine(self, name: str) -> LuaEngine:
        return LuaEngine(
            name,
            exports=self.exports,
            globals=self.globals,
            timeout_ms=self.options.timeout_ms,
            max_memory_mb=self.options.max_memory_mb,
            native_path=self.options.native_path,
            hook_count=self.options.hook_count,
            timeout_setting=self.options.timeout_setting,
            memory_setting=self.options.memory_setting,
            search_path=f"{self.root}/?.lua;{self.root}/?/init.lua",
            prelude=self.prelude,
            script_root=self.root,
            full_libraries=self.options.full_libraries,
            hidden_env=self.options.hidden_env,
            watchdog=self.watchdog,
            on_call=self.on_call,
        )

    @property
    def prelude(self) -> bytes:
        """The prelude with this set's exports and setup Lua, compiled once for all its engines."""
        if self._prelude is None:
            self._prelude = build_prelude(self.exports, self._setup, self._libraries)
        return self._prelude

    def add_export(self, name: str, export: Export) -> None:
        """Add a global for every engine created from now on (call before :meth:`start`)."""
        self.exports[name] = export
        self._prelude = None

    def add_setup(self, source: str) -> None:
        """Lua run in every engine created from now on, after the exports are bound (helpers
        written in Lua; call before :meth:`start`)."""
        self._setup = (*self._setup, source)
        self._prelude = None

    def add_library(self, library: LuaLibrary) -> None:
        """Lua functions every engine created from now on has, compiled in an engine only when
        one is first called (call before :meth:`start`)."""
        self._libraries = (*self._libraries, library)
        self._prelude = None

    async def start(self) -> None:
        await self.reload(force=True)
        if self.reload_interval > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for engine in self._pool:
            engine.release()
        self._pool.clear()
        if self.watchdog is not None:
            self.watchdog.stop()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                await self.reload()
            except Exception:
                log.exception("script reload failed")

    async def reload(self, force: bool = False) -> None:
        """Load whichever script changed on disk since the last look."""
        async with self._lock:
            for state in (self.singleton_state, self.transient_state):
                singleton = state is self.singleton_state
                mtime = self._singleton_stat() if singleton else _stat(state.path)
                if not force and mtime == state.mtime:
                    continue
                state.mtime = mtime
                state.reloaded = time.time()
                if mtime is None:
                    if state.loaded:
                        log.info("%s removed: its callbacks are off", state.path)
                        self._changed(state.path, "removed")
                    await (self._load_singleton(None) if singleton else self._load_transient(None))
                    continue
                try:
                    if singleton:
                        await self._load_singleton_files()
                    else:
                        await self._load_transient(state.path.read_bytes())
                except LuaError as e:
                    self._failed(state, str(e), e.traceback)
                except OSError as e:
                    where = e.filename or state.path
                    self._failed(state, f"{where}: cannot read: {e.strerror or e}", "")
                else:
                    if state.error or not force:
                        log.info("%s loaded; callbacks: %s", state.path, ", ".join(sorted(state.callbacks)) or "none")
                    state.error = None
                    self._changed(state.path, "loaded" if force else "reloaded")

    def _changed(self, path: Path, what: str) -> None:
        if self.on_changed is not None:
            try:
                self.on_changed(path, what)
            except Exception:
                log.exception("on_changed(%s) failed", path)

    def _singleton_stat(self) -> tuple[Any, ...] | None:
        """main.lua's stat with those of the extra scripts; None when none of them exists."""
        stats = (_stat(self.singleton_state.path), *(_stat(p) for p in self.extra_singleton))
        return None if all(s is None for s in stats) else stats

    async def _load_singleton_files(self) -> None:
        """main.lua (if present), then each extra script in order, into one new engine."""
        files = [self.singleton_state.path] if self.singleton_state.path.is_file() else []
        for path in self.extra_singleton:
            if not path.is_file():
                raise FileNotFoundError(
                    2, f"no such file (listed in {self.extra_setting or 'the extra scripts'})", str(path))
            files.append(path)
        await self._load_singleton([(path.read_bytes(), path) for path in files])

    def _failed(self, state: ScriptState, message: str, traceback: str) -> None:
        kept = " (keeping the previous version)" if state.loaded else ""
        state.error = message
        log.error("script %s failed to load%s: %s", state.path, kept, traceback or message)
        if self.on_error:
            self.on_error(state.path, message)

    @staticmethod
    def _functions(engine: LuaEngine) -> set[str]:
        return {k for k, v in engine.globals.items() if isinstance(k, str) and lupa.lua_type(v) == "function"}

    def _callbacks(self, engine: LuaEngine) -> frozenset[str]:
        """The functions the script defined: its globals minus those of a blank engine."""
        if self._baseline is None:
            self._baseline = frozenset(self._functions(self.new_engine("baseline")))
        return frozenset(self._functions(engine) - self._baseline)

    async def _load_singleton(self, sources: list[tuple[bytes, Path]] | None) -> None:
        state = self.singleton_state
        if sources is None:
            self.singleton, state.loaded, state.callbacks = None, False, frozenset()
            return
        engine = self.new_engine("singleton")
        try:
            for source, path in sources:
                await engine.load(source, str(path))
        except BaseException:
            engine.release()
            raise
        callbacks = self._callbacks(engine)
        previous = self.singleton
        self.singleton, state.loaded, state.callbacks = engine, True, callbacks
        if self.on_loaded:
            await self.on_loaded(engine)
        if previous is not None:
            previous.close()

    async def _load_transient(self, source: bytes | None) -> None:
        state = self.transient_state
        for engine in self._pool:
            engine.release()
        self._pool.clear()
        if source is None:
            self._transient_chunk, state.loaded, state.callbacks = None, False, frozenset()
            return
        compiler = lupa.LuaRuntime(encoding=None)
        fn = compiler.globals().load(source, b"@" + str(state.path).encode(), b"t")
        if isinstance(fn, tuple):
            msg = full_chunk_path(fn[1].decode() if isinstance(fn[1], bytes) else str(fn[1]), str(state.path))
            raise LuaError(msg.partition("\n")[0], msg)
        chunk = bytes(compiler.globals().string.dump(fn))
        probe = self.new_engine("transient")
        await probe.load(chunk, str(state.path))  # proves the top level runs before we switch
        self._transient_chunk, state.loaded, state.callbacks = chunk, True, self._callbacks(probe)
        self._pool.append(probe)
        self._schedule_refill()

    async def new_transient(self) -> LuaEngine:
        """A fresh transient engine with the script loaded (from the warm pool when possible)."""
        chunk = self._transient_chunk
        if chunk is None:
            raise LuaError(f"{self.transient_state.path}: no transient script is loaded")
        if self._pool:
            engine = self._pool.pop()
        else:
            engine = self.new_engine("transient")
            await engine.load(chunk, str(self.transient_state.path))
        self._schedule_refill()
        return engine

    def _schedule_refill(self) -> None:
        if not self._refilling and len(self._pool) < self.pool_size and self._transient_chunk:
            self._refilling = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        """Add one engine to the pool, then come back on a later loop turn for the next: requests
        run in between. A plain callback, not a task: a script whose top level does not await
        (the usual case) loads synchronously."""
        self._refilling = False
        chunk = self._transient_chunk
        if chunk is None or len(self._pool) >= self.pool_size:
            return
        engine = self.new_engine("transient")
        try:
            pending = engine.load_begin(chunk, str(self.transient_state.path))
        except LuaError as e:
            engine.release()
            log.error("transient engine failed to start: %s", e.traceback)
            return
        if pending is None:
            self._pooled(engine, chunk)
        else:
            self._refilling = True
            asyncio.get_running_loop().create_task(self._refill_async(engine, chunk, pending))

    async def _refill_async(self, engine: LuaEngine, chunk: bytes, pending: Awaitable[Any]) -> None:
        try:
            await pending
        except LuaError as e:
            engine.release()
            log.error("transient engine failed to start: %s", e.traceback)
            return
        finally:
            self._refilling = False
        self._pooled(engine, chunk)

    def _pooled(self, engine: LuaEngine, chunk: bytes) -> None:
        if chunk is self._transient_chunk:
            self._pool.append(engine)
            self._schedule_refill()
        else:  # the script changed while this one loaded
            engine.release()

    async def execute(
        self, source: str | bytes, chunkname: str,
        during: Callable[[LuaEngine], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> tuple[Any, ...]:
        """Run ``source`` in the singleton engine, among its globals (Orthanc's ``/tools/execute-script``),
        under the engine's time budget: what it defines stays for later calls, and a callback it
        defines takes effect at once, until main.lua is next reloaded. Without a main.lua, a blank
        singleton engine is made for it (and kept until one appears). Held under the reload lock,
        so it never runs in an engine being replaced. ``during(engine)``: a context held around the run
        (the gateway collects what the script prints with it)."""
        async with self._lock:
            engine = self.singleton
            if engine is None:
                engine = self.new_engine("singleton")
                engine.script = str(self.singleton_state.path)
                self.singleton = engine
            fn = engine.compile(source, chunkname)
            try:
                with during(engine) if during is not None else contextlib.nullcontext():
                    return await engine.run(fn)
            finally:
                callbacks = self._callbacks(engine)
                if callbacks != self.singleton_state.callbacks:
                    log.info("%s: the singleton's callbacks are now %s", chunkname,
                             ", ".join(sorted(callbacks)) or "none")
                self.singleton_state.callbacks = callbacks

    # ------------------------------------------------------------------ events
    def defines(self, callback: str) -> bool:
        return callback in self.singleton_state.callbacks or callback in self.transient_state.callbacks

    def defines_any(self, callbacks: frozenset[str]) -> bool:
        """Whether any engine defines one of ``callbacks`` (one call for a layer with two hooks)."""
        return not (callbacks.isdisjoint(self.singleton_state.callbacks)
                    and callbacks.isdisjoint(self.transient_state.callbacks))

    def singleton_defines(self, callback: str) -> bool:
        return self.singleton is not None and callback in self.singleton_state.callbacks

    def transient_defines(self, callback: str) -> bool:
        return callback in self.transient_state.callbacks

    def transient_scope(self) -> TransientScope:
        return TransientScope(self)

    async def engines_for(self, callback: str, scope: TransientScope | None) -> list[tuple[LuaEngine, bool]]:
        """The engines that define ``callback``, singleton first; (engine, is_one_shot)."""
        engines: list[tuple[LuaEngine, bool]] = []
        if self.singleton is not None and callback in self.singleton_state.callbacks:
            engines.append((self.singleton, False))
        if callback in self.transient_state.callbacks:
            if scope is not None:
                engines.append((await scope.engine(), False))
            else:
                engines.append((await self.new_transient(), True))
        return engines

    async def dispatch(
        self, callback: str, *args: Any, scope: TransientScope | None = None, timeout_ms: int | None = None
    ) -> Dispatch:
        """Deliver an event: singleton, then transient, each only if its script defines it.

        Tables are converted per engine; edits made by one engine are seen by the next and come
        back in ``Dispatch.args``. A script error is logged and raised as :class:`LuaError`.
        """
        out = Dispatch(args=args)
        if not self.defines(callback):
            return out
        current = list(args)
        for engine, one_shot in await self.engines_for(callback, scope):
            try:
                lua_args = [engine.to_lua(a) for a in current]
                ret = await engine.call(callback, *lua_args, timeout_ms=timeout_ms)
                out.results.append(engine.from_lua(ret[0]) if ret else None)
                current = [
                    engine.from_lua(la) if isinstance(a, dict | list | tuple) else a
                    for a, la in zip(current, lua_args, strict=True)
                ]
            except LuaError as e:
                log.error("%s in %s engine failed: %s", callback, engine.name, e.traceback)
                raise
            finally:
                if one_shot:
                    engine.release()
        out.args = tuple(current)
        return out

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "script": str(s.path),
                "kind": kind,
                "present": s.mtime is not None,
                "loaded": s.loaded,
                "callbacks": sorted(s.callbacks),
                "error": s.error,
                "lastReload": s.reloaded,
            }
            for kind, s in (("singleton", self.singleton_state), ("transient", self.transient_state))
        ]


class TransientScope:
    """One transient engine for one request, association or upload, created on first use."""

    def __init__(self, scripts: ScriptSet) -> None:
        self._scripts = scripts
        self._engine: LuaEngine | None = None

    async def engine(self) -> LuaEngine:
        if self._engine is None:
            self._engine = await self._scripts.new_transient()
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.release()
            self._engine = None

    async def __aenter__(self) -> TransientScope:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> TransientScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Dispatch", "EngineOptions", "ScriptSet", "TransientScope"]
