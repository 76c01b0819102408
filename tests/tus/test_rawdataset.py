"""Datasets without a Part-10 header: found in each uncompressed syntax, wrapped so pydicom reads
them back as they were, and never confused with a ZIP, a PDF, text or random bytes."""

from __future__ import annotations

import io
import random
import zipfile

import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomproxy.tus import archive, rawdataset
from tests.dicom_samples import dataset_bytes, make_instance, raw_dataset

SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_each_syntax_is_found_and_wrapped(syntax: str) -> None:
    raw, ds = raw_dataset(syntax, patient_id="RAW1", patient_name="Raw^One", size=(8, 8))
    found = rawdataset.sniff(raw[:rawdataset.HEAD])
    assert found == rawdataset.Sniffed(syntax, ds.SOPClassUID, ds.SOPInstanceUID)
    wrapped = rawdataset.file_meta(found) + raw
    back = pydicom.dcmread(io.BytesIO(wrapped))
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.PatientID == "RAW1" and back.PixelData == ds.PixelData


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_scan_sends_a_raw_file_and_a_raw_zip_member_with_their_meta(tmp_path, syntax: str) -> None:
    raw, ds = raw_dataset(syntax, patient_id="RAW2", patient_name="Raw^Two")
    path = tmp_path / "image.raw"
    path.write_bytes(raw)
    kind, parts, skipped = archive.scan(path)
    assert (kind, skipped, len(parts)) == ("dicom", [], 1)
    source = parts[0].open()
    body = b"".join(iter(lambda: source.read(1000), b""))
    source.close()
    assert len(body) == parts[0].size and body.endswith(raw)
    assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == ds.SOPInstanceUID
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zf:
        zf.writestr("a/raw", raw)
        zf.writestr("b/readme.txt", b"hello")
    kind, parts, skipped = archive.scan(tmp_path / "study.zip")
    assert (kind, skipped, [p.name for p in parts]) == ("zip", ["b/readme.txt"], ["a/raw"])
    source = parts[0].open()
    body = source.read(-1)
    source.close()
    assert len(body) == parts[0].size and pydicom.dcmread(io.BytesIO(body)).PatientID == "RAW2"


def pdf() -> bytes:
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + bytes(range(256)) * 20 + b"%%EOF\n"


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.txt", b"x" * 1000)
    return buf.getvalue()


@pytest.mark.parametrize("data", [
    b"", b"\x08\x00", pdf(), zip_bytes(), b"hello world\n" * 500, b"\x00" * 4096,
    b'{"00080016": {"vr": "UI"}}' * 50,
    b"\x08\x00\x16\x00UI\x04\x00abcd" + b"\x08\x00\x18\x00UI\x02\x00zz",  # group 0008, but no valid UIDs
    b"\x08\x00\x18\x00UI\x04\x001.2\x00\x08\x00\x16\x00UI\x04\x001.2\x00",  # UIDs valid, tags descending
    b"\x00\x00\x00\x00UL\x04\x00\x10\x00\x00\x00" * 10,  # a command set (group 0000)
])
def test_not_datasets(data: bytes) -> None:
    assert rawdataset.sniff(data) is None


def test_part10_and_its_meta_group_alone_are_not_raw() -> None:
    data, _ = make_instance(patient_id="P10", patient_name="Part^Ten")
    assert isinstance(data, bytes)
    assert rawdataset.sniff(data) is None  # the preamble
    assert rawdataset.sniff(data[132:]) is None  # group 0002 first


def test_random_bytes_are_never_datasets() -> None:
    rng = random.Random(1107)
    for i in range(3000):
        head = rng.choice([b"\x08\x00", b"\x00\x08", b""])  # even random files that start like group 0008
        data = head + rng.randbytes(rng.randrange(0, 3000))
        assert rawdataset.sniff(data) is None, i


def test_a_raw_dataset_with_one_byte_changed_in_its_uids_is_refused() -> None:
    raw, ds = raw_dataset(ImplicitVRLittleEndian, patient_id="RAW3", patient_name="Raw^Three")
    at = raw.index(ds.SOPInstanceUID.encode())
    assert rawdataset.sniff(raw[:at] + b"x" + raw[at + 1:]) is None
    assert rawdataset.sniff(raw) is not None
    assert dataset_bytes(ds)  # the same dataset as Part-10 stays readable the ordinary way
