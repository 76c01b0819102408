"""The AE and address policy through the real stack: dcmtk's echoscu/storescu/findscu/movescu/getscu
against the gateway process; each refusal as the dcmtk client reports it (``-d``: the A-ASSOCIATE-RJ
reason, or the DIMSE status) and as the gateway's one log line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk

LOOPBACK = "127.0.0.1"


def echo(gateway: GatewayProcess, calling: str, called: str | None = None) -> Any:
    return run_dcmtk("echoscu", "-d", "-aet", calling, "-aec", called or gateway.aet, LOOPBACK,
                     str(gateway.dicom_port), check=False)


@pytest.mark.parametrize("settings, calling, called, reason, line, passes", [
    ({}, "CT1", "WRONG", "Called AE Title Not Recognized",
     "to WRONG refused (A-ASSOCIATE-RJ reason 7): called AE 'WRONG' is not this gateway's", "CT1"),
    ({"BlockedCallingAets": ["CT1"]}, "CT1", None, "Calling AE Title Not Recognized",
     "refused (A-ASSOCIATE-RJ reason 3): calling AE is in Dicom:BlockedCallingAets", "CT2"),
    ({"AllowedCallingAets": ["MR1"]}, "CT1", None, "Calling AE Title Not Recognized",
     "refused (A-ASSOCIATE-RJ reason 3): calling AE is not in Dicom:AllowedCallingAets", "MR1"),
    ({"AllowedAddresses": ["10.0.0.0/8", "fd00::/8"]}, "CT1", None, "No Reason",
     "refused (A-ASSOCIATE-RJ reason 1): address 127.0.0.1 is not in Dicom:AllowedAddresses", None),
])
def test_association_refusals_carry_the_reason(
    gateway_factory: Any, settings: dict[str, Any], calling: str, called: str | None, reason: str, line: str,
    passes: str | None,
) -> None:
    gateway = gateway_factory({"Dicom": settings}, orthanc=None)
    refused = echo(gateway, calling, called)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "Rejected Permanent" in out and f"Reason: {reason}" in out, out
    assert gateway.wait_for_log(line).count(line) == 1  # one line per refusal
    if passes is not None:  # a request that keeps the rules is accepted
        assert echo(gateway, passes).returncode == 0


def test_allowed_address_and_called_aet_check_off(gateway_factory: Any) -> None:
    gateway = gateway_factory({"Dicom": {"AllowedAddresses": ["127.0.0.0/8"], "CheckCalledAet": False}},
                              orthanc=None)
    assert echo(gateway, "CT1", "WHATEVER").returncode == 0


def test_operations_per_calling_ae(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any, tmp_path: Path
) -> None:
    scp = storescp_factory("DEST")
    permissions = {"CT1": ["store"], "VIEWER": ["find", "move"], "*": []}
    gateway = gateway_factory({"Dicom": {"AePermissions": permissions, "Modalities": {
        "dest": {"Aet": scp.aet, "Host": LOOPBACK, "Port": scp.port}}}})
    port = str(gateway.dicom_port)
    study = pydicom.uid.generate_uid()
    path, _uid = dicom_samples.make_instance(tmp_path / "ct.dcm", patient_id="PPOL", patient_name="Pol^Icy",
                                             study_uid=study)

    def store(calling: str) -> Any:
        return run_dcmtk("storescu", "-d", "-aet", calling, "-aec", gateway.aet, LOOPBACK, port, str(path),
                         check=False)

    refused = store("VIEWER")
    assert refused.returncode != 0 and "0x0124" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    gateway.wait_for_log("C-STORE from VIEWER (127.0.0.1:")
    assert "'VIEWER' may not store (Dicom:AePermissions)" in gateway.log_text()
    assert store("CT1").returncode == 0
    fresh_orthanc.wait_for_instances(1)
    assert echo(gateway, "NOBODY").returncode == 0  # C-ECHO is always allowed, even with no operation

    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    find = run_dcmtk("findscu", "-d", "-S", "-aet", "CT1", "-aec", gateway.aet, LOOPBACK, port, *keys, check=False)
    assert "0x0124" in find.stdout + find.stderr or "Refused: Not Authorized" in find.stdout + find.stderr, \
        find.stdout + find.stderr
    gateway.wait_for_log("C-FIND from CT1 (127.0.0.1:")
    allowed = run_dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", gateway.aet, LOOPBACK, port, *keys, check=False)
    assert allowed.returncode == 0, allowed.stderr

    move = ["-S", "-aem", scp.aet, "-aec", gateway.aet, LOOPBACK, port, *keys]
    refused_move = run_dcmtk("movescu", "-d", "-aet", "CT1", *move, check=False)
    assert "0x0124" in refused_move.stdout + refused_move.stderr or "Not Authorized" in (
        refused_move.stdout + refused_move.stderr), refused_move.stdout + refused_move.stderr
    gateway.wait_for_log("C-MOVE from CT1 (127.0.0.1:")
    assert run_dcmtk("movescu", "-aet", "VIEWER", *move, check=False).returncode == 0
    scp.wait_for_files(1)
    # the refused C-MOVE opened nothing to the destination (no Verification association first,
    # as the pynetdicom Q/R AE needed): the permitted one is the only association it saw
    assert scp.log_text().count("Association Acknowledged") == 1, scp.log_text()  # (the start probe: Received)

    get = run_dcmtk("getscu", "-d", "-S", "-aet", "VIEWER", "-aec", gateway.aet, LOOPBACK, port, *keys,
                    "-od", str(tmp_path), check=False)
    assert "0x0124" in get.stdout + get.stderr or "Not Authorized" in get.stdout + get.stderr, get.stdout + get.stderr
    gateway.wait_for_log("C-GET from VIEWER (127.0.0.1:")
