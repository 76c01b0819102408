"""Unit tests of the DICOM side's pure pieces: table conversion, the spool file format and its
recovery, the light requester against a real pynetdicom SCP, the forwarder's scheduling."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomproxy.dicom import datasets, scu
from dicomproxy.dicom.forwarder import Forwarder, ForwardTarget
from dicomproxy.dicom.spool import Spool, read_file_meta
from tests import dicom_samples
from tests.peers import free_port


# --------------------------------------------------------------------------- datasets
def _ds() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.PatientID = "P1"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = 16
    ds.add_new(0x00091010, "LO", "private value")
    item = Dataset()
    item.CodeValue = "123"
    item.CodingSchemeDesignator = "DCM"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.PixelData = b"\0" * 32
    ds["PixelData"].VR = "OW"
    return ds


def test_table_uses_keywords_private_keys_arrays_and_skips_bulk_data() -> None:
    table = datasets.dataset_to_table(_ds())
    assert table["PatientName"] == "Doe^John"
    assert table["ImageType"] == "ORIGINAL\\PRIMARY"
    assert table["Rows"] == 16
    assert table["0009,1010"] == "private value"
    assert table["ProcedureCodeSequence"] == [{"CodeValue": "123", "CodingSchemeDesignator": "DCM"}]
    assert "PixelData" not in table


def test_edits_by_keyword_and_tag_key_apply_as_a_diff() -> None:
    ds = _ds()
    before = datasets.dataset_to_table(ds)
    after = dict(before)
    after["PatientName"] = "Edited^Name"
    after["0008,0080"] = "Hospital"  # InstitutionName written by tag
    after["Rows"] = 32.0  # Lua numbers may come back as floats
    del after["PatientID"]
    after["ProcedureCodeSequence"] = {1: {"CodeValue": "456", "CodingSchemeDesignator": "DCM"}}
    assert datasets.apply_table(ds, before, after)
    assert ds.PatientName == "Edited^Name"
    assert ds.InstitutionName == "Hospital"
    assert ds.Rows == 32
    assert "PatientID" not in ds
    assert ds.ProcedureCodeSequence[0].CodeValue == "456"
    assert ds.PixelData == b"\0" * 32  # untouched
    assert not datasets.apply_table(ds, datasets.dataset_to_table(ds), datasets.dataset_to_table(ds))


def test_a_tag_key_edit_wins_over_the_unchanged_keyword_key_in_any_order() -> None:
    for order in (("0010,0010", "PatientName"), ("PatientName", "0010,0010")):
        ds = _ds()
        before = datasets.dataset_to_table(ds)
        after = {k: v for k, v in before.items() if k != "PatientName"}
        for key in order:
            after[key] = "By^Tag" if key == "0010,0010" else before["PatientName"]
        datasets.apply_table(ds, before, after)
        assert ds.PatientName == "By^Tag", order


def test_bad_keys_and_values_raise_table_errors() -> None:
    ds = _ds()
    with pytest.raises(datasets.TableError, match="NotAKeyword"):
        datasets.set_value(ds, "NotAKeyword", "x")
    with pytest.raises(datasets.TableError, match="sequence"):
        datasets.set_value(ds, "ProcedureCodeSequence", "not a list")


def test_encode_decode_round_trip_and_header_uids() -> None:
    ds = dicom_samples.build_dataset(patient_id="P9", patient_name="X^Y")
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.1.99"):
        raw = datasets.encode(ds, ts)
        back = datasets.decode(raw, ts)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        uids = datasets.header_uids(raw, ts)
        assert uids == {
            "SOPClassUID": ds.SOPClassUID,
            "SOPInstanceUID": ds.SOPInstanceUID,
            "StudyInstanceUID": ds.StudyInstanceUID,
            "SeriesInstanceUID": ds.SeriesInstanceUID,
            "PatientID": "P9",
        }


# --------------------------------------------------------------------------- spool
def _put(spool: Spool, data: bytes, study: str = "1.2.3") -> Any:
    return spool.put(
        data,
        sop_class=CTImageStorage,
        sop_instance="1.2.3.4",
        transfer_syntax=ExplicitVRLittleEndian,
        study=study,
        origin={"CallingAE": "MOD", "RemoteIp": "127.0.0.1"},
    )


def test_spool_files_are_part10_and_recover_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.open() == []
    a = _put(spool, b"\x08\x00\x16\x00" + b"x" * 10)
    b = _put(spool, b"second", study="9.9")
    assert spool.depth == 2 and b.seq == a.seq + 1
    meta, offset = read_file_meta(a.path.read_bytes())
    assert meta[0x0016].rstrip(b" \0") == b"MOD"  # Source AE title, standard meta
    spool.close()

    again = Spool(tmp_path)
    entries = again.open()
    assert [e.seq for e in entries] == [a.seq, b.seq]
    assert entries[1].study == "9.9" and entries[0].origin["CallingAE"] == "MOD"
    assert again.read_dataset(entries[1]) == b"second"
    assert _put(again, b"third").seq == b.seq + 1  # numbering continues after a restart
    again.close()


def test_spool_drops_a_truncated_write_and_keeps_failures(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    good = _put(spool, b"complete")
    torn = _put(spool, b"will be cut short")
    torn.path.write_bytes(torn.path.read_bytes()[:-5])  # as if the process died mid-write
    target = spool.fail(good, "refused", status=0xC000)
    assert target.exists() and target.with_suffix(".json").exists()
    assert spool.failed_count == 1
    spool.close()
    again = Spool(tmp_path)
    assert again.open() == []  # the torn file was never acknowledged: dropped
    assert again.failed_count == 1
    again.close()


# --------------------------------------------------------------------------- light requester vs pynetdicom
@pytest.fixture
def pynetdicom_scp() -> Any:
    received: list[tuple[str, str]] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax)))
        return 0xB000 if ds.get("PatientID") == "WARN" else (0xA900 if ds.get("PatientID") == "BAD" else 0)

    ae = AE("PYSCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, received
    server.shutdown()


async def test_light_requester_stores_echoes_and_reports_contexts(pynetdicom_scp: Any) -> None:
    port, received = pynetdicom_scp
    status = await scu.echo("127.0.0.1", port, called_aet="PYSCP", calling_aet="ME")
    assert status.is_success
    assoc = await scu.Association.connect(
        "127.0.0.1",
        port,
        called_aet="PYSCP",
        calling_aet="ME",
        contexts=[
            (CTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, ImplicitVRLittleEndian),
            ("1.2.3.4", ExplicitVRLittleEndian),
        ],
    )
    assert (CTImageStorage, ImplicitVRLittleEndian) in assoc.rejected
    assert ("1.2.3.4", ExplicitVRLittleEndian) in assoc.rejected
    results = []
    for pid in ("OK", "WARN", "BAD"):
        ds = dicom_samples.build_dataset(patient_id=pid, patient_name="A^B", size=(300, 300))  # > one PDU
        results.append(
            await assoc.c_store(
                CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, datasets.encode(ds, ExplicitVRLittleEndian)
            )
        )
    await assoc.release()
    assert [r.status for r in results] == [0, 0xB000, 0xA900]
    assert results[1].is_warning and not results[2].is_success
    assert len(received) == 3


async def test_light_requester_errors_name_the_peer() -> None:
    port = free_port()
    with pytest.raises(scu.DimseError, match=f"127.0.0.1:{port}"):
        await scu.echo("127.0.0.1", port, called_aet="NOBODY", calling_aet="ME", timeout=2)


# --------------------------------------------------------------------------- forwarder scheduling
async def test_forwarder_keeps_study_order_and_runs_studies_in_parallel(tmp_path: Path) -> None:
    """Against a real pynetdicom SCP that records arrival order and overlap per study."""
    lock = threading.Lock()
    order: dict[str, list[int]] = {}
    active: dict[str, int] = {}
    overlap = {"max_studies": 0, "same_study": 0}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        study = str(ds.StudyInstanceUID)
        with lock:
            active[study] = active.get(study, 0) + 1
            if active[study] > 1:
                overlap["same_study"] += 1
            overlap["max_studies"] = max(overlap["max_studies"], sum(1 for v in active.values() if v))
        threading.Event().wait(0.02)
        with lock:
            active[study] -= 1
            order.setdefault(study, []).append(int(ds.InstanceNumber))
        return 0

    ae = AE("PYSCP")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    spool = Spool(tmp_path)
    spool.open()
    stored: list[str] = []

    async def on_stored(entry: Any, result: Any, data: bytes) -> None:
        stored.append(entry.sop_instance)

    fwd = Forwarder(spool, ForwardTarget("dimse", "PYSCP", "127.0.0.1", port), concurrency=3, on_stored=on_stored)
    try:
        await fwd.start([])
        studies = [f"1.2.826.0.1.3680043.10.1426.99.{i}" for i in range(3)]
        for n in range(1, 7):
            for study in studies:
                ds = dicom_samples.build_dataset(patient_id="P", patient_name="A^B", study_uid=study, InstanceNumber=n)
                raw = datasets.encode(ds, ExplicitVRLittleEndian)
                fwd.enqueue(
                    spool.put(
                        raw,
                        sop_class=CTImageStorage,
                        sop_instance=ds.SOPInstanceUID,
                        transfer_syntax=ExplicitVRLittleEndian,
                        study=study,
                    )
                )
        for _ in range(200):
            if len(stored) == 18:
                break
            await asyncio.sleep(0.05)
    finally:
        await fwd.stop()
        server.shutdown()
        spool.close()
    assert len(stored) == 18 and spool.depth == 0
    assert all(v == [1, 2, 3, 4, 5, 6] for v in order.values()), order
    assert overlap["same_study"] == 0
    assert overlap["max_studies"] >= 2  # unrelated studies really went in parallel
