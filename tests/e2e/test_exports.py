"""The system exports, called by scripts in a real gateway process (issue 2, item 6).

``Config``, ``requireNative``, ``OsExecute``, ``LogDebug``/``LogInfo``/``LogError`` and
``InternalCmdRun`` (``LuaBackgroundWorker`` is covered in test_engines.py). Each route of the
singleton script below exercises one export and writes what it saw into the response.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.observe import running_with_argument
from tests.peers import GatewayProcess, OrthancServer

MAIN = r"""
local function reply(r, ...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  r:ResponseWrite(table.concat(parts, "\n"))
  return true
end

function onHttpRequest(r)
  local p = r.Path
  if p == "/config" then
    local lines = {}
    for key in (r.Headers["x-keys"] .. ","):gmatch("([^,]*),") do
      lines[#lines + 1] = key .. "=" .. tostring(Config[key])
    end
    return reply(r, table.concat(lines, "\n"))
  elseif p == "/native" then
    local socket = requireNative("socket.core")
    local again = requireNative("socket.core")
    local now = socket.gettime()
    -- a real TCP exchange with Orthanc through the native module
    local port = tonumber(Config["Upstream:Url"]:match(":(%d+)$"))
    local c = socket.tcp()
    c:settimeout(5)
    assert(c:connect("127.0.0.1", port))
    c:send("GET /system HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    local status = c:receive("*l")
    c:close()
    local ok, err = pcall(requireNative, "no.such.module")
    return reply(r, type(socket), socket._VERSION, now > 1e9, again == socket, status, ok, err)
  elseif p == "/exec" then
    local code, out, err = OsExecute(r.Headers["x-cmd"], r.Headers["x-args"])
    return reply(r, code, out, err)
  elseif p == "/exec-pcall" then
    local ok, err = pcall(OsExecute, r.Headers["x-cmd"], r.Headers["x-args"])
    return reply(r, ok, err)
  elseif p == "/log" then
    local m = r.Headers["x-marker"]
    LogInfo("info {0} and {1} " .. m, "alpha", 42)
    LogInfo("named {User} did {Action} " .. m, "bob", "upload")
    LogError("error {0} " .. m, "bad")
    LogDebug("debug {0} " .. m, nil)
    LogInfo("literal {{braces}} {0} " .. m, "x", "extra")
    return reply(r, "logged")
  elseif p == "/cmd" then
    local help = InternalCmdRun("help")
    local names = {}
    for name, usage in pairs(help) do names[#names + 1] = name:lower() end
    table.sort(names)
    local ok, err = pcall(InternalCmdRun, "no-such-command", "")
    return reply(r, table.concat(names, ","), help["help"], ok, err)
  end
end
"""

TRANSIENT = r"""
function onHttpRequest(r)
  if r.Path == "/tlog" then
    LogInfo("from transient {0} " .. r.Headers["x-marker"], "t1")
    r:ResponseWrite("ok")
    return true
  end
end
"""

ENV = {"DICOMPROXY__ExtraConfig__FromEnv": "env-value"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[GatewayProcess]:
    if not orthanc.running:
        orthanc.start()
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("gw-exports"), orthanc=orthanc,
        settings={"Dicom": {"Port": 0}, "Lua": {"OsExecuteTimeoutSeconds": 1},
                  "ExtraConfig": {"Custom": "hello", "TusUploadFolder": "uploads/tus"}},
        scripts={"main.lua": MAIN, "main-transient.lua": TRANSIENT}, env=ENV,
    )
    gateway.start()
    yield gateway
    gateway.stop()


def lines(gw: GatewayProcess, path: str, **headers: str) -> list[str]:
    r = gw.get(path, headers={k.replace("_", "-"): v for k, v in headers.items()})
    assert r.status_code == 200, r.text
    return r.text.split("\n")


# --------------------------------------------------------------------------- Config
def test_config_paths_case_insensitive_config_root(gw: GatewayProcess, orthanc: OrthancServer) -> None:
    keys = ["ExtraConfig:TusUploadFolder", "extraconfig:tusuploadfolder", "EXTRACONFIG:TUSUPLOADFOLDER",
            "ConfigRoot", "configroot", "Upstream:Url", "ExtraConfig:Custom", "extraConfig:fromenv",
            "Lua:TimeoutMs", "Lua:OsExecuteTimeoutSeconds", "No:Such:Key"]
    got = dict(line.split("=", 1) for line in lines(gw, "/config", X_Keys=",".join(keys)))
    root = str(gw.config_path.parent)
    tus = str(gw.config_path.parent / "uploads" / "tus")  # relative: resolved against ConfigRoot
    assert got["ExtraConfig:TusUploadFolder"] == tus
    assert got["extraconfig:tusuploadfolder"] == got["EXTRACONFIG:TUSUPLOADFOLDER"] == tus
    assert got["ConfigRoot"] == got["configroot"] == root
    assert got["Upstream:Url"] == orthanc.http_url
    assert got["ExtraConfig:Custom"] == "hello"
    assert got["extraConfig:fromenv"] == "env-value"  # DICOMPROXY__ExtraConfig__FromEnv
    assert got["Lua:TimeoutMs"] == "5000" and got["Lua:OsExecuteTimeoutSeconds"] == "1"
    assert got["No:Such:Key"] == "nil"


# --------------------------------------------------------------------------- requireNative
def test_require_native_socket_core(gw: GatewayProcess) -> None:
    kind, version, now_ok, cached, status, ok, *err_lines = lines(gw, "/native")
    err = "\n".join(err_lines)
    assert kind == "table" and version.startswith("LuaSocket")
    assert now_ok == "true" and cached == "true"
    assert status.startswith("HTTP/1.") and " 200" in status  # it really talked TCP to Orthanc
    assert ok == "false" and "no.such.module" in err and "not found" in err and "Lua:NativePath" in err


# --------------------------------------------------------------------------- OsExecute
def test_os_execute_returns_code_stdout_stderr(gw: GatewayProcess) -> None:
    assert lines(gw, "/exec", X_Cmd="sh", X_Args="-c 'echo out; echo err >&2; exit 3'") == ["3", "out", "", "err", ""]
    assert lines(gw, "/exec", X_Cmd="echo", X_Args="'a  b' \"c d\" e") == ["0", "a  b c d e", "", ""]
    code, out, *err = lines(gw, "/exec", X_Cmd="ls", X_Args="/definitely/not/here")
    assert code != "0" and out == "" and "not/here" in "\n".join(err)


def test_os_execute_uses_no_shell(gw: GatewayProcess, tmp_path: Path) -> None:
    victim = tmp_path / "created-by-shell"
    args = f"hello $HOME; touch {victim} && echo pwned | cat > {victim} `id` $(id)"
    code, out, err, _ = lines(gw, "/exec", X_Cmd="echo", X_Args=args)
    assert code == "0" and err == ""
    assert out == f"hello $HOME; touch {victim} && echo pwned | cat > {victim} `id` $(id)"
    assert not victim.exists()
    # the command itself is a program name, not a shell line
    ok, err = lines(gw, "/exec-pcall", X_Cmd="echo hi; id", X_Args="")[:2]
    assert ok == "false" and "cannot run" in err


def test_os_execute_time_limit_kills_the_process(gw: GatewayProcess) -> None:
    seconds = f"7.{uuid.uuid4().int % 1000:03d}"
    started = time.monotonic()
    ok, err = lines(gw, "/exec-pcall", X_Cmd="sleep", X_Args=seconds)[:2]
    elapsed = time.monotonic() - started
    assert ok == "false"
    assert "ran past 1 s and was killed" in err and "Lua:OsExecuteTimeoutSeconds" in err
    assert 0.9 < elapsed < 3, elapsed
    assert running_with_argument(seconds) == [], "the timed-out process is still running"


# --------------------------------------------------------------------------- logging
def test_log_functions_fill_placeholders_and_name_engine_and_script(gw: GatewayProcess) -> None:
    marker = "m-" + uuid.uuid4().hex[:8]
    assert lines(gw, "/log", X_Marker=marker) == ["logged"]
    log = gw.wait_for_log(f"literal {{braces}} x {marker} extra")
    mine = [line for line in log.splitlines() if marker in line]
    assert any("INFO" in x and "dicomproxy.lua" in x and f"[singleton main.lua] info alpha and 42 {marker}" in x
               for x in mine), mine
    assert any(f"[singleton main.lua] named bob did upload {marker}" in x for x in mine), mine
    assert any("ERROR" in x and f"[singleton main.lua] error bad {marker}" in x for x in mine), mine
    assert any("DEBUG" in x and f"[singleton main.lua] debug nil {marker}" in x for x in mine), mine
    tmarker = "t-" + uuid.uuid4().hex[:8]
    assert gw.get("/tlog", headers={"X-Marker": tmarker}).text == "ok"
    log = gw.wait_for_log(f"from transient t1 {tmarker}")
    assert f"[transient main-transient.lua] from transient t1 {tmarker}" in log


# --------------------------------------------------------------------------- InternalCmdRun
def test_internal_cmd_run_help_and_unknown_command(gw: GatewayProcess) -> None:
    names, help_usage, ok, err = lines(gw, "/cmd")
    known = names.split(",")
    assert "help" in known
    assert help_usage.startswith("help")
    assert ok == "false"
    assert "unknown command 'no-such-command'" in err
    assert err.endswith("known commands: " + ", ".join(known)), err


def test_exports_are_listed_in_health(gw: GatewayProcess) -> None:
    exports = set(gw.get("/dicomproxy/health").json()["scripts"]["exports"])
    assert {"InternalCmdRun", "LogDebug", "LogError", "LogInfo", "LuaBackgroundWorker", "OsExecute"} <= exports
    assert os.path.isabs(gw.get("/dicomproxy/health").json()["scripts"]["scriptsRoot"])
