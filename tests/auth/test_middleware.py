"""The ASGI layer in-process: one credential, challenges, 400/401/403/429, the scope it hands on."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest

from dicomproxy.auth.apikeys import ApiKeyVerifier, hash_key
from dicomproxy.auth.basic import BasicVerifier
from dicomproxy.auth.middleware import AuthMiddleware, Schemes
from dicomproxy.auth.passwords import parse_stored
from dicomproxy.auth.policy import Policy, builtin_rules
from dicomproxy.auth.ratelimit import FailureLimiter

KEY = "dpk_test-key-0123456789"


class App:
    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def layer(burst: int = 3) -> tuple[AuthMiddleware, App]:
    app = App()
    schemes = Schemes(
        basic=BasicVerifier.from_passwords({"alice": (parse_stored("pw"), frozenset({"viewer", "uploader"})),
                                            "root": (parse_stored("r00t"), frozenset({"admin"}))}),
        api_keys=ApiKeyVerifier({"tool": (hash_key(KEY), frozenset({"uploader"}))}))
    return AuthMiddleware(app, schemes, Policy((), builtin_rules()), FailureLimiter(burst), "R"), app


def basic(user: str, pw: str) -> tuple[bytes, bytes]:
    return b"authorization", b"Basic " + base64.b64encode(f"{user}:{pw}".encode())


async def call(mw: AuthMiddleware, path: str, headers: list[tuple[bytes, bytes]], method: str = "GET",
               host: str = "10.0.0.1") -> tuple[int, dict[bytes, bytes], Any]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"accept", b"*/*"), *headers],
             "client": (host, 5000)}
    await mw(scope, None, send)
    body = sent[1]["body"]
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(body) if body != b"ok" else body


async def test_a_valid_credential_reaches_the_app_as_an_identity_without_the_credential() -> None:
    mw, app = layer()
    for headers, name, scheme, roles in (([basic("alice", "pw")], "alice", "basic", ("uploader", "viewer")),
                                         ([(b"x-api-key", KEY.encode())], "tool", "api-key", ("uploader",))):
        status, _, _ = await call(mw, "/files/", headers, "POST")
        assert status == 200
        scope = app.scopes[-1]
        assert (scope["user"], scope["auth_scheme"], scope["roles"], dict(scope["claims"])) == (name, scheme, roles, {})
        assert scope["headers"] == [(b"accept", b"*/*")]


@pytest.mark.parametrize("headers,status", [
    ([], 401),
    ([basic("alice", "pw"), (b"x-api-key", KEY.encode())], 400),
    ([basic("alice", "pw"), basic("alice", "pw")], 400),
    ([basic("alice", "nope")], 401),
    ([(b"x-api-key", b"dpk_wrong")], 401),
    ([(b"authorization", b"Bearer abc")], 401),
    ([(b"authorization", b"Digest x")], 401),
])
async def test_refusals(headers: list[tuple[bytes, bytes]], status: int) -> None:
    mw, app = layer()
    got, head, body = await call(mw, "/dicom-web/studies", headers)
    assert got == status and app.scopes == []
    if status == 401:
        assert head[b"www-authenticate"] == b'Basic realm="R", charset="UTF-8"'
        assert body == {"error": "authentication required"}


async def test_a_missing_role_is_403_naming_it() -> None:
    mw, _ = layer()
    status, _, body = await call(mw, "/dicom-web/studies", [(b"x-api-key", KEY.encode())])
    assert status == 403 and body["requiredRoles"] == ["viewer"] and body["rule"] == "GET,HEAD /"
    assert (await call(mw, "/tools/execute-script", [basic("alice", "pw")], "POST"))[0] == 403
    assert (await call(mw, "/tools/execute-script", [basic("root", "r00t")], "POST"))[0] == 200


async def test_failures_are_logged_without_the_secret_and_limited(caplog: pytest.LogCaptureFixture) -> None:
    mw, _ = layer(burst=3)
    caplog.set_level(logging.WARNING, "dicomproxy.auth")
    for _ in range(3):
        assert (await call(mw, "/x", [basic("alice", "Secret-Guess")]))[0] == 401
    status, head, _ = await call(mw, "/x", [basic("alice", "pw")])  # right, but the address is blocked
    assert status == 429 and int(head[b"retry-after"]) > 0
    assert (await call(mw, "/x", [basic("alice", "pw")], host="10.0.0.2"))[0] == 200
    assert (await call(mw, "/x", [(b"x-api-key", b"dpk_Guess")], host="10.0.0.3"))[0] == 401
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "authentication failed from 10.0.0.1: basic user 'alice': wrong password"
    assert lines[-1] == "authentication failed from 10.0.0.3: API key: not a configured key"
    assert not any("Secret-Guess" in line or "Guess" in line for line in lines)


async def test_health_is_open_and_anonymous_without_a_valid_credential() -> None:
    mw, app = layer(burst=1)
    for headers in ([], [basic("alice", "bad")], [basic("alice", "pw")]):
        assert (await call(mw, "/dicomproxy/health", headers))[0] == 200
    assert [s.get("anonymous", False) for s in app.scopes] == [True, True, True], "blocked after one failure"
    assert all(b"authorization" not in dict(s["headers"]) for s in app.scopes)
    assert (await call(mw, "/dicomproxy/health", [basic("alice", "pw")], host="10.9.9.9"))[0] == 200
    assert app.scopes[-1]["user"] == "alice" and "anonymous" not in app.scopes[-1]
