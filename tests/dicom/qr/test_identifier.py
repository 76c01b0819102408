"""Units of dicomproxy.dicom.qr.identifier: bytes pass unchanged unless edited, an edit changes
only the edited element (in the identifier's character set), Orthanc's table form."""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicomproxy.dicom import datasets, presentation
from dicomproxy.dicom.qr.identifier import Identifier, canonical, orthanc_table

JAPANESE = b"Test-\x84D\x83\xa6\xc8"  # Shift-JIS under ISO_IR 13, as Orthanc writes it


def _raw(ds: Dataset, ts: str = presentation.EXPLICIT) -> bytes:
    return datasets.encode(ds, ts)


def _japanese() -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 13"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Test-QQQQQ"
    ds.StudyDescription = "old"
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x11, "US", 1234)
    return _raw(ds).replace(b"Test-QQQQQ", JAPANESE)


def _elements(raw: bytes) -> dict[int, bytes]:
    ds = pydicom.filereader.read_dataset(DicomBytesIO(raw), False, True)
    return {int(tag): ds.get_item(tag).value for tag in ds.keys()}


def test_unedited_bytes_pass_unchanged_and_tables_do_not_touch_them() -> None:
    raw = _japanese()
    ident = Identifier(raw, presentation.EXPLICIT)
    table = ident.table()
    assert table["QueryRetrieveLevel"] == "STUDY"
    assert ident.orthanc_table()["0008,0052"] == "STUDY"
    assert ident.encoded(presentation.EXPLICIT) is raw and not ident.edited
    assert not ident.apply(table, dict(table))  # returned as given: nothing changed, nothing re-encoded
    assert ident.encoded(presentation.EXPLICIT) is raw


def test_an_edit_keeps_every_other_byte_and_the_character_set() -> None:
    raw = _japanese()
    ident = Identifier(raw, presentation.EXPLICIT)
    table = ident.table()
    assert ident.apply(table, {**table, "StudyDescription": "new"})
    before, after = _elements(raw), _elements(ident.encoded(presentation.EXPLICIT))
    assert after.pop(0x00081030).rstrip(b" ") == b"new"
    before.pop(0x00081030)
    assert after == before  # the Japanese name, the private US, the character set: as they came
    assert after[0x00100010] == JAPANESE


def test_an_edited_value_under_iso_ir_13_is_written_in_shift_jis() -> None:
    ident = Identifier(_japanese(), presentation.EXPLICIT)
    table = ident.table()
    assert ident.apply(table, {**table, "StudyDescription": "検査"})
    value = _elements(ident.encoded(presentation.EXPLICIT))[0x00081030]
    assert value.rstrip(b" ") == "検査".encode("shift_jis")


def test_re_encoded_only_into_another_transfer_syntax() -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    ident = Identifier(_raw(ds), presentation.EXPLICIT)
    implicit = ident.encoded(presentation.IMPLICIT)
    assert implicit == _raw(ds, presentation.IMPLICIT)


def test_orthanc_table_form() -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.NumberOfStudyRelatedInstances = 3
    step = Dataset()
    step.ScheduledStationAETitle = "CT01"
    ds.ScheduledProcedureStepSequence = [step]
    table = orthanc_table(datasets.decode(_raw(ds), presentation.EXPLICIT))
    assert table == {"0010,0020": "P1", "0008,0061": "CT\\MR", "0020,1208": "3",
                     "0040,0100": [{"0040,0001": "CT01"}]}
    assert canonical(table) == canonical({"PatientID": "P1", "ModalitiesInStudy": "CT\\MR",
                                          "NumberOfStudyRelatedInstances": "3",
                                          "ScheduledProcedureStepSequence": {1: {"ScheduledStationAETitle": "CT01"}}})
