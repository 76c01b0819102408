"""The HTTP front door, tried as an attacker would: nothing anonymous reaches the PACS, one
canonical request for every layer, bounded heads, slow clients and connection counts.

Each attack was reproduced against the gateway before the fix (issue: "Safe on a hospital
network"); each test asserts on the real Orthanc behind the gateway (compared with a direct
request) or on the bytes the upstream received.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.local_upstream import LocalUpstream, raw_request
from tests.observe import rss_kb
from tests.peers import LOOPBACK, GatewayProcess, OrthancServer, run_dcmtk, wait_until

USERS = {"alice": "wonderland", "root": {"Password": "s3cret", "Roles": ["admin"]}}
ALICE = ("alice", "wonderland")

# A rule written like the README's examples: it must hold however the path is spelled.
GUARD_LUA = r"""
function onHttpRequest(request)
  if request.Path:find("^/patients") or request.Path:find("^/echo/secret") then
    request.StatusCode = 403
    request:ResponseWrite("blocked " .. request.Path)
    return true
  end
  if request.Method == "DELETE" and request.User ~= "root" then
    request.StatusCode = 403
    request:ResponseWrite("no delete for " .. tostring(request.User))
    return true
  end
  request:AddHeader("X-Hook-Saw", request.Method .. " " .. request.Path .. "?" .. (request.QueryString or ""))
