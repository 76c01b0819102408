"""Units of dicomproxy.dicom.storage_scu against a real pynetdicom SCP: C-STORE and C-ECHO,
accepted and rejected contexts, statuses, data sets sent from a file in pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomproxy.dicom import datasets
from dicomproxy.dicom.storage_scu import FileDataset, StorageScu, echo
from dicomproxy.dicom.ul.errors import UpperLayerError
from tests import dicom_samples
from tests.peers import free_port

received_bytes: dict[str, bytes] = {}

@pytest.fixture
def pynetdicom_scp() -> Any:
    received: list[tuple[str, str]] = []

    def on_store(event: evt.Event) -> int:
        received_bytes[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
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
    status = await echo("127.0.0.1", port, called_aet="PYSCP", calling_aet="ME")
    assert status.is_success
    assoc = await StorageScu.connect(
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
    with pytest.raises(UpperLayerError, match=f"127.0.0.1:{port}"):
        await echo("127.0.0.1", port, called_aet="NOBODY", calling_aet="ME", timeout=2)


async def test_a_data_set_in_a_file_is_sent_in_pieces_byte_for_byte(pynetdicom_scp: Any, tmp_path: Path) -> None:
    port, received = pynetdicom_scp
    ds = dicom_samples.build_dataset(patient_id="BIG", patient_name="A^B", size=(1100, 1100))  # ~2.4 MB: 3 pieces
    raw = datasets.encode(ds, ExplicitVRLittleEndian)
    path = tmp_path / "data.bin"
    path.write_bytes(b"HEADER" + raw + b"TRAILER")
    assoc = await StorageScu.connect(
        "127.0.0.1", port, called_aet="PYSCP", calling_aet="ME", contexts=[(CTImageStorage, ExplicitVRLittleEndian)]
    )
    try:
        status = await assoc.c_store(
            CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, FileDataset(path, 6, len(raw))
        )
    finally:
        await assoc.release()
    assert status.is_success and received[-1] == (ds.SOPInstanceUID, ExplicitVRLittleEndian)
    assert received_bytes[ds.SOPInstanceUID] == raw


async def test_a_file_shorter_than_announced_fails_the_operation(pynetdicom_scp: Any, tmp_path: Path) -> None:
    port, _ = pynetdicom_scp
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 100)
    assoc = await StorageScu.connect(
        "127.0.0.1", port, called_aet="PYSCP", calling_aet="ME", contexts=[(CTImageStorage, ExplicitVRLittleEndian)]
    )
    try:
        with pytest.raises(UpperLayerError, match="shorter"):
            await assoc.c_store(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, FileDataset(path, 0, 5 << 20))
    finally:
        assoc.abort()
