"""Issue 11's "done when": a corpus of DICOM files covering the transfer syntaxes and storage
classes a site sends (big endian, deflated, RLE, encapsulated JPEG / JPEG 2000 / HTJ2K / MPEG-4
frames, a retired class, a private class, Shift-JIS, private tags, multi-frame, a file without
its Part-10 header) goes through the gateway by C-STORE, STOW-RS and TUS into a real Orthanc,
and what Orthanc answers and stores is what it answers and stores when the same file is sent to
it directly: the same status, and the stored file byte for byte (the file meta group included;
for the TUS import of the raw file, whose meta the gateway has to make, the data set after it).

The C-STORE client is pynetdicom (it proposes exactly the file's transfer syntax, which
storescu would not for every one of these); the STOW-RS client is httpx; the TUS client tuspy.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from tusclient import client as tus_client

from dicomproxy.scripting.orthanc.pacs import orthanc_id
from tests import dicom_samples
from tests.peers import LOOPBACK, GatewayProcess, OrthancServer, wait_until

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
MPEG4_HP41 = "1.2.840.10008.1.2.4.102"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
PRIVATE_CLASS = "1.3.6.1.4.1.9590.100.1.2.424242"
MODALITY_AET = "CORPUS_MOD"


def _encapsulated(ds: Dataset, syntax: str, frames: int = 1) -> Dataset:
    """The data set with ``frames`` opaque encapsulated frames in ``syntax`` (nobody decodes them
    on the way: the bytes are the point)."""
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([bytes([0xFF, 0xD8]) + uuid.uuid4().bytes * 8 for _ in range(frames)])
    ds["PixelData"].VR = "OB"
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _corpus() -> dict[str, bytes]:
    """name -> a Part-10 file (or, for ``raw``, a bare data set)."""
    def base(**kw: Any) -> Dataset:
        return dicom_samples.build_dataset(patient_id="CORPUS", patient_name="Corpus^Test",
                                           study_uid=generate_uid(), **kw)

    files: dict[str, Dataset] = {
        "explicit-le": base(),
        "implicit-le": base(transfer_syntax=ImplicitVRLittleEndian),
        "explicit-be": base(transfer_syntax=ExplicitVRBigEndian),
        "deflated": base(transfer_syntax=DeflatedExplicitVRLittleEndian),
        "rle": base(transfer_syntax=RLELossless),
        "jpeg-baseline": _encapsulated(base(), JPEGBaseline8Bit),
        "jpeg2000": _encapsulated(base(), JPEG2000),
        "htj2k": _encapsulated(base(), HTJ2K_LOSSLESS),
        "mpeg4": _encapsulated(base(modality="XC"), MPEG4_HP41, frames=3),
        "multiframe": base(NumberOfFrames=1),
    }
    us = base()
    us.SOPClassUID = us.file_meta.MediaStorageSOPClassUID = US_RETIRED
    us.Modality = "US"
    files["us-retired"] = us
    private = base()
    private.SOPClassUID = private.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    files["private-class"] = private
    sjis = base()
    sjis.SpecificCharacterSet = "ISO_IR 13"
    sjis.PatientName = "ﾔﾏﾀﾞ^ﾀﾛｳ"
    sjis.StudyDescription = "ｹﾝｻ"
    files["shift-jis"] = sjis
    tagged = base()
    block = tagged.private_block(0x0009, "DICOMPROXY CORPUS", create=True)
    block.add_new(0x01, "LO", "a private value")
    block.add_new(0x02, "US", 4242)
    files["private-tags"] = tagged
    out = {name: dicom_samples.dataset_bytes(ds) for name, ds in files.items()}
    raw, _ = dicom_samples.raw_dataset(ExplicitVRLittleEndian, patient_id="CORPUS", patient_name="Raw^File",
                                       study_uid=generate_uid())
    out["raw-no-meta"] = raw
    return out


CORPUS = _corpus()
PART10 = [name for name in CORPUS if name != "raw-no-meta"]


# -- the three ways in -------------------------------------------------------------------------
def c_store(host: str, port: int, called: str, data: bytes) -> int:
    ds = dcmread(io.BytesIO(data))
    ae = AE(MODALITY_AET)
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return -1  # the association (its only context) was refused
    try:
        if not assoc.accepted_contexts:
            return -2
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else -3
    finally:
        assoc.release()


def stow(root: str, data: bytes, auth: Any = None) -> int:
    boundary = "corpus-" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    r = httpx.post(root.rstrip("/") + "/studies", content=body, timeout=60, auth=auth,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                            "Accept": "application/dicom+json"})
    return r.status_code


def stored(orthanc: OrthancServer, data: bytes) -> bytes | None:
    """The file Orthanc stored for this instance, or None."""
    ds = dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    oid = orthanc_id(str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                     str(ds.SOPInstanceUID))
    r = orthanc.request("GET", f"/instances/{oid}/file")
    return r.content if r.status_code == 200 else None


def _dataset_part(part10: bytes) -> bytes:
    """The bytes after the file meta group (what a C-STORE carries)."""
    ds = dcmread(io.BytesIO(part10), stop_before_pixels=False)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return part10[meta_end:]


def _compare(orthanc: OrthancServer, data: bytes, direct: Callable[[], int], through: Callable[[], int]) -> None:
    orthanc.clear()
    want_status = direct()
    want = stored(orthanc, data)
    orthanc.clear()
    got_status = through()
    got = wait_until(lambda: stored(orthanc, data), timeout=20, what="the instance in Orthanc") if want else \
        stored(orthanc, data)
    assert got_status == want_status
    assert (got is None) == (want is None)
    if want is not None:
        assert got == want, "what Orthanc stored through the gateway differs from what it stored directly"


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess], fresh_orthanc: OrthancServer) -> GatewayProcess:
    return gateway_factory({"Dicom": {"AllowedCallingAets": [MODALITY_AET]}})


@pytest.mark.parametrize("name", sorted(PART10))
def test_c_store_through_the_gateway_stores_what_orthanc_stores_directly(
    name: str, gateway: GatewayProcess, fresh_orthanc: OrthancServer
) -> None:
    data = CORPUS[name]
    _compare(
        fresh_orthanc, data,
        lambda: c_store(LOOPBACK, fresh_orthanc.dicom_port, fresh_orthanc.aet, data),
        lambda: c_store(LOOPBACK, gateway.dicom_port, gateway.aet, data),
    )


@pytest.mark.parametrize("name", sorted(PART10))
def test_stow_rs_through_the_gateway_stores_what_orthanc_stores_directly(
    name: str, gateway: GatewayProcess, fresh_orthanc: OrthancServer
) -> None:
    data = CORPUS[name]
    _compare(fresh_orthanc, data, lambda: stow(fresh_orthanc.dicomweb_url, data),
             lambda: stow(gateway.url + "/dicom-web", data))


def _tus(gateway: GatewayProcess, data: bytes, tmp: Path) -> int:
    path = tmp / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(data)
    tus_client.TusClient(gateway.url + "/files/").uploader(str(path), chunk_size=64 * 1024).upload()
    return 200


@pytest.mark.parametrize("name", ["explicit-be", "deflated", "jpeg2000", "shift-jis", "private-tags", "mpeg4"])
def test_tus_import_stores_what_stow_rs_stores_directly(
    name: str, gateway: GatewayProcess, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    data = CORPUS[name]
    _compare(fresh_orthanc, data, lambda: stow(fresh_orthanc.dicomweb_url, data),
             lambda: _tus(gateway, data, tmp_path))


def test_tus_import_of_a_file_without_its_part10_header(
    gateway: GatewayProcess, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """The gateway makes the file meta a bare data set lacks: the data set Orthanc stores is the
    one a modality's C-STORE of it stores."""
    raw = CORPUS["raw-no-meta"]
    fresh_orthanc.clear()
    ds = dcmread(io.BytesIO(raw), force=True)
    ds.file_meta = dicom_samples.build_dataset(patient_id="X", patient_name="Y").file_meta
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    part10 = dicom_samples.dataset_bytes(ds)
    assert c_store(LOOPBACK, fresh_orthanc.dicom_port, fresh_orthanc.aet, part10) == 0
    want = stored(fresh_orthanc, part10)
    assert want is not None
    fresh_orthanc.clear()
    _tus(gateway, raw, tmp_path)
    got = wait_until(lambda: stored(fresh_orthanc, part10), timeout=30, what="the imported raw data set in Orthanc")
    assert _dataset_part(got) == _dataset_part(want)
