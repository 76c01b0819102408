"""The Lua trust model (middleware/stdlib/sandbox.lua and the parts it loads): what a script can
reach of the standard library in the default and the full-library mode, that nothing of Python is
reachable, and that none of the known ways to escape the time budget works. The README's "Lua
trust model" table is this file's TABLE; the same attacks run through a real gateway in
tests/e2e/test_lua_sandbox.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomproxy_middleware import Export, LuaEngine, LuaError, LuaExportError, LuaTimeoutError, Watchdog
from dicomproxy_middleware.runtime import lupa


@pytest.fixture(scope="module")
def watchdog() -> Iterator[Watchdog]:
    wd = Watchdog(lupa)
    yield wd
    wd.stop()


def make_engine(tmp_path: Path, watchdog: Watchdog, *, full: bool = False, timeout_ms: int = 2000,
                exports: dict[str, Export] | None = None) -> LuaEngine:
    return LuaEngine("sandbox", timeout_ms=timeout_ms, max_memory_mb=128, watchdog=watchdog, full_libraries=full,
                     script_root=tmp_path, search_path=f"{tmp_path}/?.lua", hidden_env="DICOMPROXY__",
                     exports=exports or {}, globals={"Config": {"Section:Key": "value"}})


def run(engine: LuaEngine, code: str, timeout_ms: int | None = None) -> tuple[Any, ...]:
    return asyncio.run(engine.run(engine.compile(code, "script.lua"), timeout_ms=timeout_ms))


@pytest.fixture
def default_engine(tmp_path: Path, watchdog: Watchdog) -> Iterator[LuaEngine]:
    engine = make_engine(tmp_path, watchdog)
    yield engine
    engine.release()


@pytest.fixture
def full_engine(tmp_path: Path, watchdog: Watchdog) -> Iterator[LuaEngine]:
    engine = make_engine(tmp_path, watchdog, full=True)
    yield engine
    engine.release()


# --------------------------------------------------------------------------- the table
# (Lua expression, its value's type in the default mode, in full-library mode). The README's
# "Lua trust model" table says why for each.
TABLE = [
    ("python", "nil", "nil"),
    ("package.loaded.python", "nil", "nil"),
    ("os.execute", "nil", "function"),
    ("io", "nil", "table"),
    ("io and io.popen", "nil", "function"),
    ("os.exit", "nil", "function"),
    ("os.getenv", "nil", "function"),
    ("os.remove", "nil", "function"),
    ("os.rename", "nil", "function"),
    ("os.tmpname", "nil", "function"),
    ("os.setlocale", "nil", "nil"),
    ("os.time", "function", "function"),
    ("os.clock", "function", "function"),
    ("os.date", "function", "function"),
    ("os.difftime", "function", "function"),
    ("package.loadlib", "nil", "function"),
    ("package.searchpath", "nil", "function"),
    ("package.cpath", "nil", "string"),
    ("package.searchers", "nil", "table"),
    ("package.path", "string", "string"),
    ("package.loaded", "table", "table"),
    ("require", "function", "function"),
    ("dofile", "function", "function"),
    ("loadfile", "function", "function"),
    ("load", "function", "function"),
    ("string.dump", "nil", "function"),
    ("debug.sethook", "nil", "nil"),
    ("debug.gethook", "nil", "nil"),
    ("debug.getlocal", "nil", "nil"),
    ("debug.setlocal", "nil", "nil"),
    ("debug.getupvalue", "nil", "nil"),
    ("debug.setupvalue", "nil", "nil"),
    ("debug.upvaluejoin", "nil", "nil"),
    ("debug.getregistry", "nil", "nil"),
    ("debug.getmetatable", "nil", "nil"),
    ("debug.setmetatable", "nil", "nil"),
    ("debug.getuservalue", "nil", "nil"),
    ("debug.debug", "nil", "nil"),
    ("debug.traceback", "function", "function"),
    ("debug.getinfo", "function", "function"),
    ("collectgarbage", "function", "function"),
    ("string.find", "function", "function"),
    ("coroutine.create", "function", "function"),
    ("getmetatable('').__index == string", "boolean", "boolean"),
]


@pytest.mark.parametrize(("expr", "default", "full"), TABLE)
def test_the_standard_library_table(default_engine: LuaEngine, full_engine: LuaEngine, expr: str, default: str,
                                    full: str) -> None:
    assert run(default_engine, f"return type({expr})") == (default,), f"default mode: {expr}"
    assert run(full_engine, f"return type({expr})") == (full,), f"full-library mode: {expr}"


def test_os_getenv_in_full_mode_hides_the_gateways_secrets(full_engine: LuaEngine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMPROXY__Smtp__Password", "s3cret")
    monkeypatch.setenv("LT_VISIBLE", "yes")
    assert run(full_engine, "return os.getenv('DICOMPROXY__Smtp__Password'), os.getenv('dicomproxy__smtp__password'),"
                            " os.getenv('LT_VISIBLE')") == (None, None, "yes")
    (out,) = run(full_engine, "local f = io.popen('env') local t = f:read('a') f:close() return t")
    assert "LT_VISIBLE=yes" in out and "s3cret" not in out and "DICOMPROXY__" not in out


def test_files_in_the_default_mode_only_from_the_scripts_folder(tmp_path: Path, default_engine: LuaEngine) -> None:
    (tmp_path / "helper.lua").write_text("return 'helped'\n")
    (tmp_path / "mod.lua").write_text("return { name = ... }\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.lua"
    outside.write_text("return 'escaped'\n")
    assert run(default_engine, "return dofile('helper.lua'), loadfile('helper.lua')()") == ("helped", "helped")
    assert run(default_engine, f"return dofile('{tmp_path}/helper.lua')") == ("helped",)
    assert run(default_engine, "return require('mod').name") == ("mod",)
    for path in (str(outside), "../" + outside.name, f"{tmp_path}/../{outside.name}", "/etc/passwd"):
        ok, message = run(default_engine, f"return pcall(dofile, {path!r})")
        assert ok is False and "scripts folder" in message, path
        assert run(default_engine, f"return loadfile({path!r})")[0] is None
    # package.path is only a description: changing it does not change where require looks
    ok, message = run(default_engine, f"package.path = '{tmp_path.parent}/?.lua' return pcall(require, "
                                      f"{outside.stem!r})")
    assert ok is False and "not found" in message
    ok, message = run(default_engine, "return pcall(dofile)")
    assert ok is False and "standard input" in message


def test_chunks_are_text_only(default_engine: LuaEngine, full_engine: LuaEngine) -> None:
    bytecode = lupa.LuaRuntime(encoding=None).eval("string.dump(function() return 1 end)")
    for engine in (default_engine, full_engine):
        engine.globals.bytecode = bytecode
        fn, message = run(engine, "return load(bytecode)")
        assert fn is None and "binary" in message
        assert run(engine, "return load(bytecode, 'x', 'b')")[0] is None
        assert run(engine, "return load('return 40 + 2')()") == (42,)
        # a long source is parsed in pieces: same result
        assert run(engine, "return load(('x = 1 '):rep(20000) .. 'return x')()") == (1,)


def test_collector_and_finalizers(default_engine: LuaEngine) -> None:
    assert run(default_engine, "collectgarbage() collectgarbage('step') return collectgarbage('count') > 0, "
                               "collectgarbage('isrunning')") == (True, True)
    for option in ("stop", "restart", "generational", "incremental", "setpause", "setstepmul"):
        ok, message = run(default_engine, f"return pcall(collectgarbage, {option!r})")
        assert ok is False and "not available to scripts" in message
    ok, message = run(default_engine, "return pcall(setmetatable, {}, {__gc = function() end})")
    assert ok is False and "__gc" in message
    assert run(default_engine, "return getmetatable(setmetatable({}, {__index = {a = 1}})).__index.a") == (1,)


def test_print_is_a_log_line(default_engine: LuaEngine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dicomproxy_middleware.lua"):
        run(default_engine, "print('a', 1, nil, true)")
    assert "a\t1\tnil\ttrue" in caplog.text


def test_library_tables_behave_as_tables(default_engine: LuaEngine) -> None:
    (names,) = run(default_engine, "local t = {} for k in pairs(string) do t[#t + 1] = k end table.sort(t) "
                                   "return table.concat(t, ',')")
    assert "find" in names and "format" in names and "dump" not in names
    assert run(default_engine, "string.myhelper = function() return 'mine' end return ('x'):myhelper()") == ("mine",)
    assert run(default_engine, "local f = string.find return f('abc', 'b')") == (2, 2)


# --------------------------------------------------------------------------- nothing of Python
class Thing:
    secret = "s3cret"


ESCAPES = [
    "return python.as_attrgetter(Config).__class__",
    "return package.loaded.python.as_attrgetter(Config).__class__",
    "return Config.__class__.__mro__",
    "local ok, e = pcall(function() return Config[{}] end) return e.__traceback__.tb_frame.f_globals",
    "return Thing().__class__",
    "local t = Thing() return t.__init__.__globals__",
    "local t = Thing() return getmetatable(t).__index(t, '__class__')",
    "local t = Thing() return t.secret",
    "local t = Thing() t.secret = 'changed'",
    "return LogInfo.__globals__",
    "return debug.getinfo(1, 'f').func",
    "local co = coroutine.running() return coroutine.resume(co)",
    "return debug.getregistry()",
    "local f = debug.getupvalue(LogInfo, 2) return f",
]


@pytest.mark.parametrize("escape", ESCAPES)
def test_nothing_of_python_is_reachable(tmp_path: Path, watchdog: Watchdog, escape: str) -> None:
    """Each escape either fails (a Lua error: no such thing, or "Python attributes are not
    reachable") or returns nothing but plain Lua values: never a Python object or its data."""
    engine = make_engine(tmp_path, watchdog, exports={"Thing": Export(Thing), "LogInfo": Export(print)})
    try:
        try:
            result = run(engine, escape)
        except LuaError as e:
            assert "s3cret" not in e.traceback
            result = ()
    finally:
        engine.release()
    assert all(v is None or isinstance(v, bool | int | float | str) for v in result), f"{escape} gave {result!r}"
    assert "s3cret" not in repr(result)
    assert Thing.secret == "s3cret"


def test_a_global_metamethod_never_runs_outside_the_budget(default_engine: LuaEngine) -> None:
    """The gateway asks which callbacks a script defines, and calls them by name, on the main
    thread (no hook): a script's _G.__index must not run there."""
    run(default_engine, "setmetatable(_G, {__index = function() while true do end end})")
    started = time.monotonic()
    assert default_engine.defines("onNothing") is False
    with pytest.raises(LuaError):
        asyncio.run(default_engine.call("onNothing"))
    assert time.monotonic() - started < 1


# --------------------------------------------------------------------------- the budget holds
BUDGET_ESCAPES = {
    "debug.sethook removed": "pcall(debug.sethook) while true do end",
    "pcall": "while true do pcall(function() while true do end end) end",
    "xpcall with a looping handler": "while true do xpcall(error, function() while true do end end) end",
    "__close replacing the budget error": "while true do pcall(function() local x <close> = setmetatable({}, "
                                          "{__close = function() error('not the budget') end}) while true do end "
                                          "end) end",
    "coroutine.close": "while true do local co = coroutine.create(function() while true do end end) "
                       "pcall(coroutine.resume, co) coroutine.close(co) end",
    "coroutine.wrap in pcall": "while true do pcall(coroutine.wrap(function() while true do end end)) end",
    "error in a load reader": "while true do load(function() while true do end end) end",
    "error object with a looping __tostring": "error(setmetatable({}, {__tostring = function() while true do end "
                                              "end}))",
    "the worker coroutine": "local co = coroutine.running() while true do pcall(coroutine.resume, co) end",
    "table.move with C metamethods": "table.move(setmetatable({}, {__index = type}), 1, 2^40, 1, "
                                     "setmetatable({}, {__newindex = rawequal}))",
    "table.move over an empty range": "table.move({}, 1, 2^40, 1, {})",
    "table.insert with a huge __len": "table.insert(setmetatable({}, {__len = function() return 1 << 40 end, "
                                      "__index = type, __newindex = rawequal}), 1, 'x')",
    "table.remove with a huge __len": "table.remove(setmetatable({}, {__len = function() return 1 << 40 end, "
                                      "__index = type, __newindex = rawequal}), 1)",
    "table.concat with a C __index": "table.concat(setmetatable({}, {__index = type}), '', 1, 2^40)",
    "table.unpack with a C __index": "while true do table.unpack(setmetatable({}, {__index = type}), 1, 900000) end",
    "table.sort with a C comparator": "local t = {} for i = 1, 3e6 do t[i] = i end table.sort(t, rawequal)",
    "table.sort of long strings": "local s = ('x'):rep(2^20) local t = {} for i = 1, 2e5 do t[i] = s end "
                                  "t[1] = s:sub(1, -2) table.sort(t)",
    "string.rep of nothing": "string.rep('', 2^50)",
    "a huge chunk to load": "load(('local a = 1 '):rep(5e6))",
    "os.execute in full mode": "os.execute('sleep 10')",
    "io.popen in full mode": "io.popen('sleep 10'):read('a')",
}


@pytest.mark.parametrize("name", list(BUDGET_ESCAPES))
def test_no_script_outruns_its_budget(tmp_path: Path, watchdog: Watchdog, name: str) -> None:
    engine = make_engine(tmp_path, watchdog, full="mode" in name, timeout_ms=300)
    code = BUDGET_ESCAPES[name] + " while true do end"  # one that returned in time runs into the loop
    started = time.monotonic()
    try:
        with pytest.raises(LuaTimeoutError):
            run(engine, code)
    finally:
        elapsed = time.monotonic() - started
        engine.release()
    assert elapsed < 0.3 + 0.5, f"{name}: stopped after {elapsed:.2f} s"


# --------------------------------------------------------------------------- full-library mode
def test_full_mode_processes_do_not_block_the_loop(full_engine: LuaEngine) -> None:
    fn = full_engine.compile("local ok, kind, code = os.execute('sleep 0.5; exit 3') return ok, kind, code",
                             "script.lua")

    async def main() -> tuple[Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.get_running_loop().create_task(ticker())
        try:
            result = await full_engine.run(fn)
        finally:
            task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result == (None, "exit", 3)
    assert ticks >= 10, "the event loop was blocked while the program ran"
    assert run(full_engine, "return os.execute('true')") == (True, "exit", 0)
    assert run(full_engine, "return os.execute()") == (True,)


def test_full_mode_popen(full_engine: LuaEngine, tmp_path: Path) -> None:
    assert run(full_engine, "local f = io.popen('printf \"a\\\\nb\\\\n42\"') local a, b, n = f:read('l', 'l', 'n') "
                            "local ok, kind, code = f:close() return a, b, n, ok, kind, code, io.type(f)") == (
        "a", "b", 42, True, "exit", 0, "closed file")
    target = tmp_path / "written"
    assert run(full_engine, f"local f = io.popen('cat > {target}', 'w') f:write('hello', ' ', 1) return f:close()") \
        == (True, "exit", 0)
    assert target.read_text() == "hello 1"
    assert run(full_engine, "local t = {} for line in io.popen('printf \"x\\\\ny\\\\n\"'):lines() do t[#t + 1] = "
                            "line end return table.concat(t, ',')") == ("x,y",)


def test_full_mode_budget_ends_the_program(full_engine: LuaEngine) -> None:
    marker = f"lua-trust-{os.getpid()}-{time.monotonic_ns()}"
    started = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        run(full_engine, f"os.execute('sleep 30 # {marker}')", timeout_ms=300)
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and marker in os.popen("ps -eo args").read():
        time.sleep(0.05)
    assert marker not in os.popen("ps -eo args").read(), "the program outlived its call"


def test_the_private_program_exports_refuse_in_the_default_mode(default_engine: LuaEngine) -> None:
    """os.execute and io.popen are bound only in full-library mode, and no script reaches the
    private exports behind them; called anyway (as a way to them would), they refuse."""
    for name, args in (("_Shell", ("true",)), ("_Popen", ("true", "r", None))):
        export = default_engine.exports[name]
        with pytest.raises(LuaExportError, match="full-library mode only"):
            asyncio.run(export.func(default_engine, *args))
