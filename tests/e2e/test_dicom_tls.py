"""DICOM TLS through the real stack: dcmtk's echoscu/storescu/findscu with ``+tls`` against the
gateway's TLS port (storage fast path, and Query/Retrieve served on the loop over the acceptor's
TLS socket), refused client certificates (the log line, the metric), Orthanc with
``DicomTlsEnabled`` as the upstream (forwarding, C-FIND, C-GET over TLS), a TLS storescp as the
``send`` / C-MOVE destination, and TLS end to end: a modality's C-FIND/C-GET/C-MOVE on the TLS
port, relayed to a TLS PACS and fetched into a TLS destination."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests import dicom_samples
from tests.peers import REPO_ROOT, GatewayProcess, OrthancServer, free_port, run_dcmtk
from tests.tls_certs import Issued, TestCa

LOOPBACK = "127.0.0.1"


@dataclass
class Certs:
    ca: TestCa
    gateway: Issued  # the gateway's server certificate (127.0.0.1)
    gateway_client: Issued  # what the gateway presents to a TLS PACS or destination
    modality: Issued  # a modality's client certificate from the same CA
    stranger: Issued  # a client certificate from another CA
    peer: Issued  # a server certificate for Orthanc / storescp


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = TestCa.create(tmp_path / "pki")
    other = TestCa.create(tmp_path / "other", "Other CA")
    return Certs(ca, ca.issue("gateway", [LOOPBACK, "localhost"]), ca.issue("gateway-client", client=True),
                 ca.issue("modality", client=True), other.issue("stranger", client=True),
                 ca.issue("peer", [LOOPBACK, "localhost"]))


def tls_settings(certs: Certs, **extra: Any) -> dict[str, Any]:
    return {"Enabled": True, "Port": free_port(), "Certificate": str(certs.gateway.cert_path),
            "Key": str(certs.gateway.key_path), "ClientCa": str(certs.ca.cert_path), **extra}


def tls_args(client: Issued | None, ca: TestCa) -> list[str]:
    """dcmtk's ``+tls key cert +cf ca`` (``+tla``: no client certificate)."""
    own = ["+tls", str(client.key_path), str(client.cert_path)] if client else ["+tla"]
    return [*own, "+cf", str(ca.cert_path)]


def tls_port(gateway: GatewayProcess) -> str:
    return str(gateway.settings["Dicom"]["Tls"]["Port"])


def test_store_echo_find_over_tls(
    gateway_factory: Any, fresh_orthanc: OrthancServer, certs: Certs, tmp_path: Path
) -> None:
    gateway = gateway_factory({"Dicom": {"Tls": tls_settings(certs)}})
    port = tls_port(gateway)
    health = gateway.get("/dicomproxy/health").json()["dicom"]
    assert health["tlsListening"] == f"{gateway.aet}@127.0.0.1:{port}" and health["listening"]
    tls = tls_args(certs.modality, certs.ca)
    echo = run_dcmtk("echoscu", "-d", *tls, "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, port)
    assert "TLS" in echo.stdout + echo.stderr  # dcmtk says which suite it negotiated
    study = pydicom.uid.generate_uid()
    paths = [dicom_samples.make_instance(tmp_path / f"im{i}.dcm", patient_id="PTLS", patient_name="T^Ls",
                                         study_uid=study, InstanceNumber=i + 1)[0] for i in range(3)]
    run_dcmtk("storescu", *tls, "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, port, *map(str, paths))
    fresh_orthanc.wait_for_instances(3)
    found = run_dcmtk("findscu", "-v", *tls, "-S", "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, port,
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "-k", "PatientID")
    assert "PTLS" in found.stdout + found.stderr  # Q/R on the loop over the TLS socket, answered by Orthanc
    # the plain port still serves, beside the TLS one
    assert run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port)).returncode == 0


