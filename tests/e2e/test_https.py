"""HTTPS on the gateway's own listeners (issue 12, items 1 and 8), through real processes: curl
(Debian's, OpenSSL 3), tuspy, a real Orthanc behind the gateway, and the status page in Chromium.

Certificates come from tests/tls_certs.py: a private CA, a server certificate for
127.0.0.1/localhost, client certificates (one from another CA, one expired), PKCS#12 bundles.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from tusclient import client as tus_client

from tests.e2e.test_ui import CHROMIUM_ARGS, PASSWORD, USER
from tests.local_upstream import LocalUpstream
from tests.peers import LOOPBACK, REPO_ROOT, GatewayProcess, OrthancServer, chromium, free_port, wait_until
from tests.tls_certs import Issued, TestCa

CURL = "/usr/bin/curl"
GatewayFactory = Callable[..., GatewayProcess]

WHO = r"""
function onHttpRequest(r)
  if r.Path == "/who" then
    r:ResponseWrite(r.Scheme .. "|" .. r.ClientCertificate .. "|" .. tostring(Config["Https:KeyPassword"]) .. "|"
      .. tostring(Config["Https:Pkcs12Password"]))
    return true
  end
end
"""


@dataclass
class Pki:
    ca: TestCa
    server: Issued
    alice: Issued
    expired_client: Issued
    stranger: Issued  # a client certificate from another CA

    @property
    def ca_file(self) -> str:
        return str(self.ca.cert_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCa.create(folder / "ca")
    other = TestCa.create(folder / "other", "Other CA")
    return Pki(ca, ca.issue("server", [LOOPBACK, "localhost"], key_kind="rsa"), ca.issue("alice", client=True),
               ca.issue("expired-client", client=True, days=-1), other.issue("mallory", client=True))


def curl(*args: str, ca: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    if not Path(CURL).exists():
        pytest.fail("curl is missing: run scripts/install.sh (apt-get install curl)", pytrace=False)
    cmd = [CURL, "-sS", "--max-time", str(timeout), *(["--cacert", ca] if ca else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)


def served_serial(url: str, ca: str) -> str:
    """The serial of the certificate a new curl connection gets (``-w %{certs}``)."""
    out = curl("-o", "/dev/null", "-w", "%{certs}", url + "/dicomproxy/health", ca=ca)
    assert out.returncode == 0, out.stderr
    serial = re.search(r"Serial Number:\s*([0-9a-fA-F:]+)", out.stdout)
    assert serial, out.stdout
    return f"{int(serial.group(1).replace(':', ''), 16):X}"


def https_settings(server: Issued, port: int | None = None, **https: Any) -> dict[str, Any]:
    return {"Urls": f"https://{LOOPBACK}:{port or free_port()}", "Dicom": {"Port": 0},
            "Https": {"CertificateFile": str(server.cert_path), "KeyFile": str(server.key_path), **https}}


def tls_socket(port: int, ca: str, cert: Issued | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    return ctx.wrap_socket(socket.create_connection((LOOPBACK, port), timeout=10), server_hostname=LOOPBACK)


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


# --------------------------------------------------------------------------- one gateway, many checks
@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, pki: Pki, upstream: LocalUpstream) -> Iterator[GatewayProcess]:
    """http + https, redirect and HSTS on, optional client certificates, small head limits, the echo upstream."""
    http_port, https_port = free_port(), free_port()
    settings = {
        "Urls": f"http://{LOOPBACK}:{http_port};https://{LOOPBACK}:{https_port}", "Dicom": {"Port": 0},
        "Upstream": {"Url": upstream.url},
        "Https": {"CertificateFile": str(pki.server.cert_path), "KeyFile": str(pki.server.key_path),
                  "RedirectHttp": True, "Hsts": True, "HstsMaxAgeSeconds": 600, "HstsIncludeSubDomains": True,
                  "ClientCertificateMode": "Optional", "ClientCaFile": pki.ca_file},
        "Server": {"MaxHeadBytes": 4096, "MaxUrlBytes": 1024, "HeadTimeoutSeconds": 2},
    }
    gateway = GatewayProcess(tmp_path_factory.mktemp("https-gw"), settings=settings, scripts={"main.lua": WHO})
    gateway.start()
    gateway.https_url = gateway.urls[1]  # type: ignore[attr-defined]
    gateway.https_port = https_port  # type: ignore[attr-defined]
    yield gateway
    gateway.stop()


def test_curl_over_tls13_with_the_ca_hsts_and_lua(gw: GatewayProcess, pki: Pki, upstream: LocalUpstream) -> None:
    base = gw.https_url  # type: ignore[attr-defined]
    out = curl("-v", "-i", base + "/who", ca=pki.ca_file)
    assert out.returncode == 0, out.stderr
    assert "SSL connection using TLSv1.3" in out.stderr and "ALPN: server accepted http/1.1" in out.stderr
    assert "strict-transport-security: max-age=600; includeSubDomains\n" in out.stdout
    assert out.stdout.endswith("\nhttps|||")  # Scheme, no client certificate, no passwords
    # proxied: the upstream sees X-Forwarded-Proto https, and the response carries HSTS too
    r = requests.get(base + "/echo/x", verify=pki.ca_file, timeout=10)
    assert r.status_code == 200 and r.headers["Strict-Transport-Security"] == "max-age=600; includeSubDomains"
    forwarded = {k.lower(): v for k, v in r.json()["headers"]}
    assert forwarded["x-forwarded-proto"] == "https"
    port = gw.https_port  # type: ignore[attr-defined]
    assert forwarded["forwarded"] == f"for={LOOPBACK};host={LOOPBACK}:{port};proto=https"  # the relay's, over TLS
    # without the CA, curl refuses the private certificate: nothing is trusted by accident
    assert curl(base + "/who").returncode == 60


def test_tls_below_12_is_refused_by_the_gateway(gw: GatewayProcess, pki: Pki) -> None:
    base = gw.https_url  # type: ignore[attr-defined]
    before = gw.log_text().count("offers only TLS versions older than 1.2")
    # SECLEVEL=0 so that Debian's curl really offers TLS 1.1 / 1.0 (by default its OpenSSL refuses to)
    for version in ("1.1", "1.0"):
        old = curl(f"--tlsv{version}", "--tls-max", version, "--ciphers", "DEFAULT@SECLEVEL=0", base + "/who",
                   ca=pki.ca_file)
        assert old.returncode == 35, (version, old.stderr)
    wait_until(lambda: gw.log_text().count("offers only TLS versions older than 1.2 (Https:MinimumTlsVersion)")
               >= before + 2, what="both refusals in the gateway log")
    tls12 = curl("-v", "--tlsv1.2", "--tls-max", "1.2", base + "/who", ca=pki.ca_file)
    assert tls12.returncode == 0 and "SSL connection using TLSv1.2 / ECDHE-RSA-AES" in tls12.stderr
    assert "GCM" in tls12.stderr or "CHACHA20" in tls12.stderr
    cbc = curl("--tlsv1.2", "--tls-max", "1.2", "--ciphers", "ECDHE-RSA-AES256-SHA384", base + "/who", ca=pki.ca_file)
    assert cbc.returncode == 35  # a CBC suite Python's default would have accepted


def test_plain_http_redirects_to_https_but_health_answers(gw: GatewayProcess, pki: Pki) -> None:
    port = gw.https_port  # type: ignore[attr-defined]
    out = curl("-i", "-X", "POST", "--data-binary", "abc", gw.url + "/echo/x?a=1&b=2")
    assert out.stdout.startswith("HTTP/1.1 308"), out.stdout
    assert f"location: https://{LOOPBACK}:{port}/echo/x?a=1&b=2" in out.stdout
    assert "strict-transport-security" not in out.stdout.lower()  # never over plain HTTP
    # followed, the POST and its body arrive over https
    followed = curl("-L", "-X", "POST", "--data-binary", "abc", gw.url + "/echo/x?a=1", ca=pki.ca_file)
    echo = json.loads(followed.stdout)
    assert echo["method"] == "POST" and echo["body_length"] == 3 and echo["raw_query"] == "a=1"
    health = requests.get(gw.url + "/dicomproxy/health", timeout=10, allow_redirects=False)
    assert health.status_code == 200 and "Strict-Transport-Security" not in health.headers
    assert health.json()["https"]["certificate"]["serial"] == pki.server.serial
    for probe, status in (("live", "live"), ("ready", "ready")):  # load-balancer probes ask over plain HTTP too
        answer = requests.get(f"{gw.url}/dicomproxy/health/{probe}", timeout=10, allow_redirects=False)
        assert (answer.status_code, answer.json()) == (200, {"status": status})
    localhost = curl("-i", f"http://localhost:{gw.http_port}/x")
    assert f"location: https://localhost:{port}/x" in localhost.stdout


def test_optional_client_certificates(gw: GatewayProcess, pki: Pki) -> None:
    base = gw.https_url  # type: ignore[attr-defined]
    alice = curl("--cert", str(pki.alice.cert_path), "--key", str(pki.alice.key_path), base + "/who", ca=pki.ca_file)
    assert alice.stdout.startswith("https|CN=alice,O=DicomProxy tests|")
    assert curl(base + "/who", ca=pki.ca_file).stdout.startswith("https||")
    for client, reason in ((pki.expired_client, "certificate has expired"),
                           (pki.stranger, "unable to get local issuer certificate")):
        refused = curl("--cert", str(client.cert_path), "--key", str(client.key_path), base + "/who", ca=pki.ca_file)
        assert refused.returncode != 0 and not refused.stdout.startswith("https|")
        gw.wait_for_log(f"refused: its client certificate does not verify against Https:ClientCaFile: {reason}")


def test_head_limits_hold_over_tls(gw: GatewayProcess, pki: Pki) -> None:
    port = gw.https_port  # type: ignore[attr-defined]
    for head, status in ((b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 8000 + b"\r\n\r\n", b"431"),
                         (b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", b"414")):
        with tls_socket(port, pki.ca_file) as sock:
            sock.sendall(head)
            assert read_all(sock).startswith(b"HTTP/1.1 " + status)
    with tls_socket(port, pki.ca_file) as sock:  # a head that never ends: 408 after HeadTimeoutSeconds
        started = time.monotonic()
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 408")
        assert 1.5 < time.monotonic() - started < 8
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:  # no handshake at all: closed at the deadline
        started = time.monotonic()
        assert read_all(raw) == b""
        assert 1.5 < time.monotonic() - started < 8
    gw.wait_for_log("refused: no TLS handshake within 2 s (Server:HeadTimeoutSeconds)")


# --------------------------------------------------------------------------- client certificates required
def test_required_client_certificate(gateway_factory: GatewayFactory, pki: Pki) -> None:
    settings = https_settings(pki.server, ClientCertificateMode="Required", ClientCaFile=pki.ca_file)
    gateway = gateway_factory(settings, {"main.lua": WHO}, orthanc=None, verify=pki.ca_file,
                              cert=(str(pki.alice.cert_path), str(pki.alice.key_path)))
    out = curl("--cert", str(pki.alice.cert_path), "--key", str(pki.alice.key_path), gateway.url + "/who",
               ca=pki.ca_file)
    assert out.stdout.startswith("https|CN=alice,O=DicomProxy tests|"), out.stderr
    none = curl(gateway.url + "/who", ca=pki.ca_file)
    assert none.returncode != 0 and not none.stdout
    gateway.wait_for_log("refused: it sent no client certificate (Https:ClientCertificateMode is Required)")
    health = gateway.get("/dicomproxy/health").json()["https"]
    assert health["clientCertificates"] == "Required" and health["clientCas"] == 1


# --------------------------------------------------------------------------- PKCS#12 and secrets
def test_pkcs12_by_its_default_name_and_no_secret_shows(gateway_factory: GatewayFactory, pki: Pki) -> None:
    password = "pfx-Secret-4711"
    pfx_server = pki.ca.issue("pfx-server", [LOOPBACK], key_kind="rsa")
    gateway = gateway_factory({"Urls": f"https://{LOOPBACK}:{free_port()}", "Dicom": {"Port": 0},
                               "Https": {"Pkcs12PasswordFile": "pfx-password.txt"}},
                              {"main.lua": WHO}, orthanc=None, verify=pki.ca_file, start=False)
    pfx_server.pkcs12(gateway.workdir / "certificate.pfx", password.encode(), legacy=True)  # as Windows exports it
    (gateway.workdir / "pfx-password.txt").write_text(password + "\n")
    gateway.start()
    assert served_serial(gateway.url, pki.ca_file) == pfx_server.serial
    assert gateway.get("/who").text == "https|||***"  # Lua sees the password masked
    health = gateway.get("/dicomproxy/health").text
    shown = subprocess.run([sys.executable, "-m", "dicomproxy", "config", "--config", str(gateway.config_path)],
                           capture_output=True, text=True, cwd=gateway.workdir, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert json.loads(shown.stdout)["Https"]["Pkcs12Password"] == "***"
    for text in (gateway.log_text(), health, shown.stdout, shown.stderr):
        assert password not in text


def test_encrypted_pem_key_with_the_password_from_the_environment(gateway_factory: GatewayFactory, pki: Pki,
                                                                  tmp_path: Path) -> None:
    password = "key-Secret-0815"
    key = pki.server.encrypted_key(tmp_path / "server-enc.key", password.encode())
    settings = https_settings(pki.server, KeyFile=str(key))
    gateway = gateway_factory(settings, {"main.lua": WHO}, orthanc=None, verify=pki.ca_file,
                              env={"DICOMPROXY__Https__KeyPassword": password})
    assert gateway.get("/who").text == "https||***|"
    assert password not in gateway.log_text() and password not in gateway.get("/dicomproxy/health").text


def test_startup_errors_name_the_key(pki: Pki, tmp_path: Path) -> None:
    key = pki.server.encrypted_key(tmp_path / "enc.key", b"right-password")
    taken = socket.create_server((LOOPBACK, 0))
    port = taken.getsockname()[1]
    try:
        for https, port_, expected in (
            ({"KeyFile": str(key), "KeyPassword": "Wrong-Secret-1"}, None, "Https:KeyPassword: does not decrypt"),
            ({"KeyFile": str(pki.alice.key_path)}, None, "Https:KeyFile: the key in"),
            ({}, port, f"Urls: cannot listen on https://{LOOPBACK}:{port}: Address already in use"),
        ):
            config = tmp_path / "appsettings.json"
            config.write_text(json.dumps(https_settings(pki.server, port_, **https)))
            out = subprocess.run([sys.executable, "-m", "dicomproxy", "serve", "--config", str(config)],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
            assert out.returncode == 2 and f"dicomproxy: config error: {expected}" in out.stderr, out.stderr
            assert "Wrong-Secret-1" not in out.stderr + out.stdout
    finally:
        taken.close()


def test_expired_server_certificate_is_loud(gateway_factory: GatewayFactory, pki: Pki) -> None:
    expired = pki.ca.issue("expired-server", [LOOPBACK], days=-1)
    https_port = free_port()
    settings = https_settings(expired, https_port)
    settings["Urls"] = f"http://{LOOPBACK}:{free_port()};https://{LOOPBACK}:{https_port}"
    gateway = gateway_factory(settings, orthanc=None)
    gateway.wait_for_log(f"Https: the certificate CN=expired-server,O=DicomProxy tests (serial {expired.serial}")
    assert "has EXPIRED: clients will refuse it; renew it" in gateway.log_text()
    out = curl(f"https://{LOOPBACK}:{https_port}/dicomproxy/health", ca=pki.ca_file)
    assert out.returncode == 60 and "expired" in out.stderr
    health = gateway.get("/dicomproxy/health").json()
    assert "https" in health["degraded"] and health["https"]["ok"] is False


# --------------------------------------------------------------------------- renewal
def install(issued: Issued, folder: Path, key: bytes | None = None) -> None:
    folder.mkdir(exist_ok=True)
    for name, data in (("server.crt", issued.pem()), ("server.key", key if key is not None else issued.key_pem())):
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)


def test_renewed_certificate_without_a_restart(gateway_factory: GatewayFactory, pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    first, second = (pki.ca.issue(n, [LOOPBACK]) for n in ("renew-first", "renew-second"))
    install(first, live)
    settings = https_settings(first, ReloadIntervalSeconds=0.2)
    settings["Https"].update(CertificateFile=str(live / "server.crt"), KeyFile=str(live / "server.key"))
    gateway = gateway_factory(settings, orthanc=None, verify=pki.ca_file)
    assert served_serial(gateway.url, pki.ca_file) == first.serial
    kept = http.client.HTTPSConnection(LOOPBACK, gateway.http_port, timeout=10,
                                       context=ssl.create_default_context(cafile=pki.ca_file))
    kept.request("GET", "/dicomproxy/health")
    assert kept.getresponse().read() and kept.sock is not None

    install(second, live)
    gateway.wait_for_log(f"Https: serving the renewed certificate CN=renew-second,O=DicomProxy tests (serial "
                         f"{second.serial}")
    assert served_serial(gateway.url, pki.ca_file) == second.serial
    kept.request("GET", "/dicomproxy/health")  # an open connection goes on with the certificate it has
    assert kept.getresponse().status == 200
    assert kept.sock.getpeercert(binary_form=True) == first.cert.public_bytes(serialization.Encoding.DER)
    kept.close()

    install(second, live, key=first.key_pem())  # a broken renewal: the key of another certificate
    gateway.wait_for_log("Https: the changed certificate files were not loaded: Https:KeyFile: the key in")
    assert served_serial(gateway.url, pki.ca_file) == second.serial
    health = gateway.get("/dicomproxy/health").json()
    assert health["https"]["ok"] is False and "https" in health["degraded"]
    failed = [n for n in gateway.get("/dicomproxy/notifications").json() if n["kind"] == "certificate.failed"]
    assert failed and failed[0]["level"] == "error" and second.serial in failed[0]["body"]
    install(first, live)  # mended: served again, health ok
    gateway.wait_for_log("(was serial " + second.serial + ")")
    assert served_serial(gateway.url, pki.ca_file) == first.serial
    assert gateway.get("/dicomproxy/health").json()["https"]["ok"] is True


def test_stop_with_an_idle_tls_connection_is_prompt(gateway_factory: GatewayFactory, pki: Pki) -> None:
    """An idle keep-alive client that never answers close_notify must not hold up a graceful stop."""
    gateway = gateway_factory(https_settings(pki.server), orthanc=None, verify=pki.ca_file)
    idle = http.client.HTTPSConnection(LOOPBACK, gateway.http_port, timeout=10,
                                       context=ssl.create_default_context(cafile=pki.ca_file))
    idle.request("GET", "/dicomproxy/health")
    assert idle.getresponse().read()
    assert gateway.stop() in (0, None) and not gateway.forced_kill
    assert "timeout graceful shutdown exceeded" not in gateway.log_text()
    idle.close()


# --------------------------------------------------------------------------- the connection cap
def test_connection_cap_counts_tls_handshakes(gateway_factory: GatewayFactory, pki: Pki) -> None:
    """Clients that connect to the TLS port and never send a ClientHello fill Server:MaxConnections:
    one more is closed at once, and the plain listener answers 503 (the cap is shared)."""
    https_port = free_port()
    settings = https_settings(pki.server, https_port)
    settings["Urls"] = f"http://{LOOPBACK}:{free_port()};https://{LOOPBACK}:{https_port}"
    settings["Server"] = {"MaxConnections": 4, "ReservedFileDescriptors": 0, "HeadTimeoutSeconds": 30}
    gateway = gateway_factory(settings, orthanc=None)
    silent: list[socket.socket] = []
    try:
        for _ in range(10):  # the readiness probe's connection may still count: stop at the first refusal
            sock = socket.create_connection((LOOPBACK, https_port), timeout=10)
            if _refused_at_once(sock):
                break
            silent.append(sock)
        assert 1 <= len(silent) <= 4, f"{len(silent)} silent TLS connections held, the cap is 4"
        gateway.wait_for_log("refusing a TLS connection from 127.0.0.1: 4 connections open or in handshake "
                             "(Server:MaxConnections)")
        plain = requests.get(gateway.url + "/dicomproxy/health", timeout=10)
        assert plain.status_code == 503
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: curl(f"https://{LOOPBACK}:{https_port}/dicomproxy/health", ca=pki.ca_file).returncode == 0,
               what="room again once the silent connections closed")


def _refused_at_once(sock: socket.socket) -> bool:
    """The gateway closed ``sock`` without a word within a second (else it waits for a handshake)."""
    sock.settimeout(1.0)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        closed = True
    sock.close()
    return closed


# --------------------------------------------------------------------------- TUS and the UI over https
def test_tus_over_https_with_tuspy(gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, pki: Pki,
                                   dicom_samples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = gateway_factory(https_settings(pki.server), orthanc=fresh_orthanc, verify=pki.ca_file)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca_file)  # tuspy verifies with requests' default
    path, sop_uid = dicom_samples.make_instance(tmp_path / "ct.dcm", patient_id="TLS1", patient_name="Tls^One")
    uploader = tus_client.TusClient(gateway.url + "/files/").uploader(str(path), chunk_size=8192,
                                                                      metadata={"filename": "ct.dcm"})
    uploader.upload()
    assert uploader.url.startswith(f"https://{LOOPBACK}:{gateway.http_port}/files/")
    wait_until(lambda: fresh_orthanc.sop_instance_uids() == {sop_uid}, timeout=60, what="the import into Orthanc")


def spki_pin(issued: Issued) -> str:
    spki = issued.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def https_browser(pki: Pki) -> Iterator[Any]:
    """Chromium trusting exactly the test server's key (the SPKI pin; Playwright gives it a user data dir)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: run scripts/install.sh", pytrace=False)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium(), args=[
            *CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_pin(pki.server)}"])
        try:
            yield instance
        finally:
            instance.close()


