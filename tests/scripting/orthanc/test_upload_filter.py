"""Units of the HTTP upload filter: the streaming header reader and the multipart state machine,
fed real DICOM files (tests/dicom_samples.py) cut into every kind of chunk."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from dicomproxy.scripting.orthanc import upload_filter as uf
from tests import dicom_samples


def instance(patient: str, size: tuple[int, int] = (64, 64), **tags: Any) -> bytes:
    raw, _ = dicom_samples.make_instance(patient_id=patient, patient_name="Up^Load", size=size, **tags)
    assert isinstance(raw, bytes)
    return raw


def test_header_needs_the_pixel_tag_or_the_end() -> None:
    raw = instance("P1")
    pixels = raw.find(b"\xe0\x7f\x10\x00")
    assert uf.parse_header(raw[: pixels + 4], complete=False) is None  # the tag, but not its VR and length yet
    header = uf.parse_header(raw[: pixels + 12], complete=False)
    assert header is not None and header.info["HasPixelData"] is True
    assert header.table["PatientID"] == "P1" and header.info["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert uf.parse_header(raw[:200], complete=False) is None
    with pytest.raises(uf.Refusal):
        uf.parse_header(b"not dicom at all" * 20, complete=True)


def test_header_reader_limit() -> None:
    raw = instance("P2", size=(512, 512))
    reader = uf.HeaderReader(limit=4096)
    with pytest.raises(uf.Refusal) as e:
        asyncio.run(reader.attempt(b"\0" * 128 + b"DICM" + b"\0" * 5000, complete=False))
    assert e.value.status == 413 and uf.SETTING in str(e.value)
    assert asyncio.run(uf.HeaderReader(limit=1 << 20).attempt(raw[:100_000], complete=False)) is not None


class FakeBody(uf.Body):
    """The client's body in the given chunk size."""

    def __init__(self, data: bytes, size: int) -> None:
        self.chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        self.ended = False

    async def chunk(self) -> bytes:
        c = self.chunks.pop(0)
        self.ended = not self.chunks
        return c


def multipart(parts: list[bytes], boundary: bytes = b"b0undary", preamble: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\nContent-Length: " + str(len(p)).encode()
        out += b"\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\nepilogue"


async def run_parts(body: bytes, size: int, refuse: set[str], boundary: bytes = b"b0undary") -> tuple[bytes, Any]:
    async def decide(h: uf.Header) -> bool:
        return h.table["PatientID"] not in refuse

    parts = uf.StowParts(FakeBody(body, size), boundary, decide, 1 << 20)
    out = []
    while (chunk := await parts.output()) is not None:
        out.append(chunk)
    return b"".join(out), parts


@pytest.mark.parametrize("size", [3, 7, 100, 4096, 1 << 20])
def test_stow_parts_drop_the_refused_and_keep_the_rest_byte_for_byte(size: int) -> None:
    a, b, c = instance("KEEP1"), instance("DROP"), instance("KEEP2", size=(200, 200))
    body = multipart([a, b, c], preamble=b"\r\n")
    out, parts = asyncio.run(run_parts(body, size, {"DROP"}))
    assert out == multipart([a, c]).removesuffix(b"epilogue")
    assert [f.sop_instance for f in parts.failed] == [uf.parse_header(b, True).uids["SOPInstanceUID"]]  # type: ignore[union-attr]


def test_stow_parts_all_refused_and_malformed() -> None:
    out, parts = asyncio.run(run_parts(multipart([instance("DROP")]), 1000, {"DROP"}))
    assert out == b"" and len(parts.failed) == 1
    with pytest.raises(uf.Refusal, match="ends before its close delimiter"):
        asyncio.run(run_parts(multipart([instance("X")])[:-30], 1000, set()))
    bad = multipart([b"x"]).replace(b"application/dicom", b"application/dicom+json")
    with pytest.raises(uf.Refusal, match="must be application/dicom") as e:
        asyncio.run(run_parts(bad, 1000, set()))
    assert e.value.status == 415


def test_merge_failed_into_an_orthanc_answer() -> None:
    answer = json.dumps({"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": [{}]}}).encode()
    merged = json.loads(uf.merge_failed(answer, [uf.Failed("1.2", "3.4")]) or b"")
    assert merged["00081198"]["Value"] == [{"00081150": {"vr": "UI", "Value": ["1.2"]},
                                            "00081155": {"vr": "UI", "Value": ["3.4"]},
                                            "00081197": {"vr": "US", "Value": [0x0110]}}]
    assert uf.merge_failed(b"<xml/>", []) is None
    assert uf.merge_failed(b"not <xml", [], xml=True) is None


ORTHANC_XML = b"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence" />
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence"><Item number="1"/></DicomAttribute>
</NativeDicomModel>"""


def test_merge_failed_into_an_orthanc_xml_answer() -> None:
    import xml.etree.ElementTree as ET

    merged = uf.merge_failed(ORTHANC_XML, [uf.Failed("1.2", "3.4"), uf.Failed("", "")], xml=True)
    assert merged is not None and merged.startswith(b'<?xml version="1.0"')
    ns = {"d": uf.NATIVE_DICOM}
    root = ET.fromstring(merged)
    items = root.findall("d:DicomAttribute[@tag='00081198']/d:Item", ns)
    assert [i.get("number") for i in items] == ["1", "2"]
    values = {a.get("tag"): a.find("d:Value", ns).text for a in items[0].findall("d:DicomAttribute", ns)}  # type: ignore[union-attr]
    assert values == {"00081150": "1.2", "00081155": "3.4", "00081197": "272"}
    assert len(root.findall("d:DicomAttribute[@tag='00081199']/d:Item", ns)) == 1  # the stored ones untouched


def test_filtered_out_answer_has_orthanc_ids() -> None:
    uids = {"PatientID": "p", "StudyInstanceUID": "1", "SeriesInstanceUID": "2", "SOPInstanceUID": "3"}
    answer = uf.filtered_out(uids)
    assert answer["Status"] == "FilteredOut" and answer["Path"] == "/instances/" + answer["ID"]


def test_a_part_whose_header_is_over_the_limit_is_a_failed_sop() -> None:
    async def accept(h: uf.Header) -> bool:
        return True

    small, big = instance("SMALL"), instance("BIG", InstitutionName="x" * 3000)  # a header over 2 KB

    async def run() -> tuple[bytes, uf.StowParts]:
        parts = uf.StowParts(FakeBody(multipart([big, small]), 512), b"b0undary", accept, 2048)
        out = []
        while (chunk := await parts.output()) is not None:
            out.append(chunk)
        return b"".join(out), parts

    out, parts = asyncio.run(run())
    assert out == multipart([small]).removesuffix(b"epilogue")
    assert [(f.sop_class, f.sop_instance) for f in parts.failed] == [("", "")]
    assert uf.failed_items(parts.failed) == [{"00081197": {"vr": "US", "Value": [0x0110]}}]
