"""Store-and-forward that cannot be wedged, and the PACS seeing the modality: the gateway process,
dcmtk storescu, a real Orthanc (checked over its REST API).

From the issue: four instances Orthanc refused (0xA700) were acknowledged to the modality, then
retried forever, holding every forwarding lane; nothing else was forwarded, no forward.failed was
raised and a restart replayed them. Orthanc 1.10 answers 0xA700 ("Refused: Out of Resources") for
an instance without SeriesInstanceUID (or StudyInstanceUID); it takes one without PatientID.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydicom

from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
USERS = {"boss": {"Password": "boss-secret", "Roles": ["admin"]},
         "tech": {"Password": "tech-secret", "Roles": ["viewer", "uploader"]}}
ADMIN = ("boss", "boss-secret")
TECH = ("tech", "tech-secret")


def storescu(port: int, aec: str, *paths: Path, calling: str = "CT01", check: bool = True) -> Any:
    return run_dcmtk("storescu", "-v", "-aet", calling, "-aec", aec, LOOPBACK, str(port), *map(str, paths),
                     check=check)


def instances(folder: Path, n: int, study: str, *, series: bool = True, tag: str = "") -> list[tuple[Path, str]]:
    """``n`` CT instances of ``study``; without ``series`` Orthanc refuses them (0xA700)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds = dicom_samples.build_dataset(patient_id="PFWD", patient_name="For^Ward", study_uid=study,
                                         series_uid=series_uid, instance_number=i + 1)
        if not series:
            del ds.SeriesInstanceUID
        path = folder / f"{tag}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, str(ds.SOPInstanceUID)))
    return out


def spool_api(gateway: GatewayProcess, path: str = "", method: str = "GET", auth: tuple[str, str] = ADMIN) -> Any:
    return gateway.request(method, f"/dicomproxy/spool{path}", auth=auth)


def failed_notes(gateway: GatewayProcess) -> list[dict[str, Any]]:
    r = spool_api(gateway, "/failed")
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def forward_failed_events(gateway: GatewayProcess) -> list[dict[str, Any]]:
    r = gateway.get("/dicomproxy/notifications?limit=500", auth=ADMIN)
    return [n for n in r.json() if n["kind"] == "forward.failed"]


def test_refused_instances_back_off_alone_fail_for_good_and_are_managed_by_an_admin(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory()
    gateway = gateway_factory({
        "Dicom": {"StoreMode": "StoreAndForward", "ForwardConcurrency": 2, "ForwardMaxAttempts": 4,
                  "ForwardRetrySeconds": 1.5, "ForwardMaxRetrySeconds": 3},
        "Authentication": {"Users": USERS},
    }, orthanc=pacs)
    study_a, study_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    poison = instances(tmp_path / "in", 4, study_a, series=False, tag="a-bad")  # more than the lanes
    good = instances(tmp_path / "in", 5, study_a, tag="a-good") + instances(tmp_path / "in", 10, study_b, tag="b")
    storescu(gateway.dicom_port, gateway.aet, *[p for p, _ in poison + good])  # all acknowledged: spooled
    pacs.wait_for_instances(15, timeout=30)
    # every good one, of the poison's study too, arrived while the poison instances are still retried
    waiting = spool_api(gateway).json()
    assert pacs.sop_instance_uids() == {u for _, u in good}
    assert waiting["failed"] < 4 and waiting["destinations"][0]["reachable"], waiting
    notes = wait_until(lambda: len(n := failed_notes(gateway)) == 4 and n, timeout=60, what="4 failed instances")
    assert {n["SOPInstanceUID"] for n in notes} == {u for _, u in poison}
    for note in notes:
        assert note["attempts"] == 4 and "gave up after 4 attempts" in note["reason"] and "0xA700" in note["reason"]
        assert "0xA700" in note["firstError"] and note["firstErrorAt"] <= note["lastErrorAt"]
        assert note["origin"]["CallingAE"] == "CT01" and note["StudyInstanceUID"] == study_a
        assert note["SeriesInstanceUID"] == "" and note["status"] == 0xA700
    events = wait_until(lambda: len(e := forward_failed_events(gateway)) == 4 and e, what="4 forward.failed events")
    assert {e["data"]["sop_instance"] for e in events} == {u for _, u in poison}
    assert spool_api(gateway).json()["depth"] == 0
    # the spool is the admin's: a technician may not look, retry or discard
    for path, method in (("", "GET"), ("/failed", "GET"), (f"/failed/{notes[0]['id']}/retry", "POST"),
                         (f"/failed/{notes[0]['id']}", "DELETE")):
        assert spool_api(gateway, path, method, auth=TECH).status_code == 403
    # retry: back in the queue with fresh attempts, refused again four times, failed again
    r = spool_api(gateway, f"/failed/{notes[0]['id']}/retry", "POST")
    assert r.status_code == 200 and r.json()["SOPInstanceUID"] == notes[0]["SOPInstanceUID"], r.text
    assert spool_api(gateway, f"/failed/{notes[0]['id']}/retry", "POST").status_code == 404
    wait_until(lambda: len(forward_failed_events(gateway)) == 5, timeout=60, what="the retried one failed again")
    again = [n for n in failed_notes(gateway) if n["SOPInstanceUID"] == notes[0]["SOPInstanceUID"]]
    assert len(again) == 1 and again[0]["id"] != notes[0]["id"] and again[0]["attempts"] == 4
    # discard: gone, file and note
    assert spool_api(gateway, f"/failed/{notes[1]['id']}", "DELETE").status_code == 204
    assert spool_api(gateway, f"/failed/{notes[1]['id']}", "DELETE").status_code == 404
    assert len(failed_notes(gateway)) == 3
    assert not list((gateway.data_dir / "spool" / "failed").glob(f"{notes[1]['id']}.*"))
    assert "dicomproxy_dicom_forward_failed_total 5" in gateway.get("/dicomproxy/metrics", auth=ADMIN).text


def test_a_kill9_during_backoff_keeps_the_attempts(orthanc_factory: Any, gateway_factory: Any, tmp_path: Path) -> None:
    pacs = orthanc_factory()
    gateway = gateway_factory({"Dicom": {"StoreMode": "StoreAndForward", "ForwardMaxAttempts": 3,
                                         "ForwardRetrySeconds": 2, "ForwardMaxRetrySeconds": 2}}, orthanc=pacs)
    study = pydicom.uid.generate_uid()
    ((bad, bad_uid),) = instances(tmp_path / "in", 1, study, series=False, tag="bad")
    ((fine, fine_uid),) = instances(tmp_path / "in", 1, study, tag="good")
    storescu(gateway.dicom_port, gateway.aet, bad, fine)
    queue = gateway.data_dir / "spool" / "queue"
    state = wait_until(lambda: [p for p in queue.glob("*.state")], what="the refused one's state file")[0]
    before = json.loads(state.read_text())
    assert before["attempts"] == 1 and "0xA700" in before["lastError"]
    pacs.wait_for_instances(1)
    # the API shows it waiting in its study, with its origin (no Authentication here: the API is open)
    # (the good one leaves the spool once the gateway has Orthanc's answer, just after Orthanc has it)
    waiting = wait_until(lambda: (w := gateway.get("/dicomproxy/spool").json())["depth"] == 1 and w,
                         what="only the refused one in the spool")
    (row,) = waiting["destinations"][0]["studies"]
    assert row["study"] == study and row["callingAe"] == "CT01", waiting
    assert row["waiting"] + row["delayed"] + row["sending"] == 1
    killed_at = time.time()
    gateway.kill9()
    gateway.start()
    (note,) = wait_until(lambda: failed_notes_plain(gateway), timeout=30, what="the refused one in failed/")
    # three attempts in all, the first before the kill: the restart went on from the saved state
    assert note["SOPInstanceUID"] == bad_uid and note["attempts"] == 3
    assert note["firstErrorAt"] <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(killed_at))
    assert pacs.sop_instance_uids() == {fine_uid}
    assert not list(queue.iterdir())


