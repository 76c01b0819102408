"""Units of dicomproxy.dicom.datasets: Dataset <-> Lua table conversion, edits as a diff, encoding."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomproxy.dicom import datasets
from tests import dicom_samples


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


def test_header_uids_reads_a_stream() -> None:
    from io import BytesIO

    ds = dicom_samples.build_dataset(patient_id="P8", patient_name="S^T")
    raw = datasets.encode(ds, ExplicitVRLittleEndian)
    assert datasets.header_uids(BytesIO(raw), ExplicitVRLittleEndian)["SOPInstanceUID"] == ds.SOPInstanceUID


def test_a_data_set_that_does_not_read_as_its_syntax_is_refused() -> None:
    from dicomproxy.dicom.datasets import EncodingMismatch, check_encoding, header_uids

    ds = dicom_samples.build_dataset(patient_id="P", patient_name="A^B")
    syntaxes = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
    for sent in syntaxes:
        raw = datasets.encode(ds, sent)
        for negotiated in syntaxes:
            if negotiated == sent:
                check_encoding(raw, negotiated)
                assert header_uids(raw, negotiated)["SOPInstanceUID"] == ds.SOPInstanceUID
            else:
                with pytest.raises(EncodingMismatch):
                    header_uids(raw, negotiated)
    with pytest.raises(EncodingMismatch, match="explicit VR data"):
        datasets.decode(datasets.encode(ds, "1.2.840.10008.1.2.1"), "1.2.840.10008.1.2")


def test_a_ui_value_a_script_writes_must_be_a_uid() -> None:
    ds = Dataset()
    datasets.set_value(ds, "StudyInstanceUID", "1.2.3")
    datasets.set_value(ds, "SOPClassesInStudy", ["1.2.840.10008.5.1.4.1.1.2", "1.2.3"])  # multi-valued
    datasets.set_value(ds, "SeriesInstanceUID", "")  # an empty type 2 value
    assert ds.StudyInstanceUID == "1.2.3" and len(ds.SOPClassesInStudy) == 2
    for key, value, says in (
        ("StudyInstanceUID", "1.02.3", "StudyInstanceUID: '1.02.3' is not a valid UID: component 2 ('02') has a "
                                       "leading zero"),
        ("0020,000E", "1..2", "0020,000E: '1..2' is not a valid UID: component 2 is empty"),
        ("SOPInstanceUID", "1." + "2" * 70, "at most 64"),
        ("SOPClassesInStudy", ["1.2", "x"], "'x' is not a valid UID"),
        ("StudyInstanceUID", True, "True is not a UID"),
    ):
        with pytest.raises(datasets.TableError) as caught:
            datasets.set_value(ds, key, value)
        assert says in str(caught.value)
    assert ds.StudyInstanceUID == "1.2.3"  # a refused value leaves the element as it was
