"""TUS through the whole stack: the gateway process, its scripts, its task queue, a real Orthanc.

Uploads land in Orthanc with the same SOP Instance UIDs; ``onTusFileComplete`` can take over;
a gateway killed with -9 mid-PATCH resumes to a byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from tusclient import client as tus_client

from tests.peers import JS_DIR, GatewayProcess, OrthancServer, run_node, wait_until
from tests.tus.test_support import OCTET, TUS, RawRequest, sha256_file, upload_id, wait_file_size

GatewayFactory = Callable[..., GatewayProcess]


def tus_url(gw: GatewayProcess) -> str:
    return gw.url + "/files/"


def tus_folder(gw: GatewayProcess) -> Path:
    return gw.data_dir / "tus"


def tasks(gw: GatewayProcess, kind: str = "tus-import") -> list[dict[str, Any]]:
    r = gw.get("/dicomproxy/tasks")
    assert r.status_code == 200, r.text
    return [t for t in r.json() if t["kind"] == kind]


def notifications(gw: GatewayProcess, kind: str) -> list[dict[str, Any]]:
    r = gw.get("/dicomproxy/notifications")
    assert r.status_code == 200, r.text
    return [n for n in r.json() if n["kind"] == kind]


def wait_task(gw: GatewayProcess, state: str, n: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        found = [t for t in tasks(gw) if t["state"] == state]
        return found if len(found) >= n else None

    try:
        return wait_until(ready, timeout=timeout, what=f"{n} tus-import task(s) {state}")
    except BaseException:
        print(json.dumps(tasks(gw), indent=1), gw.log_text()[-4000:])
        raise


def test_tuspy_dicom_file_is_imported_into_orthanc(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    gw = gateway_factory()
    path, sop_uid = dicom_samples.make_instance(tmp_path / "ct.dcm", patient_id="TUS1", patient_name="Tus^One")
    uploader = tus_client.TusClient(tus_url(gw)).uploader(
        str(path), chunk_size=4096, metadata={"filename": "ct.dcm", "PatientID": "TUS1"})
    uploader.upload()
    assert uploader.url.startswith(gw.url + "/files/")
    uid = upload_id(uploader.url)
    done = wait_task(gw, "done")[0]
    assert done["result"]["fileId"] == uid and done["result"]["stored"] == 1
    assert done["result"]["sopInstanceUids"] == [sop_uid]
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    # Imported, so deleted (Tus:KeepAfterImport is false by default).
    wait_until(lambda: not (tus_folder(gw) / uid).exists() and not (tus_folder(gw) / f"{uid}.info").exists(),
               what="the imported upload to be deleted")
    assert requests.head(uploader.url, headers=TUS, timeout=10).status_code == 404
    metrics = gw.get("/dicomproxy/metrics").text
    assert 'dicomproxy_tus_imports_total{outcome="stored"} 1' in metrics
    imported = wait_until(lambda: notifications(gw, "upload.imported"), what="an upload.imported event")
    assert "ct.dcm" in imported[0]["title"] and imported[0]["data"]["fileId"] == uid


def test_tus_js_client_zip_is_imported_in_batches(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    gw = gateway_factory({"Tus": {"ImportBatchSize": 2, "KeepAfterImport": True}})
    zip_path, uids = dicom_samples.make_zip(
        tmp_path / "study.zip", n_series=1, n_instances=5, patient_id="TUSZIP",
        extra_entries={"README.txt": b"not dicom", "DICOMDIR": b"\0" * 200})
    proc = run_node((JS_DIR / "tus_upload.js").read_text(), tus_url(gw), str(zip_path),
                    json.dumps({"chunkSize": 64 * 1024, "metadata": {"filename": "study.zip"}}), timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], proc.stdout
    done = wait_task(gw, "done")[0]["result"]
    assert done["content"] == "zip" and done["stored"] == 5 and done["batches"] == 3
    assert done["skipped"] == 2  # README.txt and DICOMDIR
    assert fresh_orthanc.sop_instance_uids() == set(uids)
    # KeepAfterImport: the upload stays, byte for byte.
    kept = tus_folder(gw) / upload_id(str(result["url"]))
    assert kept.read_bytes() == zip_path.read_bytes()


MAIN_HANDLES = """
function onTusFileComplete(metadata)
  LogInfo("TUSHOOK fileId=" .. metadata["fileId"] .. " filename=" .. tostring(metadata["filename"])
          .. " PatientID=" .. tostring(metadata["PatientID"]) .. " size=" .. metadata["size"]
          .. " path=" .. metadata["path"])
  return true
