"""Configuration through a real gateway (issue 9, item 1): the environment's file layered on top,
a typo that stops ``serve``, and secrets that no script, log or health answer can read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.peers import GatewayProcess

CONFIG_SCRIPT = r"""
function onHttpRequest(r)
  if r.Path == "/cfg" then
    local out = {}
    for _, k in ipairs({"Tus:BasePath", "Lua:TimeoutMs", "ExtraConfig:Site", "Dicom:Aet",
                        "Upstream:ReadTimeoutSeconds"}) do
      out[#out + 1] = k .. "=" .. tostring(Config[k])
    end
    r:ResponseWrite(table.concat(out, "\n"))
    return true
  end
end
"""


def test_environment_file_and_variables_layer_over_appsettings(gateway_factory: Any) -> None:
    gw: GatewayProcess = gateway_factory({
        "Tus": {"BasePath": "/files/"}, "Lua": {"TimeoutMs": 1111}, "ExtraConfig": {"Site": "base"},
        "Dicom": {"Port": 0},
    }, {"main.lua": CONFIG_SCRIPT}, env={"DICOMPROXY_ENVIRONMENT": "Production",
                                         "DICOMPROXY__Upstream__ReadTimeoutSeconds": "33"}, start=False)
    (gw.config_path.parent / "appsettings.Production.json").write_text(json.dumps({
        "tus": {"basepath": "/prod-files"}, "Lua": {"TimeoutMs": 2222}, "ExtraConfig": {"Site": "production"},
    }))
    gw.start()
    health = gw.get("/dicomproxy/health").json()
    assert health["tus"]["basePath"] == "/prod-files/"  # the Production file's value, normalised
    got = dict(line.split("=", 1) for line in gw.get("/cfg").text.splitlines())
    assert got == {"Tus:BasePath": "/prod-files/", "Lua:TimeoutMs": "2222", "ExtraConfig:Site": "production",
                   "Dicom:Aet": "DICOMPROXY", "Upstream:ReadTimeoutSeconds": "33"}
    assert gw.request("OPTIONS", "/prod-files/").headers.get("Tus-Resumable") == "1.0.0"  # TUS really moved there


@pytest.mark.parametrize(("where", "expected"), [
    ("file", "{path}: Dicom:AllowedCallingAet: unknown key; did you mean Dicom:AllowedCallingAets?"),
    ("environment file", "{prod}: Dicom:AllowedCallingAet: unknown key; did you mean Dicom:AllowedCallingAets?"),
    ("variable", "environment DICOMPROXY__DICOM__ALLOWEDCALLINGAET: Dicom:ALLOWEDCALLINGAET: unknown key; "
                 "did you mean Dicom:AllowedCallingAets?"),
])
def test_a_typo_stops_serve_with_exit_2_and_one_line(gateway_factory: Any, where: str, expected: str) -> None:
    gw: GatewayProcess = gateway_factory({"Dicom": {"Port": 0}}, start=False)
    prod = gw.config_path.parent / "appsettings.Production.json"
    typo = {"Dicom": {"AllowedCallingAet": ["CT1"]}}
    if where == "file":
        gw.update_settings(typo)
    elif where == "environment file":
        prod.write_text(json.dumps(typo))
        gw.extra_env["DICOMPROXY_ENVIRONMENT"] = "Production"
    else:
        gw.extra_env["DICOMPROXY__DICOM__ALLOWEDCALLINGAET"] = "CT1"
    with pytest.raises(pytest.fail.Exception, match="exited with status 2"):
        gw.start(timeout=30)
    log = gw.log_text().split("=====\n", 1)[1]
    assert log.splitlines() == [f"dicomproxy: config error: {expected.format(path=gw.config_path, prod=prod)}"]


SECRET_SCRIPT = r"""
function onHttpRequest(r)
  if r.Path == "/peek" then
    local c = GetOrthancConfiguration()
    local out = {
      "smtp=" .. tostring(Config["Smtp:Password"]),
      "smtp-lower=" .. tostring(Config["smtp:password"]),
      "user=" .. tostring(Config["Authentication:Users:alice"]),
      "file=" .. tostring(Config["Smtp:PasswordFile"]),
      "registered=" .. tostring(c["RegisteredUsers"]["alice"]),
      "dicomproxy=" .. tostring(c["DicomProxy"]["Smtp"]["Password"]),
      "dump=" .. DumpJson(c["DicomProxy"]),
    }
    r:ResponseWrite(table.concat(out, "\n"))
    return true
  end
end
"""


def test_scripts_logs_and_health_never_see_secrets(gateway_factory: Any) -> None:
    gw: GatewayProcess = gateway_factory({"Dicom": {"Port": 0}}, {"main.lua": SECRET_SCRIPT}, start=False)
    (gw.workdir / "smtp-password").write_text("smtp-S3CRET-from-file\n")
    gw.update_settings({"Smtp": {"Host": "127.0.0.1", "Username": "mailer", "PasswordFile": "smtp-password"},
                        "Authentication": {"Users": {"alice": "alice-S3CRET"}}, "Logging": {"Level": "DEBUG"}})
    gw.start()
    auth = ("alice", "alice-S3CRET")
    peek = gw.get("/peek", auth=auth)
    assert peek.status_code == 200, peek.text  # the gateway uses the password: alice gets in
    got = dict(line.split("=", 1) for line in peek.text.splitlines())
    assert {k: v for k, v in got.items() if k != "dump"} == {
        "smtp": "***", "smtp-lower": "***", "user": "***", "file": "nil", "registered": "***", "dicomproxy": "***"}
    health = gw.get("/dicomproxy/health", auth=auth).text
    for text in (peek.text, health, gw.log_text()):
        assert "S3CRET" not in text
