"""The seed's UID type through a real gateway and Orthanc (issue 11, item 10): a bad UID a script
writes in onCStore fails the C-STORE (the modality gets a failure status, nothing reaches the
PACS, the log names the tag and the value); NewUid() gives UIDs under Dicom:UidRoot (or 2.25.)
that are stored as such; ModifyInstance with a bad replacement UID is refused before the PACS
is asked. Units: tests/test_uids.py, tests/dicom/test_datasets.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.test_dicom_gateway import make_files, orthanc_tags, storescu
from tests.peers import OrthancServer

ROOT = "1.2.826.0.1.3680043.10.999"
MAIN = r"""
function onCStore(dataset, assoc)
  if dataset.PatientID == "BADUID" then dataset.StudyInstanceUID = "1.02.3" end
  if dataset.PatientID == "NEWUID" then
    dataset.SeriesInstanceUID = NewUid()
    LogInfo("new series uid {0}", dataset.SeriesInstanceUID)
  end
end
function onHttpRequest(r)
  if r.Path == "/modify" then
    local ok, err = pcall(ModifyInstance, r.Headers["X-Id"], { StudyInstanceUID = r.Headers["X-Uid"] })
    r:ResponseWrite(ok and ("modified " .. err) or ("refused " .. tostring(err)))
    return true
  end
end
"""


def test_a_bad_uid_fails_the_store_and_new_uid_is_stored(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory({"Dicom": {"UidRoot": ROOT}}, {"main.lua": MAIN})
    ((bad, bad_sop),) = make_files(tmp_path / "bad", 1, patient_id="BADUID")
    refused = storescu(gateway, bad, check=False)
    assert refused.returncode != 0 and "Status: 0x110" in refused.stderr, refused.stderr  # Processing Failure
    log = gateway.wait_for_log("'1.02.3' is not a valid UID")
    assert "StudyInstanceUID: '1.02.3' is not a valid UID: component 2 ('02') has a leading zero" in log
    ((good, good_sop),) = make_files(tmp_path / "new", 1, patient_id="NEWUID")
    storescu(gateway, good)
    fresh_orthanc.wait_for_instances(1)  # the good one arrived; the bad one, sent first, never did
    assert fresh_orthanc.sop_instance_uids() == {good_sop}
    series = orthanc_tags(fresh_orthanc, good_sop)["SeriesInstanceUID"]
    assert series.startswith(ROOT + ".") and len(series) <= 64
    assert f"new series uid {series}" in gateway.log_text()


def test_new_uid_defaults_to_2_25(gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    gateway = gateway_factory(scripts={"main.lua": MAIN})
    ((good, sop),) = make_files(tmp_path / "new", 1, patient_id="NEWUID")
    storescu(gateway, good)
    fresh_orthanc.wait_for_instances(1)
    assert orthanc_tags(fresh_orthanc, sop)["SeriesInstanceUID"].startswith("2.25.")


def test_modify_instance_refuses_a_bad_replacement_uid(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory({"Dicom": {"Port": 0}}, {"main.lua": MAIN})
    ((path, _),) = make_files(tmp_path / "one", 1)
    instance = fresh_orthanc.upload(path)["ID"]
    r = gateway.get("/modify", headers={"X-Id": instance, "X-Uid": "1..2"})
    assert r.text.startswith("refused ") and "StudyInstanceUID" in r.text and "'1..2'" in r.text, r.text
    assert fresh_orthanc.instances() == [instance]  # nothing was asked of the PACS
    r = gateway.get("/modify", headers={"X-Id": instance, "X-Uid": "1.2.3.4"})
    assert r.text.startswith("modified "), r.text
    assert len(fresh_orthanc.instances()) == 2