end
"""


def test_script_returning_true_takes_over(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(scripts={"main.lua": MAIN_HANDLES})
    path, _ = dicom_samples.make_instance(tmp_path / "mr.dcm", patient_id="TUS2", patient_name="Tus^Two",
                                          modality="MR")
    uploader = tus_client.TusClient(tus_url(gw)).uploader(
        str(path), chunk_size=100_000, metadata={"filename": "mr.dcm", "PatientID": "TUS2"})
    uploader.upload()
    uid = upload_id(uploader.url)
    data_path = tus_folder(gw) / uid
    log = gw.wait_for_log(f"TUSHOOK fileId={uid}", timeout=20)
    line = next(ln for ln in log.splitlines() if f"TUSHOOK fileId={uid}" in ln)
    assert "filename=mr.dcm" in line and "PatientID=TUS2" in line
    assert f"size={path.stat().st_size}" in line and f"path={data_path}" in line
    # logged where the feature decides: after it, no default import can be queued for this upload
    gw.wait_for_log(f"tus: upload {uid} handled by onTusFileComplete")
    assert tasks(gw) == []
    assert fresh_orthanc.instance_count() == 0
    assert data_path.read_bytes() == path.read_bytes()  # the script owns the file now


def test_script_error_falls_back_to_default_import(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    gw = gateway_factory(scripts={"main.lua": 'function onTusFileComplete(m)\n  error("boom")\nend\n'})
    path, sop_uid = dicom_samples.make_instance(tmp_path / "cr.dcm", patient_id="TUS3", patient_name="Tus^Three")
    tus_client.TusClient(tus_url(gw)).uploader(str(path), chunk_size=1 << 20).upload()
    wait_task(gw, "done")
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    assert "boom" in gw.log_text()


def test_not_dicom_is_a_failed_task_and_the_upload_is_kept(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gw = gateway_factory()
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the DICOM files you are looking for\n" * 100)
    uploader = tus_client.TusClient(tus_url(gw)).uploader(str(path), metadata={"filename": "notes.txt"})
    uploader.upload()
    failed = wait_task(gw, "failed")[0]
    assert "not DICOM" in failed["error"] and "notes.txt" in failed["error"]
    event = wait_until(lambda: notifications(gw, "import.failed"), what="an import.failed event")[0]
    assert "notes.txt" in event["title"] and "not DICOM" in event["body"]
    assert (tus_folder(gw) / upload_id(uploader.url)).read_bytes() == path.read_bytes()
    assert fresh_orthanc.instance_count() == 0


def test_import_failure_when_pacs_is_down_keeps_upload(
    gateway_factory: GatewayFactory, orthanc_factory: Callable[..., OrthancServer], dicom_samples: Any,
    tmp_path: Path,
) -> None:
    pacs = orthanc_factory()
    gw = gateway_factory(orthanc=pacs)
    pacs.stop()
    path, _ = dicom_samples.make_instance(tmp_path / "x.dcm", patient_id="TUS4", patient_name="Tus^Four")
    uploader = tus_client.TusClient(tus_url(gw)).uploader(str(path))
    uploader.upload()
    failed = wait_task(gw, "failed")[0]
    assert "STOW-RS" in failed["error"]
    assert (tus_folder(gw) / upload_id(uploader.url)).exists()
    assert "import of upload" in gw.log_text()


def test_gateway_killed_mid_patch_resumes_byte_identical(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = gateway_factory({"Tus": {"KeepAfterImport": True}})
    size = 24 * 1024 * 1024
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(size))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    r = requests.post(tus_url(gw), headers={**TUS, "Upload-Length": str(size)}, timeout=10)
    url = r.headers["Location"]
    uid = upload_id(url)
    data_path = tus_folder(gw) / uid
    patch = RawRequest(gw.http_port, "PATCH", f"/files/{uid}",
                       {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": str(size)})
    patch.send(src.read_bytes()[: 13 * 1024 * 1024])
    wait_file_size(data_path, 8 * 1024 * 1024)  # at least two write batches reached the file
    gw.kill9()
    patch.close()
    on_disk = data_path.stat().st_size
    assert 0 < on_disk <= 13 * 1024 * 1024
    assert (tus_folder(gw) / f"{uid}.lock").exists()  # left behind by the killed process
    gw.start()
    head = requests.head(url, headers=TUS, timeout=10)
    assert head.status_code == 200
    assert int(head.headers["Upload-Offset"]) == on_disk
    # The client resumes where the server says and ends with the very same file.
    resumed = tus_client.TusClient(tus_url(gw)).uploader(str(src), url=url, chunk_size=4 * 1024 * 1024)
    assert resumed.offset == on_disk
    resumed.upload()
    assert sha256_file(data_path) == want


def test_tusd_written_folder_is_served_and_resumed(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    """A folder left by tusd (its filestore + filelocker) is picked up as is."""
    gw = gateway_factory(start=False)
    folder = tus_folder(gw)
    folder.mkdir(parents=True, exist_ok=True)
    path, sop_uid = dicom_samples.make_instance(tmp_path / "us.dcm", patient_id="TUSD", patient_name="Tus^D",
                                                modality="US")
    data = path.read_bytes()
    uid = "3c6d1a4c1f5fa0a6b8e0b6f1d2e3a4b5"
    half = len(data) // 2
    (folder / uid).write_bytes(data[:half])
    # Exactly what tusd v2 writes: Go's field order, Offset 0 (tusd never updates it), tusd's
    # own Storage paths (another machine's), and a lock file left by a dead tusd process.
    info = {"ID": uid, "Size": len(data), "SizeIsDeferred": False, "Offset": 0,
            "MetaData": {"filename": "us.dcm", "filetype": "application/dicom"},
            "IsPartial": False, "IsFinal": False, "PartialUploads": None,
            "Storage": {"InfoPath": f"/srv/tusd-data/{uid}.info", "Path": f"/srv/tusd-data/{uid}",
                        "Type": "filestore"}}
    (folder / f"{uid}.info").write_text(json.dumps(info, separators=(",", ":")))
    (folder / f"{uid}.lock").write_text("999999\n")
    gw.start()
    url = f"{tus_url(gw)}{uid}"
    head = requests.head(url, headers=TUS, timeout=10)
    assert head.status_code == 200
    assert head.headers["Upload-Offset"] == str(half) and head.headers["Upload-Length"] == str(len(data))
    tus_client.TusClient(tus_url(gw)).uploader(str(path), url=url, chunk_size=1 << 20).upload()
    wait_task(gw, "done")
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
