"""``Dicom:Transcode`` through the real stack: an Orthanc that refuses JPEG and JPEG 2000
(``AcceptedTransferSyntaxes``), dcmtk's storescu proposing only the compressed syntax (a
``-xf`` profile, so storescu cannot decompress itself), and what Orthanc stores.

With ``ToAccepted`` the instance arrives decoded: Orthanc's file is Explicit VR Little Endian and
its pixels are exactly pydicom's decode of the original; everything else (character set, private
tags) as sent. With ``Never`` (the default) the store fails at negotiation, as it does direct,
and nothing reaches Orthanc.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from dicomproxy.dicom.presentation import EXPLICIT, IMPLICIT
from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
UNCOMPRESSED_ONLY = {"AcceptedTransferSyntaxes": [IMPLICIT, EXPLICIT]}
PROFILE = """
[[TransferSyntaxes]]
[Jpeg]
TransferSyntax1 = JPEGBaseline
[J2k]
TransferSyntax1 = JPEG2000LosslessOnly
[[PresentationContexts]]
[JpegOnly]
PresentationContext1 = SecondaryCaptureImageStorage\\Jpeg
PresentationContext2 = CTImageStorage\\J2k
[[Profiles]]
[Compressed]
PresentationContexts = JpegOnly
"""


def _base(path: Path, **tags: Any) -> pydicom.Dataset:
    ds = dicom_samples.build_dataset(patient_id="PTC", patient_name="Trans^Code", size=(32, 48), **tags)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jörg"
    block = ds.private_block(0x0009, "ACME TRANSCODE", create=True)
    block.add_new(0x01, "LO", "private value")
    return ds


def jpeg_baseline(tmp: Path) -> Path:
    """An 8-bit secondary capture, JPEG baseline encoded by dcmtk's dcmcjpeg."""
    ds = _base(tmp, modality="OT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dicom_samples.SECONDARY_CAPTURE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes((i * 5) % 256 for i in range(32 * 48))
    plain, out = tmp / "plain8.dcm", tmp / "jpeg.dcm"
    ds.save_as(plain, enforce_file_format=True)
    run_dcmtk("dcmcjpeg", "+eb", plain, out)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    return out


def jpeg2000(tmp: Path) -> Path:
    """A 16-bit CT, JPEG 2000 lossless encoded by pydicom with pylibjpeg-openjpeg."""
    ds = _base(tmp)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    out = tmp / "j2k.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def storescu(port: int, aec: str, path: Path, tmp: Path) -> Any:
    cfg = tmp / "compressed.cfg"
    cfg.write_text(PROFILE)
    return run_dcmtk("storescu", "-v", "-aet", "CT01", "-aec", aec, "-xf", cfg, "Compressed", LOOPBACK, str(port),
                     path, check=False)


def stored(orthanc: OrthancServer, sop_uid: str) -> pydicom.Dataset:
    ids = orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    assert len(ids) == 1, ids
    return pydicom.dcmread(io.BytesIO(orthanc.rest_get(f"/instances/{ids[0]}/file")))


def assert_decoded(orthanc: OrthancServer, original: Path) -> None:
    src = pydicom.dcmread(original)
    got = stored(orthanc, src.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert (got.pixel_array == src.pixel_array).all()  # pydicom's decode of the original, exactly
    assert got.PatientName == "Müller^Jörg" and got.SpecificCharacterSet == "ISO_IR 100"
    assert got[0x0009, 0x1001].value == "private value"
    assert got.StudyInstanceUID == src.StudyInstanceUID and got.SOPClassUID == src.SOPClassUID


@pytest.mark.parametrize("mode", ["RelayOrSpool", "StoreAndForward"])
def test_to_accepted_decodes_jpeg_and_jpeg2000_for_a_pacs_that_refuses_them(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path, mode: str
) -> None:
    pacs = orthanc_factory(extra_config=UNCOMPRESSED_ONLY)
    gateway: GatewayProcess = gateway_factory({"Dicom": {"StoreMode": mode, "Transcode": "ToAccepted"}}, orthanc=pacs)
    files = [jpeg_baseline(tmp_path), jpeg2000(tmp_path)]
    for path in files:
        direct = storescu(pacs.dicom_port, pacs.aet, path, tmp_path)
        assert direct.returncode != 0 and "No Acceptable Presentation Contexts" in direct.stderr
        res = storescu(gateway.dicom_port, pacs.aet, path, tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: pacs.instance_count() == 2, what="both instances in Orthanc")
    for path in files:
        assert_decoded(pacs, path)
    gateway.wait_for_log("transcoded")
    metrics = gateway.get("/dicomproxy/metrics").text
    assert 'dicomproxy_dicom_transcoded_total{from_syntax="1.2.840.10008.1.2.4.50",result="ok",' \
           'to_syntax="1.2.840.10008.1.2.1"} 1.0' in metrics, metrics


def test_never_fails_at_negotiation_as_direct_and_names_it(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory(extra_config=UNCOMPRESSED_ONLY)
    gateway: GatewayProcess = gateway_factory(orthanc=pacs)  # Dicom:Transcode Never, the default
    path = jpeg_baseline(tmp_path)
    direct = storescu(pacs.dicom_port, pacs.aet, path, tmp_path)
    res = storescu(gateway.dicom_port, pacs.aet, path, tmp_path)
    assert res.returncode != 0 and direct.returncode != 0
    for out in (direct, res):
        assert "No Acceptable Presentation Contexts" in out.stderr, out.stderr
    assert pacs.instance_count() == 0


def _move(port: int, aec: str, dest_aet: str, study: str) -> Any:
    return run_dcmtk("movescu", "-S", "-v", "-aet", "MOVESCU", "-aec", aec, "-aem", dest_aet, "-k",
                     "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", LOOPBACK, str(port), check=False)


@pytest.mark.parametrize("transcode", ["Never", "ToAccepted"])
def test_cmove_fetch_and_store_to_a_destination_that_refuses_the_syntax(
    orthanc_factory: Any, gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path, transcode: str
) -> None:
    path = jpeg2000(tmp_path)
    fresh_orthanc.upload(path.read_bytes())  # the PACS keeps it as JPEG 2000
    src = pydicom.dcmread(path)
    dest = orthanc_factory(aet="DESTPACS", extra_config=UNCOMPRESSED_ONLY)
    modality = {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.dicom_port, "Retrieve": "FetchAndStore"}
    gateway: GatewayProcess = gateway_factory({"Dicom": {"Transcode": transcode, "Modalities": {"dest": modality}}})
    res = _move(gateway.dicom_port, gateway.aet, dest.aet, src.StudyInstanceUID)
    out = res.stdout + res.stderr
    if transcode == "ToAccepted":
        assert "Final Move Response (Success)" in out, out
        assert_decoded(dest, path)
        assert "transcoded" in gateway.log_text() and "for the move destination" in gateway.log_text()
    else:
        assert "Final Move Response (Success)" not in out, out
        assert dest.instance_count() == 0
        assert "transcoded" not in gateway.log_text()


SEND_SCRIPT = r"""
function onHttpRequest(req)
  if req.Path == "/run/send" then
    local r = InternalCmdRun("send", req.Headers["x-args"])
    local why = ""
    if r.Failures[1] ~= nil then why = r.Failures[1].Error end
    req:ResponseWrite(tostring(r.Sent) .. "/" .. tostring(r.Failed) .. "/" .. why)
    return true
  end
end
"""


@pytest.mark.parametrize("transcode", ["Never", "ToAccepted"])
def test_send_command_to_a_target_that_refuses_the_syntax(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path, transcode: str
) -> None:
    dest = orthanc_factory(aet="SENDPACS", extra_config=UNCOMPRESSED_ONLY)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    path = jpeg2000(outbox)
    original = path.read_bytes()
    gateway: GatewayProcess = gateway_factory({"Dicom": {"Transcode": transcode}}, {"main.lua": SEND_SCRIPT})
    r = gateway.get("/run/send", headers={"x-args": f"{outbox} {dest.aet}@{LOOPBACK}:{dest.dicom_port}"})
    if transcode == "ToAccepted":
        assert r.text == "1/0/", r.text
        assert_decoded(dest, path)
        assert path.read_bytes() == original  # the file on disk is left as it is
    else:
        assert r.text.startswith("0/1/") and "not transcoded with Dicom:Transcode Never" in r.text, r.text
        assert dest.instance_count() == 0


def test_relay_refuses_what_decodes_past_transcode_max_mb(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory(extra_config=UNCOMPRESSED_ONLY)
    gateway: GatewayProcess = gateway_factory({"Dicom": {"Transcode": "ToAccepted", "TranscodeMaxMB": 1}},
                                              orthanc=pacs)
    ds = dicom_samples.build_dataset(patient_id="PBIG", patient_name="Big^Pixels", size=(1024, 1024))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")  # 2 MB decoded
    path = tmp_path / "big-j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    res = storescu(gateway.dicom_port, pacs.aet, path, tmp_path)
    assert res.returncode != 0 and "Received Store Response (Unknown Status: 0x110)" in res.stderr, res.stderr
    gateway.wait_for_log("exceed Dicom:TranscodeMaxMB (1 MB)")
    assert pacs.instance_count() == 0
    metrics = gateway.get("/dicomproxy/metrics").text
    assert 'result="failed"' in metrics and "dicomproxy_dicom_transcoded_total" in metrics


@pytest.mark.parametrize("transcode", ["Never", "ToAccepted"])
def test_cget_to_a_requester_that_takes_only_uncompressed(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path, transcode: str
) -> None:
    path = jpeg2000(tmp_path)
    fresh_orthanc.upload(path.read_bytes())  # the PACS keeps it as JPEG 2000
    src = pydicom.dcmread(path)
    gateway: GatewayProcess = gateway_factory({"Dicom": {"Transcode": transcode}})
    out = tmp_path / "got"
    out.mkdir()
    res = run_dcmtk("getscu", "-S", "-v", "-aet", "GETSCU", "-aec", gateway.aet, "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={src.StudyInstanceUID}", "-od", out, LOOPBACK, str(gateway.dicom_port),
                    check=False)
    files = list(out.iterdir())
    if transcode == "ToAccepted":
        assert len(files) == 1, res.stdout + res.stderr
        got = pydicom.dcmread(files[0])
        assert got.file_meta.TransferSyntaxUID in (EXPLICIT, IMPLICIT)
        assert (got.pixel_array == src.pixel_array).all() and got.SOPInstanceUID == src.SOPInstanceUID
        assert got.PatientName == "Müller^Jörg"
        assert "transcoded" in gateway.log_text() and "for the requester" in gateway.log_text()
    else:
        assert not files, res.stdout + res.stderr
        assert "transcoded" not in gateway.log_text()


def _getscu(port: int, aec: str, study: str, out: Path) -> Any:
    out.mkdir()
    return run_dcmtk("getscu", "-S", "-d", "-aet", "GETSCU", "-aec", aec, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study}", "-od", out, LOOPBACK, str(port), check=False)


def _final_report(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Final status report" in line)
    return [line.rsplit(":", 1)[1].strip() for line in lines[start + 1: start + 5]]


def _get_response(text: str) -> list[str]:
    """The final C-GET-RSP as getscu -d prints it (status, counts, error comment, status detail)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if "Message Type                  : C-GET RSP" in line)
    return lines[start:lines.index("E: DIMSE status is: Failed: UnableToProcess")]


def test_never_cget_of_a_syntax_the_requester_did_not_propose_answers_as_orthanc_direct(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """Orthanc 1.10 cannot decode JPEG 2000 for a requester that proposed only uncompressed
    syntaxes: it sends no sub-operation and answers the C-GET 0xC000, one failed, with the failed
    instance in a (0008,0058) it puts in the command set (DCMTK's "status detail"). The gateway
    used to abort on that command set ("malformed message"); through it (``Dicom:Transcode``
    ``Never``) the requester now gets the same answer as direct plus an Error Comment naming the
    syntax, and the log names it with the SOP class and the setting that would take it."""
    path = jpeg2000(tmp_path)
    fresh_orthanc.upload(path.read_bytes())
    src = pydicom.dcmread(path)
    gateway: GatewayProcess = gateway_factory()
    direct = _getscu(fresh_orthanc.dicom_port, fresh_orthanc.aet, src.StudyInstanceUID, tmp_path / "direct")
    via = _getscu(gateway.dicom_port, gateway.aet, src.StudyInstanceUID, tmp_path / "via")
    direct_text, via_text = direct.stdout + direct.stderr, via.stdout + via.stderr
    assert _final_report(via_text) == _final_report(direct_text) == ["0", "0", "1", "0"], via_text
    got, want = _get_response(via_text), _get_response(direct_text)
    comment = "D: (0000,0902) LO [JPEG 2000 Image Compression (Lossless Only) not accepted] #  56, 1 ErrorComment"
    assert comment in got, got
    assert [line for line in got if line != comment] == want  # status 0xC000, counts, the failed UID list
    assert any(f"(0008,0058) UI [{src.SOPInstanceUID}]" in line for line in got), got
    assert not list((tmp_path / "via").iterdir())
    log = gateway.log_text()
    assert "malformed" not in log, log
    assert (f"the PACS did not send {src.SOPInstanceUID}: it holds it in JPEG 2000 Image Compression (Lossless "
            "Only) (1.2.840.10008.1.2.4.90) for CT Image Storage, a transfer syntax the requester did not propose; "
            "the gateway does not decode it with Dicom:Transcode Never (ToAccepted would)") in log, log
