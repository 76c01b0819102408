"""``dicomproxy serve | check | --version`` as real processes (issue 2, item 3)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import requests

import dicomproxy
from dicomproxy.config.model import Settings
from dicomproxy.config.schema import defaults
from tests.peers import REPO_ROOT, OrthancServer, free_port, wait_until


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMPROXY__")}
    clean["PYTHONPATH"] = str(REPO_ROOT)
    return clean


def run(*args: str, cwd: Path = REPO_ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomproxy", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def console_script() -> str:
    """The installed ``dicomproxy`` entry point (pyproject [project.scripts])."""
    for candidate in (Path(sys.executable).parent / "dicomproxy", REPO_ROOT / ".venv" / "bin" / "dicomproxy"):
        if candidate.is_file():
            return str(candidate)
    pytest.fail("the dicomproxy console script is not installed: run scripts/install.sh (pip install -e .)",
                pytrace=False)
    raise AssertionError("unreachable")


def test_version() -> None:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dicomproxy.__version__ == version
    proc = run("--version")
    assert (proc.returncode, proc.stdout) == (0, f"dicomproxy {version}\n")
    proc = subprocess.run([console_script(), "--version"], env=env(), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"dicomproxy {version}\n")


def test_no_command_is_a_usage_error() -> None:
    proc = run()
    assert proc.returncode == 2 and "usage: dicomproxy" in proc.stderr


def scripts_config(tmp_path: Path, scripts: dict[str, str]) -> Path:
    folder = tmp_path / "scripts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
    config = tmp_path / "appsettings.json"
    config.write_text(json.dumps({"ExtraConfig": {"ScriptsRoot": "scripts", "DataFolder": "data"},
                                  "Dicom": {"Port": 0}}))
    return config


def test_check_accepts_the_shipped_scripts(tmp_path: Path) -> None:
    shipped = {p.name: p.read_text() for p in (REPO_ROOT / "lua").glob("*.lua")}
    assert {"main.lua", "main-transient.lua", "main-task.lua"} <= set(shipped)
    config = scripts_config(tmp_path, shipped)
    proc = run("check", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in shipped:
        assert f"{tmp_path / 'scripts' / name}: ok" in proc.stdout.splitlines()


def test_check_reports_each_broken_script_as_file_line_message(tmp_path: Path) -> None:
    config = scripts_config(tmp_path, {
        "main.lua": "function onHttpRequest(r)\n  local x = \n  return true\nend\n",  # syntax error, line 3
        "main-transient.lua": "function onHttpRequest(r) end\n",
        "main-task.lua": "local n = 1\nerror('task script broke')\n",  # runtime error at load, line 2
    })
    proc = run("check", "--config", str(config))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    folder = tmp_path / "scripts"
    assert any(re.fullmatch(re.escape(f"{folder / 'main.lua'}:3:") + r" .+", line) for line in out), out
    assert f"{folder / 'main-task.lua'}:2: task script broke" in out, out
    assert f"{folder / 'main-transient.lua'}: ok" in out
    # and the same scripts fixed pass
    (folder / "main.lua").write_text("function onHttpRequest(r)\n  local x = 1\n  return true\nend\n")
    (folder / "main-task.lua").write_text("function run(args) return args end\n")
    assert run("check", "--config", str(config)).returncode == 0


def test_check_without_a_scripts_folder_fails(tmp_path: Path) -> None:
    config = tmp_path / "appsettings.json"
    config.write_text(json.dumps({"ExtraConfig": {"ScriptsRoot": "missing"}, "Dicom": {"Port": 0}}))
    proc = run("check", "--config", str(config))
    assert proc.returncode == 1 and "missing" in proc.stdout + proc.stderr


def test_check_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "appsettings.json"
    config.write_text('{"Lua": {"TimeoutMs": "x"}}')
    proc = run("check", "--config", str(config))
    assert proc.returncode == 2 and f"{config}: Lua:TimeoutMs: expected an integer" in proc.stderr


def test_serve_uses_appsettings_json_in_the_working_directory_and_stops_on_sigterm(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """``dicomproxy serve`` (no --config): HTTP on Urls, proxies Upstream:Url, exits 0 on SIGTERM."""
    if not orthanc.running:
        orthanc.start()
    port = free_port()
    (tmp_path / "appsettings.json").write_text(json.dumps({
        "Urls": f"http://127.0.0.1:{port}", "Upstream": {"Url": orthanc.http_url}, "Dicom": {"Port": 0},
    }))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([console_script(), "serve"], cwd=tmp_path, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        health = wait_until(lambda: requests.get(base + "/dicomproxy/health", timeout=2).json(), timeout=30,
                            what="the gateway to answer /dicomproxy/health")
        assert health["version"] == dicomproxy.__version__
        assert Path(health["scripts"]["scriptsRoot"]) == tmp_path / "lua"  # default, relative to ConfigRoot
        assert requests.get(base + "/system", timeout=10).json()["DicomAet"] == orthanc.aet
        # serving: the start-up heap leaves the collector's full passes (cli.freeze_startup_heap)
        frozen = wait_until(lambda: re.search(r"start-up heap frozen: (\d+) objects", log.read_text()), timeout=30,
                            what="the start-up heap to be frozen once serving")
        assert int(frozen.group(1)) > 10_000
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()  # a clean stop on request is a success
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert f"listening on http://127.0.0.1:{port}" in log.read_text()


def test_console_script_declared() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dicomproxy": "dicomproxy.cli:main"}
    assert shutil.which(console_script())


def test_serve_keeps_body_buffers_in_the_heap() -> None:
    """``serve`` tunes glibc's malloc so 256 KB body chunks are reused, not mapped per chunk."""
    import platform

    from dicomproxy.cli import _tune_malloc

    assert platform.libc_ver()[0] == "glibc", "the gateway is built for Debian (glibc)"
    assert _tune_malloc() is True


