"""C-MOVE and C-GET through the real stack (a real Orthanc as the PACS, dcmtk ``storescp`` as the
move destination, dcmtk ``movescu``/``getscu`` and pynetdicom as requesters): a C-MOVE relayed
as a C-MOVE (the PACS moves, its answers come back as they are, also for an identifier without
``QueryRetrieveLevel``), served by fetching and storing with counts from the real matches, the
``Auto`` choice learned from the PACS's answer (the instances fetched and stored byte for byte
those the PACS moves itself), and a 300 MB instance through C-GET and C-MOVE
with the gateway's peak memory measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from tests import dicom_samples
from tests.e2e.test_dicom_qr import dataset_part, japanese_instance
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
COUNTS = ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
          "NumberOfWarningSuboperations")


def _study(orthanc: OrthancServer, n: int, patient_id: str) -> tuple[str, set[str]]:
    study = pydicom.uid.generate_uid()
    uids = set()
    for i in range(n):
        data, uid = dicom_samples.make_instance(patient_id=patient_id, patient_name="Move^Me", study_uid=study,
                                                InstanceNumber=i + 1, AccessionNumber=f"ACC-{patient_id}")
        orthanc.upload(data)
        uids.add(uid)
    return study, uids


def raw_move(port: int, aet: str, destination: str, keys: dict[str, str]) -> list[tuple[int, list[int]]]:
    """A C-MOVE with pynetdicom: (status, [remaining, completed, failed, warning]) per response."""
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(LOOPBACK, port, ae_title=aet)
    assert assoc.is_established
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    out = []
    for status, _identifier in assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove):
        out.append((int(status.Status), [int(status.get(k, -1)) for k in COUNTS]))
    assoc.release()
    return out


def source_aets(files: list[Path]) -> set[str]:
    """Who sent each file to storescp (storescp records the calling AE title in the file meta)."""
    return {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle).strip()
            for f in files}


def destination(dest: Any, retrieve: str) -> dict[str, Any]:
    return {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.port, "Retrieve": retrieve}


def test_cmove_relayed_the_pacs_moves_and_its_answers_come_back(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any
) -> None:
    study, uids = _study(fresh_orthanc, 3, "PRELAY")
    dest = storescp_factory("RELAYDEST")
    fresh_orthanc.set_modality("relaydest", dest.aet, LOOPBACK, dest.port)
    gateway = gateway_factory({"Dicom": {"Modalities": {"relaydest": destination(dest, "Relay")}}})
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    direct = raw_move(fresh_orthanc.dicom_port, fresh_orthanc.aet, dest.aet, keys)
    files = dest.wait_for_files(3)
    through = raw_move(gateway.dicom_port, gateway.aet, dest.aet, keys)
    assert through == direct, (through, direct)
    assert through[-1][0] == 0x0000 and through[-1][1][1:] == [3, 0, 0], through
    files = dest.wait_for_files(3)
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in files} == uids
    assert source_aets(files) == {fresh_orthanc.aet}  # the PACS moved them itself, not the gateway
    # an identifier without QueryRetrieveLevel (Orthanc's own C-MOVE accepts it): passed as sent
    bare = {"StudyInstanceUID": study}
    assert raw_move(gateway.dicom_port, gateway.aet, dest.aet, bare) == raw_move(
        fresh_orthanc.dicom_port, fresh_orthanc.aet, dest.aet, bare)
    # movescu too: the same responses through the gateway as straight to Orthanc
    args = ["-S", "-v", "-aet", "MOVESCU", "-aem", dest.aet, "-k", "QueryRetrieveLevel=STUDY", "-k",
            f"StudyInstanceUID={study}"]
    d = run_dcmtk("movescu", "-aec", fresh_orthanc.aet, *args, LOOPBACK, str(fresh_orthanc.dicom_port))
    t = run_dcmtk("movescu", "-aec", gateway.aet, *args, LOOPBACK, str(gateway.dicom_port))
    assert _move_lines(t.stderr) == _move_lines(d.stderr) and "Final Move Response (Success)" in t.stderr
    assert "fetching and storing" not in gateway.log_text()


def _move_lines(output: str) -> list[str]:
    return [line.split(": ", 1)[-1] for line in output.splitlines() if "Move Response" in line]


def test_cmove_fetch_and_store_counts_the_real_matches(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any
) -> None:
    study, uids = _study(fresh_orthanc, 3, "PFETCH")
    _study(fresh_orthanc, 2, "POTHER")  # more instances in the PACS, matched by nothing below
    dest = storescp_factory("FETCHDEST")  # unknown to Orthanc: only the gateway can deliver there
    gateway = gateway_factory({"Dicom": {"Modalities": {"fetchdest": destination(dest, "FetchAndStore")}}})
    moved = raw_move(gateway.dicom_port, gateway.aet, dest.aet, {"QueryRetrieveLevel": "STUDY",
                                                                  "StudyInstanceUID": study})
    assert moved[-1][0] == 0x0000 and moved[-1][1][1:] == [3, 0, 0], moved
    files = dest.wait_for_files(3)
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in files} == uids
    assert source_aets(files) == {gateway.aet}
    # without QueryRetrieveLevel, as Orthanc's own C-MOVE accepts it: passed on as sent
    bare = raw_move(gateway.dicom_port, gateway.aet, dest.aet, {"StudyInstanceUID": study})
    assert bare[-1][0] == 0x0000 and bare[-1][1][1:] == [3, 0, 0], bare
    # a key that matches nothing counts nothing (not every instance in the PACS)
    for keys in ({"QueryRetrieveLevel": "STUDY", "AccessionNumber": "nope"},
                 {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study, "AccessionNumber": "nope"}):
        none = raw_move(gateway.dicom_port, gateway.aet, dest.aet, keys)
        assert len(none) == 1 and none[0][0] == 0x0000 and none[0][1][1:] == [0, 0, 0], none
    # an accession number that matches: the two instances of that study only
    acc = raw_move(gateway.dicom_port, gateway.aet, dest.aet, {"QueryRetrieveLevel": "STUDY",
                                                                "AccessionNumber": "ACC-POTHER"})
    assert acc[-1][0] == 0x0000 and acc[-1][1][1:] == [2, 0, 0], acc
    assert len(dest.wait_for_files(5)) == 5
    assert gateway.log_text().count("no instance matches") == 2


def test_cmove_auto_relays_when_the_pacs_knows_the_destination_and_learns_when_not(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any, tmp_path: Path
) -> None:
    study = pydicom.uid.generate_uid()
    for n in (1, 2):  # a Japanese (ISO_IR 13) name and private elements: the bytes must not change on the way
        path, _ = japanese_instance(tmp_path, patient_id="PAUTO", study_uid=study, number=n)
        fresh_orthanc.upload(path)
    known = storescp_factory("KNOWNDEST")
    unknown = storescp_factory("UNKNOWNDEST")
    fresh_orthanc.set_modality("knowndest", known.aet, LOOPBACK, known.port)
    gateway = gateway_factory({"Dicom": {"Modalities": {
        "knowndest": destination(known, "Auto"), "unknowndest": destination(unknown, "Auto")}}})
    # Orthanc answers a bare 0xC000 for a study it does not hold, as for a destination it does not
    # know: passed on as it is, and the known destination is not taken for an unknown one
    missing = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": pydicom.uid.generate_uid()}
    direct = raw_move(fresh_orthanc.dicom_port, fresh_orthanc.aet, known.aet, missing)
    assert raw_move(gateway.dicom_port, gateway.aet, known.aet, missing) == direct and direct[-1][0] == 0xC000
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    assert raw_move(gateway.dicom_port, gateway.aet, known.aet, keys)[-1][0] == 0x0000
    assert source_aets(known.wait_for_files(2)) == {fresh_orthanc.aet}
    for _ in range(2):
        moved = raw_move(gateway.dicom_port, gateway.aet, unknown.aet, keys)
        assert moved[-1][0] == 0x0000 and moved[-1][1][1:] == [2, 0, 0], moved
    fetched = unknown.wait_for_files(2)
    assert source_aets(fetched) == {gateway.aet}
    # what the gateway fetched and stored is, byte for byte, what the PACS itself moves
    assert sorted(map(dataset_part, fetched)) == sorted(map(dataset_part, known.files()))
    # the PACS was asked once; the second move went straight to fetching (remembered)
    assert gateway.log_text().count(f"C-MOVE to {unknown.aet}: the PACS cannot move there") == 1
    assert f"C-MOVE to {known.aet}: the PACS cannot move there" not in gateway.log_text()


# --------------------------------------------------------------------------- memory
def _big_instance(path: Path, megabytes: int) -> tuple[Path, str]:
    ds = dicom_samples.build_dataset(patient_id="PBIGQR", patient_name="Big^Retrieve", size=(16, 16))
    side = int(((megabytes << 20) / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side * 2 // 256) + bytes(side * side * 2 % 256)
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def _peak_rss_mb(gateway: GatewayProcess) -> float:
    assert gateway.proc is not None
    status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


@pytest.mark.timeout(900)
def test_a_300_mb_instance_through_cget_and_cmove_keeps_memory_flat(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any, tmp_path: Path
) -> None:
    dest = storescp_factory("BIGDEST")
    gateway = gateway_factory({"Dicom": {"Modalities": {"bigdest": destination(dest, "FetchAndStore")}}})
    warm_study, _ = _study(fresh_orthanc, 1, "PWARM")  # every code path once before the baseline
    warm = ["-S", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), "-k", "QueryRetrieveLevel=STUDY", "-k",
            f"StudyInstanceUID={warm_study}"]
    (tmp_path / "warm").mkdir()
    run_dcmtk("getscu", *warm, "-od", str(tmp_path / "warm"))
    run_dcmtk("movescu", "-aem", dest.aet, *warm)
    dest.wait_for_files(1)
    path, study = _big_instance(tmp_path / "big.dcm", 300)
    run_dcmtk("storescu", "-aec", fresh_orthanc.aet, LOOPBACK, str(fresh_orthanc.dicom_port), str(path), timeout=300)
    tail = path.read_bytes()[-(1 << 20):]
    before = _peak_rss_mb(gateway)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    got = tmp_path / "got"
    got.mkdir()
    run_dcmtk("getscu", "-S", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), *keys, "-od", str(got),
              timeout=600)
    after_get = _peak_rss_mb(gateway)
    [fetched] = list(got.iterdir())
    assert fetched.stat().st_size > 299 << 20 and fetched.read_bytes()[-(1 << 20):] == tail
    run_dcmtk("movescu", "-S", "-aem", dest.aet, "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), *keys,
              timeout=600)
    moved = wait_until(lambda: [f for f in dest.files() if f.stat().st_size > 299 << 20], timeout=60,
                       what="the 300 MB instance at the move destination")
    assert moved[0].read_bytes()[-(1 << 20):] == tail
    after_move = _peak_rss_mb(gateway)
    print(f"peak RSS growth: C-GET {after_get - before:.1f} MB, C-MOVE {after_move - after_get:.1f} MB")
    assert after_get - before <= 50, f"C-GET of 300 MB grew the gateway's peak RSS by {after_get - before:.0f} MB"
    assert after_move - before <= 50, f"C-MOVE of 300 MB grew the gateway's peak RSS by {after_move - before:.0f} MB"


# --------------------------------------------------------------------------- C-CANCEL
@pytest.mark.parametrize("retrieve", ["Relay", "FetchAndStore"])
def test_cmove_cancel_is_passed_upstream(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any, retrieve: str
) -> None:
    study = pydicom.uid.generate_uid()
    for n in range(30):
        data, _ = dicom_samples.make_instance(patient_id="PCANCEL", patient_name="C^M", study_uid=study,
                                              InstanceNumber=n + 1, size=(64, 64))
        fresh_orthanc.upload(data)
    dest = storescp_factory("CANCELDEST")
    fresh_orthanc.set_modality("canceldest", dest.aet, LOOPBACK, dest.port)
    gateway = gateway_factory({"Dicom": {"Modalities": {"canceldest": destination(dest, retrieve)}}})
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(LOOPBACK, gateway.dicom_port, ae_title=gateway.aet)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    statuses = []
    for status, _ in assoc.send_c_move(query, dest.aet, StudyRootQueryRetrieveInformationModelMove, msg_id=7):
        statuses.append((int(status.Status), [int(status.get(k, -1)) for k in COUNTS]))
        if len(statuses) == 1:
            assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelMove)
    assoc.release()
    final, counts = statuses[-1]
    assert final == 0xFE00, statuses
    assert 1 <= counts[1] < 30 and sum(c for c in counts if c > 0) == 30, statuses  # the PACS's accounting
    gateway.wait_for_log("cancelling upstream")
