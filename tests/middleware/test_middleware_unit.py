"""Fast in-process unit tests of ``middleware/`` (the reusable Lua runtime and ASGI middleware)
and of the small pure helpers of the gateway's exports. The same behaviours are tested through a
real gateway process in test_http_hooks.py, test_engines.py and test_robustness.py; these pin
down the pieces one at a time, without a network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dicomproxy_middleware import (
    Export,
    LuaEngine,
    LuaError,
    LuaExportError,
    LuaHttpMiddleware,
    LuaMemoryError,
    LuaTimeoutError,
    ScriptSet,
    check_header,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, Router

from dicomproxy.scripting.exports import ConfigView, format_message


# --------------------------------------------------------------------------- a tiny ASGI client
async def call(app: Any, method: str = "GET", path: str = "/", headers: list[tuple[str, str]] = (),
               body: bytes = b"", user: str | None = None,
               extensions: dict[str, Any] | None = None) -> tuple[int, list[tuple[str, str]], list[bytes]]:
    """Drive an ASGI app once; returns status, headers and the body messages as sent."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }
    if user is not None:
        scope["user"] = user
    if extensions is not None:
        scope["extensions"] = extensions
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    return start["status"], [(k.decode(), v.decode()) for k, v in start["headers"]], bodies


def hdr(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name.lower()), None)


class Calls:
    count = 0


