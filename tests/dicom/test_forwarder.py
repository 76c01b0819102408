"""Units of dicomproxy.dicom.forwarder: scheduling (study order, parallel studies) against a real
pynetdicom SCP, and large instances sent from the spool file in pieces."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomproxy.dicom import datasets
from dicomproxy.dicom.forwarder import Forwarder, ForwardTarget
from dicomproxy.dicom.spool import Spool
from tests import dicom_samples
from tests.peers import free_port


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
