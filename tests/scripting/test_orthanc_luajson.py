"""Orthanc's DumpJson / ParseJson / PrintRecursive / print semantics, in a real Lua 5.4 engine
with the Orthanc layer's exports and Lua shim (no peers needed for pure functions)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from dicomproxy_middleware import Export, LuaEngine, LuaLibrary

from dicomproxy.scripting.orthanc import LUA_SHIM, SHIM_FUNCTIONS
from dicomproxy.scripting.orthanc.execute_script import LuaPrinter
from dicomproxy.scripting.orthanc.luajson import dump_json, lua_tonumber, lua_tostring, parse_json, print_recursive


@pytest.fixture
def engine() -> Any:
    calls: list[tuple[Any, ...]] = []

    async def rest(*args: Any) -> bytes:
        calls.append(args)
        return b"\x00\xffanswer"

    async def http(engine: LuaEngine, *args: Any) -> None:
        calls.append(args)

    e = LuaEngine(
        "test",
        exports={
            "DumpJson": Export(dump_json, pass_engine=True, raw=True),
            "PrintRecursive": Export(print_recursive, pass_engine=True, raw=True),
            "_OrthancParseJson": Export(parse_json),
            "_OrthancPrint": Export(LuaPrinter(), pass_engine=True),
            "_OrthancRestApi": Export(rest, is_async=True),
            "_OrthancHttp": Export(http, is_async=True, pass_engine=True),
        },
        libraries=(LuaLibrary("orthanc", LUA_SHIM, SHIM_FUNCTIONS),),
    )
    e.calls = calls
    yield e
    e.close()


async def run(engine: LuaEngine, source: str) -> Any:
    await engine.load(f"result = (function() {source} end)()", "test.lua")
    return engine.globals.result


@pytest.mark.parametrize(
    ("lua", "expected"),
    [
        ("{}", "[]"),
        ("{1, 2, 3}", "[1,2,3]"),
        ("{'00123', ' 0x1A ', '1e3', '1.5', 'abc', '', 'inf'}", '[123,26,1000,1.5,"abc","","inf"]'),
        ("{b = true, a = 2.0, c = {x = {}}}", '{"a":2,"b":true,"c":{"x":[]}}'),
        ("{[1] = 'a', [3] = 'c'}", '{"1":"a","3":"c"}'),
        ("{n = 1/0}", '{"n":null}'),
        ("{f = print}", '{"f":null}'),
    ],
)
async def test_dump_json(engine: LuaEngine, lua: str, expected: str) -> None:
    assert await run(engine, f"return DumpJson({lua})") == expected


async def test_dump_json_keep_strings_writes_numbers_as_strings(engine: LuaEngine) -> None:
    out = await run(engine, "return DumpJson({id = '00123', n = 1, f = 2.0, b = false, t = {1}}, true)")
    assert json.loads(out) == {"id": "00123", "n": "1", "f": "2.0", "b": False, "t": ["1"]}


async def test_parse_json(engine: LuaEngine) -> None:
    out = await run(engine, """
      local t = ParseJson('{"a":[1,null,3],"s":"x","n":null,"f":1.0,"big":123456789012345678901234}')
      return table.concat({#t.a, t.a[3], t.s, tostring(t.n), math.type(t.f), math.type(t.big),
                           tostring(ParseJson('nope')), tostring(ParseJson(nil)),
                           tostring(ParseJson(string.char(255)))}, ',')
    """)
    assert out == "1,3,x,nil,float,float,nil,nil,nil"


async def test_binary_bodies_cross_intact(engine: LuaEngine) -> None:
    body = bytes(range(256))
    engine.globals.body = body
    out = await run(engine, "local r = RestApiPost('/instances', body) return #r .. ':' .. r:byte(2)")
    method, uri, data, latin1, headers = engine.calls[-1]
    assert (method, uri, latin1) == ("POST", "/instances", True)
    assert data.encode("latin-1") == body  # every byte, exactly
    assert out == "8:255"  # binary answers reach Lua intact
    await run(engine, "return HttpPut('http://x/', 'héllo', {A = 'b'})")
    assert engine.calls[-1] == ("PUT", "http://x/", "héllo", False, {"A": "b"})


async def test_print_and_print_recursive_log(engine: LuaEngine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dicomproxy.lua"):
        await run(engine, "print('a', 1, nil, true) PrintRecursive({x = {y = 'z'}})")
    text = caplog.text
    assert "Lua says: a, 1, nil, true" in text
    assert "table\n[x] table\n[x]  [y] string z" in text


@pytest.mark.parametrize(
    ("text", "value"),
    [("12", 12), (" -7 ", -7), ("0x10", 16), ("0xffffffffffffffff", -1), ("1e2", 100.0), (".5", 0.5),
     ("5.", 5.0), ("0x1p4", 16.0), ("99999999999999999999", 1e20), ("inf", None), ("nan", None), ("1 2", None),
     ("", None), ("abc", None)],
)
def test_lua_tonumber(text: str, value: Any) -> None:
    assert lua_tonumber(text) == value


def test_lua_tostring() -> None:
    assert [lua_tostring(v) for v in (1, 2.0, 1.5, 1e20, None, True)] == ["1", "2.0", "1.5", "1e+20", "nil", "true"]