def test_untrusted_or_missing_client_certificate_is_refused(gateway_factory: Any, certs: Certs) -> None:
    gateway = gateway_factory({"Dicom": {"Tls": tls_settings(certs)}}, orthanc=None)
    port = tls_port(gateway)
    stranger = run_dcmtk("echoscu", *tls_args(certs.stranger, certs.ca), "-aec", gateway.aet, LOOPBACK, port,
                         check=False)
    assert stranger.returncode != 0
    line = gateway.wait_for_log("DICOM TLS port: handshake from 127.0.0.1:")
    assert "refused (untrusted_certificate): certificate verify failed" in line, line
    assert gateway.metric("dicomproxy_dicom_tls_refused_total", reason="untrusted_certificate") == 1
    anonymous = run_dcmtk("echoscu", *tls_args(None, certs.ca), "-aec", gateway.aet, LOOPBACK, port, check=False)
    assert anonymous.returncode != 0
    gateway.wait_for_log("refused (no_certificate)")
    assert gateway.metric("dicomproxy_dicom_tls_refused_total", reason="no_certificate") == 1
    plain = run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, port, check=False)  # not TLS at all
    assert plain.returncode != 0
    gateway.wait_for_log("refused (protocol)")
    # the modality's own certificate still works afterwards
    run_dcmtk("echoscu", *tls_args(certs.modality, certs.ca), "-aec", gateway.aet, LOOPBACK, port)


def test_encryption_only_and_tls_only(gateway_factory: Any, certs: Certs) -> None:
    settings = tls_settings(certs, RequireClientCertificate=False, Only=True)
    gateway = gateway_factory({"Dicom": {"Tls": settings}}, orthanc=None)
    run_dcmtk("echoscu", *tls_args(None, certs.ca), "-aec", gateway.aet, LOOPBACK, tls_port(gateway))
    assert run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), check=False).returncode != 0
    assert gateway.get("/dicomproxy/health").json()["dicom"]["listening"] == ""


def orthanc_tls(certs: Certs) -> dict[str, Any]:
    return {"DicomTlsEnabled": True, "DicomTlsCertificate": str(certs.peer.cert_path),
            "DicomTlsPrivateKey": str(certs.peer.key_path), "DicomTlsTrustedCertificates": str(certs.ca.cert_path),
            "DicomTlsRemoteCertificateRequired": True}


def upstream_tls(orthanc: OrthancServer, certs: Certs, client: Issued) -> dict[str, Any]:
    return {"Aet": orthanc.aet, "Host": LOOPBACK, "Port": orthanc.dicom_port, "Tls": True,
            "TlsCa": str(certs.ca.cert_path), "TlsCertificate": str(client.cert_path), "TlsKey": str(client.key_path)}