def failed_notes_plain(gateway: GatewayProcess) -> list[dict[str, Any]]:
    r = gateway.get("/dicomproxy/spool/failed")  # no Authentication configured: the API is open
    return list(r.json()["items"]) if r.status_code == 200 else []


def _origin(orthanc: OrthancServer, sop_uid: str) -> tuple[str, str]:
    found = orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    assert len(found) == 1, f"{sop_uid} not in Orthanc"
    meta = lambda name: orthanc.rest_get(f"/instances/{found[0]}/metadata/{name}").decode()  # noqa: E731
    return meta("RemoteAET"), meta("CalledAET")


def test_the_pacs_sees_the_modalitys_ae_titles(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    study = pydicom.uid.generate_uid()
    files = instances(tmp_path / "in", 4, study)
    storescu(fresh_orthanc.dicom_port, "ORTHANC", files[0][0], calling="CT01")  # direct, for comparison
    direct = _origin(fresh_orthanc, files[0][1])
    assert direct == ("CT01", "ORTHANC")
    relay = gateway_factory()  # RelayOrSpool, Dicom:Upstream:AeTitles Modality: the defaults
    spool = gateway_factory({"Dicom": {"StoreMode": "StoreAndForward"}})
    gateway_titles = gateway_factory({"Dicom": {"StoreMode": "StoreAndForward", "Upstream": {"AeTitles": "Gateway"}}})
    storescu(relay.dicom_port, "ORTHANC", files[1][0], calling="CT01")
    storescu(spool.dicom_port, "ORTHANC", files[2][0], calling="CT01")
    storescu(gateway_titles.dicom_port, "ORTHANC", files[3][0], calling="CT01")
    fresh_orthanc.wait_for_instances(4)
    assert _origin(fresh_orthanc, files[1][1]) == direct
    assert _origin(fresh_orthanc, files[2][1]) == direct
    assert _origin(fresh_orthanc, files[3][1]) == (gateway_titles.aet, fresh_orthanc.aet)
    # what Orthanc keeps of the store-and-forwarded one is what a direct storescu leaves, byte for byte
    forwarded = fresh_orthanc.rest_get(f"/instances/{_find(fresh_orthanc, files[2][1])}/file")
    fresh_orthanc.clear()
    storescu(fresh_orthanc.dicom_port, "ORTHANC", files[2][0], calling="CT01")
    assert fresh_orthanc.rest_get(f"/instances/{_find(fresh_orthanc, files[2][1])}/file") == forwarded


def _find(orthanc: OrthancServer, sop_uid: str) -> str:
    (found,) = orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    return str(found)
