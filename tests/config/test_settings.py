"""The ``appsettings.json`` rules (issue 2, item 2; issue 9, item 1).

Colon key paths, case-insensitive keys, ``DICOMPROXY__Section__Key`` environment overrides,
``--config PATH``, ``ConfigRoot`` and relative paths resolved against it; a malformed file or a
wrong-typed value stops start-up with exit code 2 and ONE line naming the file, the key and
what was expected. Fast in-process checks of :func:`load_settings`, then the same rules through
``dicomproxy serve`` as a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicomproxy.config.settings import ConfigError, load_settings
from tests.peers import REPO_ROOT, GatewayProcess, OrthancServer, free_port


def write_config(folder: Path, data: Any, name: str = "appsettings.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


# --------------------------------------------------------------------------- in-process
def test_colon_paths_and_case_insensitive_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"upstream": {"URL": "http://pacs.example:9000/", "readtimeoutseconds": 7},
                                   "LUA": {"timeoutms": 1234}, "ExtraConfig": {"Custom": {"Deep": "yes"}}})
    s = load_settings(path, environ={})
    assert s.upstream.url == "http://pacs.example:9000"  # trailing slash dropped
    assert s.upstream.read_timeout == 7.0 and s.lua.timeout_ms == 1234
    assert s.tree["Upstream:Url"] == s.tree["UPSTREAM:url"] == "http://pacs.example:9000"  # the effective value
    assert s.tree["extraconfig:custom:deep"] == "yes"
    assert s.tree["Lua:MaxMemoryMB"] == 64  # defaults fill in what the file leaves out
    assert "Upstream:Nope" not in s.tree and s.tree.get("Upstream:Nope", "dflt") == "dflt"
    flat = s.lua_config()
    assert flat["ConfigRoot"] == str(tmp_path)
    assert {k.lower(): v for k, v in flat.items()}["extraconfig:custom:deep"] == "yes"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"Upstream": {"Url": "http://from-file:1"}, "Lua": {"TimeoutMs": 100}})
    environ = {
        "DICOMPROXY__Upstream__Url": "http://from-env:2",
        "dicomproxy__lua__TIMEOUTMS": "250",  # prefix and keys are case-insensitive
        "DICOMPROXY__Lua__FailOpen": "true",
        "DICOMPROXY__Authentication__Users__carol": "pw",
        "DICOMPROXY__Dicom__Upstream__Port": "11113",
        "OTHER__Upstream__Url": "http://ignored:3",
    }
    s = load_settings(path, environ=environ)
    assert s.upstream.url == "http://from-env:2"
    assert s.lua.timeout_ms == 250 and s.lua.fail_open is True
    assert s.users == {"carol": "pw"}
    assert s.dicom.upstream.port == 11113 and s.dicom.upstream.aet == "ORTHANC"
    assert load_settings(path, environ={}).upstream.url == "http://from-file:1"


def test_config_root_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "dicomproxy"
    path = write_config(conf, {"ExtraConfig": {"ScriptsRoot": "scripts", "DataFolder": "../var",
                                               "TusUploadFolder": str(tmp_path / "abs-tus")},
                               "Dicom": {"SpoolFolder": "spool"}})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(path, environ={})
    assert s.config_file == path and s.config_root == conf
    assert s.lua.scripts_root == conf / "scripts"
    assert s.data_folder == (tmp_path / "etc" / "var")
    assert s.tus.upload_folder == tmp_path / "abs-tus"  # absolute stays absolute
    assert s.dicom.spool_folder == conf / "spool"
    assert s.lua_config()["ConfigRoot"] == str(conf)
    # a relative --config is relative to the working directory
    monkeypatch.chdir(tmp_path)
    assert load_settings("etc/dicomproxy/appsettings.json", environ={}).config_root == conf


def test_default_file_is_appsettings_json_in_the_working_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, environ={})
    assert s.config_file is None and s.config_root == tmp_path and s.port == 8080
    write_config(tmp_path, {"Urls": "http://127.0.0.1:9999"})
    s = load_settings(None, environ={})
    assert s.config_file == tmp_path / "appsettings.json" and s.port == 9999


@pytest.mark.parametrize(("data", "key", "expected"), [
    ({"Lua": {"TimeoutMs": "soon"}}, "Lua:TimeoutMs", "expected an integer, got 'soon'"),
    ({"Lua": {"TimeoutMs": 0}}, "Lua:TimeoutMs", "expected an integer >= 1"),
    ({"lua": {"failopen": "maybe"}}, "Lua:FailOpen", "expected true or false"),
    ({"Upstream": {"Url": "ftp://pacs"}}, "Upstream:Url", "expected an http(s) URL"),
    ({"Upstream": {"ReadTimeoutSeconds": True}}, "Upstream:ReadTimeoutSeconds", "expected a number"),
    ({"Authentication": {"Users": ["alice"]}}, "Authentication:Users", "expected an object"),
    ({"Authentication": {"Users": {"alice": 5}}}, "Authentication:Users:alice", "expected a password string"),
    ({"Urls": "somewhere"}, "Urls", "expected http(s)://HOST:PORT"),
    ({"Tus": {"ExpireAfter": "forever"}}, "Tus:ExpireAfter", "expected seconds or a time span"),
    ({"Dicom": {"Modalities": {"pacs": {"Aet": "X"}}}}, "Dicom:Modalities:pacs",
     "expected an object with Aet, Host and Port"),
    ({"Dicom": {"Upstream": "nope"}}, "Dicom:Upstream", "expected a JSON object"),
])
def test_wrong_typed_value_names_file_key_and_expectation(tmp_path: Path, data: Any, key: str,
                                                          expected: str) -> None:
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: ") and expected in message, message


def test_malformed_file_names_file_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, '{\n  "Urls": "http://127.0.0.1:1",\n  "Lua": {"TimeoutMs": 5,}\n}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value).startswith(f"{path}:3:") and "not valid JSON" in str(info.value)
    top = write_config(tmp_path, "[1, 2]", "array.json")
    with pytest.raises(ConfigError, match="expected a JSON object at the top level"):
        load_settings(top, environ={})


# --------------------------------------------------------------------------- real process
def serve(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 30) -> \
        subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMPROXY__")}
    clean["PYTHONPATH"] = str(REPO_ROOT)
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "dicomproxy", "serve", *args], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("content", "env", "must_contain"), [
    ('{"Urls": "http://127.0.0.1:1",\n "Lua": {"TimeoutMs": }}', {}, ["{path}:2:", "not valid JSON"]),
    ({"Lua": {"TimeoutMs": "soon"}}, {}, ["{path}: Lua:TimeoutMs: expected an integer, got 'soon'"]),
    ({"Upstream": {"Url": "pacs:8042"}}, {}, ["{path}: Upstream:Url: expected an http(s) URL"]),
    ({}, {"DICOMPROXY__Lua__MaxMemoryMB": "lots"},
     ["environment DICOMPROXY__Lua__MaxMemoryMB: Lua:MaxMemoryMB: expected an integer, got 'lots'"]),
    ({"Dicom": {"AllowedCallingAet": ["CT1"]}}, {},
     ["{path}: Dicom:AllowedCallingAet: unknown key; did you mean Dicom:AllowedCallingAets?"]),
], ids=["malformed", "wrong-type", "bad-url", "bad-env", "typo"])
def test_serve_refuses_a_bad_config_with_exit_2_and_one_line(tmp_path: Path, content: Any, env: dict[str, str],
                                                             must_contain: list[str]) -> None:
    path = write_config(tmp_path / "conf", content)
    proc = serve(["--config", str(path)], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for text in must_contain:
        assert text.format(path=path) in lines[0], lines[0]
    assert proc.stdout == ""


def test_serve_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = serve(["--config", str(tmp_path / "nope.json")], cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.json" in lines[0] and "does not exist" in lines[0]


CONFIG_SCRIPT = r"""
function onHttpRequest(r)
  if r.Path == "/cfg" then
    local out = {}
    for _, k in ipairs({"ConfigRoot", "ExtraConfig:ScriptsRoot", "ExtraConfig:TusUploadFolder",
                        "Upstream:Url", "Lua:TimeoutMs", "ExtraConfig:Site"}) do
      out[#out + 1] = k .. "=" .. tostring(Config[k])
    end
    r:ResponseWrite(table.concat(out, "\n"))
    return true
  end
end
"""


def test_rules_through_a_real_gateway(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> None:
    """Config in a sub-folder (not the working directory), odd key case, relative paths, env."""
    if not orthanc.running:
        orthanc.start()
    dead = f"http://127.0.0.1:{free_port()}"
    gw = GatewayProcess(tmp_path_factory.mktemp("gw-config"), settings={
        "dicom": {"port": 0},
        "UPSTREAM": {"url": dead},  # overridden by the environment below
        "extraconfig": {"scriptsroot": "lua-rel", "TUSUPLOADFOLDER": "up/tus", "datafolder": "var"},
        "lua": {"timeoutms": 321},
    }, env={"DICOMPROXY__Upstream__Url": orthanc.http_url, "DICOMPROXY__ExtraConfig__Site": "from-env"})
    conf_dir = gw.workdir / "conf"
    conf_dir.mkdir()
    gw.config_path = conf_dir / "appsettings.json"  # --config points away from the working directory
    gw._write_config()
    (conf_dir / "lua-rel").mkdir()
    (conf_dir / "lua-rel" / "main.lua").write_text(CONFIG_SCRIPT)
    try:
        gw.start()
        got = dict(line.split("=", 1) for line in gw.get("/cfg").text.splitlines())
        assert got == {
            "ConfigRoot": str(conf_dir),
            "ExtraConfig:ScriptsRoot": str(conf_dir / "lua-rel"),
            "ExtraConfig:TusUploadFolder": str(conf_dir / "up" / "tus"),
            "Upstream:Url": orthanc.http_url,
            "Lua:TimeoutMs": "321",
            "ExtraConfig:Site": "from-env",
        }
        assert gw.get("/system").json()["DicomAet"] == orthanc.aet  # the env's upstream is the one used
        assert (conf_dir / "var").is_dir() and not (gw.workdir / "var").exists()
    finally:
        gw.stop()