end
"""


@pytest.fixture(scope="module")
def echo_gw(tmp_path_factory: pytest.TempPathFactory, upstream: LocalUpstream) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("front-echo"), settings={
        "Upstream": {"Url": upstream.url}, "Dicom": {"Port": 0}, "Authentication": {"Users": USERS},
    }, scripts={"main.lua": GUARD_LUA})
    gw.start()
    yield gw
    gw.stop()


def seen(response: tuple[int, list[tuple[str, str]], bytes]) -> dict[str, Any]:
    status, _, data = response
    assert status == 200, (status, data)
    return json.loads(data)


def hook_saw(echo: dict[str, Any]) -> str:
    return next(v for k, v in echo["headers"] if k.lower() == "x-hook-saw")


def auth_header(user: str = "alice", password: str = "wonderland") -> tuple[str, str]:
    import base64

    return ("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


# --------------------------------------------------------------------------- CORS preflights
def test_anonymous_preflight_with_method_override_never_reaches_orthanc(
    gateway_factory: Any, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Any
) -> None:
    """The critical finding: an anonymous OPTIONS dressed as a preflight, with an override to
    DELETE (or PUT on /modalities with a body), was executed by Orthanc."""
    path, _ = dicom_samples.make_instance(tmp_path / "a.dcm", patient_id="CORS1", patient_name="Cors^One")
    instance = fresh_orthanc.upload(path.read_bytes())["ID"]
    gw = gateway_factory(settings={"Authentication": {"Users": USERS}, "Dicom": {"Port": 0}})
    before = fresh_orthanc.rest_get("/modalities")
    for method, target, override, body in (
        ("OPTIONS", f"/instances/{instance}", "DELETE", None),
        ("OPTIONS", "/modalities/evil", "PUT", json.dumps(["EVIL", "10.6.6.6", 104]).encode()),
        ("POST", f"/instances/{instance}", "DELETE", b""),
    ):
        headers = [("Origin", "https://evil.example"), ("Access-Control-Request-Method", override),
                   ("X-HTTP-Method-Override", override), ("X-HTTP-Method", override)]
        status, _, data = raw_request(gw.url, method, target, headers, body)
        assert status in (400, 401), (method, target, status, data)
    # the same question asked of Orthanc directly: the instance and the modalities are as they were
    assert fresh_orthanc.rest_get(f"/instances/{instance}")["ID"] == instance
    assert fresh_orthanc.rest_get("/modalities") == before


def test_preflights_follow_the_configured_policy(gateway_factory: Any, upstream: LocalUpstream) -> None:
    gw = gateway_factory(settings={
        "Upstream": {"Url": upstream.url}, "Dicom": {"Port": 0}, "Authentication": {"Users": USERS},
        "Cors": {"AllowedOrigins": ["https://viewer.example.org"], "AllowCredentials": True,
                 "CrossOriginOpenerPolicy": "same-origin", "CrossOriginEmbedderPolicy": "require-corp"},
    }, orthanc=None)
    upstream.reset()
    ok = requests.options(gw.url + "/dicom-web/studies", headers={
        "Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept"}, timeout=10)
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    assert "GET" in ok.headers["Access-Control-Allow-Methods"]
    refused = requests.options(gw.url + "/dicom-web/studies", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"}, timeout=10)
    assert refused.status_code == 400 and "origin" in refused.text
    assert "Access-Control-Allow-Origin" not in refused.headers
    # an actual cross-origin request still needs a user, and gets the policy's headers
    assert requests.get(gw.url + "/echo/x", headers={"Origin": "https://viewer.example.org"},
                        timeout=10).status_code == 401
    r = requests.get(gw.url + "/echo/x", headers={"Origin": "https://viewer.example.org"}, auth=ALICE, timeout=10)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert "Upload-Offset" in r.headers["Access-Control-Expose-Headers"]
    assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    evil = requests.get(gw.url + "/echo/x", headers={"Origin": "https://evil.example"}, auth=ALICE, timeout=10)
    assert "Access-Control-Allow-Origin" not in evil.headers
    # no preflight ever reached the upstream: only the two authenticated GETs did
    assert [r["path"] for r in upstream.stats()["requests"]] == ["/echo/x", "/echo/x"]


# --------------------------------------------------------------------------- method overrides
def test_method_override_becomes_the_effective_method(echo_gw: GatewayProcess, upstream: LocalUpstream) -> None:
    # alice may not DELETE: the hook sees the DELETE a POST asked for, and refuses it
    status, _, data = raw_request(echo_gw.url, "POST", "/echo/x",
                                  [auth_header(), ("X-HTTP-Method-Override", "DELETE")], b"")
    assert (status, data) == (403, b"no delete for alice")
    # root may: the upstream receives a DELETE, with no override header left
    echo = seen(raw_request(echo_gw.url, "POST", "/echo/x?_method=DELETE&keep=1",
                            [auth_header("root", "s3cret")], b""))
    assert echo["method"] == "DELETE" and echo["raw_query"] == "keep=1"
    assert hook_saw(echo) == "DELETE /echo/x?keep=1"
    tunnelled = seen(raw_request(echo_gw.url, "POST", "/echo/y",
                                 [auth_header(), ("X-HTTP-Method-Override", "PATCH")], b"abc"))
    assert tunnelled["method"] == "PATCH" and tunnelled["body_length"] == 3
    assert not [k for k, _ in tunnelled["headers"] if "override" in k.lower() or k.lower() == "x-http-method"]
    for method, headers in (
        ("GET", [("X-HTTP-Method-Override", "DELETE")]),
        ("OPTIONS", [("X-Method-Override", "DELETE")]),
        ("POST", [("X-HTTP-Method-Override", "HEAD")]),
        ("POST", [("X-HTTP-Method-Override", "TRACE")]),
        ("POST", [("X-HTTP-Method-Override", "PUT"), ("X-HTTP-Method", "DELETE")]),
    ):
        status, _, data = raw_request(echo_gw.url, method, "/echo/z", [auth_header(), *headers], b"")
        assert status == 400, (method, headers, status, data)


# --------------------------------------------------------------------------- one canonical path
@pytest.mark.parametrize("target", [
    "/patients", "//patients", "/./patients", "/x/../patients", "/x/%2e%2e/patients", "/x/%2E%2E/patients",
    "/pat%69ents", "///patients/", "/echo/../patients/1", "/echo/secret", "/echo/./secret", "/echo//secret",
    "/echo/x/../secret", "/echo/%73ecret",
])
def test_every_spelling_of_a_blocked_path_is_blocked(echo_gw: GatewayProcess, target: str) -> None:
    status, _, data = raw_request(echo_gw.url, "GET", target, [auth_header()])
    assert status == 403 and data.startswith(b"blocked /"), (target, status, data)


@pytest.mark.parametrize("target", [
    "/echo/a%2Fb", "/echo/a%2fb", "/echo/a%5Cb", "/echo/a\\b", "/../patients", "/echo/../../patients",
    "/%2e%2e/patients", "/echo/%zz", "/echo/a%00b", "/echo/%c3%28",
])
def test_ambiguous_targets_are_refused(echo_gw: GatewayProcess, upstream: LocalUpstream, target: str) -> None:
    before = len(upstream.stats()["requests"])
    status, _, data = raw_request(echo_gw.url, "GET", target, [auth_header()])
    assert status == 400 and b"bad request" in data, (target, status, data)
    assert len(upstream.stats()["requests"]) == before


def test_the_upstream_receives_the_path_the_hooks_saw(echo_gw: GatewayProcess) -> None:
    for target, expected in (
        ("/echo//a/./b/../c", "/echo/a/c"),
        ("/echo/caf%C3%A9/%41", "/echo/caf%C3%A9/A"),
        ("/echo/sp%20ace/", "/echo/sp%20ace/"),
        ("/echo/plain?x=%2F", "/echo/plain"),
    ):
        echo = seen(raw_request(echo_gw.url, "GET", target, [auth_header()]))
        assert echo["path"] == expected, target
        # header values reach the echo server as bytes; it shows them as latin-1
        hook_path = hook_saw(echo).encode("latin-1").decode("utf-8").split(" ", 1)[1].split("?", 1)[0]
        assert quote(hook_path, safe="/%") == expected, (target, hook_path)


def test_a_path_prefix_in_the_upstream_url_cannot_be_left(
    gateway_factory: Any, orthanc: OrthancServer
) -> None:
    gw = gateway_factory(settings={"Upstream": {"Url": orthanc.http_url + "/dicom-web"}, "Dicom": {"Port": 0}})
    assert gw.get("/studies").status_code == 200  # /dicom-web/studies
    for target in ("/../system", "/studies/../../system", "/%2e%2e/system", "/..%2fsystem",
                   "/studies/%2E%2E/%2E%2E/system"):
        status, _, data = raw_request(gw.url, "GET", target)
        assert status == 400, (target, status, data)
        assert b"ApiVersion" not in data


# --------------------------------------------------------------------------- head and URL limits
def test_oversized_heads_and_urls_are_refused_before_the_app(echo_gw: GatewayProcess, upstream: LocalUpstream) -> None:
    before = len(upstream.stats()["requests"])
    status, _, _ = raw_request(echo_gw.url, "GET", "/echo/" + "a" * 9000, [auth_header()])
    assert status == 414
    status, _, _ = raw_request(echo_gw.url, "GET", "/echo/x", [auth_header(), ("X-Big", "b" * 70_000)])
    assert status == 431
    status, _, _ = raw_request(echo_gw.url, "GET", "/echo/x",
                               [auth_header(), *((f"X-H{i}", "v" * 100) for i in range(700))])
    assert status == 431
    assert len(upstream.stats()["requests"]) == before
    assert seen(raw_request(echo_gw.url, "GET", "/echo/fine", [auth_header()]))["path"] == "/echo/fine"


def test_a_100_mb_header_block_does_not_grow_memory(echo_gw: GatewayProcess) -> None:
    assert echo_gw.proc is not None
    rss_before = rss_kb(echo_gw.proc.pid)
    sent = 0
    with socket.create_connection((LOOPBACK, echo_gw.http_port), timeout=10) as s:
        s.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        chunk = b"f" * (1 << 20)
        try:
            while sent < 100 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the gateway closed the connection: what we want
        answer = b""
        try:
            answer = s.recv(1024)
        except OSError:
            pass
    assert sent < 100 << 20, "the gateway kept reading a 100 MB header block"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer
    grown_mb = (rss_kb(echo_gw.proc.pid) - rss_before) / 1024
    assert grown_mb < 10, f"RSS grew by {grown_mb:.1f} MB"


# --------------------------------------------------------------------------- slow clients
@pytest.fixture(scope="module")
def tight_gw(tmp_path_factory: pytest.TempPathFactory, upstream: LocalUpstream) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("front-tight"), settings={
        "Upstream": {"Url": upstream.url}, "Dicom": {"Port": 0},
        "Server": {"HeadTimeoutSeconds": 1, "MaxConnections": 20},
    })
    gw.start()
    yield gw
    gw.stop()


def test_a_dripping_head_is_answered_408_and_closed(tight_gw: GatewayProcess) -> None:
    with socket.create_connection((LOOPBACK, tight_gw.http_port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"GET /echo/x HTTP/1.1\r\n")
        answer = b""
        for piece in (b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n"):
            time.sleep(0.4)
            try:
                s.sendall(piece)
            except OSError:
                break
        while True:
            data = s.recv(4096)
            if not data:
                break
            answer += data
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 0.9 < elapsed < 3, elapsed


def test_a_kept_alive_connections_next_head_gets_its_own_head_timeout(tight_gw: GatewayProcess) -> None:
    """The head timer is one per connection (http/server.py): armed when the connection opened,
    it fires while the second request's head is only 0.4 s old, and must wait for that head's
    own deadline (1 s after its first byte), neither refusing it early nor letting it drip on."""
    with socket.create_connection((LOOPBACK, tight_gw.http_port), timeout=10) as s:
        s.sendall(b"GET /echo/first HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += s.recv(4096)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += s.recv(4096)
        time.sleep(0.6)  # the connection's timer (armed at its opening) fires 0.4 s into the next head
        started = time.monotonic()
        s.sendall(b"GET /echo/second HTTP/1.1\r\n")
        answer = b""
        for piece in (b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n", b"X-D: 4\r\n"):
            time.sleep(0.3)
            try:
                s.sendall(piece)
            except OSError:
                break
        while True:
            data = s.recv(4096)
            if not data:
                break
            answer += data
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 0.9 < elapsed < 2.2, elapsed


def test_an_idle_new_connection_is_closed(tight_gw: GatewayProcess) -> None:
    with socket.create_connection((LOOPBACK, tight_gw.http_port), timeout=10) as s:
        started = time.monotonic()
        assert s.recv(1) == b""  # closed by the gateway, without a byte
        assert 0.9 < time.monotonic() - started < 3


def test_past_the_connection_cap_new_connections_get_503(tight_gw: GatewayProcess) -> None:
    held = [socket.create_connection((LOOPBACK, tight_gw.http_port), timeout=10) for _ in range(20)]
    try:
        for s in held:
            s.sendall(b"GET /echo/x HTTP/1.1\r\n")  # a head in progress: each connection stays open
        with socket.create_connection((LOOPBACK, tight_gw.http_port), timeout=10) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        for s in held:
            s.close()
    # once they are gone (closed by us, or by the head timeout), normal service
    wait_until(lambda: requests.get(tight_gw.url + "/echo/back", timeout=5).status_code == 200,
               timeout=10, what="service after the held connections closed")


def test_slow_clients_cannot_starve_the_dicom_side_of_file_descriptors(
    gateway_factory: Any, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Any
) -> None:
    """At LimitNOFILE 1024, 1,100 dripping HTTP connections left the spool without descriptors and
    C-STORE answered 0xA700. With 400 descriptors here and 256 reserved, at most 144 HTTP
    connections are served and the DICOM side keeps storing."""
    gw = gateway_factory(settings={"Server": {"HeadTimeoutSeconds": 60}},
                         command_prefix=["prlimit", "--nofile=400:400", "--"])
    assert "at most 144 HTTP connections will be served" in gw.log_text()
    held = []
    try:
        refused = 0
        for _ in range(300):
            try:
                s = socket.create_connection((LOOPBACK, gw.http_port), timeout=5)
            except OSError:
                refused += 1
                continue
            held.append(s)
            s.sendall(b"GET /x HTTP/1.1\r\n")
        paths = [dicom_samples.make_instance(tmp_path / f"i{i}.dcm", patient_id="FD", patient_name="Fd^Five")[0]
                 for i in range(5)]
        run_dcmtk("storescu", "-aec", gw.aet, LOOPBACK, str(gw.dicom_port), *map(str, paths))
        wait_until(lambda: fresh_orthanc.instance_count() == 5, timeout=30, what="5 instances in Orthanc")
    finally:
        for s in held:
            s.close()
    assert refused == 0 or "Server:MaxConnections" in gw.log_text()