@pytest.mark.parametrize("mode", ["RelayOrSpool", "StoreAndForward"])
def test_orthanc_with_dicom_tls_as_the_upstream(
    gateway_factory: Any, orthanc_factory: Any, certs: Certs, tmp_path: Path, mode: str
) -> None:
    orthanc = orthanc_factory(extra_config=orthanc_tls(certs))
    gateway = gateway_factory({"Dicom": {"StoreMode": mode,
                                         "Upstream": upstream_tls(orthanc, certs, certs.gateway_client)}},
                              orthanc=orthanc)
    study = pydicom.uid.generate_uid()
    paths = [dicom_samples.make_instance(tmp_path / f"im{i}.dcm", patient_id="PUPTLS", patient_name="Up^Tls",
                                         study_uid=study, InstanceNumber=i + 1)[0] for i in range(2)]
    run_dcmtk("storescu", "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), *map(str, paths))
    orthanc.wait_for_instances(2)  # relayed, or spooled and forwarded, by C-STORE over TLS
    assert "the PACS cannot be reached" not in gateway.log_text()  # the probe / mirror over TLS too
    found = run_dcmtk("findscu", "-v", "-S", "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "-k", "PatientID")
    assert "PUPTLS" in found.stdout + found.stderr  # the Q/R C-FIND to the PACS over TLS


def test_relay_mode_to_a_tls_pacs_from_both_ports(
    gateway_factory: Any, orthanc_factory: Any, certs: Certs, tmp_path: Path
) -> None:
    """``Dicom:StoreMode`` ``Relay`` (no spool fallback: a PACS it cannot reach is a rejection) to
    Orthanc over TLS: each C-STORE is answered with Orthanc's status, so Orthanc holds the
    instances when storescu returns; from the plain port and from the TLS port."""
    orthanc = orthanc_factory(extra_config=orthanc_tls(certs))
    gateway = gateway_factory({"Dicom": {"StoreMode": "Relay", "Tls": tls_settings(certs),
                                         "Upstream": upstream_tls(orthanc, certs, certs.gateway_client)}},
                              orthanc=orthanc)
    paths = [dicom_samples.make_instance(tmp_path / f"im{i}.dcm", patient_id="PRELTLS", patient_name="Relay^Tls",
                                         InstanceNumber=i + 1)[0] for i in range(3)]
    run_dcmtk("storescu", "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), *map(str, paths[:2]))
    assert orthanc.instance_count() == 2  # relayed: stored by Orthanc before storescu heard success
    run_dcmtk("storescu", *tls_args(certs.modality, certs.ca), "-aet", "CT1", "-aec", gateway.aet, LOOPBACK,
              tls_port(gateway), str(paths[2]))
    assert orthanc.instance_count() == 3
    health = gateway.get("/dicomproxy/health").json()["dicom"]
    assert health["spoolDepth"] == 0 and health["forwarded"] == 3 and health["storeMode"] == "Relay", health


def test_a_pacs_that_refuses_the_gateway_certificate_is_retried_with_the_reason(
    gateway_factory: Any, orthanc_factory: Any, certs: Certs, tmp_path: Path
) -> None:
    orthanc = orthanc_factory(extra_config=orthanc_tls(certs))
    gateway = gateway_factory({"Dicom": {"Upstream": upstream_tls(orthanc, certs, certs.stranger),
                                         "ForwardRetrySeconds": 0.2, "ForwardMaxRetrySeconds": 0.5}}, orthanc=orthanc)
    path, _uid = dicom_samples.make_instance(tmp_path / "im.dcm", patient_id="PREF", patient_name="Re^Fused")
    run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(path))
    line = gateway.wait_for_log(f"@127.0.0.1:{orthanc.dicom_port} over TLS", timeout=15)  # the titles: AeTitles
    assert "does it trust the gateway's client certificate?" in line or "not trusted" in line, line
    assert orthanc.instance_count() == 0


def test_relay_mode_to_a_pacs_that_refuses_the_gateway_certificate(
    gateway_factory: Any, orthanc_factory: Any, certs: Certs, tmp_path: Path
) -> None:
    """``Relay``: the PACS's TLS refusal is "cannot be reached", a transient A-ASSOCIATE-RJ to the
    modality, with OpenSSL's reason in the log; nothing is spooled."""
    orthanc = orthanc_factory(extra_config=orthanc_tls(certs))
    gateway = gateway_factory({"Dicom": {"StoreMode": "Relay",
                                         "Upstream": upstream_tls(orthanc, certs, certs.stranger)}}, orthanc=orthanc)
    path, _uid = dicom_samples.make_instance(tmp_path / "im.dcm", patient_id="PRREF", patient_name="Re^Fused")
    done = run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(path), check=False)
    assert done.returncode != 0 and "reject" in (done.stdout + done.stderr).lower(), done
    log = gateway.wait_for_log("the PACS cannot be reached", timeout=15)
    line = next(x for x in log.splitlines() if "the PACS cannot be reached" in x)
    assert f"@127.0.0.1:{orthanc.dicom_port} over TLS" in line and "client certificate" in line, line
    assert gateway.get("/dicomproxy/health").json()["dicom"]["spoolDepth"] == 0
    assert orthanc.instance_count() == 0


def test_send_and_cmove_to_a_tls_destination(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any, certs: Certs, tmp_path: Path
) -> None:
    scp_tls = ["+tls", str(certs.peer.key_path), str(certs.peer.cert_path), "+cf", str(certs.ca.cert_path)]
    dest = storescp_factory("TLSDEST", args=scp_tls)
    assert run_dcmtk("echoscu", "-aec", dest.aet, LOOPBACK, str(dest.port), check=False).returncode != 0  # TLS only
    script = ('function onHttpRequest(req)\n  if req.Path == "/run/send" then\n'
              '    local r = InternalCmdRun("send", req.Headers["x-args"])\n'
              '    req:ResponseWrite(tostring(r.Sent) .. "/" .. tostring(r.Failed))\n    return true\n  end\nend\n')
    modality = {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.port, "Tls": True, "TlsCa": str(certs.ca.cert_path),
                "TlsCertificate": str(certs.gateway_client.cert_path), "TlsKey": str(certs.gateway_client.key_path)}
    gateway = gateway_factory({"Dicom": {"Modalities": {"dest": modality}}}, {"main.lua": script})
    folder = tmp_path / "outbox"
    study = pydicom.uid.generate_uid()
    sent = {dicom_samples.make_instance(folder / f"im{i}.dcm", patient_id="PSEND", patient_name="Se^Nd",
                                        study_uid=study, InstanceNumber=i + 1)[1] for i in range(2)}
    assert gateway.get("/run/send", headers={"x-args": f"{folder} dest"}).text == "2/0"
    got = dest.wait_for_files(2)
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in got} == sent
    # C-MOVE: other instances, in Orthanc (a plain upstream), to the same TLS destination
    moved_study = pydicom.uid.generate_uid()
    for i in range(2):
        path, _uid = dicom_samples.make_instance(tmp_path / "pacs" / f"im{i}.dcm", patient_id="PMOVE",
                                                 patient_name="Mo^Ve", study_uid=moved_study, InstanceNumber=i + 1)
        fresh_orthanc.upload(path)
    run_dcmtk("movescu", "-S", "-aet", "VIEWER", "-aem", dest.aet, "-aec", gateway.aet, LOOPBACK,
              str(gateway.dicom_port), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={moved_study}")
    assert len(dest.wait_for_files(4)) == 4


def modality_context(certs: Certs) -> ssl.SSLContext:
    """What a modality with the ``modality`` certificate uses (dcmtk's getscu/movescu have no TLS)."""
    ctx = ssl.create_default_context(cafile=str(certs.ca.cert_path))
    ctx.load_cert_chain(certs.modality.cert_path, certs.modality.key_path)
    return ctx


def tls_retrieve(
    port: int, aet: str, context: ssl.SSLContext, study: str, move_to: str = ""
) -> tuple[dict[str, bytes], list[int]]:
    """A C-GET (or with ``move_to`` a C-MOVE) with pynetdicom over TLS: the instances received
    (SOP Instance UID -> pixel data) and the statuses."""
    ae = AE(ae_title="VIEWER")
    model = StudyRootQueryRetrieveInformationModelMove if move_to else StudyRootQueryRetrieveInformationModelGet
    ae.add_requested_context(model)
    ae.add_requested_context(dicom_samples.SOP_CLASSES["CT"])
    got: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        got[str(ds.SOPInstanceUID)] = ds.PixelData
        return 0x0000

    assoc = ae.associate(LOOPBACK, port, ae_title=aet, tls_args=(context, LOOPBACK),
                         ext_neg=[build_role(dicom_samples.SOP_CLASSES["CT"], scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    responses = assoc.send_c_move(query, move_to, model) if move_to else assoc.send_c_get(query, model)
    statuses = [int(status.Status) for status, _ in responses]
    assoc.release()
    return got, statuses


def test_query_retrieve_over_tls_end_to_end(
    gateway_factory: Any, orthanc_factory: Any, storescp_factory: Any, certs: Certs, tmp_path: Path
) -> None:
    orthanc = orthanc_factory(extra_config=orthanc_tls(certs))
    dest = storescp_factory("TLSDEST", args=["+tls", str(certs.peer.key_path), str(certs.peer.cert_path),
                                             "+cf", str(certs.ca.cert_path)])
    modality = {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.port, "Retrieve": "FetchAndStore", "Tls": True,
                "TlsCa": str(certs.ca.cert_path), "TlsCertificate": str(certs.gateway_client.cert_path),
                "TlsKey": str(certs.gateway_client.key_path)}
    gateway = gateway_factory({"Dicom": {
        "Tls": tls_settings(certs, Only=True), "Upstream": upstream_tls(orthanc, certs, certs.gateway_client),
        "Modalities": {"dest": modality}, "AePermissions": {"VIEWER": ["find", "get", "move"], "*": ["store"]}}},
        orthanc=orthanc)
    study = pydicom.uid.generate_uid()
    sent = {}
    for i in range(4):  # one of ~2 MB: more than the TLS transport's write buffer, so writes wait
        size = (1024, 1024) if i == 0 else (16, 16)
        path, uid = dicom_samples.make_instance(tmp_path / "pacs" / f"im{i}.dcm", patient_id="PQRTLS",
                                                patient_name="Qr^Tls", study_uid=study, size=size,
                                                InstanceNumber=i + 1)
        orthanc.upload(path)
        sent[uid] = pydicom.dcmread(path).PixelData
    tls, port = tls_args(certs.modality, certs.ca), tls_port(gateway)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    found = run_dcmtk("findscu", "-v", *tls, "-S", "-aet", "VIEWER", "-aec", gateway.aet, LOOPBACK, port, *keys,
                      "-k", "PatientID")
    assert "PQRTLS" in found.stdout + found.stderr
    context = modality_context(certs)
    fetched, statuses = tls_retrieve(int(port), gateway.aet, context, study)
    assert statuses[-1] == 0x0000 and fetched == sent, statuses  # every instance whole, through two TLS hops
    _, statuses = tls_retrieve(int(port), gateway.aet, context, study, move_to=dest.aet)
    assert statuses[-1] == 0x0000, (statuses, dest.log_text())
    moved = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, dest.wait_for_files(4))}
    assert moved == sent  # fetched from the TLS PACS with C-GET, stored into the TLS destination
    refused = run_dcmtk("findscu", "-d", *tls, "-S", "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, port, *keys,
                        check=False)
    assert "0x0124" in refused.stdout + refused.stderr or "Not Authorized" in refused.stdout + refused.stderr
    assert "'CT1' may not find (Dicom:AePermissions)" in gateway.wait_for_log("C-FIND from CT1 (127.0.0.1:")


CONFIG_SCRIPT = r"""
function onHttpRequest(r)
  if r.Path == "/secret" then
    r:ResponseWrite(tostring(Config["Dicom:Tls:KeyPassword"]) .. "|"
      .. tostring(Config["Dicom:Upstream:TlsKeyPassword"]))
    return true
  end
end
"""


def test_encrypted_keys_and_no_secret_shows(gateway_factory: Any, certs: Certs, tmp_path: Path) -> None:
    password, upstream_password = "dicom-Secret-4711", "upstream-Secret-0815"
    key = certs.gateway.encrypted_key(tmp_path / "gateway-enc.key", password.encode())
    client_key = certs.gateway_client.encrypted_key(tmp_path / "client-enc.key", upstream_password.encode())
    (tmp_path / "key-password.txt").write_text(password + "\n")
    upstream = {"Tls": True, "TlsCa": str(certs.ca.cert_path), "TlsCertificate": str(certs.gateway_client.cert_path),
                "TlsKey": str(client_key), "TlsKeyPassword": upstream_password}
    settings = tls_settings(certs, Key=str(key), KeyPasswordFile=str(tmp_path / "key-password.txt"))
    gateway = gateway_factory({"Dicom": {"Tls": settings, "Upstream": upstream}}, {"main.lua": CONFIG_SCRIPT},
                              orthanc=None)
    run_dcmtk("echoscu", *tls_args(certs.modality, certs.ca), "-aec", gateway.aet, LOOPBACK, tls_port(gateway))
    assert gateway.get("/secret").text == "***|***"  # Lua sees them masked
    shown = subprocess.run([sys.executable, "-m", "dicomproxy", "config", "--config", str(gateway.config_path)],
                           capture_output=True, text=True, cwd=gateway.workdir, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    config = json.loads(shown.stdout)["Dicom"]
    assert config["Tls"]["KeyPassword"] == "***" and config["Upstream"]["TlsKeyPassword"] == "***"
    for text in (gateway.log_text(), gateway.get("/dicomproxy/health").text, shown.stdout, shown.stderr):
        assert password not in text and upstream_password not in text


@pytest.mark.parametrize("change, key", [
    ({"Certificate": "missing.crt"}, "Dicom:Tls:Certificate"),
    ({"RequireClientCertificate": True, "ClientCa": ""}, "Dicom:Tls:ClientCa"),
])
def test_startup_errors_name_the_key(
    gateway_factory: Any, certs: Certs, change: dict[str, Any], key: str
) -> None:
    gateway = gateway_factory({"Dicom": {"Tls": tls_settings(certs, **change)}}, orthanc=None, start=False)
    proc = subprocess.run([sys.executable, "-m", "dicomproxy", "serve", "--config", str(gateway.config_path)],
                          capture_output=True, text=True, cwd=gateway.workdir, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode != 0 and key in proc.stderr, proc.stderr[-2000:]