# --------------------------------------------------------------------------- dicomproxy config (issue 9, item 1)
def test_config_prints_every_key_with_its_effective_value_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "smtp").write_text("from-a-file\n")
    (tmp_path / "appsettings.json").write_text(json.dumps({
        "Upstream": {"Url": "http://pacs:8042/"}, "Smtp": {"Host": "localhost", "PasswordFile": "smtp"},
        "Authentication": {"Users": {"alice": "alice-pw"}}, "Dicom": {"Port": 1}}))
    (tmp_path / "appsettings.Staging.json").write_text(json.dumps({"Dicom": {"Port": 2, "Aet": "STAGING"}}))
    proc = run("config", "--environment", "Staging", "--Dicom:Port=3", "--Lua:TimeoutMs", "77", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)

    def keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
        out = {prefix + name for name in tree}
        for name, value in tree.items():
            out |= keys(value, f"{prefix}{name}:") if isinstance(value, dict) else set()
        return out

    assert keys(shown) >= keys(defaults(Settings))  # every key
    assert shown["Upstream"]["Url"] == "http://pacs:8042" and shown["Dicom"]["Aet"] == "STAGING"
    assert shown["Dicom"]["Port"] == 3 and shown["Lua"]["TimeoutMs"] == 77
    assert shown["ExtraConfig"]["ScriptsRoot"] == str(tmp_path / "lua")  # paths resolved against ConfigRoot
    assert shown["Smtp"]["Password"] == "***" and shown["Authentication"]["Users"] == {"alice": "***"}
    assert "from-a-file" not in proc.stdout and "alice-pw" not in proc.stdout


def test_command_line_overrides_reach_serve_and_a_bad_one_exits_2(tmp_path: Path, orthanc: OrthancServer) -> None:
    if not orthanc.running:
        orthanc.start()
    port = free_port()
    (tmp_path / "appsettings.json").write_text(json.dumps({"Urls": "http://127.0.0.1:1", "Dicom": {"Port": 0}}))
    proc = run("serve", "--Lua:TimeoutMx=5", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("dicomproxy: config error: command line: Lua:TimeoutMx: unknown key; "
                                   "did you mean Lua:TimeoutMs?")
    proc = run("check", "--nonsense", cwd=tmp_path)
    assert proc.returncode == 2 and "command line: --nonsense: expected a value (--nonsense=value)" in proc.stderr
    proc = run("check", "nonsense", cwd=tmp_path)
    assert proc.returncode == 2 and "'nonsense': not an option of the command, nor --Section:Key=value" in proc.stderr
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([console_script(), "serve", f"--Urls=http://127.0.0.1:{port}", "--Upstream:Url",
                                   orthanc.http_url], cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        system = wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/system", timeout=2).json(), timeout=30,
                            what="the gateway on the command line's Urls")
        assert system["DicomAet"] == orthanc.aet
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(15)
