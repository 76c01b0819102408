"""A Failover group as the C-STORE destination: the primary stopped in the middle of a burst of
C-STOREs, nothing is lost (every instance arrives in the secondary), and the instances go to the
primary again once its C-ECHO health check sees it back. Two real Orthancs, the gateway process,
dcmtk storescu."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OrthancServer]]:
    servers = {name: OrthancServer(tmp_path_factory.mktemp(f"orthanc-{name}"), aet=f"FAIL{name.upper()}")
               for name in ("primary", "secondary")}
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def burst(folder: Path, n: int, tag: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for i in range(n):
        ds = dicom_samples.build_dataset(patient_id="PFAIL", patient_name="Fail^Over", study_uid=study,
                                         series_uid=series, instance_number=i + 1, modality="CT")
        path = folder / f"{tag}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def healthy(gateway: GatewayProcess, name: str) -> bool:
    return bool(gateway.get("/dicomproxy/health").json()["upstreams"]["servers"][name]["healthy"])


def storescu(gateway: GatewayProcess, paths: list[Path]) -> None:
    run_dcmtk("storescu", "-aet", "CT01", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
              *map(str, paths))


def test_a_failover_group_takes_a_burst_while_the_primary_is_down_and_gets_it_back(
    pair: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    primary, secondary = pair["primary"], pair["secondary"]
    gateway = gateway_factory({
        "Upstreams": {
            "Servers": {name: {"Url": s.http_url, "Dicom": {"Aet": s.aet, "Port": s.dicom_port},
                               "HealthCheck": {"Echo": True, "IntervalSeconds": 0.5, "Failures": 1, "Successes": 1}}
                        for name, s in pair.items()},
            "Groups": {"archive": {"Members": ["primary", "secondary"], "Mode": "Failover"}},
        },
        "Dicom": {"StoreMode": "StoreAndForward", "ForwardRetrySeconds": 0.2, "ForwardMaxRetrySeconds": 1,
                  "Routes": [{"Destinations": ["archive"]}]},
    }, orthanc=primary)

    first = burst(tmp_path / "first", 10, "a")
    storescu(gateway, first)
    wait_until(lambda: uids(first) <= primary.sop_instance_uids(), timeout=30,
               what="the first half of the burst in the primary")

    primary.stop()  # the burst goes on at once, before any health check has noticed
    second = burst(tmp_path / "second", 20, "b")
    storescu(gateway, second)  # acknowledged by the gateway while the primary is down
    wait_until(lambda: uids(second) <= secondary.sop_instance_uids(), timeout=60,
               what="the second half of the burst in the secondary (the primary is down)")
    assert not uids(first) & secondary.sop_instance_uids()  # what the primary had is not sent again

    primary.start()
    wait_until(lambda: healthy(gateway, "primary"), timeout=30, what="the primary healthy again (its C-ECHO check)")
    third = burst(tmp_path / "third", 5, "c")
    storescu(gateway, third)
    wait_until(lambda: uids(third) <= primary.sop_instance_uids(), timeout=60,
               what="the primary serving again once it is back")
    assert uids(first) <= primary.sop_instance_uids()  # its storage survived the stop
    assert not uids(third) & secondary.sop_instance_uids()
    wait_until(lambda: gateway.get("/dicomproxy/spool").json()["depth"] == 0, timeout=30,
               what="the spool emptied (every instance delivered once)")
    assert gateway.get("/dicomproxy/spool").json()["failed"] == 0


def server_health(gateway: GatewayProcess, name: str) -> dict[str, Any]:
    return dict(gateway.get("/dicomproxy/health").json()["upstreams"]["servers"][name])


def findscu(gateway: GatewayProcess, patient: str) -> Any:
    return run_dcmtk("findscu", "-S", "-v", "-aet", "FINDSCU", "-aec", gateway.aet, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"PatientID={patient}", "-k", "StudyInstanceUID", LOOPBACK, str(gateway.dicom_port))


def test_a_member_whose_dicom_side_is_down_is_ejected_by_failed_associations(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    """Two Orthancs in a Failover group, the first with its DICOM port closed (``DicomServerEnabled``
    false) and its HTTP side up, no active health check: the first C-FIND through the gateway
    finds the first member's port refused, that failed association ejects it (``Failures`` 1), and
    the next C-FIND and a burst of C-STOREs routed to the group go to the second member without
    trying the first again (its error count stays at the one refused association)."""
    down = orthanc_factory(aet="DICOMDOWN", extra_config={"DicomServerEnabled": False})
    up = orthanc_factory(aet="DICOMUP")
    first = burst(tmp_path / "seed", 1, "s")
    up.upload(first[0])
    check = {"Failures": 1, "IntervalSeconds": 600}  # no Path, no Echo: only traffic judges them
    gateway = gateway_factory({
        "Upstreams": {
            "Servers": {name: {"Url": s.http_url, "Dicom": {"Aet": s.aet, "Port": s.dicom_port}, "HealthCheck": check}
                        for name, s in (("down", down), ("up", up))},
            "Groups": {"archive": {"Members": ["down", "up"], "Mode": "Failover"}},
        },
        "Dicom": {"StoreMode": "StoreAndForward", "QueryUpstream": "archive",
                  "Routes": [{"Destinations": ["archive"]}]},
    }, orthanc=up)
    assert server_health(gateway, "down")["healthy"]  # its HTTP side answers; nothing judged it yet

    res = findscu(gateway, "PFAIL")
    assert "Find Response: 1 (Pending)" in res.stdout + res.stderr, res.stdout + res.stderr
    health = server_health(gateway, "down")
    assert health["state"] == "ejected" and health["errors"] == 1, health
    assert "DICOM" in health["lastError"] and "DICOMDOWN" not in str(health.get("url")), health
    gateway.wait_for_log("upstream down (")  # the registry's ejection line

    res = findscu(gateway, "PFAIL")
    assert "Find Response: 1 (Pending)" in res.stdout + res.stderr, res.stdout + res.stderr
    more = burst(tmp_path / "more", 5, "m")
    storescu(gateway, more)
    wait_until(lambda: uids(more) <= up.sop_instance_uids(), timeout=30, what="the burst in the live member")
    assert server_health(gateway, "down")["errors"] == 1  # not tried again: routing skips the ejected member
    assert gateway.log_text().count("trying the next member") == 1
    assert server_health(gateway, "up")["healthy"]
