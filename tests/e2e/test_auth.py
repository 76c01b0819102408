"""``Authentication:Users`` (HTTP basic) in a real gateway (issue 2, item 8); API keys too.

When users are configured every route but ``/dicomproxy/health`` needs a valid user, the
username reaches the hooks as ``request.User``, and the client's credentials (``Authorization``,
``X-API-Key``) are not passed on
to the PACS (checked at :mod:`tests.local_upstream`, which echoes what it receives).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from dicomproxy.auth.apikeys import hash_key
from tests.local_upstream import LocalUpstream, header_values
from tests.peers import GatewayProcess

USERS = {"alice": "s3cret", "bob": "pass:with:colons"}
API_KEY = "dpk_auth-test-key-0123456789abcdef"

MAIN = r"""
function onHttpRequest(r)
  if r.Path == "/whoami" then
    r:ResponseWrite("user=" .. tostring(r.User))
    return true
  end
end

function onHttpResponse(res)
  res:AddHeader("X-User", tostring(res.User))
end
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: LocalUpstream) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("gw-auth"),
        settings={"Dicom": {"Port": 0}, "Upstream": {"Url": upstream.url},
                  "Authentication": {"Users": USERS, "Realm": "TestRealm", "FailedAttempts": {"Burst": 0},
                                     "ApiKeys": {"tool": {"Hash": hash_key(API_KEY), "Roles": ["viewer"]}}}},
        scripts={"main.lua": MAIN},
    )
    gateway.start()
    yield gateway
    gateway.stop()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def get(gw: GatewayProcess, path: str, **kw: Any) -> requests.Response:
    return requests.get(gw.url + path, timeout=10, **kw)


@pytest.mark.parametrize("headers", [
    {},
    basic("alice", "wrong"),
    basic("mallory", "s3cret"),
    basic("alice", ""),
    {"Authorization": "Basic !!!not-base64!!!"},
    {"Authorization": "Bearer s3cret"},
], ids=["none", "wrong-password", "unknown-user", "empty-password", "garbage", "bearer"])
def test_requests_without_valid_user_get_401(gw: GatewayProcess, upstream: LocalUpstream,
                                             headers: dict[str, str]) -> None:
    upstream.reset()
    for path in ("/echo/private", "/whoami", "/dicomproxy/tasks", "/dicomproxy/metrics"):
        r = get(gw, path, headers=headers)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith('Basic realm="TestRealm"')
        assert r.json() == {"error": "authentication required"}
    assert upstream.paths_seen() == []


def test_valid_user_passes_and_reaches_the_hooks(gw: GatewayProcess) -> None:
    r = get(gw, "/echo/private", headers=basic("alice", "s3cret"))
    assert r.status_code == 200
    assert r.headers["X-User"] == "alice"
    seen = r.json()["headers"]
    assert header_values(seen, "authorization") == [], "the client's credentials went to the PACS"
    seen = get(gw, "/echo/private", headers={"X-API-Key": API_KEY}).json()["headers"]
    assert header_values(seen, "x-api-key") == [] and header_values(seen, "authorization") == []
    r = get(gw, "/whoami", headers=basic("bob", "pass:with:colons"))
    assert (r.status_code, r.text) == (200, "user=bob")
    assert get(gw, "/dicomproxy/tasks", headers=basic("alice", "s3cret")).status_code == 200
    assert get(gw, "/dicomproxy/metrics", headers=basic("bob", "pass:with:colons")).status_code == 200


def test_health_is_open(gw: GatewayProcess) -> None:
    r = get(gw, "/dicomproxy/health")
    assert r.status_code == 200 and r.json()["status"] in ("ok", "degraded")
    assert r.headers["X-User"] == ""  # hooks ran, with no user


def test_no_users_means_no_authentication(gateway_factory: Any, upstream: LocalUpstream) -> None:
    open_gw = gateway_factory({"Dicom": {"Port": 0}, "Upstream": {"Url": upstream.url}},
                              {"main.lua": MAIN}, orthanc=None)
    r = get(open_gw, "/whoami")
    assert (r.status_code, r.text) == (200, "user=")
    # without configured users the Authorization header is the PACS's business: passed on
    seen = get(open_gw, "/echo/x", headers=basic("pacs", "pw")).json()["headers"]
    assert header_values(seen, "authorization") == [basic("pacs", "pw")["Authorization"]]
