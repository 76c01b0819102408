"""Units of dicomproxy.dicom.forwarder: scheduling (study order, parallel studies) against a real
pynetdicom SCP, and large instances sent from the spool file in pieces."""

from __future__ import annotations

import asyncio
import random
import threading
import time
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


def _scp(refuse: set[str], seen: list[str]) -> tuple[Any, int]:
    """A pynetdicom SCP answering 0xA700 for the SOP instances in ``refuse``."""

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        seen.append(uid)
        return 0xA700 if uid in refuse else 0

    ae = AE("PYSCP")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]), port


def _put(spool: Spool, study: str, n: int) -> Any:
    ds = dicom_samples.build_dataset(patient_id="P", patient_name="A^B", study_uid=study, InstanceNumber=n)
    return spool.put(datasets.encode(ds, ExplicitVRLittleEndian), sop_class=CTImageStorage,
                     sop_instance=ds.SOPInstanceUID, transfer_syntax=ExplicitVRLittleEndian, study=study)


async def test_a_refused_instance_backs_off_alone_and_ends_in_failed(tmp_path: Path) -> None:
    """Poison instances (0xA700) of one study get their own attempts; the rest of that study and
    the other studies go on, with one lane; after ForwardMaxAttempts they are in failed/."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    study_a, study_b = "1.2.826.0.1.3680043.10.1426.98.1", "1.2.826.0.1.3680043.10.1426.98.2"
    poison = [_put(spool, study_a, 1), _put(spool, study_a, 2)]
    good = [_put(spool, study_a, 3), *(_put(spool, study_b, n) for n in range(1, 4))]
    seen: list[str] = []
    server, port = _scp({e.sop_instance for e in poison}, seen)
    failed: list[tuple[str, str]] = []
    stored: list[str] = []

    async def on_stored(entry: Any, result: Any, read: Any) -> None:
        stored.append(entry.sop_instance)

    fwd = Forwarder(spool, ForwardTarget("dimse", "PYSCP", "127.0.0.1", port), concurrency=1, retry=0.2,
                    max_retry=0.4, max_attempts=3, on_stored=on_stored,
                    on_failed=lambda e, reason: failed.append((e.sop_instance, reason)))
    try:
        await fwd.start([])
        for entry in poison + good:
            fwd.enqueue(entry)
        for _ in range(200):
            if len(failed) == 2:
                break
            await asyncio.sleep(0.05)
    finally:
        await fwd.stop()
        server.shutdown()
    assert sorted(stored) == sorted(e.sop_instance for e in good)
    # every good instance went before the poison's second attempt: nothing waited on them
    assert seen.index(poison[0].sop_instance) < seen.index(good[0].sop_instance)
    last_good = max(seen.index(e.sop_instance) for e in good)
    assert seen.count(poison[0].sop_instance) == 3 and seen[last_good + 1 :].count(poison[0].sop_instance) == 2
    assert {uid for uid, _ in failed} == {e.sop_instance for e in poison}
    assert all("gave up after 3 attempts" in reason and "0xA700" in reason for _, reason in failed)
    total, notes = spool.failed_list()
    assert total == 2 and notes[0]["attempts"] == 3 and notes[0]["firstError"] and notes[0]["StudyInstanceUID"]
    assert spool.depth == 0 and not list(spool.queue_dir.glob("*.state"))
    spool.close()


async def test_the_attempts_survive_a_restart_and_an_unreachable_pacs_charges_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    entry = _put(spool, "1.2.3.4", 1)
    seen: list[str] = []
    server, port = _scp({entry.sop_instance}, seen)
    fwd = Forwarder(spool, ForwardTarget("dimse", "PYSCP", "127.0.0.1", port), concurrency=1, retry=30,
                    max_attempts=5)
    try:
        await fwd.start([entry])
        for _ in range(100):
            if entry.path.with_suffix(".state").exists():
                break
            await asyncio.sleep(0.05)
    finally:
        await fwd.stop()
        server.shutdown()
    spool.close()
    again = Spool(tmp_path, fsync=False)
    (recovered,) = again.open()
    assert recovered.attempts == 1 and recovered.next_at > time.time() + 20 and "0xA700" in recovered.last_error
    down = Forwarder(again, ForwardTarget("dimse", "NOBODY", "127.0.0.1", free_port()), concurrency=1, retry=0.05,
                     max_retry=0.1, max_attempts=2)
    recovered.next_at = 0.0  # due now, against a port where nothing listens
    try:
        await down.start([recovered])
        for _ in range(100):
            if down.destination.down:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several rounds of the destination's backoff (0.05-0.1 s)
        assert down.snapshot()["reachable"] is False and down.snapshot()["waiting"] == 1
    finally:
        await down.stop()
    assert recovered.attempts == 1 and again.failed_count == 0  # no attempt charged, nothing failed
    again.close()


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
