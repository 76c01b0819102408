"""``POST /tools/execute-script`` through a real gateway, against a real Orthanc with
``ExecuteLuaEnabled`` (issue 11, item 12): the same scripts give the same answers (what ``print``
wrote; Orthanc's JSON error), the body runs in the singleton engine and keeps its globals, a
callback it defines takes effect at once and lasts until main.lua is reloaded, only admins may
(and nobody without authentication unless the site says so), every run is logged with its user,
the time budget and the sandbox hold; with the switch off the route goes to the PACS."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.peers import OrthancServer, wait_until

PATH = "/tools/execute-script"
ADMIN = ("boss", "b0ss-pw")
VIEWER = ("eve", "eve-pw")
USERS = {"Authentication": {"Users": {ADMIN[0]: {"Password": ADMIN[1], "Roles": ["admin"]},
                                      VIEWER[0]: {"Password": VIEWER[1], "Roles": ["viewer"]}}}}
MAIN = """
function onHttpRequest(r)
  if r.Path == "/hello" then r:ResponseWrite("from main.lua") return true end
end
"""
# (script, the same answer from Orthanc and the gateway); run in this order, in one context
SAME = [
    ("print(42)", "42\n"),
    ("print(1, 'a', nil) print('x')", "1, a, nil\nx\n"),
    ("x = 5", ""),
    ("print(x)", "5\n"),
    ("return 3", ""),
    ("", ""),
]


@pytest.fixture
def lua_orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    return orthanc_factory(extra_config={"ExecuteLuaEnabled": True})


def post(url: str, body: str, auth: tuple[str, str] | None = ADMIN) -> requests.Response:
    return requests.post(url + PATH, data=body.encode(), auth=auth, timeout=30)


def hello(gw: Any) -> requests.Response:
    return gw.get("/hello", auth=VIEWER)


def test_the_gateway_answers_as_orthanc_does(gateway_factory: Any, lua_orthanc: OrthancServer) -> None:
    gw = gateway_factory({"Dicom": {"Port": 0}, "Orthanc": {"ExecuteLuaEnabled": True}, **USERS},
                         {"main.lua": MAIN}, orthanc=lua_orthanc)
    orthanc_url = f"http://{lua_orthanc.host}:{lua_orthanc.http_port}"
    for script, expected in SAME:
        direct = post(orthanc_url, script, auth=None)
        through = post(gw.url, script)
        assert (direct.status_code, direct.text) == (200, expected), script
        assert (through.status_code, through.text) == (200, expected), script
        assert through.headers["content-type"].startswith("text/plain")
    for script, detail in (("error('boom')", "boom"), ("function f(", "expected near <eof>")):
        direct, through = post(orthanc_url, script, auth=None), post(gw.url, script)
        assert direct.status_code == through.status_code == 500, script
        d, t = direct.json(), through.json()
        assert {k: t[k] for k in ("Message", "HttpStatus", "OrthancError", "OrthancStatus", "Uri", "Method")} == \
            {k: d[k] for k in ("Message", "HttpStatus", "OrthancError", "OrthancStatus", "Uri", "Method")}
        assert detail in d["Details"] and detail in t["Details"] and "execute-script:1:" in t["Details"], t
    assert requests.get(gw.url + PATH, auth=ADMIN, timeout=10).status_code == 405
    assert requests.get(orthanc_url + PATH, timeout=10).status_code == 405
    assert gw.wait_for_log(f"execute-script by {ADMIN[0]} from 127.0.0.1")
    assert "print(42)" not in gw.log_text()  # the size and digest are logged, not the text


def test_a_callback_it_defines_takes_effect_until_the_next_reload(gateway_factory: Any) -> None:
    gw = gateway_factory({"Dicom": {"Port": 0}, "Orthanc": {"ExecuteLuaEnabled": True}, **USERS}, {"main.lua": MAIN})
    assert hello(gw).text == "from main.lua"
    r = post(gw.url, 'count = 0 function onHttpRequest(r) if r.Path == "/hello" then count = count + 1 '
                     'r:ResponseWrite("from execute-script " .. count) return true end end')
    assert r.status_code == 200, r.text
    assert hello(gw).text == "from execute-script 1"
    assert post(gw.url, "print(count)").text == "1\n"  # the same globals: the singleton's
    assert hello(gw).text == "from execute-script 2"
    gw.write_script("main.lua", MAIN + "\n-- edited\n")
    wait_until(lambda: hello(gw).text == "from main.lua", timeout=15, what="main.lua to be reloaded")


def test_callbacks_without_a_main_lua(gateway_factory: Any) -> None:
    gw = gateway_factory({"Dicom": {"Port": 0}, "Orthanc": {"ExecuteLuaEnabled": True}, **USERS})
    assert hello(gw).status_code == 404  # no script: Orthanc answers
    assert post(gw.url, 'function onHttpRequest(r) if r.Path == "/hello" then r:ResponseWrite("hi") '
                        'return true end end').status_code == 200
    assert hello(gw).text == "hi"


def test_only_admins_and_not_anonymous(gateway_factory: Any) -> None:
    gw = gateway_factory({"Dicom": {"Port": 0}, "Orthanc": {"ExecuteLuaEnabled": True}, **USERS})
    assert post(gw.url, "print(1)", auth=VIEWER).status_code == 403
    assert post(gw.url, "print(1)", auth=None).status_code == 401
    open_gw = gateway_factory({"Dicom": {"Port": 0}, "Orthanc": {"ExecuteLuaEnabled": True}})
    r = post(open_gw.url, "print(1)", auth=None)
    assert r.status_code == 403 and "Orthanc:ExecuteLuaAllowAnonymous" in r.json()["error"], r.text
    anon_gw = gateway_factory({"Dicom": {"Port": 0},
                               "Orthanc": {"ExecuteLuaEnabled": True, "ExecuteLuaAllowAnonymous": True}})
    assert post(anon_gw.url, "print(1)", auth=None).text == "1\n"
    assert anon_gw.wait_for_log("execute-script by anonymous")


def test_budget_sandbox_and_size(gateway_factory: Any) -> None:
    gw = gateway_factory({"Dicom": {"Port": 0}, "Orthanc": {"ExecuteLuaEnabled": True}, "Lua": {"TimeoutMs": 300},
                          **USERS})
    started = time.monotonic()
    r = post(gw.url, "while true do end")
    assert r.status_code == 500 and "Lua:TimeoutMs" in r.json()["Details"], r.text
    assert time.monotonic() - started < 0.3 + 1.0
    r = post(gw.url, "os.execute('true')")
    assert r.status_code == 500 and "attempt to call a nil value (field 'execute')" in r.json()["Details"], r.text
    r = post(gw.url, "print(python)")
    assert r.text == "nil\n"
    assert post(gw.url, "-- " + "x" * (1 << 20)).status_code == 413
    assert gw.get("/dicomproxy/health").status_code == 200


def test_off_the_route_goes_to_the_pacs(gateway_factory: Any, lua_orthanc: OrthancServer) -> None:
    gw = gateway_factory({"Dicom": {"Port": 0}}, {"main.lua": "function onHttpRequest(r) end\n"}, orthanc=lua_orthanc)
    r = post(gw.url, "print('from', 'orthanc')", auth=None)
    assert (r.status_code, r.text) == (200, "from, orthanc\n")
    assert "execute-script by" not in gw.log_text()
