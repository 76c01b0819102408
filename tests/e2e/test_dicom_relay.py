"""Relay mode and negotiation through the real stack: the modality hears the PACS's own answers.

Each check compares the gateway with dcmtk's storescu (or the gateway's own SCU for the
contexts storescu cannot propose) straight to the same Orthanc: the C-STORE statuses, the
presentation contexts accepted at negotiation, and what Orthanc stores, byte for byte.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from dicomproxy.dicom import datasets
from dicomproxy.dicom.presentation import EXPLICIT, IMPLICIT
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul.errors import UpperLayerError
from tests import dicom_samples
from tests.e2e.test_dicom_admission import _big_instance, _peak_rss_mb
from tests.peers import GatewayProcess, OrthancServer, dcmtk, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
UNCOMPRESSED_ONLY = {"AcceptedTransferSyntaxes": [IMPLICIT, EXPLICIT]}
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.1426.77.1"
HTJ2K = "1.2.840.10008.1.2.4.201"


def storescu(port: int, aec: str, *paths: Path, args: tuple[str, ...] = (), check: bool = False) -> Any:
    return run_dcmtk("storescu", "-v", "-aet", "CT01", "-aec", aec, *args, LOOPBACK, str(port), *map(str, paths),
                     check=check)


def summary(res: Any) -> tuple[int, list[str]]:
    """storescu's exit code and its verdict lines, for comparing two runs."""
    out = (res.stdout + res.stderr).splitlines()
    keep = ("Store Response", "No presentation context", "Association Rejected", "Association Accepted",
            "Converting transfer syntax", "Store Failed")
    lines = [line.split("(Max Send")[0].split(": /")[0].strip() for line in out if any(k in line for k in keep)]
    return res.returncode, lines


def health(gateway: GatewayProcess) -> dict[str, Any]:
    return gateway.get("/dicomproxy/health").json()["dicom"]


def find(orthanc: OrthancServer, sop_uid: str) -> list[str]:
    return list(orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}))


