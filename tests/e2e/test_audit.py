"""The audit trail through the real stack: the gateway process in front of a real Orthanc, a real
rsyslog (Debian's, with rsyslog-gnutls) as the TLS and UDP collector, dcmtk for the DICOM side,
tuspy for TUS, HTTP clients for QIDO-RS / WADO-RS and logins.

Every message that arrives is parsed as RFC 5424 and its XML validated against the PS3.15
A.5.1 schema (tests/audit/schema). Delivery over TLS is at least once: a message may arrive
twice after an outage, identified by its ``sequenceId``; none may be missing, and the first
copies arrive in sequence order.

``DICOMPROXY_AUDIT_OUTAGE_SECONDS`` sets how long the collector is down in the outage test
(default 60, the issue's minute).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from tusclient import client as tus_client

from tests.audit.atna import Rsyslog, SyslogMessage, make_certs, validate
from tests.peers import LOOPBACK, GatewayProcess, OrthancServer, run_dcmtk, wait_until

ALICE = ("alice", "s3cret")
OUTAGE = float(os.environ.get("DICOMPROXY_AUDIT_OUTAGE_SECONDS", "60"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    good = make_certs(tmp_path_factory.mktemp("audit-certs"))
    other = make_certs(tmp_path_factory.mktemp("other-certs"))
    good["other-ca"] = other["ca"]
    return good


@pytest.fixture
def rsyslog_factory(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Any:
    made: list[Rsyslog] = []

    def make(mutual: bool = False, start: bool = True) -> Rsyslog:
        r = Rsyslog(tmp_path_factory.mktemp("rsyslog"), certs, mutual=mutual)
        made.append(r)
        return r.start() if start else r

    yield make
    for r in made:
        r.stop()


def audit_settings(tmp: Path, collectors: list[Any], **extra: Any) -> dict[str, Any]:
    return {"Audit": {"Enabled": True, "Collectors": collectors, "File": str(tmp / "audit.jsonl"),
                      "EnterpriseSiteId": "TEST-SITE", **extra}}


def messages(r: Rsyslog, input_name: str = "imtcp") -> list[tuple[SyslogMessage, Any]]:
    """Every message received, parsed and validated, with its XML document."""
    out = []
    for m in r.received(input_name):
        assert m.pri == 85 and m.msgid == "IHE+RFC-3881" and m.app == "dicomproxy"
        out.append((m, validate(m.msg)))
    return out


def kinds(received: list[tuple[SyslogMessage, Any]]) -> set[tuple[str, str]]:
    """(EventID code, first EventTypeCode or EventActionCode) of each message."""
    out = set()
    for _, doc in received:
        ident = doc.find("EventIdentification")
        kind = ident.find("EventTypeCode")
        out.add((ident.find("EventID").get("csd-code"),
                 kind.get("csd-code") if kind is not None else ident.get("EventActionCode")))
    return out


def health(gw: GatewayProcess) -> dict[str, Any]:
    return gw.get("/dicomproxy/health", auth=ALICE).json()["audit"]


def study_in_orthanc(orthanc: OrthancServer, dicom_samples: Any, folder: Path, n: int = 2) -> str:
    files = dicom_samples.make_study(folder, n_instances=n, patient_id="AUDIT-PAT")
    for path, _ in files:
        orthanc.upload(path)
    return str(pydicom.dcmread(files[0][0]).StudyInstanceUID)


def qido(gw: GatewayProcess, auth: Any = ALICE) -> requests.Response:
    return gw.get("/dicom-web/studies", params={"PatientID": "AUDIT*"}, auth=auth)


# --------------------------------------------------------------------------- every event type
def test_every_event_type_arrives_valid(
    gateway_factory: Any, fresh_orthanc: OrthancServer, rsyslog_factory: Any, storescp_factory: Any,
    certs: dict[str, Path], dicom_samples: Any, tmp_path: Path,
) -> None:
    collector = rsyslog_factory(mutual=True)
    dest = storescp_factory("MOVEDEST")
    tls = {"Url": collector.tls_url, "CaFile": str(certs["ca"]), "CertFile": str(certs["client"]),
           "KeyFile": str(certs["client-key"])}
    refused = {"Url": collector.tls_url, "CaFile": str(certs["other-ca"])}  # a certificate we must refuse
    gw = gateway_factory(
        {**audit_settings(tmp_path, [tls, collector.udp_url, refused], FailedLoginBurst=3),
         "Authentication": {"Users": {ALICE[0]: ALICE[1]}},
         "Dicom": {"AllowedCallingAets": ["STORESCU", "FINDSCU", "MOVESCU", "GETSCU"],
                   "Modalities": {"dest": {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.port}}}},
        {"main.lua": "-- v1\n"},
    )
    study = study_in_orthanc(fresh_orthanc, dicom_samples, tmp_path / "pacs")
    store = [str(p) for p, _ in dicom_samples.make_study(tmp_path / "store", n_instances=2, patient_id="AUDIT-2")]
    port = str(gw.dicom_port)
    run_dcmtk("storescu", "-aec", gw.aet, LOOPBACK, port, *store)
    assert run_dcmtk("storescu", "-aet", "EVIL", "-aec", gw.aet, LOOPBACK, port, store[0], check=False).returncode
    run_dcmtk("findscu", "-S", "-aec", gw.aet, LOOPBACK, port, "-k", "QueryRetrieveLevel=STUDY",
              "-k", "PatientID=AUDIT*")
    retrieve = ["-S", "-aec", gw.aet, LOOPBACK, port, "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}"]
    run_dcmtk("movescu", "-aem", dest.aet, *retrieve)
    (tmp_path / "got").mkdir()
    run_dcmtk("getscu", *retrieve, "-od", str(tmp_path / "got"))
    assert qido(gw).status_code == 200
    assert gw.get(f"/dicom-web/studies/{study}/metadata", auth=ALICE).status_code == 200
    for _ in range(3):
        assert qido(gw, auth=("alice", "wrong")).status_code == 401
    upload = dicom_samples.make_instance(tmp_path / "tus.dcm", patient_id="AUDIT-TUS", patient_name="Tus^A")[0]
    headers = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    tus_client.TusClient(gw.url + "/files/", headers=headers).uploader(str(upload), chunk_size=1 << 20).upload()
    gw.write_script("main.lua", "-- v2\n")
    gw.wait_for_log("main.lua loaded")
    gw.stop()
    gw.start()

    expected = {
        ("110100", "110120"), ("110100", "110121"),  # application start, stop
        ("110114", "110122"),  # logins (HTTP and DICOM), successes and failures
        ("110104", "C"), ("110104", "R"),  # instances received (C-STORE), sent (forward, move, get, WADO, TUS)
        ("110102", "E"),  # begin transferring (C-MOVE, C-GET)
        ("110112", "E"),  # queries (C-FIND, QIDO-RS)
        ("110113", "110126"), ("110113", "110132"), ("110113", "110131"),  # blocked AE / certificate, burst, script
    }
    got = wait_until(lambda: (r := messages(collector)) and expected <= kinds(r) and r, timeout=60,
                     what=f"every event type at rsyslog (missing {expected - kinds(messages(collector))})")
    docs = [doc for _, doc in got]
    _check_contents(docs, study, tmp_path)
    # The same messages over UDP (no outage here, loopback: every one of them).
    udp = wait_until(lambda: expected <= kinds(r := messages(collector, "imudp")) and r, timeout=30,
                     what="every event type over UDP")
    assert {m.sequence for m, _ in udp} <= {m.sequence for m, _ in messages(collector)}
    # The JSON-lines file has them too, with the same sequence numbers.
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {e["seq"] for e in lines} >= {m.sequence for m, _ in got}
    assert any(e["event"] == "Security Alert" and "certificate refused" in e.get("description", "") for e in lines)


def _check_contents(docs: list[Any], study: str, tmp_path: Path) -> None:
    def having(event_id: str, **attrs: str) -> list[Any]:
        return [d for d in docs if d.find("EventIdentification/EventID").get("csd-code") == event_id and all(
            d.find("EventIdentification").get(k) == v for k, v in attrs.items())]

    received = having("110104", EventActionCode="C")
    assert any(o.get("ParticipantObjectID") == "AUDIT-2" for d in received
               for o in d.findall("ParticipantObjectIdentification"))
    assert any(int(c.get("NumberOfInstances")) == 2 for d in received for c in d.iter("SOPClass"))
    sent = having("110104", EventActionCode="R")
    assert any(o.get("ParticipantObjectID") == study
               for d in sent for o in d.findall("ParticipantObjectIdentification"))
    failed_logins = having("110114", EventOutcomeIndicator="4")
    users = {p.get("UserID") for d in failed_logins for p in d.findall("ActiveParticipant")}
    assert {"alice", "EVIL"} <= users
    queries = having("110112")
    ids = {o.get("ParticipantObjectID") for d in queries for o in d.findall("ParticipantObjectIdentification")}
    assert {"SearchForStudies", "1.2.840.10008.5.1.4.1.2.2.1"} <= ids
    source = docs[0].find("AuditSourceIdentification")
    assert source.get("AuditEnterpriseSiteID") == "TEST-SITE" and source.get("AuditSourceID").startswith("DICOMPROXY@")


# --------------------------------------------------------------------------- outage
def test_collector_outage_loses_nothing(
    gateway_factory: Any, fresh_orthanc: OrthancServer, rsyslog_factory: Any, certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    collector = rsyslog_factory()
    gw = gateway_factory(audit_settings(tmp_path, [{"Url": collector.tls_url, "CaFile": str(certs["ca"])}]))
    for _ in range(20):
        assert qido(gw, auth=None).status_code == 200
    wait_until(lambda: health(gw)["collectors"][0]["pending"] == 0, timeout=30, what="the first events delivered")
    before = len(messages(collector))
    collector.stop()
    during = 0
    deadline = time.monotonic() + OUTAGE
    while time.monotonic() < deadline:  # events keep coming while the collector is down
        assert qido(gw, auth=None).status_code == 200
        during += 1
        time.sleep(min(0.05, OUTAGE / 400))
    # (the writer gathers 50 ms of events per batch: the last ones may still be on their way to the buffer)
    state = wait_until(lambda: (c := health(gw)["collectors"][0])["pending"] >= during and c, timeout=10,
                       what=f"{during} messages pending for the collector that is down")
    assert state["state"] in ("backoff", "connecting")
    assert len(messages(collector)) == before  # nothing could arrive meanwhile
    collector.start()
    last = health(gw)["lastSequence"]
    try:
        wait_until(lambda: {m.sequence for m, _ in messages(collector)} >= set(range(1, last + 1)), timeout=60,
                   what=f"all {last} messages after the collector came back")
    except BaseException:
        got = {m.sequence for m, _ in messages(collector)}
        print("missing sequences:", sorted(set(range(1, last + 1)) - got)[:50], "audit health:", health(gw))
        raise
    sequences = [m.sequence for m, _ in messages(collector)]
    first_copies = list(dict.fromkeys(sequences))
    assert first_copies == sorted(first_copies), "first copies arrive in sequence order"
    assert set(first_copies) >= set(range(1, last + 1)) and during >= 50
    print(f"\noutage {OUTAGE:.0f}s: {during} requests during it, {last} messages, "
          f"{len(sequences) - len(first_copies)} duplicate(s) (at least once)")


# --------------------------------------------------------------------------- buffer full
def test_buffer_full_raises_the_alert_and_recovers(
    gateway_factory: Any, fresh_orthanc: OrthancServer, rsyslog_factory: Any, certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    collector = rsyslog_factory(start=False)  # down from the start
    gw = gateway_factory(audit_settings(tmp_path, [{"Url": collector.tls_url, "CaFile": str(certs["ca"])}],
                                        BufferMaxMB=0.02))
    sent = 0
    while not health(gw)["bufferFull"]:
        assert qido(gw, auth=None).status_code == 200
        sent += 1
        assert sent < 500, "the buffer never filled"
    for _ in range(5):
        qido(gw, auth=None)
    state = wait_until(lambda: (h := health(gw))["dropped"] >= 1 and h, what="dropped events counted")
    assert state["ok"] is False
    full = gw.get("/dicomproxy/health").json()
    assert full["status"] == "degraded" and "audit" in full["degraded"]
    notes = wait_until(lambda: [n for n in gw.get("/dicomproxy/notifications", auth=ALICE).json()
                                if n["kind"] == "audit.buffer_full"], what="an audit.buffer_full notification")
    assert "Audit:BufferMaxMB" in notes[0]["body"]
    assert 'dicomproxy_audit_dropped_total{reason="buffer_full"}' in gw.get("/dicomproxy/metrics", auth=ALICE).text
    collector.start()
    wait_until(lambda: ("110113", "110133") in kinds(messages(collector)), timeout=60,
               what="the Audit Recording Stopped alert delivered once the collector is up")
    wait_until(lambda: health(gw)["collectors"][0]["pending"] == 0, timeout=60, what="the buffer drained")
    qido(gw, auth=None)  # the next event finds room: recording started again
    started = wait_until(lambda: [d for _, d in messages(collector)
                                  if d.find("EventIdentification/EventTypeCode") is not None
                                  and d.find("EventIdentification/EventTypeCode").get("csd-code") == "110134"],
                         timeout=30, what="the Audit Recording Started alert")
    assert "dropped" in started[0].findtext("EventIdentification/EventOutcomeDescription")
    assert health(gw)["bufferFull"] is False


def test_audit_is_off_by_default(gateway_factory: Any, fresh_orthanc: OrthancServer) -> None:
    gw = gateway_factory()
    assert qido(gw, auth=None).status_code == 200
    assert gw.get("/dicomproxy/health").json()["audit"] == {
        "ok": True, "enabled": False, "bufferFull": False, "dropped": 0, "bufferBytes": 0, "lastSequence": 0,
        "collectors": []}
    assert not (gw.data_dir / "audit").exists()
