"""The layers (issue 9, item 1): order, environment selection, unknown keys from every source,
``…File`` secrets, command-line overrides, arrays, and messages that name the source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dicomproxy.config.loader import load_settings
from dicomproxy.config.settings import ConfigError
from dicomproxy.config.settings import load_settings as reexported


def write(folder: Path, data: Any, name: str = "appsettings.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def error(path: Path | None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **{"environ": {}, **kw})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_old_import_path_still_works() -> None:
    assert reexported is load_settings


# --------------------------------------------------------------------------- layering order
def test_each_layer_overrides_the_ones_before(tmp_path: Path) -> None:
    path = write(tmp_path, {"Lua": {"TimeoutMs": 1, "TaskTimeoutMs": 1, "MaxMemoryMB": 1, "BackgroundWorkers": 1}})
    write(tmp_path, {"lua": {"taskTimeoutMs": 2, "MAXMEMORYMB": 2, "BackgroundWorkers": 2}},
          "appsettings.Production.json")
    environ = {"DICOMPROXY_ENVIRONMENT": "Production", "DICOMPROXY__Lua__MaxMemoryMB": "3",
               "DICOMPROXY__LUA__BACKGROUNDWORKERS": "3"}
    s = load_settings(path, environ=environ, overrides={"Lua:BackgroundWorkers": "4"})
    assert (s.lua.timeout_ms, s.lua.task_timeout_ms, s.lua.max_memory_mb, s.lua.background_workers) == (1, 2, 3, 4)
    assert s.environment == "Production"
    assert s.files == (path, tmp_path / "appsettings.Production.json")


def test_environment_comes_from_the_variable_or_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, {"Dicom": {"Aet": "BASE"}})
    write(tmp_path, {"Dicom": {"Aet": "STAGING"}}, "appsettings.Staging.json")
    write(tmp_path, {"Dicom": {"Aet": "PROD"}}, "appsettings.Production.json")
    assert load_settings(path, environ={}).dicom.aet == "BASE"
    assert load_settings(path, environ={"DICOMPROXY_ENVIRONMENT": "Staging"}).dicom.aet == "STAGING"
    # --environment wins over the variable
    s = load_settings(path, environ={"DICOMPROXY_ENVIRONMENT": "Staging"}, environment="Production")
    assert s.dicom.aet == "PROD"


def test_environment_file_sits_beside_the_config_file_and_follows_its_name(tmp_path: Path) -> None:
    path = write(tmp_path / "etc", {"Dicom": {"Aet": "BASE"}}, "site.json")
    write(tmp_path / "etc", {"Dicom": {"Aet": "SITEPROD"}}, "site.Production.json")
    assert load_settings(path, environ={}, environment="Production").dicom.aet == "SITEPROD"


def test_a_named_environment_without_its_file_stops_start_up(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    message = error(path, environ={"DICOMPROXY_ENVIRONMENT": "Prodution"})
    assert message.startswith(f"{tmp_path / 'appsettings.Prodution.json'}: the file of environment 'Prodution'")
    assert "DICOMPROXY_ENVIRONMENT" in message
    assert "expected a name like Production" in error(path, environment="../etc/passwd")


def test_environment_variable_keys_and_prefix_are_case_insensitive(tmp_path: Path) -> None:
    s = load_settings(None, environ={"dicomproxy__upstream__URL": "http://pacs:1", "DICOMPROXY__Dicom__Upstream__Port":
                                     "11113", "DICOMPROXY_OTHER": "x", "OTHER__Lua__TimeoutMs": "x"})
    assert s.upstream.url == "http://pacs:1"
    assert (s.dicom.upstream.aet, s.dicom.upstream.port) == ("ORTHANC", 11113)  # one part of an object alone


def test_command_line_overrides_accept_nested_and_colon_forms(tmp_path: Path) -> None:
    path = write(tmp_path, {"Dicom": {"Port": 1}})
    s = load_settings(path, environ={"DICOMPROXY__Dicom__Port": "2"},
                      overrides={"dicom:port": "0", "Upstream": {"Url": "http://cli:3"}})
    assert s.dicom.port == 0 and s.upstream.url == "http://cli:3"


def test_a_later_array_replaces_the_earlier_one_whole(tmp_path: Path) -> None:
    path = write(tmp_path, {"Dicom": {"AllowedCallingAets": ["CT1", "CT2", "MR1"]}})
    write(tmp_path, {"Dicom": {"AllowedCallingAets": ["CT1"]}}, "appsettings.Production.json")
    assert load_settings(path, environ={}, environment="Production").dicom.allowed_calling_aets == ("CT1",)
    # environment: comma list, JSON, or one variable per item (ASP.NET index keys)
    for environ in ({"DICOMPROXY__Dicom__AllowedCallingAets": "A, B"},
                    {"DICOMPROXY__Dicom__AllowedCallingAets": '["A", "B"]'},
                    {"DICOMPROXY__Dicom__AllowedCallingAets__1": "B", "DICOMPROXY__Dicom__AllowedCallingAets__0": "A"}):
        assert load_settings(path, environ=environ).dicom.allowed_calling_aets == ("A", "B"), environ


def test_objects_may_come_as_json_in_one_variable(tmp_path: Path) -> None:
    s = load_settings(None, environ={
        "DICOMPROXY__Dicom__Modalities": '{"ct": {"aet": "CT1", "host": "ct", "port": 104}}',
        "DICOMPROXY__Notifications__Email": '[{"To": "ops@example.org"}]'})
    assert (s.dicom.modalities["ct"].aet, s.dicom.modalities["ct"].port) == ("CT1", 104)
    assert s.notifications.email[0].to == ("ops@example.org",) and s.notifications.email[0].events == ("*",)


# --------------------------------------------------------------------------- unknown keys, every source
@pytest.mark.parametrize(("data", "key", "nearest"), [
    ({"Dicom": {"AllowedCallingAet": ["CT1"]}}, "Dicom:AllowedCallingAet", "Dicom:AllowedCallingAets"),
    ({"upstream": {"ReadTimeoutSecond": 5}}, "Upstream:ReadTimeoutSecond", "Upstream:ReadTimeoutSeconds"),
    ({"Dicom": {"Modalities": {"ct": {"Aet": "CT", "Hots": "ct", "Port": 104}}}}, "Dicom:Modalities:ct:Hots",
     "Dicom:Modalities:ct:Host"),
    ({"Smtp": {"PasswordFiles": "x"}}, "Smtp:PasswordFiles", "Smtp:PasswordFile"),
    ({"Tus": {"UploadFolder": "x"}}, "Tus:UploadFolder", "ExtraConfig:TusUploadFolder"),
    ({"Logging": {"Level": "INFO"}, "Loging": {}}, "Loging", "Logging"),
])
def test_an_unknown_key_in_a_file_names_the_nearest_valid_key(tmp_path: Path, data: Any, key: str,
                                                               nearest: str) -> None:
    path = write(tmp_path, data)
    assert error(path) == f"{path}: {key}: unknown key; did you mean {nearest}?"


def test_an_unknown_key_without_a_near_one_lists_what_is_there(tmp_path: Path) -> None:
    path = write(tmp_path, {"Tus": {"Zzz": 1}, "Site": {"Name": "x"}})
    assert error(path).startswith(f"{path}: Tus:Zzz: unknown key; Tus has BasePath, MaxSize, ")
    path = write(tmp_path, {"Site": {"Name": "x"}})
    assert error(path) == f"{path}: Site: unknown key; a site's own keys for its scripts go under ExtraConfig " \
                          "(ExtraConfig:Site)"


def test_an_unknown_key_in_an_environment_file_names_that_file(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    prod = write(tmp_path, {"Dicom": {"AllowedCallingAet": ["CT1"]}}, "appsettings.Production.json")
    assert error(path, environment="Production") == \
        f"{prod}: Dicom:AllowedCallingAet: unknown key; did you mean Dicom:AllowedCallingAets?"


def test_an_unknown_key_in_the_environment_names_the_variable() -> None:
    assert error(None, environ={"DICOMPROXY__Dicom__AllowedCallingAet": "CT1"}) == \
        "environment DICOMPROXY__Dicom__AllowedCallingAet: Dicom:AllowedCallingAet: unknown key; " \
        "did you mean Dicom:AllowedCallingAets?"


def test_an_unknown_key_on_the_command_line_says_so() -> None:
    assert error(None, overrides={"Dicom:AllowedCallingAet": "CT1"}) == \
        "command line: Dicom:AllowedCallingAet: unknown key; did you mean Dicom:AllowedCallingAets?"


def test_free_form_places_stay_free(tmp_path: Path) -> None:
    path = write(tmp_path, {"ExtraConfig": {"Site": "north", "Deep": {"Any": [1, 2]}},
                            "Dicom": {"Modalities": {"Any Name The Site Likes": {"Aet": "X", "Host": "h", "Port": 1}}},
                            "Authentication": {"Users": {"dr.who": "pw"}}})
    s = load_settings(path, environ={"DICOMPROXY__ExtraConfig__FromEnv": "yes"})
    flat = s.lua_config()
    assert (flat["ExtraConfig:Site"], flat["ExtraConfig:Deep:Any"], flat["ExtraConfig:FromEnv"]) == ("north", [1, 2],
                                                                                                     "yes")
    assert list(s.dicom.modalities) == ["Any Name The Site Likes"] and list(s.users) == ["dr.who"]


def test_wrong_values_name_the_source_that_gave_them(tmp_path: Path) -> None:
    path = write(tmp_path, {"Lua": {"TimeoutMs": 5}})
    prod = write(tmp_path, {"Lua": {"TimeoutMs": "fast"}}, "appsettings.Production.json")
    assert error(path, environment="Production") == f"{prod}: Lua:TimeoutMs: expected an integer, got 'fast'"
    assert error(path, environ={"DICOMPROXY__Lua__TimeoutMs": "fast"}) == \
        "environment DICOMPROXY__Lua__TimeoutMs: Lua:TimeoutMs: expected an integer, got 'fast'"
    assert error(path, overrides={"Lua:TimeoutMs": "fast"}) == \
        "command line: Lua:TimeoutMs: expected an integer, got 'fast'"
    # a later layer that fixes the value wins
    assert load_settings(path, environ={"DICOMPROXY__Lua__TimeoutMs": "fast"}, overrides={"Lua:TimeoutMs": 7},
                         environment=None).lua.timeout_ms == 7


def test_one_key_twice_in_one_source_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '{"Lua": {"TimeoutMs": 1}, "lua": {"timeoutms": 2}}')
    assert "Lua:TimeoutMs: given twice in one source" in error(path)
    path = write(tmp_path, '{"Lua": {"TimeoutMs": 1}, "lua": {"MaxMemoryMB": 2}}')  # two spellings of a section merge
    s = load_settings(path, environ={})
    assert (s.lua.timeout_ms, s.lua.max_memory_mb) == (1, 2)


# --------------------------------------------------------------------------- secrets from files
def test_a_secret_may_come_from_a_file_relative_to_config_root(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "smtp").write_text("s3cret\n")
    (tmp_path / "secrets" / "alice").write_text("alice-pw\r\n")
    path = write(tmp_path, {"Smtp": {"Host": "127.0.0.1", "PasswordFile": "secrets/smtp"},
                            "Authentication": {"Users": {"alice": {"PasswordFile": "secrets/alice"}, "bob": "bob-pw"}}})
    s = load_settings(path, environ={})
    assert s.smtp.password == "s3cret"  # the trailing newline dropped
    assert s.users == {"alice": "alice-pw", "bob": "bob-pw"}


def test_secret_files_from_the_environment_and_the_later_spelling_wins(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file")
    path = write(tmp_path, {"Smtp": {"Host": "localhost", "Password": "in-json"}})
    assert load_settings(path, environ={"DICOMPROXY__Smtp__PasswordFile": "pw"}).smtp.password == "from-file"
    path = write(tmp_path, {"Smtp": {"Host": "localhost", "PasswordFile": "pw"}})
    assert load_settings(path, environ={"DICOMPROXY__Smtp__Password": "from-env"}).smtp.password == "from-env"
    s = load_settings(None, environ={"DICOMPROXY__Authentication__Users__carol__PasswordFile": str(tmp_path / "pw")})
    assert s.users == {"carol": "from-file"}
    assert "given twice in one source" in error(write(tmp_path, {"Smtp": {"Password": "a", "PasswordFile": "pw"}}))


def test_a_missing_or_unreadable_secret_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"Smtp": {"PasswordFile": "nope"}})
    assert error(path) == f"{path}: Smtp:PasswordFile: cannot read {tmp_path / 'nope'}: No such file or directory"
    (tmp_path / "folder").mkdir()
    message = error(None, environ={"DICOMPROXY__Authentication__Users__alice__PasswordFile": str(tmp_path / "folder")})
    assert message.startswith("environment DICOMPROXY__Authentication__Users__alice__PasswordFile: "
                              f"Authentication:Users:alice:PasswordFile: cannot read {tmp_path / 'folder'}: ")
    assert "expected the path of a file" in error(write(tmp_path, {"Smtp": {"PasswordFile": ""}}))


def test_a_wrong_secret_is_never_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, {"Authentication": {"Users": {"alice": 123456}}})
    message = error(path)
    assert message == f"{path}: Authentication:Users:alice: expected a password string or an object with Password " \
                      "or PasswordFile (and Roles) (the value is secret and not shown)"
    assert "123456" not in error(write(tmp_path, {"Smtp": {"Password": ["123456"]}}))
