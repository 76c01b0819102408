"""A transparent relay (issue 11, items 7 and 8) through the real stack: a real Orthanc with its
DICOMweb plugin, a real ``dicomproxy serve``, and ``dicomweb-client`` as the viewer.

* URLs in answers point at the gateway: with ``Forwarded`` (the session Orthanc honours it), and,
  for a PACS that honours neither ``Forwarded`` nor ``Host`` (an Orthanc with ``DicomWeb:Host``
  pinned, HTTP compression on, authentication on), by the streaming rewriter. Every
  ``RetrieveURL``, ``BulkDataURI`` a dicomweb-client answer holds is followed through the gateway.
* The gateway's own calls carry ``Upstream:Username``/``Password``; proxied requests carry the
  client's own credentials; the password shows nowhere.
* TUS import of datasets without a Part-10 header (item 9), in each uncompressed syntax, into the
  Orthanc that wants a login.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tusclient import client as tus_client

from tests.dicom_samples import make_instance, raw_dataset
from tests.local_upstream import LocalUpstream, header_values, raw_request
from tests.peers import GatewayProcess, OrthancServer, wait_until

NO_DICOM = {"Dicom": {"Port": 0}}
PACS_USER, PACS_PASSWORD = "pacsuser", "pacs-S3CRET-pw"
BULK = 'multipart/related; type="application/octet-stream"'

PEEK = r"""
function onHttpRequest(r)
  if r.Path == "/peek" then
    local system = ParseJson(RestApiGet('/system'))
    r:ResponseWrite(DumpJson({name = system['Name'], url = Config['Upstream:Url'],
                              password = Config['Upstream:Password'],
                              orthanc = GetOrthancConfiguration()['DicomProxy']['Upstream']}))
    return true
  end
end
"""


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def relay_gw(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[GatewayProcess]:
    """A gateway in front of the session Orthanc (which builds its URLs from ``Forwarded``)."""
    if not orthanc.running:
        orthanc.start()
    gw = GatewayProcess(tmp_path_factory.mktemp("gw-relay"), orthanc=orthanc, settings=NO_DICOM)
    gw.update_settings(public_url(gw))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def strict_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc that ignores ``Forwarded`` and ``Host`` (``DicomWeb:Host`` pinned to its own address),
    compresses its answers and wants a login."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-strict"), extra_config={
        "AuthenticationEnabled": True, "RegisteredUsers": {PACS_USER: PACS_PASSWORD},
        "HttpCompressionEnabled": True})
    server.config["DicomWeb"]["Host"] = f"{server.host}:{server.http_port}"
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_gw(tmp_path_factory: pytest.TempPathFactory, strict_orthanc: OrthancServer) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("gw-strict"), orthanc=strict_orthanc, scripts={"main.lua": PEEK},
                        settings={**NO_DICOM, "Upstream": {"Username": PACS_USER, "Password": PACS_PASSWORD}})
    gw.update_settings(public_url(gw))
    gw.start()
    yield gw
    gw.stop()


# --------------------------------------------------------------------------- helpers
def public_url(gw: GatewayProcess) -> dict[str, Any]:
    """``Upstream:PublicUrl``: dicomweb-client sends ``Host`` without the port (``Host: 127.0.0.1``, its
    ``web.py``), so a URL built from its ``Host`` would miss it; a site names its public URL instead."""
    return {"Upstream": {"PublicUrl": gw.url}}


def new_study(orthanc: OrthancServer, n: int = 2) -> tuple[str, str, list[bytes]]:
    pid = "RELAY-" + uuid.uuid4().hex[:8]
    study = f"1.2.826.0.1.3680043.8.498.{uuid.uuid4().int % 10**20}"
    files = []
    for i in range(n):
        data, _ = make_instance(patient_id=pid, patient_name="Relay^Test", study_uid=study, series_uid=study + ".1",
                                InstanceNumber=i + 1, size=(64, 64))
        assert isinstance(data, bytes)
        orthanc.upload(data)
        files.append(data)
    return pid, study, files


def urls_in(obj: Any) -> list[str]:
    """Every RetrieveURL (0008,1190) and BulkDataURI in a DICOM JSON answer."""
    found: list[str] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("BulkDataURI"), str):
            found.append(obj["BulkDataURI"])
        for tag, value in obj.items():
            if tag == "00081190" and isinstance(value, dict):
                found += [v for v in value.get("Value", []) if isinstance(v, str)]
            else:
                found += urls_in(value)
    elif isinstance(obj, list):
        for item in obj:
            found += urls_in(item)
    return found


def follow(url: str, auth: tuple[str, str] | None = None) -> None:
    """GET a URL an answer gave; it must succeed (bulk data as octet-stream, a RetrieveURL as DICOM)."""
    accept = BULK if "/bulk" in url or "/frames" in url else 'multipart/related; type="application/dicom"'

    r = requests.get(url, headers={"Accept": accept}, auth=auth, timeout=30)
    assert r.status_code == 200, (url, r.status_code, r.text[:200])
    assert r.content


def client(gw: GatewayProcess, auth: tuple[str, str] | None = None) -> DICOMwebClient:
    session = requests.Session()
    session.auth = auth
    return DICOMwebClient(url=gw.url + "/dicom-web", session=session)


def check_every_url(gw: GatewayProcess, web: DICOMwebClient, pid: str, study: str,
                    auth: tuple[str, str] | None = None) -> int:
    """Search, metadata and STOW through dicomweb-client; every URL must be the gateway's and work."""
    found = urls_in(web.search_for_instances(search_filters={"PatientID": pid}))
    found += urls_in(web.search_for_studies(search_filters={"PatientID": pid}))
    found += urls_in(web.search_for_series(search_filters={"PatientID": pid}))
    metadata = web.retrieve_study_metadata(study)
    bulk = urls_in(metadata)
    assert bulk, "the metadata of a 64x64 image has a BulkDataURI (its pixel data)"
    found += bulk
    ds = pydicom.dcmread(io.BytesIO(make_instance(patient_id=pid, patient_name="Relay^Stow", study_uid=study)[0]))
    stowed = web.store_instances([ds])
    found.append(stowed.RetrieveURL)
    found += [item.RetrieveURL for item in stowed.ReferencedSOPSequence]
    assert len(found) >= 8, found  # 2 instances, the study, its series, 2 pixel data, the STOW and its instance
    for url in found:
        assert url.startswith(gw.url + "/dicom-web/"), url
        follow(url, auth)
    return len(found)


