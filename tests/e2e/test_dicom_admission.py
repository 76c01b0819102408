"""DICOM admission through the real stack: the gateway process, dcmtk tools, a real Orthanc.

From the security issue: 70 connections dripping one byte every 10 s, never completing an
A-ASSOCIATE-RQ, made every real modality get "local limit exceeded", long past ARTIM. Here
(bounded): dozens of drippers while storescu, echoscu and findscu still work; a dripper dropped at
ARTIM (measured); the per-address cap; only established associations count; a malformed
user-information item gets an A-ABORT; data sets past Dicom:MaxDatasetMB abort; a large instance
is streamed (the gateway's peak memory does not grow with it).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomproxy.dicom.presentation import IMPLICIT, VERIFICATION
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul import pdu as pdus
from tests import dicom_samples
from tests.dicom.ul.test_pdu import _rq_with_user_items
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
RQ = pdus.associate_rq("DICOMPROXY", "DRIP", [pdus.ProposedContext(1, VERIFICATION, (IMPLICIT,))], 16384).encode()


def health(gateway: GatewayProcess) -> dict[str, Any]:
    return gateway.get("/dicomproxy/health").json()["dicom"]


def echoscu(gateway: GatewayProcess, calling: str = "ECHOER") -> Any:
    return run_dcmtk("echoscu", "-aet", calling, "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), check=False)


def _connect(gateway: GatewayProcess, source: str = LOOPBACK) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((LOOPBACK, gateway.dicom_port))
    return sock


class Drippers:
    """Connections that send the A-ASSOCIATE-RQ one byte at a time, ``every`` seconds apart."""

    def __init__(self, socks: list[socket.socket], every: float) -> None:
        self.socks = socks
        self.every = every
        self.closed_at: dict[int, float] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and len(self.closed_at) < len(self.socks):
            for n, sock in enumerate(self.socks):
                if n in self.closed_at:
                    continue
                try:
                    sock.sendall(RQ[i % len(RQ) : i % len(RQ) + 1])
                    sock.setblocking(False)
                    if sock.recv(16) == b"":
                        self.closed_at[n] = time.monotonic() - self.started
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed_at[n] = time.monotonic() - self.started
                finally:
                    sock.setblocking(True)
            i += 1
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def drippers() -> Iterator[list[Drippers]]:
    made: list[Drippers] = []
    yield made
    for d in made:
        d.stop()


def test_dripping_connections_do_not_keep_modalities_out(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path, drippers: list[Drippers]
) -> None:
    gateway = gateway_factory({"Dicom": {"MaxAssociations": 3, "ArtimSeconds": 6, "MaxConnectionsPerAddress": 8}})
    socks = [_connect(gateway, f"127.0.0.{2 + i // 8}") for i in range(40)]  # 40 drippers from 5 addresses
    drip = Drippers(socks, every=0.5)
    drippers.append(drip)
    wait_until(lambda: health(gateway)["openConnections"] >= 40, what="40 dripping connections open")
    paths = [dicom_samples.make_instance(tmp_path / f"IM{i}.dcm", patient_id="PDRIP", patient_name="D^D")[0]
             for i in range(5)]
    run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), *map(str, paths))
    assert echoscu(gateway).returncode == 0
    find = run_dcmtk("findscu", "-S", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
                     "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PDRIP", check=False)
    assert find.returncode == 0, find.stderr
    assert not drip.closed_at, "a dripper was dropped before ARTIM"  # they were all there during the stores
    fresh_orthanc.wait_for_instances(5)
    wait_until(lambda: len(drip.closed_at) == 40, timeout=15, what="every dripper dropped at ARTIM")
    assert min(drip.closed_at.values()) >= 5.5  # none before ARTIM (6 s from its connection)
    h = wait_until(lambda: (d := health(gateway))["openConnections"] == 0 and d, what="no connection left")
    assert h["ok"] and h["activeAssociations"] == 0


def test_a_dripper_is_dropped_at_artim(gateway_factory: Any, drippers: list[Drippers]) -> None:
    gateway = gateway_factory({"Dicom": {"ArtimSeconds": 2}})
    drip = Drippers([_connect(gateway)], every=0.3)
    drippers.append(drip)
    wait_until(lambda: 0 in drip.closed_at, timeout=10, what="the dripper dropped")
    assert 2.0 <= drip.closed_at[0] < 3.0, drip.closed_at  # ARTIM, plus at most one drip interval of detection
    gateway.wait_for_log("closed without an association: ARTIM expired")
    assert echoscu(gateway).returncode == 0


def test_connections_per_address_are_capped(gateway_factory: Any) -> None:
    gateway = gateway_factory({"Dicom": {"MaxConnectionsPerAddress": 3}})
    idle = [_connect(gateway) for _ in range(3)]  # from 127.0.0.1, like the dcmtk tools
    wait_until(lambda: health(gateway)["openConnections"] == 3, what="three idle connections")
    refused = echoscu(gateway)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Association Rejected" in out and "Local Limit Exceeded" in out, out
    gateway.wait_for_log("connections from 127.0.0.1 (Dicom:MaxConnectionsPerAddress is 3)")
    others = [_connect(gateway, "127.0.0.2") for _ in range(3)]  # another address has its own cap
    idle.pop().close()
    wait_until(lambda: health(gateway)["openConnections"] == 5, what="one connection from 127.0.0.1 gone")
    assert echoscu(gateway).returncode == 0
    for sock in idle + others:
        sock.close()


def test_only_established_associations_count(gateway_factory: Any) -> None:
    gateway = gateway_factory({"Dicom": {"MaxAssociations": 1}})
    pending = [_connect(gateway) for _ in range(5)]  # connected, no request: they do not count
    assert echoscu(gateway).returncode == 0

    async def hold_one_then_echo() -> tuple[Any, int]:
        held = await StorageScu.connect(LOOPBACK, gateway.dicom_port, called_aet=gateway.aet, calling_aet="HOLDER",
                                        contexts=[(VERIFICATION, IMPLICIT)])
        try:
            refused = await asyncio.to_thread(echoscu, gateway)
            wait_until(lambda: health(gateway)["activeAssociations"] == 1, what="one association")
        finally:
            await held.release()
        return refused, (await asyncio.to_thread(echoscu, gateway)).returncode

    refused, after = asyncio.run(hold_one_then_echo())
    assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stdout + refused.stderr
    gateway.wait_for_log("1 associations established (Dicom:MaxAssociations)")
    assert after == 0
    for sock in pending:
        sock.close()


def test_a_malformed_user_information_item_gets_an_a_abort(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory()
    sock = _connect(gateway)
    sock.settimeout(10)
    sock.sendall(_rq_with_user_items(b"\x51\x00\x00\x03\x00\x00\x40"))  # a maximum-length sub-item of 3 bytes
    answer = sock.recv(10, socket.MSG_WAITALL)
    assert answer[0] == 0x07 and answer[8] == 2, answer  # A-ABORT from the service provider
    sock.close()
    path, uid = dicom_samples.make_instance(tmp_path / "after.dcm", patient_id="PUI", patient_name="U^I")
    run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(path))
    fresh_orthanc.wait_for_instances(1)
    log = gateway.log_text()
    assert "malformed" in log and "Traceback" not in log


def _big_instance(path: Path, megabytes: int) -> tuple[Path, str]:
    ds = dicom_samples.build_dataset(patient_id="PBIG", patient_name="Big^Instance", size=(16, 16))
    side = int(((megabytes << 20) / 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side * 2 // 256) + bytes(side * side * 2 % 256)
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _peak_rss_mb(gateway: GatewayProcess) -> float:
    assert gateway.proc is not None
    status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def test_a_large_instance_is_streamed_and_max_dataset_mb_holds(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory({"Dicom": {"MaxDatasetMB": 100}, "Logging": {"Level": "INFO"}})
    small, _ = dicom_samples.make_instance(tmp_path / "warmup.dcm", patient_id="PW", patient_name="W^W")
    run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(small))
    fresh_orthanc.wait_for_instances(1)
    before = _peak_rss_mb(gateway)
    path, uid = _big_instance(tmp_path / "big.dcm", 80)
    run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(path))
    fresh_orthanc.wait_for_instances(2, timeout=60)
    wait_until(lambda: health(gateway)["spoolDepth"] == 0, timeout=30, what="the big instance forwarded")
    grown = _peak_rss_mb(gateway) - before
    assert grown < 40, f"peak RSS grew by {grown:.0f} MB for an 80 MB instance"  # not the instance, nor twice it
    found = fresh_orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}})
    assert len(found) == 1
    assert fresh_orthanc.rest_get(f"/instances/{found[0]}/file")[-4096:] == path.read_bytes()[-4096:]
    too_big, _ = _big_instance(tmp_path / "too-big.dcm", 120)
    refused = run_dcmtk("storescu", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(too_big), check=False)
    assert refused.returncode != 0
    gateway.wait_for_log("Dicom:MaxDatasetMB")
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    assert not list((gateway.data_dir / "spool" / "queue").glob("*.dcm"))  # the aborted one left nothing