def test_the_modality_hears_the_pacss_answer_and_can_look_at_once(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory()  # Dicom:StoreMode RelayOrSpool, the default
    good, uid = dicom_samples.make_instance(tmp_path / "good.dcm", patient_id="PREL", patient_name="Re^Lay")
    ds = dicom_samples.build_dataset(patient_id="PREL", patient_name="Re^Lay")
    del ds.SeriesInstanceUID  # Orthanc refuses it: 0xA700
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    direct_bad = summary(storescu(fresh_orthanc.dicom_port, fresh_orthanc.aet, bad))
    relayed_bad = summary(storescu(gateway.dicom_port, fresh_orthanc.aet, bad))
    assert relayed_bad == direct_bad and direct_bad[0] != 0
    assert any("Refused: OutOfResources" in line for line in relayed_bad[1]), relayed_bad
    assert storescu(gateway.dicom_port, fresh_orthanc.aet, good).returncode == 0
    assert len(find(fresh_orthanc, uid)) == 1  # no waiting: the answer came after the PACS had it
    stored = fresh_orthanc.rest_get(f"/instances/{find(fresh_orthanc, uid)[0]}/file")
    fresh_orthanc.clear()
    assert storescu(fresh_orthanc.dicom_port, fresh_orthanc.aet, good).returncode == 0
    assert fresh_orthanc.rest_get(f"/instances/{find(fresh_orthanc, uid)[0]}/file") == stored  # byte for byte
    h = health(gateway)
    assert h["spoolDepth"] == 0 and h["storeMode"] == "RelayOrSpool" and h["forwarded"] == 1
    assert not list((gateway.data_dir / "spool" / "queue").iterdir())  # relayed, never spooled
    echo = run_dcmtk("echoscu", "-aet", "CT01", "-aec", fresh_orthanc.aet, LOOPBACK, str(gateway.dicom_port))
    assert echo.returncode == 0


def test_relay_or_spool_falls_back_to_the_spool_and_relay_rejects(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory()
    fallback = gateway_factory({"Dicom": {"ForwardRetrySeconds": 0.2, "ForwardMaxRetrySeconds": 0.5}}, orthanc=pacs)
    strict = gateway_factory({"Dicom": {"StoreMode": "Relay"}}, orthanc=pacs)
    files = [dicom_samples.make_instance(tmp_path / f"IM{i}.dcm", patient_id="PFB", patient_name="F^B")
             for i in range(3)]
    pacs.stop()
    spooled = storescu(fallback.dicom_port, pacs.aet, *[p for p, _ in files])
    assert spooled.returncode == 0, spooled.stderr  # acknowledged once spooled
    assert health(fallback)["spoolDepth"] == 3
    refused = storescu(strict.dicom_port, pacs.aet, files[0][0])
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr, refused.stderr
    strict.wait_for_log("the PACS cannot be reached")
    pacs.start()
    pacs.wait_for_instances(3, timeout=30)
    assert pacs.sop_instance_uids() == {u for _, u in files}
    wait_until(lambda: health(fallback)["spoolDepth"] == 0, what="the spool emptied")
    assert storescu(strict.dicom_port, pacs.aet, files[0][0]).returncode == 0  # relayed again


def _jpeg_instance(path: Path) -> Path:
    ds = dicom_samples.build_dataset(patient_id="PJPG", patient_name="J^Peg", size=(8, 8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 8, 8, 7, "MONOCHROME2"
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_context_the_pacs_refuses_is_refused_at_negotiation_as_direct(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory(extra_config=UNCOMPRESSED_ONLY)
    jpeg = _jpeg_instance(tmp_path / "jpeg.dcm")
    args = ("-xy", "-R")  # propose JPEG baseline (and, as dcmtk always does, explicit VR little endian)
    direct = summary(storescu(pacs.dicom_port, pacs.aet, jpeg, args=args))
    # Orthanc took the uncompressed context only: storescu cannot decompress this JPEG and gives up
    assert direct[0] != 0 and "I: Converting transfer syntax: JPEG Baseline -> Little Endian Explicit" in direct[1]
    for mode in ("RelayOrSpool", "Relay", "StoreAndForward"):
        gateway = gateway_factory({"Dicom": {"StoreMode": mode}}, orthanc=pacs)
        assert summary(storescu(gateway.dicom_port, pacs.aet, jpeg, args=args)) == direct, mode
        assert health(gateway)["spoolDepth"] == 0 and health(gateway)["failed"] == 0
    assert pacs.instance_count() == 0


async def _store_one(port: int, aec: str, sop_class: str, ts: str, raw: bytes, sop_uid: str) -> str:
    """Associate with one context; 'rejected' or the C-STORE status."""
    try:
        scu = await StorageScu.connect(LOOPBACK, port, called_aet=aec, calling_aet="CT01", contexts=[(sop_class, ts)])
    except UpperLayerError as e:
        return f"association: {type(e).__name__}"
    try:
        if (sop_class, ts) not in scu.accepted:
            return "rejected"
        return f"0x{(await scu.c_store(sop_class, sop_uid, ts, raw)).status:04X}"
    finally:
        await scu.release()


def _unusual(sop_class: str, ts: str) -> tuple[bytes, str]:
    ds = dicom_samples.build_dataset(patient_id="PODD", patient_name="Odd^Class")
    ds.SOPClassUID = sop_class
    if ts == HTJ2K:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 16])
        ds["PixelData"].VR = "OB"
        return datasets.encode(ds, EXPLICIT), str(ds.SOPInstanceUID)  # encapsulated, explicit VR LE data set
    return datasets.encode(ds, ts), str(ds.SOPInstanceUID)


def test_retired_private_and_new_syntaxes_as_the_pacs_takes_them(
    orthanc_factory: Any, gateway_factory: Any
) -> None:
    for extra in ({}, {"UnknownSopClassAccepted": True}):
        pacs = orthanc_factory(extra_config=extra)
        relay = gateway_factory(orthanc=pacs)
        spool = gateway_factory({"Dicom": {"StoreMode": "StoreAndForward"}}, orthanc=pacs)
        cases = ((US_RETIRED, EXPLICIT), (PRIVATE_CLASS, EXPLICIT), (dicom_samples.SOP_CLASSES["CT"], HTJ2K))
        for sop_class, ts in cases:
            raw, uid = _unusual(sop_class, ts)
            direct = asyncio.run(_store_one(pacs.dicom_port, pacs.aet, sop_class, ts, raw, uid))
            pacs.clear()
            assert asyncio.run(_store_one(relay.dicom_port, pacs.aet, sop_class, ts, raw, uid)) == direct, (extra, ts)
            pacs.clear()
            # store-and-forward: the same answer at negotiation, and success once spooled
            through_spool = asyncio.run(_store_one(spool.dicom_port, pacs.aet, sop_class, ts, raw, uid))
            assert through_spool == (direct if direct == "rejected" else "0x0000"), (extra, ts, direct)
            if direct == "0x0000":
                pacs.wait_for_instances(1)
            pacs.clear()
        pacs.stop()


def test_explicit_vr_bytes_on_an_implicit_context_are_refused(
    gateway_factory: Any, fresh_orthanc: OrthancServer
) -> None:
    ds = dicom_samples.build_dataset(patient_id="PVR", patient_name="V^R")
    explicit = datasets.encode(ds, EXPLICIT)
    ct = dicom_samples.SOP_CLASSES["CT"]
    for mode in ("RelayOrSpool", "StoreAndForward"):
        gateway = gateway_factory({"Dicom": {"StoreMode": mode}})
        status = asyncio.run(_store_one(gateway.dicom_port, "ORTHANC", ct, IMPLICIT, explicit, str(ds.SOPInstanceUID)))
        assert status == "0xC210", (mode, status)
        gateway.wait_for_log("explicit VR data on a context negotiated as Implicit VR Little Endian")
        assert health(gateway)["spoolDepth"] == 0
    assert fresh_orthanc.instance_count() == 0


def test_a_300_mb_instance_through_relay_and_spool_stays_within_50_mb(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    big, uid = _big_instance(tmp_path / "big.dcm", 300)
    warm, _ = dicom_samples.make_instance(tmp_path / "warm.dcm", patient_id="PW", patient_name="W^W")
    grown = {}
    for mode in ("RelayOrSpool", "StoreAndForward"):
        gateway = gateway_factory({"Dicom": {"StoreMode": mode}, "Logging": {"Level": "INFO"}})
        assert storescu(gateway.dicom_port, fresh_orthanc.aet, warm).returncode == 0
        fresh_orthanc.wait_for_instances(1)
        before = _peak_rss_mb(gateway)
        res = storescu(gateway.dicom_port, fresh_orthanc.aet, big)
        assert res.returncode == 0, res.stderr
        wait_until(lambda: find(fresh_orthanc, uid), timeout=120, what="the 300 MB instance in Orthanc")
        wait_until(lambda g=gateway: health(g)["spoolDepth"] == 0, timeout=60, what="an empty spool")
        grown[mode] = _peak_rss_mb(gateway) - before
        stored = fresh_orthanc.rest_get(f"/instances/{find(fresh_orthanc, uid)[0]}/file")
        assert len(stored) > 299 << 20 and stored[-4096:] == big.read_bytes()[-4096:]
        del stored
        fresh_orthanc.clear()
        gateway.stop()
    print(f"peak RSS growth for a 300 MB instance: {grown}")
    assert all(g < 50 for g in grown.values()), grown


def test_relay_or_spool_carries_on_from_the_spool_when_the_pacs_dies_mid_association(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory()
    gateway = gateway_factory({"Dicom": {"ForwardRetrySeconds": 0.2, "ForwardMaxRetrySeconds": 0.5}}, orthanc=pacs)
    folder = tmp_path / "in"
    folder.mkdir()
    uids = {dicom_samples.make_instance(folder / f"IM{i:03d}.dcm", patient_id="PMID", patient_name="M^Id")[1]
            for i in range(200)}
    cmd = [dcmtk("storescu"), "-aet", "CT01", "-aec", pacs.aet, LOOPBACK, str(gateway.dicom_port), str(folder), "+sd"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as modality:
        wait_until(lambda: pacs.instance_count() >= 10, timeout=30, what="the first relayed instances")
        pacs.kill()  # in the middle of the association
        out, _ = modality.communicate(timeout=120)
    # every instance was answered success: relayed, or spooled once the PACS was gone
    assert modality.returncode == 0, out
    gateway.wait_for_log("serving it from the spool")
    pacs.start()
    pacs.wait_for_instances(200, timeout=60)
    assert pacs.sop_instance_uids() == uids
    wait_until(lambda: health(gateway)["spoolDepth"] == 0, what="the spool emptied")