# --------------------------------------------------------------------------- item 7
def test_forwarded_urls_point_at_the_gateway_and_work(orthanc: OrthancServer, relay_gw: GatewayProcess) -> None:
    pid, study, _ = new_study(orthanc)
    check_every_url(relay_gw, client(relay_gw), pid, study)
    # the same answer as direct, with Orthanc's own base where the gateway's is
    target = f"/dicom-web/studies/{study}/series?PatientID={pid}"
    direct = raw_request(orthanc.http_url, "GET", target, [("Accept", "application/dicom+json")])[2]
    proxied = raw_request(relay_gw.url, "GET", target, [("Accept", "application/dicom+json")])[2]
    assert orthanc.http_url.encode() in direct
    assert proxied == direct.replace(orthanc.http_url.encode(), relay_gw.url.encode())


def test_rewritten_urls_for_a_pacs_that_ignores_forwarded(strict_orthanc: OrthancServer,
                                                          strict_gw: GatewayProcess) -> None:
    pid, study, _ = new_study(strict_orthanc)
    auth = (PACS_USER, PACS_PASSWORD)
    # direct, the PACS answers with its own base whatever it is told, and gzips what it can
    direct = requests.get(f"{strict_orthanc.http_url}/dicom-web/studies/{study}/metadata", auth=auth, timeout=30,
                          headers={"Forwarded": "host=gw.example;proto=https", "Accept-Encoding": "gzip"})
    assert direct.headers.get("Content-Encoding") == "gzip"
    assert urls_in(direct.json()) and all(u.startswith(strict_orthanc.http_url) for u in urls_in(direct.json()))
    # a gzip-asking client gets the rewritten body gzipped, as direct (the gateway asked the PACS for
    # identity and compressed what it rewrote)
    through = requests.get(f"{strict_gw.url}/dicom-web/studies/{study}/metadata", auth=auth, timeout=30,
                           headers={"Accept-Encoding": "gzip"})
    assert through.headers.get("Content-Encoding") == "gzip" and "Content-Length" not in through.headers
    assert through.json() == json.loads(direct.text.replace(strict_orthanc.http_url, strict_gw.url))
    for coding in ("deflate", "gzip;q=0, deflate", "identity", "gzip;q=0"):
        asked = {"Accept-Encoding": coding}
        d = requests.get(f"{strict_orthanc.http_url}/dicom-web/studies/{study}/metadata", auth=auth, timeout=30,
                         headers=asked)
        t = requests.get(f"{strict_gw.url}/dicom-web/studies/{study}/metadata", auth=auth, timeout=30,
                         headers=asked)
        assert t.headers.get("Content-Encoding") == d.headers.get("Content-Encoding"), (coding, d.headers, t.headers)
        assert t.json() == json.loads(d.text.replace(strict_orthanc.http_url, strict_gw.url)), coding
    check_every_url(strict_gw, client(strict_gw, auth), pid, study, auth)


