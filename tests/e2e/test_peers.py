"""The test peers themselves work: if these fail, every integration test would mislead."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from tests.dicom_samples import make_instance, make_study, make_zip, pixel_values
from tests.peers import (
    OrthancServer,
    chromium,
    dcmtk,
    free_port,
    require_binary,
    run_dcmtk,
    run_node,
)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1024 <= port <= 65535


def test_require_binary_fails_with_install_hint() -> None:
    with pytest.raises(pytest.fail.Exception, match="missing: apt-get install nothing"):
        require_binary("/usr/bin/definitely-not-installed-xyz", "apt-get install nothing")
    assert require_binary("/bin/sh", "-") == "/bin/sh"


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless],
    ids=["implicit-le", "explicit-be", "deflated", "rle"],
)
def test_samples_in_every_transfer_syntax_decode_in_orthanc(
    fresh_orthanc: OrthancServer, transfer_syntax: str
) -> None:
    data, uid = make_instance(
        patient_id="TS1", patient_name="Syntax^Test", transfer_syntax=transfer_syntax, size=(2, 3)
    )
    assert isinstance(data, bytes)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert ds.SOPInstanceUID == uid
    answer = fresh_orthanc.upload(data)
    assert answer["Status"] == "Success"
    stored_ts = fresh_orthanc.rest_get(f"/instances/{answer['ID']}/metadata/TransferSyntax")
    assert stored_ts.decode() == transfer_syntax
    # Orthanc decodes the frame: the values must be exactly the generated gradient
    matrix = fresh_orthanc.rest_get(f"/instances/{answer['ID']}/frames/0/matlab").decode()
    values = [int(v) for v in re.findall(r"\d+", matrix.split("[", 1)[1])]
    assert values == pixel_values(2, 3)


def test_make_study_and_zip(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", n_series=2, n_instances=3, patient_id="S1")
    assert len(files) == 6 and len({uid for _, uid in files}) == 6
    studies = {pydicom.dcmread(p).StudyInstanceUID for p, _ in files}
    series = {pydicom.dcmread(p).SeriesInstanceUID for p, _ in files}
    assert len(studies) == 1 and len(series) == 2
    zip_path, uids = make_zip(tmp_path / "s.zip", 1, 2, extra_entries={"README.txt": b"hi"})
    import zipfile

    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert len(uids) == 2 and "README.txt" in names and len(names) == 3


def test_orthanc_answers_rest_and_dicomweb(fresh_orthanc: OrthancServer) -> None:
    system = fresh_orthanc.rest_get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == fresh_orthanc.dicom_port
    plugins = fresh_orthanc.rest_get("/plugins")
    assert "dicom-web" in plugins
    resp = requests.get(f"{fresh_orthanc.dicomweb_url}/studies", timeout=10)
    assert resp.status_code in (200, 204)
    assert resp.status_code == 204 or resp.json() == []


def test_stored_sample_is_visible_over_rest_and_qido(fresh_orthanc: OrthancServer) -> None:
    data, sop_uid = make_instance(patient_id="PEER1", patient_name="Peer^One", StudyDescription="peers")
    answer = fresh_orthanc.upload(data)
    assert answer["Status"] == "Success"
    assert fresh_orthanc.instance_count() == 1
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    resp = requests.get(
        f"{fresh_orthanc.dicomweb_url}/studies", params={"PatientID": "PEER1"}, timeout=10,
        headers={"Accept": "application/dicom+json"},
    )
    assert resp.status_code == 200
    studies = resp.json()
    assert len(studies) == 1
    assert studies[0]["00100020"]["Value"] == ["PEER1"]
    fresh_orthanc.clear()
    assert fresh_orthanc.instance_count() == 0


def test_dcmtk_echoscu_and_storescu_reach_orthanc(fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    proc = run_dcmtk("echoscu", "-aec", fresh_orthanc.aet, "127.0.0.1", str(fresh_orthanc.dicom_port))
    assert proc.returncode == 0
    files = make_study(tmp_path, 1, 3, patient_id="DCMTK1")
    run_dcmtk("storescu", "-aec", fresh_orthanc.aet, "127.0.0.1", str(fresh_orthanc.dicom_port),
              *[str(p) for p, _ in files])
    assert fresh_orthanc.sop_instance_uids() == {uid for _, uid in files}


def test_echoscu_to_a_closed_port_fails() -> None:
    proc = subprocess.run(
        [dcmtk("echoscu"), "-to", "3", "127.0.0.1", str(free_port())], capture_output=True, timeout=30
    )
    assert proc.returncode != 0


def test_private_orthanc_keeps_data_across_stop_start(orthanc_factory, tmp_path: Path) -> None:
    server = orthanc_factory()
    path, sop_uid = make_instance(tmp_path / "x.dcm", patient_id="PERSIST", patient_name="Keep^Me")
    server.upload(path)
    server.stop()
    assert not server.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.http_url}/system", timeout=2)
    server.start()
    assert server.sop_instance_uids() == {sop_uid}
    server.kill()
    assert not server.running


def test_orthanc_cmoves_to_a_declared_storescp(
    fresh_orthanc: OrthancServer, storescp_factory, tmp_path: Path
) -> None:
    scp = storescp_factory("MOVEDEST")
    fresh_orthanc.set_modality("movedest", scp.aet, "127.0.0.1", scp.port)
    files = make_study(tmp_path, 1, 2, patient_id="MOVE1")
    for p, _ in files:
        fresh_orthanc.upload(p)
    study = fresh_orthanc.rest_get("/studies")[0]
    fresh_orthanc.rest_post("/modalities/movedest/store", json={"Resources": [study], "Synchronous": True})
    received = scp.wait_for_files(2)
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == {uid for _, uid in files}
    # the same through a real C-MOVE issued by dcmtk's movescu
    for p in received:
        p.unlink()
    study_uid = pydicom.dcmread(files[0][0]).StudyInstanceUID
    run_dcmtk(
        "movescu", "-S", "-aec", fresh_orthanc.aet, "-aem", scp.aet,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
        "127.0.0.1", str(fresh_orthanc.dicom_port),
    )
    assert len(scp.wait_for_files(2)) == 2
    fresh_orthanc.remove_modality("movedest")


def test_node_resolves_tus_js_client() -> None:
    proc = run_node(
        "const tus = require('tus-js-client');"
        "const pkg = require('tus-js-client/package.json');"
        "console.log(JSON.stringify({upload: typeof tus.Upload, version: pkg.version}));"
    )
    info = json.loads(proc.stdout)
    assert info["upload"] == "function"
    assert int(info["version"].split(".")[0]) >= 4


def test_gateway_that_dies_at_start_fails_with_its_log(gateway_factory) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"(?s)gateway exited with status \d+.*log tail"):
        gateway_factory({"Urls": "ftp://not-a-valid-listen-url"}, timeout=20)


def test_playwright_drives_the_system_chromium() -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_content("<h1 id=t>peer ok</h1>")
            assert page.inner_text("#t") == "peer ok"
        finally:
            browser.close()


def test_gateway_proxies_orthanc_and_survives_restart(gateway_factory, orthanc: OrthancServer) -> None:
    gateway = gateway_factory(scripts={"main.lua": 'LogInfo("peer-fixture main.lua loaded")\n'})
    assert gateway.http_port != orthanc.http_port
    resp = gateway.get("/system")
    assert resp.status_code == 200
    assert resp.json() == orthanc.rest_get("/system")
    health = gateway.get("/dicomproxy/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    gateway.wait_for_log("peer-fixture main.lua loaded")
    # the gateway's AE was declared in Orthanc, so Orthanc can C-MOVE/C-STORE to it
    assert orthanc.rest_get("/modalities/dicomproxy/configuration")["AET"] == gateway.aet

    pid = gateway.proc.pid
    gateway.restart()
    assert gateway.proc.pid != pid
    assert gateway.get("/system").json()["DicomAet"] == orthanc.aet
    assert gateway.log_text().count("peer-fixture main.lua loaded") == 2

    # SIGTERM is a graceful shutdown (uvicorn re-raises the signal after it, hence -SIGTERM);
    # -SIGKILL would mean stop() had to force it
    assert gateway.stop() in (0, -signal.SIGTERM)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{gateway.url}/dicomproxy/health", timeout=2)
    gateway.start()
    gateway.kill9()
    assert not gateway.running


def test_gateway_settings_and_env_overrides(gateway_factory, orthanc_factory) -> None:
    private = orthanc_factory(aet="PRIVATEPACS")
    gateway = gateway_factory(
        {"Upstream": {"Url": private.http_url}, "Dicom": {"Port": 0}},
        {"main.lua": 'LogInfo("aet from config: " .. Config["Dicom:Aet"])\n'},
        orthanc=None,
        env={"DICOMPROXY__Dicom__Aet": "ENVAET"},
    )
    assert gateway.dicom_port == 0
    assert gateway.get("/system").json()["DicomAet"] == "PRIVATEPACS"
    gateway.wait_for_log("aet from config: ENVAET")
    private.stop()
    down = gateway.get("/system")
    assert down.status_code >= 500  # upstream gone: the proxy answers with a gateway error
    private.start()
    assert gateway.get("/system").status_code == 200