def test_status_page_over_https_in_chromium(https_browser: Any, gateway_factory: GatewayFactory,
                                            fresh_orthanc: OrthancServer, pki: Pki, dicom_samples: Any,
                                            tmp_path: Path) -> None:
    settings = https_settings(pki.server, Hsts=True)
    settings["Authentication"] = {"Users": {USER: PASSWORD}}
    gateway = gateway_factory(settings, orthanc=fresh_orthanc, verify=pki.ca_file)
    context = https_browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        response = page.goto(gateway.url + "/dicomproxy/ui")
        assert response is not None and response.status == 200
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        assert page.evaluate("location.protocol") == "https:"
        page.wait_for_selector("#feed-state:text('live')", timeout=15000)  # the SSE stream over TLS
        one, sop_uid = dicom_samples.make_instance(tmp_path / "ui.dcm", patient_id="TLSUI", patient_name="Tls^Ui")
        page.set_input_files("#upload-input", [str(one)])  # tus-js-client over https
        page.wait_for_selector("#uploads li[data-name='ui.dcm'].imported", timeout=60000)
        assert fresh_orthanc.sop_instance_uids() == {sop_uid}
        page.screenshot(path=str(tmp_path / "status-page-https.png"), full_page=True)
        assert errors == []
    finally:
        context.close()
    # the pin is what made Chromium accept the private certificate: another key is still refused
    other = https_browser.new_context()
    try:
        plain_page = other.new_page()
        with pytest.raises(Exception, match="ERR_CERT"):
            plain_page.goto(f"https://{LOOPBACK}:{_other_tls_port(pki, tmp_path)}/")
    finally:
        other.close()


def _other_tls_port(pki: Pki, tmp_path: Path) -> int:
    """A tiny TLS server with another key from the same CA, answering once in a thread."""
    import threading

    issued = pki.ca.issue("unpinned", [LOOPBACK])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(issued.cert_path), str(issued.key_path))
    server = socket.create_server((LOOPBACK, 0))
    port = server.getsockname()[1]

    def serve() -> None:
        server.settimeout(20)
        try:
            for _ in range(3):
                conn, _ = server.accept()
                try:
                    ctx.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    conn.close()
        except OSError:
            pass
        finally:
            server.close()

    threading.Thread(target=serve, daemon=True).start()
    return port
