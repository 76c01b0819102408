"""A destination's own ``Transcode`` (``Dicom:Modalities`` entries, ``Upstreams:Servers`` entries'
``Dicom``) through the real stack: the same JPEG baseline instance sent to two Orthancs that both
refuse JPEG (``AcceptedTransferSyntaxes`` uncompressed only), one destination allowed to transcode
and the other not. The one allowed gets it decoded (Explicit VR Little Endian, pixels exactly
pydicom's decode); the other refuses it as it does direct (no presentation context for JPEG),
and the refusal names the setting that decided.

Paths covered: the spool forwarder (``Dicom:Routes`` fanning out to two servers), C-MOVE
fetch-and-store (two modalities), ``send`` (by modality name) and C-GET (the requester's
``Dicom:Modalities`` entry, by calling AE title).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from tests.e2e.test_transcode import (
    SEND_SCRIPT,
    UNCOMPRESSED_ONLY,
    _move,
    assert_decoded,
    jpeg2000,
    jpeg_baseline,
    storescu,
)
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"


def test_routes_to_two_servers_one_transcodes_and_one_refuses_as_direct(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    decodes = orthanc_factory(aet="DECODES", extra_config=UNCOMPRESSED_ONLY)
    keeps = orthanc_factory(aet="KEEPS", extra_config=UNCOMPRESSED_ONLY)
    servers = {
        "decodes": {"Url": decodes.http_url, "Dicom": {"Aet": decodes.aet, "Port": decodes.dicom_port,
                                                       "Transcode": "ToAccepted"}},
        "keeps": {"Url": keeps.http_url, "Dicom": {"Aet": keeps.aet, "Port": keeps.dicom_port}},  # Inherit: Never
    }
    gateway: GatewayProcess = gateway_factory({
        "Upstreams": {"Servers": servers},
        "Dicom": {"StoreMode": "StoreAndForward", "Routes": [{"Destinations": ["decodes", "keeps"]}]},
    }, orthanc=keeps)
    path = jpeg_baseline(tmp_path)
    sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    direct = storescu(keeps.dicom_port, keeps.aet, path, tmp_path)
    assert direct.returncode != 0 and "No Acceptable Presentation Contexts" in direct.stderr, direct.stderr
    res = storescu(gateway.dicom_port, gateway.aet, path, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr  # spooled for both
    decodes.wait_for_instances(1)
    assert_decoded(decodes, path)
    notes = wait_until(lambda: (n := gateway.get("/dicomproxy/spool/failed").json()["items"]) and n,
                       timeout=30, what="keeps' copy in failed/")
    assert [(n["SOPInstanceUID"], n["Destination"]) for n in notes] == [(sop, "keeps")], notes
    reason = notes[0]["reason"]
    assert "does not accept JPEG Baseline" in reason and "Dicom:Transcode Never" in reason, reason
    assert keeps.instance_count() == 0
    metrics = gateway.get("/dicomproxy/metrics").text
    assert 'dicomproxy_dicom_transcoded_total{from_syntax="1.2.840.10008.1.2.4.50",result="ok",' \
           'to_syntax="1.2.840.10008.1.2.1"} 1.0' in metrics, metrics


def test_cmove_and_send_to_two_modalities_one_transcodes_and_one_refuses(
    orthanc_factory: Any, gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """Global ``ToAccepted``, one modality ``Never``: the override works in both directions."""
    path = jpeg2000(tmp_path)
    fresh_orthanc.upload(path.read_bytes())  # the PACS keeps it as JPEG 2000
    src = pydicom.dcmread(path)
    viewer = orthanc_factory(aet="VIEWER", extra_config=UNCOMPRESSED_ONLY)
    archive = orthanc_factory(aet="ARCHIVE", extra_config=UNCOMPRESSED_ONLY)
    modalities = {
        "viewer": {"Aet": viewer.aet, "Host": LOOPBACK, "Port": viewer.dicom_port, "Retrieve": "FetchAndStore"},
        "archive": {"Aet": archive.aet, "Host": LOOPBACK, "Port": archive.dicom_port, "Retrieve": "FetchAndStore",
                    "Transcode": "Never"},
    }
    gateway: GatewayProcess = gateway_factory({"Dicom": {"Transcode": "ToAccepted", "Modalities": modalities}},
                                              {"main.lua": SEND_SCRIPT})
    to_viewer = _move(gateway.dicom_port, gateway.aet, viewer.aet, src.StudyInstanceUID)
    assert "Final Move Response (Success)" in to_viewer.stdout + to_viewer.stderr, to_viewer.stdout
    assert_decoded(viewer, path)
    to_archive = _move(gateway.dicom_port, gateway.aet, archive.aet, src.StudyInstanceUID)
    out = to_archive.stdout + to_archive.stderr
    assert "Final Move Response (Success)" not in out, out
    assert archive.instance_count() == 0
    gateway.wait_for_log("for CT Image Storage, a transfer syntax the move destination ARCHIVE did not propose; "
                         "the gateway does not decode it with the destination's own Transcode")

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    path.rename(outbox / path.name)
    r = gateway.get("/run/send", headers={"x-args": f"{outbox} archive"})
    assert r.text.startswith("0/1/") and "the destination's own Transcode" in r.text \
        and "Never" in r.text, r.text
    assert archive.instance_count() == 0
    viewer.clear()
    r = gateway.get("/run/send", headers={"x-args": f"{outbox} viewer"})
    assert r.text == "1/0/", r.text
    assert_decoded(viewer, outbox / path.name)


def test_cget_requester_with_its_own_transcode(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """Global ``Never``; the requester GETSCU's ``Dicom:Modalities`` entry says ``ToAccepted``:
    it gets the JPEG 2000 instance decoded, while another requester (OTHERSCU) gets nothing."""
    path = jpeg2000(tmp_path)
    fresh_orthanc.upload(path.read_bytes())
    src = pydicom.dcmread(path)
    modalities = {"getter": {"Aet": "GETSCU", "Host": LOOPBACK, "Port": 104, "Transcode": "ToAccepted"}}
    gateway: GatewayProcess = gateway_factory({"Dicom": {"Modalities": modalities}})
    got: dict[str, list[Path]] = {}
    for aet in ("GETSCU", "OTHERSCU"):
        out = tmp_path / aet
        out.mkdir()
        run_dcmtk("getscu", "-S", "-v", "-aet", aet, "-aec", gateway.aet, "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={src.StudyInstanceUID}", "-od", out, LOOPBACK, str(gateway.dicom_port),
                  check=False)
        got[aet] = list(out.iterdir())
    assert len(got["GETSCU"]) == 1 and not got["OTHERSCU"], got
    decoded = pydicom.dcmread(got["GETSCU"][0])
    assert (decoded.pixel_array == src.pixel_array).all() and decoded.SOPInstanceUID == src.SOPInstanceUID
    assert gateway.log_text().count("transcoded ") == 1



def test_relay_with_dicom_upstream_own_transcode_over_a_global_never(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    """``Dicom:Upstream:Transcode`` ``ToAccepted`` with ``Dicom:Transcode`` ``Never``: the relay (the
    modality's JPEG context accepted at negotiation, the instance decoded for the PACS) follows
    the PACS's own setting."""
    pacs = orthanc_factory(extra_config=UNCOMPRESSED_ONLY)
    gateway: GatewayProcess = gateway_factory({"Dicom": {"StoreMode": "RelayOrSpool", "Transcode": "Never",
                                                         "Upstream": {"Transcode": "ToAccepted"}}}, orthanc=pacs)
    path = jpeg_baseline(tmp_path)
    res = storescu(gateway.dicom_port, pacs.aet, path, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    pacs.wait_for_instances(1)
    assert_decoded(pacs, path)
    gateway.wait_for_log("transcoded")