def _framing(base: str, method: str, target: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str]]:
    status, got, body = raw_request(base, method, target, headers)
    assert method == "GET" or body == b""
    keep = ("content-encoding", "transfer-encoding", "content-length", "content-type", "etag")
    return status, {k.lower(): v for k, v in got if k.lower() in keep}


def test_head_of_a_rewritten_answer_carries_the_headers_of_its_get(gateway_factory: Any, upstream: LocalUpstream,
                                                                    strict_orthanc: OrthancServer,
                                                                    strict_gw: GatewayProcess) -> None:
    """A HEAD of a rewritable answer says what the GET would (RFC 9110 9.3.2): the Content-Encoding the
    rewritten GET is sent in, its framing (chunked: the rewritten length is known only by producing the
    body), the weak ETag. Orthanc 1.10 answers no HEAD on DICOMweb routes (404 direct, 404 through), so
    the HEAD/GET pair is taken from the local upstream, whose JSON answers the gateway rewrites."""
    _, study, _ = new_study(strict_orthanc)
    basic = "Basic " + base64.b64encode(f"{PACS_USER}:{PACS_PASSWORD}".encode()).decode()
    orthanc_target = f"/dicom-web/studies/{study}/metadata"
    asked = [("Authorization", basic), ("Accept", "application/dicom+json"), ("Accept-Encoding", "gzip")]
    assert _framing(strict_gw.url, "HEAD", orthanc_target, asked)[0] == \
        _framing(strict_orthanc.http_url, "HEAD", orthanc_target, asked)[0]
    gw = gateway_factory({**NO_DICOM, "Upstream": {"Url": upstream.url, "DicomWebRoot": "/echo",
                                                   "RewriteUrls": "Always"}}, orthanc=None)
    for coding, expected in (("gzip", "gzip"), ("deflate", "deflate"), ("identity", None)):
        headers = [("Accept", "application/json"), ("Accept-Encoding", coding)]
        get_status, get = _framing(gw.url, "GET", "/echo/head", headers)
        head_status, head = _framing(gw.url, "HEAD", "/echo/head", headers)
        assert get_status == head_status == 200
        assert head == get, (coding, get, head)
        assert head.get("content-encoding") == expected and head.get("transfer-encoding") == "chunked", head
        assert "content-length" not in head
        # direct, the upstream's HEAD carries its GET's headers too: the gateway keeps that property
        assert _framing(upstream.url, "HEAD", "/echo/head", headers)[1].keys() == \
            _framing(upstream.url, "GET", "/echo/head", headers)[1].keys()


def test_rewritten_xml_multipart_metadata_keeps_exact_part_lengths(strict_orthanc: OrthancServer,
                                                                    strict_gw: GatewayProcess) -> None:
    pid, study, _ = new_study(strict_orthanc, n=3)
    auth = (PACS_USER, PACS_PASSWORD)
    accept = {"Accept": 'multipart/related; type="application/dicom+xml"'}
    r = requests.get(f"{strict_gw.url}/dicom-web/studies/{study}/metadata", headers=accept, auth=auth, timeout=30)
    assert r.status_code == 200, r.text[:300]
    boundary = re.search(r'boundary="?([^";]+)', r.headers["Content-Type"])
    assert boundary
    parts = r.content.split(b"--" + boundary.group(1).encode())[1:-1]
    assert len(parts) == 3
    urls: list[str] = []
    for part in parts:
        head, _, xml = part.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length is None or int(length.group(1)) == len(xml) - 2, head
        urls += re.findall(r'BulkData URI="([^"]+)"|uri="([^"]+)"', xml.decode())  # type: ignore[arg-type]
    found = [u for pair in urls for u in pair if u]
    assert found and strict_orthanc.http_url.encode() not in r.content
    for url in found:
        assert url.startswith(strict_gw.url), url
        follow(url, auth)


