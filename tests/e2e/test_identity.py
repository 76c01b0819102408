"""Identities through the real stack (issue 12, items 3-5 and 8): a gateway process in front of a
real Orthanc, basic users with plain and hashed passwords, API keys, and bearer tokens issued by a
real OpenID provider (npm ``oidc-provider``, see :class:`tests.peers.OidcProvider`).

Covered: each password hash form; API keys and their roles; RS256 and ES256 tokens; a token for
another audience and an expired one refused; a key rotation at the provider (the new kid is
accepted after the gateway refetches the key set) and a flood of unknown kids costing the provider
at most one fetch per interval; role rules on the gateway's routes, TUS and proxied reads and
writes; ``request.User``/``Roles``/``Claims`` in the Lua hooks; credentials never forwarded; the
failed-attempt limiter; no secret in the log, the health answer or Lua's ``Config``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import argon2
import bcrypt
import jwt
import pytest
import requests

from dicomproxy.auth.apikeys import hash_key, new_key
from tests.peers import GatewayProcess, OidcProvider, OrthancServer, wait_until

PASSWORDS = {"plain": "plain-Pw-1", "argon": "argon-Pw-2", "bcrypt": "bcrypt-Pw-3", "passlib": "passlib-Pw-4",
             "django": "django-Pw-5", "root": "root-Pw-6"}
VIEWER_KEY, UPLOADER_KEY = new_key(), new_key()
CLIENTS = [
    {"client_id": "viewer-app", "client_secret": "viewer-app-secret-0123456789", "roles": ["radiology"]},
    {"client_id": "admin-app", "client_secret": "admin-app-secret-0123456789", "roles": ["pacs-admins"]},
    {"client_id": "plain-app", "client_secret": "plain-app-secret-0123456789", "roles": ["unmapped"]},
]

MAIN = r"""
function onHttpRequest(r)
  if r.Path == "/whoami" then
    local claims = {}
    for k, v in pairs(r.Claims) do claims[#claims + 1] = k end
    table.sort(claims)
    r:ResponseWrite(r.User .. "|" .. table.concat(r.Roles, ",") .. "|" .. #r.Roles .. "|" ..
      tostring(r.Claims.client_id) .. "|" .. tostring(r.Claims.aud) .. "|" .. table.concat(claims, ",") .. "|" ..
      tostring(r.Headers["authorization"]) .. "|" .. tostring(r.Headers["x-api-key"]) .. "|" ..
      tostring(Config["Authentication:ApiKeys:viewer:Hash"]) .. "|" ..
      tostring(Config["Authentication:Users:root:Password"]))
    return true
  end
end

function onHttpResponse(res)
  res:AddHeader("X-Roles", table.concat(res.Roles, ","))
end
"""


def passlib_pbkdf2(password: str) -> str:
    salt = b"0123456789abcdef"
    raw = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 1000)
    ab64 = [base64.b64encode(b).decode().rstrip("=").replace("+", ".") for b in (salt, raw)]
    return f"$pbkdf2-sha256$1000${ab64[0]}${ab64[1]}"


def django_pbkdf2(password: str) -> str:
    raw = hashlib.pbkdf2_hmac("sha256", password.encode(), b"NaCl-salt", 1000)
    return f"pbkdf2_sha256$1000$NaCl-salt${base64.b64encode(raw).decode()}"


def users() -> dict[str, Any]:
    cheap_argon2 = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return {
        "plain": PASSWORDS["plain"],
        "argon": cheap_argon2.hash(PASSWORDS["argon"]),
        "bcrypt": {"Password": bcrypt.hashpw(PASSWORDS["bcrypt"].encode(), bcrypt.gensalt(4)).decode(),
                   "Roles": ["viewer"]},
        "passlib": passlib_pbkdf2(PASSWORDS["passlib"]),
        "django": django_pbkdf2(PASSWORDS["django"]),
        "root": {"Password": bcrypt.hashpw(PASSWORDS["root"].encode(), bcrypt.gensalt(4)).decode(), "Roles": ["admin"]},
    }


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path_factory.mktemp("oidc"), CLIENTS).start()
    yield provider
    provider.stop()


def auth_settings(issuer: str) -> dict[str, Any]:
    return {
        "Users": users(),
        "ApiKeys": {"viewer": {"Hash": hash_key(VIEWER_KEY), "Roles": ["viewer"]},
                    "uploader": {"Hash": hash_key(UPLOADER_KEY), "Roles": ["uploader"]}},
        "Oidc": {"Issuer": issuer, "AllowHttp": True, "Audience": ["dicomproxy"], "LeewaySeconds": 0,
                 "UserClaim": "preferred_username", "JwksMinRefreshSeconds": 2,
                 "RoleMap": {"radiology": ["viewer"], "pacs-admins": ["admin"]}},
        "Rules": [{"Path": "/dicomproxy/metrics", "Roles": ["admin"]}],
        "FailedAttempts": {"Burst": 0},
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer, idp: OidcProvider) -> Iterator[GatewayProcess]:
    if not orthanc.running:
        orthanc.start()
    gateway = GatewayProcess(tmp_path_factory.mktemp("gw-identity"), orthanc=orthanc, scripts={"main.lua": MAIN},
                             settings={"Dicom": {"Port": 0}, "Authentication": auth_settings(idp.issuer)})
    gateway.start()
    gateway.wait_for_log("signing keys loaded")
    yield gateway
    gateway.stop()


def basic(user: str, password: str | None = None) -> dict[str, str]:
    pw = PASSWORDS[user] if password is None else password
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


def get(gw: GatewayProcess, path: str, headers: dict[str, str], method: str = "GET", **kw: Any) -> requests.Response:
    return requests.request(method, gw.url + path, headers=headers, timeout=30, **kw)


# --------------------------------------------------------------------------- basic users
@pytest.mark.parametrize("user", ["plain", "argon", "bcrypt", "passlib", "django"])
def test_basic_users_with_each_password_form(gw: GatewayProcess, user: str) -> None:
    for _ in range(2):  # the second time from the verified cache
        r = get(gw, "/system", basic(user))
        assert r.status_code == 200 and r.json()["DicomAet"] == gw.orthanc.aet  # type: ignore[union-attr]
    assert get(gw, "/system", basic(user, PASSWORDS[user] + "x")).status_code == 401
    roles = get(gw, "/system", basic(user)).headers["X-Roles"]
    assert roles == ("viewer" if user == "bcrypt" else "uploader,viewer")


def test_a_plain_password_warns_at_start_up_and_hashes_do_not(gw: GatewayProcess) -> None:
    log = gw.log_text()
    assert "Authentication:Users:plain: the password is stored in clear text" in log
    for hashed in ("argon", "bcrypt", "passlib", "django", "root"):
        assert f"Authentication:Users:{hashed}: the password" not in log


# --------------------------------------------------------------------------- API keys
def test_api_keys_with_their_roles(gw: GatewayProcess) -> None:
    assert get(gw, "/dicom-web/studies", key(VIEWER_KEY)).status_code == 200
    r = get(gw, "/dicom-web/studies", key(UPLOADER_KEY))
    assert r.status_code == 403 and r.json()["requiredRoles"] == ["viewer"]
    r = requests.post(gw.url + "/files/", headers={**key(UPLOADER_KEY), "Tus-Resumable": "1.0.0", "Upload-Length": "4"},
                      timeout=30)
    assert r.status_code == 201, r.text
    r = requests.post(gw.url + "/files/", headers={**key(VIEWER_KEY), "Tus-Resumable": "1.0.0", "Upload-Length": "4"},
                      timeout=30)
    assert r.status_code == 403 and r.json()["requiredRoles"] == ["uploader"]
    r = get(gw, "/dicom-web/studies", {"X-API-Key": VIEWER_KEY[:-2] + "zz"})
    assert r.status_code == 401


def test_credentials_never_reach_the_hooks_or_the_pacs_and_lua_sees_the_identity(gw: GatewayProcess,
                                                                                 idp: OidcProvider) -> None:
    fields = get(gw, "/whoami", key(VIEWER_KEY)).text.split("|")
    assert fields == ["viewer", "viewer", "1", "nil", "nil", "", "nil", "nil", "***", "***"]
    fields = get(gw, "/whoami", basic("root")).text.split("|")
    assert fields[:3] == ["root", "admin", "1"] and fields[6:8] == ["nil", "nil"]
    fields = get(gw, "/whoami", bearer(idp.token("viewer-app"))).text.split("|")
    assert fields[:5] == ["viewer-app", "viewer", "1", "viewer-app", "dicomproxy"]
    assert {"iss", "exp", "roles", "scope", "sub"} <= set(fields[5].split(",")) and fields[6:8] == ["nil", "nil"]


# --------------------------------------------------------------------------- bearer tokens
def test_rs256_and_es256_tokens_from_the_provider(gw: GatewayProcess, idp: OidcProvider) -> None:
    for resource in ("urn:dicomproxy", "urn:dicomproxy:es256"):
        token = idp.token("viewer-app", resource)
        assert jwt.get_unverified_header(token)["alg"] == ("ES256" if "es256" in resource else "RS256")
        r = get(gw, "/system", bearer(token))
        assert r.status_code == 200 and r.headers["X-Roles"] == "viewer"


def test_a_token_for_another_audience_is_refused(gw: GatewayProcess, idp: OidcProvider) -> None:
    r = get(gw, "/system", bearer(idp.token("viewer-app", "urn:other")))
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"] and "wrong audience" in r.json()["error"]


def test_an_expired_token_is_refused_even_after_it_was_cached(gw: GatewayProcess, idp: OidcProvider) -> None:
    token = idp.token("viewer-app", "urn:dicomproxy:short")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert get(gw, "/system", bearer(token)).status_code == 200
    wait_until(lambda: time.time() > exp + 0.5, timeout=10, what="the token's expiry")
    r = get(gw, "/system", bearer(token))
    assert r.status_code == 401 and r.json()["error"] == "invalid token: expired"
    assert "bearer token (unverified sub 'viewer-app'): expired" in gw.log_text()


def test_a_token_without_a_mapped_role_may_use_role_free_routes_only(gw: GatewayProcess, idp: OidcProvider) -> None:
    token = idp.token("plain-app")
    assert get(gw, "/system", bearer(token)).status_code == 403
    assert get(gw, "/dicomproxy/tasks", bearer(token)).status_code == 200


def test_key_rotation_at_the_provider(gw: GatewayProcess, idp: OidcProvider) -> None:
    old = idp.token("viewer-app")
    assert get(gw, "/system", bearer(old)).status_code == 200
    rsa_kid, ec_kid = idp.rotate()
    fresh = idp.token("viewer-app")
    assert jwt.get_unverified_header(fresh)["kid"] == rsa_kid
    loads = gw.log_text().count("signing keys loaded")
    # the last fetch may be less than JwksMinRefreshSeconds (2 s) ago: then the gateway may not
    # fetch yet; once it has fetched, the new kid is accepted
    wait_until(lambda: get(gw, "/system", bearer(fresh)).status_code == 200, timeout=10, interval=0.5,
               what="the rotated key to be accepted")
    assert gw.log_text().count("signing keys loaded") == loads + 1 and rsa_kid in gw.log_text()
    assert get(gw, "/system", bearer(old)).status_code == 200, "the old key is still published"
    assert get(gw, "/system", bearer(idp.token("viewer-app", "urn:dicomproxy:es256"))).status_code == 200


def test_a_flood_of_unknown_kids_costs_the_provider_one_fetch_per_interval(gw: GatewayProcess,
                                                                           idp: OidcProvider) -> None:
    head, body, sig = idp.token("viewer-app").split(".")
    loads = gw.log_text().count("signing keys loaded")
    started = time.monotonic()
    for i in range(40):
        forged = dict(jwt.get_unverified_header(idp.token("viewer-app")), kid=f"bogus-{i}")
        forged_head = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
        r = get(gw, "/system", bearer(f"{forged_head}.{body}.{sig}"))
        assert r.status_code == 401 and "unknown key" in r.json()["error"]
    elapsed = time.monotonic() - started
    fetched = gw.log_text().count("signing keys loaded") - loads
    assert fetched <= elapsed / 2 + 1, f"{fetched} key-set fetches in {elapsed:.1f} s (JwksMinRefreshSeconds 2)"


# --------------------------------------------------------------------------- roles and rules
def test_role_rules_on_gateway_routes(gw: GatewayProcess, idp: OidcProvider) -> None:
    admin, viewer = bearer(idp.token("admin-app")), bearer(idp.token("viewer-app"))
    assert get(gw, "/dicomproxy/metrics", admin).status_code == 200
    r = get(gw, "/dicomproxy/metrics", viewer)
    assert r.status_code == 403 and r.json() == {"error": "this needs the role admin", "requiredRoles": ["admin"],
                                                 "rule": "* /dicomproxy/metrics"}
    assert get(gw, "/dicomproxy/metrics", basic("root")).status_code == 200
    r = get(gw, "/tools/execute-script", basic("plain"), "POST", data="print(1)")
    assert r.status_code == 403 and r.json()["requiredRoles"] == ["admin"]
    r = get(gw, "/tools/execute-script", admin, "POST", data="print(1)")
    assert "requiredRoles" not in r.text, "an admin passes the gateway's rule (Orthanc answers itself)"
    # proxied writes need uploader: a viewer may not delete from the PACS
    r = get(gw, "/studies/0000", bearer(idp.token("viewer-app")), "DELETE")
    assert r.status_code == 403 and r.json()["requiredRoles"] == ["uploader"]


def test_more_than_one_credential_is_refused(gw: GatewayProcess) -> None:
    r = get(gw, "/system", {**basic("plain"), **key(VIEWER_KEY)})
    assert r.status_code == 400 and "more than one credential" in r.json()["error"]


def test_health_stays_open_and_no_secret_shows(gw: GatewayProcess, idp: OidcProvider) -> None:
    anonymous = get(gw, "/dicomproxy/health", {}).json()
    assert set(anonymous) == {"status", "degraded", "version"} and anonymous["status"] == "ok"
    full = get(gw, "/dicomproxy/health", key(VIEWER_KEY)).json()
    assert full["oidc"]["ok"] is True and full["oidc"]["issuer"] == idp.issuer
    token = idp.token("viewer-app")
    get(gw, "/system", bearer(token))
    texts = [gw.log_text(), json.dumps(full), json.dumps(anonymous)]
    secrets = [VIEWER_KEY, UPLOADER_KEY, token, *PASSWORDS.values(), hash_key(VIEWER_KEY)]
    secrets += [c["client_secret"] for c in CLIENTS]
    for text in texts:
        for secret in secrets:
            assert secret not in text


# --------------------------------------------------------------------------- failed attempts
def test_failed_attempts_are_limited_per_address(gateway_factory: Any, idp: OidcProvider) -> None:
    settings = {"Dicom": {"Port": 0}, "Authentication": {
        **auth_settings(idp.issuer), "FailedAttempts": {"Burst": 3, "PerMinute": 1}}}
    gateway = gateway_factory(settings)
    for headers in (basic("plain", "guess-1"), key("dpk_guess"), bearer("not.a.token")):
        assert get(gateway, "/system", headers).status_code == 401
    r = get(gateway, "/system", basic("plain"))
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    assert get(gateway, "/dicomproxy/health", {}).status_code == 200, "health stays open to a blocked address"
    log = gateway.log_text()
    assert "authentication failed from 127.0.0.1: basic user 'plain': wrong password" in log
    assert "authentication failed from 127.0.0.1: API key: not a configured key" in log
    assert "guess-1" not in log and "dpk_guess" not in log
