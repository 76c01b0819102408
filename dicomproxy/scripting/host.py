"""ScriptHost: the three engine types of the DicomProxy Lua API, wired to the gateway.

* singleton ``main.lua`` and transient ``main-transient.lua`` through :class:`middleware.ScriptSet`;
* background tasks: ``LuaBackgroundWorker`` queues a ``lua`` task; a worker runs it in a fresh
  engine (``main-task.lua`` unless another script is named) and calls its entry function.

All Lua runs on the event-loop thread. Other threads (the DICOM side) use
:meth:`dispatch_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dicomproxy_middleware import (
    Dispatch,
    EngineOptions,
    Export,
    LuaEngine,
    LuaError,
    LuaLibrary,
    ScriptSet,
    TransientScope,
    compile_chunk,
)

from dicomproxy import task_log
from dicomproxy.audit import codes as audit_codes
from dicomproxy.audit import events as audit_events
from dicomproxy.audit.trail import AuditTrail
from dicomproxy.commands import Commands
from dicomproxy.config.settings import ENV_PREFIX, Settings
from dicomproxy.notify.events import EventBus
from dicomproxy.scripting import exports
from dicomproxy.scripting.shared import (
    SHARED_DICT_LUA,
    AsyncSharedDictExports,
    AsyncSharedStore,
    MemoryStore,
    SharedDictExports,
    SharedStore,
)
from dicomproxy.tasks import Queue
from dicomproxy.uids import new_uid

log = logging.getLogger("dicomproxy.scripting")
MiB = 1 << 20


class ScriptHost:
    def __init__(
        self, settings: Settings, *, bus: EventBus, tasks: Queue, commands: Commands,
        audit: AuditTrail | None = None, on_call: Callable[[str, float], None] | None = None,
        shared: SharedStore | AsyncSharedStore | None = None,
    ) -> None:
        """``on_call(callback, seconds)``: the duration of every Lua callback, in every engine.
        ``shared``: the ``SharedDict`` backend (default: in this process's memory; several
        workers: :class:`~dicomproxy.scripting.shared_lmdb.LmdbStore`; replicas:
        :class:`~dicomproxy.scripting.shared_redis.RedisStore`, whose calls are awaited exports)."""
        self.settings = settings
        self.audit = audit
        self.bus = bus
        self.tasks = tasks
        self.commands = commands
        lua = settings.lua
        self.options = EngineOptions(
            timeout_ms=lua.timeout_ms, max_memory_mb=lua.max_memory_mb, native_path=lua.native_path,
            timeout_setting="Lua:TimeoutMs", memory_setting="Lua:MaxMemoryMB",
            full_libraries=lua.full_libraries, hidden_env=ENV_PREFIX,
        )
        self._loaded_hooks: list[Callable[[LuaEngine], Awaitable[None]]] = []
        self.scripts = ScriptSet(
            lua.scripts_root,
            globals={"Config": exports.ConfigView(settings.lua_config())},
            options=self.options,
            reload_interval=lua.reload_interval_ms / 1000.0,
            on_error=self._script_failed,
            on_loaded=self._singleton_loaded,
            on_changed=self._script_changed,
            libraries=(LuaLibrary("requireNative", exports.REQUIRE_NATIVE_LUA, ("requireNative",)),),
            on_call=on_call,
            extra_singleton=settings.orthanc.lua_scripts,
            extra_setting="Orthanc:LuaScripts",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.add_export("LogDebug", exports.log_debug, pass_engine=True)
        self.add_export("LogInfo", exports.log_info, pass_engine=True)
        self.add_export("LogError", exports.log_error, pass_engine=True)
        self.add_export(
            "OsExecute",
            functools.partial(exports.os_execute, timeout=lua.os_execute_timeout, hidden_env=ENV_PREFIX),
            is_async=True,
        )
        self.add_export("LuaBackgroundWorker", exports.background_worker(tasks, lua.scripts_root))
        self.add_export("InternalCmdRun", commands.run, is_async=True)
        self.add_export("NewUid", functools.partial(new_uid, settings.dicom.uid_root))
        self.shared = shared or MemoryStore(lua.shared_dict_max_keys, int(lua.shared_dict_max_mb * MiB))
        if inspect.iscoroutinefunction(self.shared.get):
            self._bind_shared_dict(AsyncSharedDictExports(self.shared), is_async=True)  # type: ignore[arg-type]
        else:
            self._bind_shared_dict(SharedDictExports(self.shared))  # type: ignore[arg-type]
        tasks.register("lua", self._run_task)

    # ------------------------------------------------------------------ setup
    def _bind_shared_dict(self, shared: SharedDictExports | AsyncSharedDictExports, is_async: bool = False) -> None:
        """``SharedDict`` in every engine: private exports and the Lua table of methods over them
        (awaited exports over Redis, as ``RestApiGet`` and ``HttpGet`` are: the engine yields)."""
        for name in ("get", "set", "add", "incr", "delete", "keys"):
            export = Export(getattr(shared, name), is_async=is_async, label=f"SharedDict:{name}")
            self.scripts.add_export(f"_Shared{name.capitalize()}", export)
        self.add_lua(SHARED_DICT_LUA, "SharedDict")

    def add_export(
        self, name: str, func: Callable[..., Any], *, is_async: bool = False, pass_engine: bool = False,
        raw: bool = False,
    ) -> None:
        """Make ``func`` a Lua global in every engine. Call before :meth:`start`."""
        self.scripts.add_export(name, Export(func, is_async=is_async, pass_engine=pass_engine, raw=raw))

    def add_loaded_hook(self, hook: Callable[[LuaEngine], Awaitable[None]]) -> None:
        """``await hook(engine)`` each time main.lua (re)loads, before the previous engine is closed."""
        self._loaded_hooks.append(hook)

    def add_lua(self, source: str, name: str) -> None:
        """Lua run in every engine after the exports are bound (helpers written in Lua); before start.
        ``name`` is for the error if it does not compile."""
        compile_chunk(source, name)  # one that does not compile fails here, by its name
        self.scripts.add_setup(source)

    def add_library(self, name: str, source: str, functions: tuple[str, ...]) -> None:
        """Lua functions (``source`` returns them in a table) that every engine has as globals,
        compiled in an engine on the first call of one of them; before start."""
        self.scripts.add_library(LuaLibrary(name, source, functions))

    async def _singleton_loaded(self, engine: LuaEngine) -> None:
        for hook in self._loaded_hooks:
            await hook(engine)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.settings.lua.scripts_root.mkdir(parents=True, exist_ok=True)
        await self.scripts.start()

    async def stop(self) -> None:
        await self.scripts.stop()

    def _script_changed(self, path: Path, what: str) -> None:
        """A script took effect (loaded at start, edited, removed): a Security Alert for the audit."""
        if self.audit is not None:
            self.audit.alert(audit_codes.SOFTWARE_CONFIGURATION, audit_events.script_file(str(path)),
                             f"Lua script {path} {what}", ok=what != "removed")

    def _script_failed(self, path: Path, message: str) -> None:
        if self.audit is not None:
            self.audit.alert(audit_codes.SOFTWARE_CONFIGURATION, audit_events.script_file(str(path)),
                             f"Lua script {path} edited but refused (the previous version stays): {message}")
        self.bus.emit("script.failed", f"Script failed to load: {path.name}", message, "/dicomproxy/ui",
                      script=str(path))

    async def execute(
        self, source: str | bytes, chunkname: str,
        during: Callable[[LuaEngine], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> tuple[Any, ...]:
        """Run ``source`` in the singleton engine, keeping its globals (``/tools/execute-script``);
        ``during(engine)`` is held around the run."""
        return await self.scripts.execute(source, chunkname, during)

    # ------------------------------------------------------------------ events
    def defines(self, callback: str) -> bool:
        return self.scripts.defines(callback)

    def transient_scope(self) -> TransientScope:
        return self.scripts.transient_scope()

    async def dispatch(
        self, callback: str, *args: Any, scope: TransientScope | None = None, timeout_ms: int | None = None
    ) -> Dispatch:
        return await self.scripts.dispatch(callback, *args, scope=scope, timeout_ms=timeout_ms)

    def dispatch_threadsafe(
        self, callback: str, *args: Any, scope: TransientScope | None = None, timeout: float | None = None
    ) -> Dispatch:
        """From a thread that is not the event loop's: run the dispatch on the loop and wait."""
        if not self.defines(callback):
            return Dispatch(args=args)
        if self._loop is None:
            raise RuntimeError("the script host is not started")
        future = asyncio.run_coroutine_threadsafe(self.dispatch(callback, *args, scope=scope), self._loop)
        wait = timeout if timeout is not None else self.settings.lua.timeout_ms / 1000.0 + 5.0
        return future.result(wait)

    def status(self) -> dict[str, Any]:
        scripts = self.scripts.status()
        task_script = self.settings.lua.scripts_root / exports.TASK_SCRIPT
        scripts.append({"script": str(task_script), "kind": "background", "present": task_script.is_file(),
                        "loaded": None, "callbacks": [], "error": None, "lastReload": None})
        return {
            "scriptsRoot": str(self.settings.lua.scripts_root),
            "scripts": scripts,
            "lastError": next((s["error"] for s in scripts if s.get("error")), None),
            "exports": sorted(name for name in self.scripts.exports if not name.startswith("_")),
        }

    async def check(self) -> list[dict[str, Any]]:
        """``dicomproxy check``: load every ``*.lua`` of the scripts folder in a fresh engine, the
        way the gateway would; ``[{"script", "ok", "error"}]`` (the error as ``file:line: message``)."""
        root = self.settings.lua.scripts_root
        results: list[dict[str, Any]] = []
        for path in sorted(root.glob("*.lua")):
            engine = self.new_engine("check")
            try:
                await engine.load(await asyncio.to_thread(path.read_bytes), str(path))
                results.append({"script": str(path), "ok": True, "error": None})
            except LuaError as e:
                results.append({"script": str(path), "ok": False, "error": str(e)})
            except OSError as e:
                results.append({"script": str(path), "ok": False, "error": f"{path}: cannot read: {e.strerror}"})
            finally:
                engine.release()
        return results

    # ------------------------------------------------------------------ background engines
    def new_engine(self, name: str) -> LuaEngine:
        return self.scripts.new_engine(name)

    async def _run_task(self, args: dict[str, Any]) -> Any:
        path = Path(args["script"])
        engine = self.new_engine("background")
        engine.timeout_setting = "Lua:TaskTimeoutMs"
        lines = task_log.current()  # what the script prints or logs goes with the task (bounded there)
        if lines is not None:
            engine.output = lines.add
        try:
            try:
                source = await asyncio.to_thread(path.read_bytes)
            except OSError as e:
                raise RuntimeError(f"{path}: cannot read the task script: {e.strerror}") from None
            await engine.load(source, str(path))
            entry = args["entry"]
            if not engine.defines(entry):
                raise RuntimeError(f"{path}: defines no function {entry!r}")
            budget = self.settings.lua.task_timeout_ms
            ret = await engine.call(entry, engine.to_lua(args.get("args")), timeout_ms=budget)
            return engine.from_lua(ret[0]) if ret else None
        except LuaError as e:
            log.error("background task %s failed: %s", path.name, e.traceback)
            if lines is not None:
                lines.add("error", str(e.traceback or e))
            raise RuntimeError(str(e)) from None
        finally:
            engine.output = None
            engine.release()