def test_rewrite_never_passes_answers_as_they_are(gateway_factory: Any, strict_orthanc: OrthancServer) -> None:
    auth = (PACS_USER, PACS_PASSWORD)
    gw: GatewayProcess = gateway_factory({**NO_DICOM, "Upstream": {"RewriteUrls": "Never"}}, orthanc=strict_orthanc)
    _, study, _ = new_study(strict_orthanc, n=1)
    r = requests.get(f"{gw.url}/dicom-web/studies/{study}/metadata", auth=auth, timeout=30,
                     headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip"  # the client's encoding kept
    assert urls_in(r.json()) and all(u.startswith(strict_orthanc.http_url) for u in urls_in(r.json()))


def test_forwarding_headers_and_preserve_host(gateway_factory: Any, upstream: LocalUpstream) -> None:
    gw: GatewayProcess = gateway_factory({**NO_DICOM, "Upstream": {"Url": upstream.url, "PreserveHost": True}},
                                         orthanc=None)
    spoof = [("Forwarded", "for=203.0.113.9;host=spoofed.example;proto=https"), ("X-Forwarded-Host", "spoofed")]
    seen = json.loads(raw_request(gw.url, "GET", "/echo/relay", spoof)[2])["headers"]
    host = f"127.0.0.1:{gw.http_port}"
    assert header_values(seen, "host") == [host]  # PreserveHost: the client's Host
    assert header_values(seen, "forwarded") == [f"for=127.0.0.1;host={host};proto=http"]  # the client's dropped
    assert header_values(seen, "x-forwarded-host") == [host]


# --------------------------------------------------------------------------- item 8
def test_own_calls_use_upstream_credentials_proxied_calls_the_clients(strict_orthanc: OrthancServer,
                                                                       strict_gw: GatewayProcess) -> None:
    peek = strict_gw.get("/peek")
    assert peek.status_code == 200, peek.text
    got = json.loads(peek.text)
    assert got["name"] == "DicomProxyTestOrthanc"  # RestApiGet logged in as Upstream:Username
    assert got["password"] == "***" and got["orthanc"]["Password"] == "***"
    # proxied requests: the PACS's own 401 without the client's credentials, 200 with them
    bare = strict_gw.get("/system")
    assert bare.status_code == 401 and "WWW-Authenticate" in bare.headers
    assert strict_gw.get("/system", auth=(PACS_USER, PACS_PASSWORD)).status_code == 200
    assert strict_gw.get("/system", auth=(PACS_USER, "wrong")).status_code == 401
    health = wait_until(lambda: (h := strict_gw.get("/dicomproxy/health").json())["upstream"]["reachable"] and h,
                        what="the health probe to reach the PACS")
    shown = subprocess.run([sys.executable, "-m", "dicomproxy", "config", "--config", str(strict_gw.config_path)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"Password": "***"' in shown
    for text in (peek.text, json.dumps(health), shown, strict_gw.log_text()):
        assert PACS_PASSWORD not in text


def test_credentials_in_the_url_work_and_are_masked(gateway_factory: Any, strict_orthanc: OrthancServer) -> None:
    bare = strict_orthanc.http_url.removeprefix("http://")
    gw: GatewayProcess = gateway_factory(
        {**NO_DICOM, "Upstream": {"Url": f"http://{PACS_USER}:{PACS_PASSWORD}@{bare}"}}, {"main.lua": PEEK},
        orthanc=None)
    got = json.loads(gw.get("/peek").text)
    assert got["name"] == "DicomProxyTestOrthanc"
    assert got["url"] == f"http://{PACS_USER}:***@{bare}" == got["orthanc"]["Url"]
    health = gw.get("/dicomproxy/health").json()
    assert health["upstream"]["url"] == strict_orthanc.http_url
    assert gw.get("/system").status_code == 401  # never added to proxied requests
    shown = subprocess.run([sys.executable, "-m", "dicomproxy", "config", "--config", str(gw.config_path)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"{PACS_USER}:***@" in shown
    for text in (json.dumps(got), json.dumps(health), shown, gw.log_text()):
        assert PACS_PASSWORD not in text


# --------------------------------------------------------------------------- item 9
def test_tus_imports_datasets_without_a_part10_header(tmp_path: Any, strict_orthanc: OrthancServer,
                                                       strict_gw: GatewayProcess) -> None:
    pid = "RAWTUS-" + uuid.uuid4().hex[:8]
    sops = {}
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian):
        raw, ds = raw_dataset(syntax, patient_id=pid, patient_name="Raw^Tus")
        path = tmp_path / f"{syntax}.raw"
        path.write_bytes(raw)
        tus_client.TusClient(strict_gw.url + "/files/").uploader(str(path), chunk_size=8192,
                                                                 metadata={"filename": path.name}).upload()
        sops[str(ds.SOPInstanceUID)] = syntax

    def done() -> list[dict[str, Any]] | None:
        found = [t for t in strict_gw.get("/dicomproxy/tasks").json()
                 if t["kind"] == "tus-import" and t["state"] in ("done", "failed")]
        return found if len(found) >= 3 else None

    tasks = wait_until(done, timeout=60, what="3 TUS imports to finish")
    assert all(t["state"] == "done" and t["result"]["stored"] == 1 for t in tasks), tasks
    stored = strict_orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"PatientID": pid},
                                                           "Expand": True})
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == set(sops)
    for instance in stored:  # stored as sent: the transfer syntax the file meta named
        syntax = strict_orthanc.rest_get(f"/instances/{instance['ID']}/metadata/TransferSyntax")
        assert syntax.decode() == sops[instance["MainDicomTags"]["SOPInstanceUID"]]
