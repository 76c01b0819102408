"""Units of dicomproxy.dicom.forwarder: scheduling (study order, parallel studies) against a real
pynetdicom SCP, and large instances sent from the spool file in pieces."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomproxy.dicom import datasets, forwarder
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


def test_stop_near_the_idle_tick_never_strands_the_lanes(tmp_path: Path, monkeypatch: Any) -> None:
    """Idle lanes wake every IDLE_CLOSE_SECONDS / 2; a stop() that lands while a lane's wait is
    timing out must still end every lane and leave no task behind. (With ``wait_for(cond.wait())``
    on Python 3.11 the timeout's cancellation and stop()'s overlapped: the lane left the
    ``async with`` before its wait had taken the lock back, the lock stayed held by a finished
    task, and the other lanes' waits -- which refuse cancellation until they get it -- hung
    stop() or asyncio.run()'s final cancel: the gateway's SIGTERM hang.) A private loop, closed
    without awaiting what a failure strands, so a regression fails here instead of hanging."""
    monkeypatch.setattr(forwarder, "IDLE_CLOSE_SECONDS", 0.004)
    spool = Spool(tmp_path)
    spool.open()
    loop = asyncio.new_event_loop()
    try:
        problems = loop.run_until_complete(_stop_at_random_moments(spool, trials=150))
    finally:
        loop.close()
        spool.close()
    assert not problems, problems


async def _stop_at_random_moments(spool: Spool, trials: int) -> list[str]:
    rng = random.Random(14)
    for trial in range(trials):
        fwd = Forwarder(spool, ForwardTarget("dimse", "NOBODY", "127.0.0.1", free_port()), concurrency=4)
        before = asyncio.all_tasks()
        await fwd.start([])
        await asyncio.sleep(rng.uniform(0.0, 0.01))
        try:
            async with asyncio.timeout(2):
                await fwd.stop()
        except TimeoutError:
            return [f"trial {trial}: stop() did not return within 2 s"]
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        if left:
            return [f"trial {trial}: stop() left {left}"]
    return []
