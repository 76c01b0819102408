"""ScriptSet's extra singleton scripts (Orthanc's ``LuaScripts``): order, later wins, reload, errors."""

from __future__ import annotations

from pathlib import Path

from dicomproxy_middleware import EngineOptions, ScriptSet


async def loaded(tmp_path: Path, *extra: str) -> ScriptSet:
    scripts = ScriptSet(tmp_path, options=EngineOptions(), reload_interval=0,
                        extra_singleton=tuple(tmp_path / e for e in extra), extra_setting="Orthanc:LuaScripts")
    await scripts.start()
    return scripts


async def which(scripts: ScriptSet) -> str:
    assert scripts.singleton is not None
    (answer,) = await scripts.singleton.call("Which")
    return answer.decode() if isinstance(answer, bytes) else str(answer)


async def test_extra_scripts_run_after_main_in_order_and_reload(tmp_path: Path) -> None:
    (tmp_path / "main.lua").write_text("function Which() return 'main' end\nfunction Main() end\n")
    (tmp_path / "a.lua").write_text("function Which() return 'a' end\nfunction OnlyA() end\n")
    (tmp_path / "b.lua").write_text("function Which() return 'b' end\n")
    scripts = await loaded(tmp_path, "a.lua", "b.lua")
    assert await which(scripts) == "b"
    assert {"Which", "Main", "OnlyA"} <= scripts.singleton_state.callbacks
    (tmp_path / "b.lua").write_text("function Which() return 'b, edited' end\n")
    await scripts.reload()
    assert await which(scripts) == "b, edited"
    (tmp_path / "main.lua").unlink()  # the extra scripts alone still make a singleton
    await scripts.reload()
    assert await which(scripts) == "b, edited" and "Main" not in scripts.singleton_state.callbacks
    (tmp_path / "a.lua").write_text("function Which( return end\n")
    await scripts.reload()
    assert scripts.singleton_state.error is not None and "a.lua:1:" in scripts.singleton_state.error
    assert await which(scripts) == "b, edited"  # the previous set is kept
    await scripts.stop()


async def test_a_missing_extra_script_is_named(tmp_path: Path) -> None:
    (tmp_path / "main.lua").write_text("x = 1\n")
    scripts = await loaded(tmp_path, "nope.lua")
    assert scripts.singleton is None
    expected = f"{tmp_path / 'nope.lua'}: cannot read: no such file (listed in Orthanc:LuaScripts)"
    assert scripts.singleton_state.error == expected
    await scripts.stop()
