"""Real, Orthanc-acceptable DICOM files made with pydicom, for tests.

Every instance has valid file meta, the patient/study/series/instance modules Orthanc indexes,
and real pixel data (a small gradient), so Orthanc, dcmtk and DICOMweb peers accept it::

    path, sop_uid = make_instance(tmp_path / "a.dcm", patient_id="P1", patient_name="Doe^John")
    data, sop_uid = make_instance(patient_id="P1", patient_name="Doe^John")      # bytes
    files = make_study(tmp_path, n_series=2, n_instances=3, patient_id="P2")      # [(path, uid)]
    zip_path, uids = make_zip(tmp_path / "s.zip", n_series=1, n_instances=4)
    pixel_values(rows, cols)   # the exact pixel values written (check a decoder's output)

Transfer syntaxes: Implicit/Explicit VR Little Endian, Explicit VR Big Endian, Deflated, and
RLE Lossless (encoded by pydicom, no numpy needed).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

SOP_CLASSES: dict[str, str] = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UNCOMPRESSED = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)


def pixel_values(rows: int, cols: int, instance_number: int = 1, series_number: int = 1) -> list[int]:
    """The pixel values (row-major) :func:`make_instance` writes: a 16-bit gradient that differs
    per instance, so files never deduplicate by content and decoders can be checked exactly."""
    seed = instance_number * 7 + series_number
    return [(i + seed) % 4096 for i in range(rows * cols)]


def _pixels(rows: int, cols: int, instance_number: int, series_number: int, big_endian: bool) -> bytes:
    order = "big" if big_endian else "little"
    return b"".join(v.to_bytes(2, order) for v in pixel_values(rows, cols, instance_number, series_number))


def build_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CT",
    size: tuple[int, int] = (16, 16),
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_number: int = 1,
    instance_number: int = 1,
    **extra_tags: Any,
) -> Dataset:
    """The dataset behind :func:`make_instance` (file meta included), for tests that edit it."""
    ts = UID(transfer_syntax)
    if ts not in UNCOMPRESSED and ts != RLELossless:
        raise ValueError(f"unsupported transfer syntax {ts}: use an uncompressed one or RLE Lossless")
    sop_class = SOP_CLASSES.get(modality.upper(), SECONDARY_CAPTURE)
    sop_uid = sop_uid or generate_uid()
    rows, cols = size

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts == RLELossless else ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesDate = "20240102"
    ds.ContentDate = "20240102"
    ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC" + patient_id[-10:]
    ds.Modality = modality
    ds.Manufacturer = "DicomProxyTests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Test study"
    ds.SeriesDescription = f"Test series {series_number}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    if sop_class != SECONDARY_CAPTURE:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0, 0, float(instance_number)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.SliceThickness = 1
    if sop_class == SOP_CLASSES["CT"]:
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(rows, cols, instance_number, series_number, ts == ExplicitVRBigEndian)
    for keyword, value in extra_tags.items():
        setattr(ds, keyword, value)  # pydicom rejects unknown keywords with a clear error
    if ts == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """Serialise a dataset as a DICOM Part 10 file (preamble, file meta, its transfer syntax)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def raw_dataset(transfer_syntax: str = ImplicitVRLittleEndian, **kwargs: Any) -> tuple[bytes, Dataset]:
    """A dataset as some modalities write it: no preamble, no ``DICM``, no file meta; in one of the
    uncompressed syntaxes. ``kwargs`` go to :func:`build_dataset`."""
    ds = build_dataset(transfer_syntax=transfer_syntax, **kwargs)
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue(), ds


def make_instance(
    path: str | Path | None = None,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CT",
    size: tuple[int, int] = (16, 16),
    transfer_syntax: str = ExplicitVRLittleEndian,
    **extra_tags: Any,
) -> tuple[Path | bytes, str]:
    """One DICOM instance: written to ``path`` (returns the Path) or returned as bytes.

    ``extra_tags`` are DICOM keywords (``StudyDescription="X"``, ``SeriesNumber=2``,
    ``InstanceNumber=5``); they override the defaults. Returns ``(path_or_bytes, sop_uid)``.
    """
    ds = build_dataset(
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        modality=modality,
        size=size,
        transfer_syntax=transfer_syntax,
        **extra_tags,
    )
    data = dataset_bytes(ds)
    if path is None:
        return data, str(ds.SOPInstanceUID)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target, str(ds.SOPInstanceUID)


def make_study(
    folder: str | Path,
    n_series: int = 1,
    n_instances: int = 1,
    *,
    patient_id: str = "PAT001",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    modality: str = "CT",
    **kwargs: Any,
) -> list[tuple[Path, str]]:
    """A study of ``n_series`` x ``n_instances`` files under ``folder/series<N>/``.

    Returns ``[(path, sop_uid), ...]``. Extra keyword arguments go to :func:`make_instance`.
    """
    folder = Path(folder)
    study_uid = study_uid or generate_uid()
    out: list[tuple[Path, str]] = []
    for s in range(1, n_series + 1):
        series_uid = generate_uid()
        for i in range(1, n_instances + 1):
            path, uid = make_instance(
                folder / f"series{s}" / f"IM{i:04d}.dcm",
                patient_id=patient_id,
                patient_name=patient_name,
                study_uid=study_uid,
                series_uid=series_uid,
                modality=modality,
                SeriesNumber=s,
                InstanceNumber=i,
                **kwargs,
            )
            assert isinstance(path, Path)
            out.append((path, uid))
    return out


def make_zip(
    zip_path: str | Path,
    n_series: int = 1,
    n_instances: int = 2,
    *,
    files: Iterable[str | Path] | None = None,
    extra_entries: dict[str, bytes] | None = None,
    **study_kwargs: Any,
) -> tuple[Path, list[str]]:
    """A zip of a generated study (or of ``files``), plus optional non-DICOM ``extra_entries``.

    Returns ``(zip_path, sop_uids)``; the SOP UIDs are read back from the zipped files.
    """
    import pydicom

    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    staging = zip_path.with_name(zip_path.stem + "_files")
    if files is None:
        paths = [p for p, _ in make_study(staging, n_series, n_instances, **study_kwargs)]
        base = staging
    else:
        paths = [Path(p) for p in files]
        base = None
    uids: list[str] = []
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            arcname = str(p.relative_to(base)) if base is not None else p.name
            zf.write(p, arcname)
            uids.append(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
        for name, data in (extra_entries or {}).items():
            zf.writestr(name, data)
    return zip_path, uids
