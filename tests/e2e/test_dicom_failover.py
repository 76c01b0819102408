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
