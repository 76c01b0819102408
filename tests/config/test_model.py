"""The model (issue 9, item 1): attribute paths the code uses, derived values, immutability,
safe defaults, secrets masked everywhere the configuration is shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydantic
import pytest

from dicomproxy.config.model import GiB, Settings, SmtpSettings, TusSettings
from dicomproxy.config.settings import ConfigError, load_settings


def load(tmp_path: Path, data: dict[str, object]) -> Settings:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps(data))
    return load_settings(path, environ={})


def test_attribute_paths_the_code_uses(tmp_path: Path) -> None:
    s = load(tmp_path, {"Urls": "http://*:9090", "Upstream": {"ReadTimeoutSeconds": 7},
                        "Dicom": {"AllowedCallingAets": "CT1,MR1"}, "Lua": {"FailOpen": ["onHttpResponse"]},
                        "ExtraConfig": {"TusUploadFolder": "up", "ScriptsRoot": "scripts"},
                        "Authentication": {"Users": {"alice": "pw"}, "Realm": "R"}, "Logging": {"Level": "debug"},
                        "Tus": {"Fsync": "PATCH", "BasePath": "uploads"}})
    assert (s.host, s.port) == ("0.0.0.0", 9090)
    assert s.upstream.read_timeout == 7.0 and s.dicom.allowed_calling_aets == ("CT1", "MR1")
    assert s.lua.fail_open is False and s.lua.fail_open_hooks == frozenset({"onHttpResponse"})
    assert s.tus.upload_folder == tmp_path / "up" and s.lua.scripts_root == tmp_path / "scripts"
    assert s.data_folder == tmp_path / "data" and s.dicom.spool_folder == tmp_path / "data" / "spool"
    assert (s.users, s.realm, s.log_level) == ({"alice": "pw"}, "R", "DEBUG")
    assert (s.tus.fsync, s.tus.base_path) == ("patch", "/uploads/")
    assert s.config_root == tmp_path and s.tree.source == str(tmp_path / "appsettings.json")
    assert load(tmp_path, {"Lua": {"FailOpen": "true"}}).lua.fail_open is True


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load(tmp_path, {})
    with pytest.raises(pydantic.ValidationError):
        s.upstream.read_timeout = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        s.lua = s.lua  # type: ignore[misc]


def test_sections_are_constructible_by_attribute_name(tmp_path: Path) -> None:
    """Tests and benchmarks build one section directly (TusApp, SmtpTransport)."""
    tus = TusSettings(base_path="/files/", upload_folder=tmp_path, max_size=0, expire_after=86400)
    assert (tus.upload_folder, tus.fsync, tus.lock_timeout) == (tmp_path, "complete", 20.0)
    smtp = SmtpSettings(host="127.0.0.1", port=2525, password="pw", sender="a@b", retry_delay=0.05)
    assert (smtp.security, smtp.password, smtp.ca_file) == ("None", "pw", None)


def test_safe_defaults() -> None:
    s = Settings()
    assert s.host == "127.0.0.1" and s.dicom.host == "127.0.0.1"  # both listeners on loopback
    assert s.lua.fail_open is False and not s.lua.fail_open_hooks  # a failing hook fails closed
    assert s.tus.max_size == 20 * GiB  # an upload cannot fill the disk
    assert s.lua.max_memory_mb == 64 and s.lua.timeout_ms == 5000
    assert s.smtp.security == "None" and s.smtp.password == ""


def test_a_password_in_plain_text_goes_only_to_a_loopback_mail_server(tmp_path: Path) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps({"Smtp": {"Host": "mail.example.org", "Username": "u", "Password": "pw"}}))
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value) == (f"{path}: Smtp:Password: would be sent in plain text to 'mail.example.org' "
                               "(Smtp:Security is None); set Smtp:Security to StartTls or Tls")
    tls = load(tmp_path, {"Smtp": {"Host": "mail.example.org", "Password": "pw", "Security": "starttls"}})
    assert tls.smtp.security == "StartTls"
    assert load(tmp_path, {"Smtp": {"Host": "127.0.0.1", "Password": "pw"}}).smtp.password == "pw"


SECRETS = {"Smtp": {"Host": "localhost", "Username": "mailer", "Password": "smtp-s3cret"},
           "Authentication": {"Users": {"alice": "alice-s3cret"}}}


def test_secrets_are_masked_in_every_view(tmp_path: Path) -> None:
    s = load(tmp_path, SECRETS)
    assert s.smtp.password == "smtp-s3cret" and s.users == {"alice": "alice-s3cret"}  # the code gets them
    views = {"tree": json.dumps(s.tree.as_dict()), "lua": json.dumps(s.lua_config()), "repr": repr(s),
             "str": str(s), "smtp repr": repr(s.smtp)}
    for name, text in views.items():
        assert "s3cret" not in text, name
    assert s.tree["Smtp:Password"] == "***" and s.tree["Authentication:Users:alice"] == "***"
    assert s.lua_config()["Smtp:Password"] == "***" and s.lua_config()["Authentication:Users:alice"] == "***"
    assert s.lua_config()["Smtp:Username"] == "mailer"
    assert load(tmp_path, {}).tree["Smtp:Password"] == ""  # unset stays visibly unset


def test_lua_config_has_every_key_with_effective_values(tmp_path: Path) -> None:
    s = load(tmp_path, {"Upstream": {"Url": "http://pacs:1/"}, "Dicom": {"SpoolFolder": "sp"}})
    flat = s.lua_config()
    assert flat["Upstream:Url"] == "http://pacs:1" and flat["Dicom:SpoolFolder"] == str(tmp_path / "sp")
    assert flat["Dicom:Host"] == "127.0.0.1" and flat["Tus:MaxSize"] == 20 * GiB and flat["ConfigRoot"] == str(tmp_path)
    assert flat["Dicom:Upstream:Port"] == 4242


def test_user_roles_and_cors_methods(tmp_path: Path) -> None:
    (tmp_path / "root-pw").write_text("r00t\n")
    s = load(tmp_path, {"Authentication": {"Users": {"alice": "pw", "root": {"PasswordFile": "root-pw",
                                                                               "Roles": ["admin"]}}},
                        "Cors": {"AllowedMethods": "get, Post"}, "Server": {"MaxHeadBytes": 4096}})
    assert s.users == {"alice": "pw", "root": "r00t"}
    roles = {name: user.roles for name, user in s.authentication.users.items()}
    assert roles == {"alice": ("viewer", "uploader"), "root": ("admin",)}  # no Roles: the default ones
    assert s.cors.allowed_methods == ("GET", "POST") and s.server.max_head_bytes == 4096
    assert s.tree["Authentication:Users"] == {"alice": "***", "root": {"Password": "***", "Roles": ["admin"]}}


def test_authentication_keys_hash_files_and_their_checks(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    (tmp_path / "key-hash").write_text(digest + "\n")
    s = load(tmp_path, {"Authentication": {"ApiKeys": {"tool": {"HashFile": "key-hash", "Roles": "uploader,viewer"}},
                                           "Oidc": {"Issuer": "https://idp.example/realms/x", "Audience": "pacs",
                                                    "RoleMap": {"g1": ["admin"]}},
                                           "Rules": [{"Path": "dicomproxy/metrics/", "Methods": ["get"]}]}})
    auth = s.authentication
    assert auth.api_keys["tool"].hash == digest and auth.api_keys["tool"].roles == ("uploader", "viewer")
    assert s.tree["Authentication:ApiKeys:tool:Hash"] == "***" and digest not in repr(s)
    assert auth.oidc.audience == ("pacs",) and auth.oidc.role_map == {"g1": ("admin",)}
    assert (auth.rules[0].path, auth.rules[0].methods, auth.rules[0].roles) == ("/dicomproxy/metrics", ("GET",), ())
    for bad, message in [
        ({"ApiKeys": {"t": {"Hash": "dpk_plain-key", "Roles": ["viewer"]}}}, "ApiKeys:t:Hash: expected sha256:"),
        ({"ApiKeys": {"t": {"Hash": digest}}}, r"ApiKeys:t: expected an object .* \(the value is secret and not shown"),
        ({"Oidc": {"Issuer": "http://idp", "Audience": "a"}}, "is not https"),
        ({"Oidc": {"Issuer": "https://idp"}}, "Oidc:Audience: required with"),
        ({"Oidc": {"Issuer": "https://idp", "Audience": "a", "Algorithms": ["HS256"]}}, "Oidc:Algorithms: expected"),
        ({"Users": {"u": "$2b$12$broken"}}, "Users:u:Password: looks like a password hash"),
        ({"Rules": [{"Path": "/x"}]}, "Rules: role rules without"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(tmp_path, {"Authentication": bad})


# --------------------------------------------------------------------------- Urls and Https
def test_urls_list_several_listeners(tmp_path: Path) -> None:
    s = load(tmp_path, {"Urls": " http://*:8080 ; https://0.0.0.0:8443;https://[::1];http://localhost"})
    assert [(e.scheme, e.host, e.port) for e in s.endpoints] == [
        ("http", "0.0.0.0", 8080), ("https", "0.0.0.0", 8443), ("https", "::1", 443), ("http", "localhost", 80)]
    assert [e.url for e in s.endpoints][2] == "https://[::1]:443"
    assert (s.host, s.port) == ("0.0.0.0", 8080)
    for bad, message in (("http://a:1;ftp://b:2", "expected http(s)://HOST:PORT, got 'ftp://b:2'"),
                         ("http://a:1;https://a:1", "each address once (a:1 is listed twice)"),
                         ("https://a:1/path", "expected http(s)://HOST:PORT"),
                         ("https://user:pw@a:1", "expected http(s)://HOST:PORT"), ("", "Urls: expected")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(tmp_path, {"Urls": bad})


def test_https_keys_are_checked_together(tmp_path: Path) -> None:
    s = load(tmp_path, {"Urls": "https://127.0.0.1:8443", "Https": {"Pkcs12Password": "pw"}})
    assert s.https.uses_pkcs12 and s.https.pkcs12_file == tmp_path / "certificate.pfx"
    assert s.https.client_certificate_mode == "None" and s.https.reload_interval == 60
    pem = load(tmp_path, {"Https": {"CertificateFile": "gw.crt", "KeyFile": "keys/gw.key",
                                    "ClientCertificateMode": "required", "ClientCaFile": "ca.pem"}}).https
    assert (pem.certificate_file, pem.key_file) == (tmp_path / "gw.crt", tmp_path / "keys" / "gw.key")
    assert not pem.uses_pkcs12 and pem.client_certificate_mode == "Required"
    for https, urls, message in (
        ({"KeyFile": "k"}, "http://a:1", "Https:KeyFile: needs Https:CertificateFile"),
        ({"CertificateFile": "c", "Pkcs12File": "b.pfx"}, "http://a:1", "Https:Pkcs12File: give either"),
        ({"ClientCertificateMode": "Optional"}, "http://a:1", "Https:ClientCaFile: required with"),
        ({"ClientCaFile": "ca.pem"}, "http://a:1", "Https:ClientCaFile: would never be used"),
        ({"RedirectHttp": True}, "https://a:1", "Https:RedirectHttp: needs an http:// and an https:// entry"),
        ({"Hsts": True}, "http://a:1", "Https:Hsts: would never be sent"),
        ({"MinimumTlsVersion": "1.1"}, "http://a:1", "Https:MinimumTlsVersion: expected one of 1.2, 1.3"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(tmp_path, {"Urls": urls, "Https": https})


def test_https_passwords_are_secrets(tmp_path: Path) -> None:
    (tmp_path / "pfx.txt").write_text("pfx-secret\n")
    s = load(tmp_path, {"Https": {"KeyPassword": "key-secret", "Pkcs12PasswordFile": "pfx.txt"}})
    assert (s.https.key_password, s.https.pkcs12_password) == ("key-secret", "pfx-secret")
    assert s.tree["Https:KeyPassword"] == s.tree["Https:Pkcs12Password"] == "***"
    flat = json.dumps(s.lua_config()) + json.dumps(s.tree.as_dict()) + repr(s)
    assert "key-secret" not in flat and "pfx-secret" not in flat


# --------------------------------------------------------------------------- Tus:Store s3, Cluster
def test_tus_s3_store_and_cluster_keys(tmp_path: Path) -> None:
    s = load(tmp_path, {})
    assert (s.tus.store, s.cluster.redis) == ("file", "")  # the embedded default needs nothing extra
    (tmp_path / "s3.secret").write_text("s3cr3t\n")
    (tmp_path / "redis.secret").write_text("r3d1s\n")
    s = load(tmp_path, {"Cluster": {"Redis": "redis://r:6379/0", "RedisPasswordFile": "redis.secret"},
                        "Tus": {"Store": "S3", "S3": {"Bucket": "up", "SecretKeyFile": "s3.secret",
                                                      "PartSizeMB": 16}}})
    assert (s.tus.store, s.tus.s3.bucket, s.tus.s3.secret_key, s.tus.s3.part_size) == ("s3", "up", "s3cr3t", 16 << 20)
    assert (s.cluster.redis_password, s.cluster.lock_lease) == ("r3d1s", 10)
    assert "s3cr3t" not in repr(s) and "r3d1s" not in repr(s)
    with pytest.raises(ConfigError, match=re.escape("Tus:S3:Bucket is empty; name the bucket")):
        load(tmp_path, {"Tus": {"Store": "s3"}})
    for bad, message in (("redis://:pw@r:6379", "move it to Cluster:RedisPassword"),
                         ("http://r:6379", "Cluster:Redis must be redis://")):
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load(tmp_path, {"Cluster": {"Redis": bad}})
        assert "pw" not in str(info.value).replace("RedisPassword", "")
    with pytest.raises(ConfigError, match="Tus:S3:PartSizeMB"):
        load(tmp_path, {"Tus": {"Store": "s3", "S3": {"Bucket": "up", "PartSizeMB": 1}}})
