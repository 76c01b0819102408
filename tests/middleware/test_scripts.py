"""ScriptSet.execute (middleware/scripts.py): a chunk run in the singleton engine among its
globals (the gateway's /tools/execute-script), the callbacks it defines at once, until the next
reload; a blank singleton when there is no main.lua. Through a real gateway and Orthanc:
tests/e2e/test_execute_script.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomproxy_middleware import EngineOptions, LuaEngine, LuaError, LuaTimeoutError, ScriptSet


async def started(root: Path, main: str | None) -> ScriptSet:
    if main is not None:
        (root / "main.lua").write_text(main)
    scripts = ScriptSet(root, options=EngineOptions(timeout_ms=300), reload_interval=0)
    await scripts.start()
    return scripts


async def test_globals_and_callbacks_until_the_next_reload(tmp_path: Path) -> None:
    scripts = await started(tmp_path, "n = 1 function onA() return 'main' end")
    try:
        await scripts.execute("n = n + 1 function onB() return n end function onA() return 'exec' end", "x")
        assert scripts.defines("onA") and scripts.defines("onB")
        assert [r for r in (await scripts.dispatch("onA")).results] == ["exec"]
        assert (await scripts.dispatch("onB")).results == [2]
        (tmp_path / "main.lua").write_text("n = 1 function onA() return 'main' end -- edited")
        os.utime(tmp_path / "main.lua", (1, 1))  # (a different mtime, whatever the clock's resolution)
        await scripts.reload()
        assert not scripts.defines("onB") and (await scripts.dispatch("onA")).results == ["main"]
    finally:
        await scripts.stop()


async def test_without_a_main_lua(tmp_path: Path) -> None:
    scripts = await started(tmp_path, None)
    try:
        assert scripts.singleton is None and not scripts.defines("onA")
        await scripts.execute("function onA() return 'defined' end", "x")
        assert (await scripts.dispatch("onA")).results == ["defined"]
        await scripts.reload()  # still no main.lua: the blank singleton stays
        assert scripts.defines("onA")
    finally:
        await scripts.stop()


async def test_errors_budget_and_the_context_held_around(tmp_path: Path) -> None:
    scripts = await started(tmp_path, "")
    seen: list[str] = []

    @contextlib.contextmanager
    def during(engine: LuaEngine) -> Iterator[None]:
        seen.append(engine.name)
        try:
            yield
        finally:
            seen.append("out")

    try:
        with pytest.raises(LuaError, match="x:1: boom"):
            await scripts.execute("error('boom')", "x", during)
        with pytest.raises(LuaError, match="x:1:"):
            await scripts.execute("function (", "x", during)  # a syntax error: nothing ran
        with pytest.raises(LuaTimeoutError):
            await scripts.execute("while true do end", "x", during)
        assert seen == ["singleton", "out", "singleton", "out"]
        assert await scripts.execute("return 1, 'two'", "x") == (1, "two")
    finally:
        await scripts.stop()