def make_app(calls: Calls) -> Router:
    async def echo(request: Request) -> JSONResponse:
        calls.count += 1
        return JSONResponse({"headers": dict(request.headers), "body": (await request.body()).decode()},
                            headers={"X-App": "1"})

    async def stream(request: Request) -> StreamingResponse:
        calls.count += 1

        async def parts() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"part{i};".encode()

        return StreamingResponse(parts(), media_type="text/plain")

    return Router(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/stream", stream)])


async def scripts_for(tmp_path: Path, main: str | None = None, transient: str | None = None,
                      **options: Any) -> ScriptSet:
    if main is not None:
        (tmp_path / "main.lua").write_text(main)
    if transient is not None:
        (tmp_path / "main-transient.lua").write_text(transient)
    from dicomproxy_middleware import EngineOptions

    scripts = ScriptSet(tmp_path, options=EngineOptions(**options), reload_interval=0)
    await scripts.start()
    return scripts


# --------------------------------------------------------------------------- LuaHttpMiddleware
async def test_without_hooks_the_app_streams_untouched(tmp_path: Path) -> None:
    calls = Calls()
    scripts = await scripts_for(tmp_path, main="x = 1 -- defines no callback\n")
    app = LuaHttpMiddleware(make_app(calls), scripts)
    status, headers, bodies = await call(app, path="/stream")
    assert status == 200 and b"".join(bodies) == b"part0;part1;part2;part3;part4;"
    assert len([b for b in bodies if b]) == 5  # chunk by chunk, not buffered
    assert calls.count == 1


async def test_intercept_and_header_edits(tmp_path: Path) -> None:
    calls = Calls()
    scripts = await scripts_for(tmp_path, main=r"""
function onHttpRequest(r)
  if r.Path == "/blocked" then
    r:SetStatusCode(451)
    r:AddResponseHeader("X-Why", "policy")
    r:ResponseWrite("no " .. r.User)
    return true
  end
  r:AddHeader("X-From-Lua", r.Method)
  r.RemoveHeader("X-Drop")
end
""")
    app = LuaHttpMiddleware(make_app(calls), scripts)
    status, headers, bodies = await call(app, path="/blocked", user="carol")
    assert (status, b"".join(bodies), hdr(headers, "x-why")) == (451, b"no carol", "policy")
    assert calls.count == 0
    status, headers, bodies = await call(app, "POST", "/echo", [("X-Drop", "1"), ("X-Keep", "2")], b"data")
    import json

    seen = json.loads(b"".join(bodies))
    assert status == 200 and seen["body"] == "data"
    assert seen["headers"]["x-from-lua"] == "POST" and "x-drop" not in seen["headers"]
    assert seen["headers"]["x-keep"] == "2"


async def test_client_certificate_from_the_tls_extension(tmp_path: Path) -> None:
    scripts = await scripts_for(tmp_path, main=r"""
function onHttpRequest(r)
  r:ResponseWrite("[" .. r.ClientCertificate .. "]")
  return true
end
""")
    app = LuaHttpMiddleware(make_app(Calls()), scripts)
    tls = {"client_cert_name": "CN=ct-01,O=Radiology", "client_cert_chain": [], "tls_version": 0x0304}
    assert b"".join((await call(app, extensions={"tls": tls}))[2]) == b"[CN=ct-01,O=Radiology]"
    assert b"".join((await call(app, extensions={"tls": {**tls, "client_cert_name": None}}))[2]) == b"[]"
    assert b"".join((await call(app, extensions={"http.response.trailers": {}}))[2]) == b"[]"
    assert b"".join((await call(app))[2]) == b"[]"


async def test_response_hook_replaces_streamed_body(tmp_path: Path) -> None:
    scripts = await scripts_for(tmp_path, main=r"""
function onHttpResponse(res)
  if res.Path == "/stream" then
    res.StatusCode = 202
    res:AddHeader("X-Replaced", "yes")
    res:ResponseWrite("whole new body")
  end
end
""")
    app = LuaHttpMiddleware(make_app(Calls()), scripts)
    status, headers, bodies = await call(app, path="/stream")
    assert (status, b"".join(bodies)) == (202, b"whole new body")
    assert hdr(headers, "content-length") == "14" and hdr(headers, "x-replaced") == "yes"
    assert hdr(headers, "transfer-encoding") is None


@pytest.mark.parametrize("fail_open", [False, True])
async def test_script_error_is_500_or_fail_open(tmp_path: Path, fail_open: bool) -> None:
    calls = Calls()
    scripts = await scripts_for(tmp_path, main='function onHttpRequest(r)\n  error("nope")\nend\n')
    app = LuaHttpMiddleware(make_app(calls), scripts, fail_open=fail_open)
    status, headers, bodies = await call(app, path="/echo")
    if fail_open:
        assert status == 200 and calls.count == 1
    else:
        import json

        body = json.loads(b"".join(bodies))
        assert status == 500 and hdr(headers, "content-type") == "application/json"
        assert body["hook"] == "onHttpRequest" and body["message"] == f"{tmp_path / 'main.lua'}:2: nope"
        assert calls.count == 0


async def test_transient_state_does_not_leak_between_requests(tmp_path: Path) -> None:
    scripts = await scripts_for(tmp_path, transient=r"""
function onHttpRequest(r)
  r:ResponseWrite(tostring(seen))
  seen = true
  return true
end
""")
    app = LuaHttpMiddleware(make_app(Calls()), scripts)
    answers = [b"".join((await call(app, path="/echo"))[2]) for _ in range(5)]
    assert answers == [b"nil"] * 5


async def test_response_write_accepts_binary_data(tmp_path: Path) -> None:
    scripts = await scripts_for(tmp_path, main=r"""
function onHttpRequest(r)
  r:ResponseWrite("\255\254bin\0")
  return true
end
""")
    app = LuaHttpMiddleware(make_app(Calls()), scripts)
    status, _, bodies = await call(app, path="/bin")
    assert (status, b"".join(bodies)) == (200, b"\xff\xfebin\x00")


async def test_on_call_times_every_hook_and_callback_of_a_script_set(tmp_path: Path) -> None:
    from dicomproxy_middleware import EngineOptions

    (tmp_path / "main.lua").write_text("function onHttpRequest(r) r:AddHeader('X-A', '1') end\n"
                                       "function onThing() error('boom') end\n")
    (tmp_path / "main-transient.lua").write_text("function onHttpResponse(r) end\n")
    seen: list[tuple[str, float]] = []
    scripts = ScriptSet(tmp_path, options=EngineOptions(), reload_interval=0,
                        on_call=lambda callback, seconds: seen.append((callback, seconds)))
    await scripts.start()
    try:
        app = LuaHttpMiddleware(make_app(Calls()), scripts)
        assert (await call(app, path="/echo"))[0] == 200
        with pytest.raises(LuaError, match="boom"):
            await scripts.dispatch("onThing")
    finally:
        await scripts.stop()
    assert [c for c, _ in seen] == ["onHttpRequest", "onHttpResponse", "onThing"]  # a failed call too
    assert all(0 < s < 5 for _, s in seen)


# --------------------------------------------------------------------------- LuaEngine
async def test_async_exports_yield_so_calls_interleave() -> None:
    async def wait(ms: int) -> str:
        await asyncio.sleep(ms / 1000)
        return f"waited {ms}"

    engine = LuaEngine("t", exports={"Wait": Export(wait, is_async=True)})
    await engine.load("function f(ms) return Wait(ms) end\n"
                      "function g(ms) local co = coroutine.wrap(function() return Wait(ms) end) return co() end",
                      "unit.lua")
    started = time.monotonic()
    results = await asyncio.gather(*(engine.call("f", 200) for _ in range(5)), engine.call("g", 200))
    assert [r[0] for r in results] == ["waited 200"] * 6
    assert time.monotonic() - started < 0.6  # 6 x 200 ms overlapped, not 1.2 s in a row


async def test_budget_cannot_be_swallowed_by_pcall() -> None:
    engine = LuaEngine("t", timeout_ms=200)
    await engine.load("function spin() while true do pcall(function() while true do end end) end end\n"
                      "function ok() return 42 end", "spin.lua")
    started = time.monotonic()
    with pytest.raises(LuaTimeoutError, match=r"time budget of 200 ms \(timeout_ms\)"):
        await engine.call("spin")
    assert 0.15 < time.monotonic() - started < 1.5
    assert (await engine.call("ok")) == (42,)  # the engine is usable afterwards


async def test_awaiting_past_the_budget_is_a_timeout() -> None:
    engine = LuaEngine("t", timeout_ms=150, exports={"Sleep": Export(asyncio.sleep, is_async=True)})
    await engine.load("function f() Sleep(5) end", "sleep.lua")
    with pytest.raises(LuaTimeoutError):
        await engine.call("f")


async def test_memory_cap() -> None:
    engine = LuaEngine("t", max_memory_mb=8)
    await engine.load("function hog() local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(64) .. i end end\n"
                      "function ok() return 'fine' end", "hog.lua")
    with pytest.raises(LuaMemoryError, match=r"out of memory \(max_memory_mb\)"):
        await engine.call("hog")
    assert (await engine.call("ok")) == ("fine",)


async def test_errors_carry_file_and_line_and_export_errors_are_lua_errors() -> None:
    def fails(x: Any) -> None:
        raise LuaExportError(f"bad argument {x}")

    engine = LuaEngine("t", exports={"Fails": Export(fails)})
    with pytest.raises(LuaError, match=r"^broken\.lua:1: "):
        engine.compile("function (", "broken.lua")
    await engine.load("function f()\n  Fails('z')\nend\n"
                      "function g() local ok, e = pcall(Fails, 1) return e end", "calls.lua")
    with pytest.raises(LuaError, match=r"^calls\.lua:2: Fails: bad argument z$"):
        await engine.call("f")
    assert (await engine.call("g"))[0].endswith("Fails: bad argument 1")


@pytest.mark.parametrize(("name", "value", "ok"), [
    ("X-Fine", "value", True), ("X-Num", 5, True), ("X Bad", "v", False), ("X-Bad\r\n", "v", False),
    ("X-Bad", "a\r\nInjected: 1", False), ("X-Bad", "a\nb", False), ("X-Bad", "a\0b", False), ("X-Bad", None, False),
])
def test_check_header(name: str, value: Any, ok: bool) -> None:
    if ok:
        assert check_header(name, value) == (name, str(value))
    else:
        with pytest.raises(LuaExportError):
            check_header(name, value)


# --------------------------------------------------------------------------- export helpers
@pytest.mark.parametrize(("message", "args", "expected"), [
    ("plain", (), "plain"),
    ("{0} and {1}", ("a", 2), "a and 2"),
    ("{1} before {0}", ("a", "b"), "b before a"),
    ("{User} did {Action}", ("bob", "upload"), "bob did upload"),
    ("{0} again {0}", ("x",), "x again x"),
    ("{{literal}} {0}", ("v",), "{literal} v"),
    ("nil is {0}", (None,), "nil is nil"),
    ("extra", ("a", "b"), "extra a b"),
    ("{0:D4} formatted", (7,), "7 formatted"),
    ("missing {3}", ("a",), "missing {3} a"),
])
def test_format_message(message: str, args: tuple[Any, ...], expected: str) -> None:
    assert format_message(message, args) == expected


def test_config_view_is_case_insensitive() -> None:
    view = ConfigView({"ExtraConfig:TusUploadFolder": "/t", "ConfigRoot": "/c", "Lua:TimeoutMs": 5})
    assert view["ExtraConfig:TusUploadFolder"] == view["extraconfig:tusuploadfolder"] == "/t"
    assert view["CONFIGROOT"] == "/c" and view["lua:timeoutms"] == 5
    assert view["No:Such"] is None and view[3] is None


async def test_config_view_from_lua() -> None:
    engine = LuaEngine("t", globals={"Config": ConfigView({"ExtraConfig:TusUploadFolder": "/t"})})
    await engine.load("function f() return Config['extraconfig:TUSUPLOADFOLDER'], Config['Nope'] end", "c.lua")
    assert await engine.call("f") == ("/t", None)
