"""The Upstreams model: servers.json beside appsettings.json, names that must resolve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.loader import load_settings

SERVERS = {
    "Servers": {
        "archive": {"Url": "http://127.0.0.1:9001", "Dicom": {"Aet": "ARCHIVE", "Port": 4301}},
        "backup": {"Url": "http://127.0.0.1:9002/", "Weight": 2, "HealthCheck": {"Path": "/system"}},
    },
    "Groups": {"main": {"Members": ["archive", "default"], "Mode": "RoundRobin", "Federated": True}},
    "Routes": [{"Path": "/dicom-web", "Header": "X-Tenant: north", "Upstream": "main"}],
}


def write(folder: Path, appsettings: dict, servers: dict | None = None) -> Path:
    (folder / "appsettings.json").write_text(json.dumps(appsettings))
    if servers is not None:
        (folder / "servers.json").write_text(json.dumps(servers))
    return folder / "appsettings.json"


def test_servers_json_is_the_upstreams_section(tmp_path: Path) -> None:
    file = write(tmp_path, {"Dicom": {"Routes": [{"CalledAet": "AI", "Destinations": ["archive", "main"]}],
                                      "QueryUpstream": "archive"}}, SERVERS)
    settings = load_settings(file, environ={})
    ups = settings.upstreams
    assert ups.servers["backup"].url == "http://127.0.0.1:9002"
    assert ups.servers["backup"].weight == 2 and ups.servers["backup"].health_check.path == "/system"
    assert ups.servers["archive"].dicom_host == "127.0.0.1" and ups.servers["archive"].dicom.port == 4301
    assert ups.groups["main"].mode == "RoundRobin" and ups.groups["main"].federated
    assert ups.routes[0].upstream == "main" and ups.routes[0].header == "X-Tenant: north"
    assert ups.dicom_names() == {"default", "archive", "main"}
    assert settings.dicom.routes[0].destinations == ("archive", "main")
    assert tmp_path / "servers.json" in settings.files


def test_without_servers_json_the_default_upstream_alone(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {}), environ={})
    assert settings.upstreams.names() == {"default"} and settings.dicom.routes == ()


@pytest.mark.parametrize(("servers", "appsettings", "message"), [
    ({"Groups": {"g": {"Members": ["nope"]}}}, {},
     "servers.json: Upstreams:Groups:g:Members: 'nope' is not a server (known: default)"),
    ({"Servers": {"default": {"Url": "http://x:1"}}}, {},
     "servers.json: Upstreams:Servers:default: is the pair Upstream + Dicom:Upstream"),
    ({"Routes": [{"Upstream": "elsewhere"}]}, {},
     "servers.json: Upstreams:Routes:0:Upstream: 'elsewhere' is neither a server nor a group"),
    ({"Server": {}}, {}, "servers.json: Upstreams:Server: unknown key; did you mean Upstreams:Servers?"),
    ({"Servers": {"web": {"Url": "http://x:1"}}}, {"Dicom": {"Routes": [{"Destinations": ["web"]}]}},
     "appsettings.json: Dicom:Routes:0:Destinations: 'web' is no upstream with a DICOM side"),
    ({}, {"Dicom": {"QueryUpstream": "nope"}}, "appsettings.json: Dicom:QueryUpstream: 'nope' is no upstream"),
])
def test_a_name_that_does_not_resolve_stops_start_up(
        tmp_path: Path, servers: dict, appsettings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, appsettings, servers), environ={})
    assert message in str(e.value)
