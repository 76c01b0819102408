"""The gateway's life cycle through real processes: it always stops when told (SIGTERM), with or
without work in flight, in front of the session Orthanc."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from tusclient import client as tus_client

from dicomproxy.auth.apikeys import hash_key, new_key
from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, dcmtk, free_port, wait_until
from tests.tus.test_support import OCTET, TUS, RawRequest, upload_id, wait_file_size

GatewayFactory = Callable[..., GatewayProcess]

MAIN = r"""
function onHttpRequest(r)
  if r.Path == "/test/queue" then
    r:ResponseWrite(LuaBackgroundWorker("main-task.lua", "slow", ""))
    return true
  end
end
"""

TASK = r"""
function slow(args)
  OsExecute("sleep", "30")
  return "slept"
end
"""


@contextlib.contextmanager
def work_in_flight(gw: GatewayProcess) -> Iterator[None]:
    """An open SSE stream, a TUS PATCH half sent, an open DICOM association and a running Lua
    task, each confirmed by the gateway before the block runs; closed after it."""
    parts = gw.url.removeprefix("http://").split(":")
    sse = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=30)
    patch: RawRequest | None = None
    assoc: Any = None
    try:
        sse.request("GET", "/dicomproxy/notifications/stream")
        stream = sse.getresponse()
        assert stream.status == 200, stream.status
        size = 8 * 1024 * 1024
        r = requests.post(gw.url + "/files/", headers={**TUS, "Upload-Length": str(size)}, timeout=10)
        assert r.status_code == 201, r.text
        uid = upload_id(r.headers["Location"])
        patch = RawRequest(gw.http_port, "PATCH", f"/files/{uid}",
                           {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": str(size)})
        patch.send(b"x" * (1024 * 1024))
        wait_file_size(gw.data_dir / "tus" / uid, 1)  # the PATCH is being written
        ae = AE(ae_title="CYCLER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", gw.dicom_port, ae_title=gw.aet)
        assert assoc.is_established
        gw.get("/test/queue")  # a task cut short by an earlier stop may run first: any will do
        wait_until(lambda: gw.get("/dicomproxy/tasks", params={"state": "running"}).json(),
                   timeout=20, what="a Lua task running")
        yield
    finally:
        if assoc is not None:
            assoc.abort()
        if patch is not None:
            patch.close()
        sse.close()


def test_every_sigterm_ends_the_gateway_cleanly(gateway_factory: GatewayFactory) -> None:
    """Start -> healthy -> SIGTERM, many times: every exit is clean (status 0, no SIGKILL) and
    within the deadline, idle or with an SSE stream, a TUS PATCH, a DICOM association and a Lua
    task in flight. (Before the forwarder's idle wait was fixed, a few idle cycles in a hundred
    hung forever after SIGTERM.)"""
    gw = gateway_factory(scripts={"main.lua": MAIN, "main-task.lua": TASK}, start=False)
    took: list[float] = []
    for cycle in range(12):
        gw.start(60)
        with work_in_flight(gw) if cycle % 4 == 3 else contextlib.nullcontext():
            t0 = time.monotonic()
            status = gw.stop()
        took.append(round(time.monotonic() - t0, 1))
        assert not gw.forced_kill and status == 0, (
            f"cycle {cycle}: exit status {status} after {took[-1]} s; log tail:\n" + gw.log_text()[-3000:]
        )
        assert took[-1] < gw.shutdown_timeout + 2, f"cycle {cycle}: {took}; log tail:\n" + gw.log_text()[-3000:]


# --------------------------------------------------------------------------- live / ready
def probe(gw: GatewayProcess, which: str) -> tuple[int, str]:
    r = requests.get(f"{gw.url}/dicomproxy/health/{which}", timeout=5)
    return r.status_code, r.json().get("status", "")


def test_ready_is_503_while_starting_and_200_once_started(gateway_factory: GatewayFactory) -> None:
    """The HTTP listener is up while the components start (a main.lua that takes 4 s to load):
    live 200, ready 503 "starting"; a request that comes meanwhile waits and is served."""
    gw = gateway_factory(scripts={"main.lua": 'OsExecute("sleep", "4")\nLogInfo("slow main.lua loaded")\n'},
                         start=False)
    starter = threading.Thread(target=gw.start, kwargs={"timeout": 60}, daemon=True)
    starter.start()
    seen = wait_until(lambda: _probe_or_none(gw, "ready"), timeout=30, what="the ready probe answering")
    assert seen == (503, "starting"), seen
    assert "slow main.lua loaded" not in gw.log_text()
    assert probe(gw, "live") == (200, "live")
    early = requests.get(f"{gw.url}/dicomproxy/health", timeout=40)  # waits for the start, then answered
    assert early.status_code == 200 and "slow main.lua loaded" in gw.log_text()
    assert probe(gw, "ready") == (200, "ready")
    starter.join(30)
    head = requests.head(f"{gw.url}/dicomproxy/health/ready", timeout=5)
    assert head.status_code == 200 and head.headers["Cache-Control"] == "no-store"


def _probe_or_none(gw: GatewayProcess, which: str) -> tuple[int, str] | None:
    try:
        return probe(gw, which)
    except requests.ConnectionError:
        return None


def test_live_stays_200_and_ready_503_while_the_pacs_is_down(gateway_factory: GatewayFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory({"Upstream": {"Url": dead}, "Dicom": {"Port": 0}}, orthanc=None)
    gw.get("/dicomproxy/health", params={"probe": "1"})  # the monitor has tried now
    assert probe(gw, "live") == (200, "live")
    assert probe(gw, "ready") == (503, "upstream down")
    relaxed = gateway_factory({"Upstream": {"Url": dead}, "Dicom": {"Port": 0},
                               "Server": {"ReadyRequiresUpstream": False}}, orthanc=None)
    relaxed.get("/dicomproxy/health", params={"probe": "1"})
    assert probe(relaxed, "ready") == (200, "ready")


def test_probes_stay_open_when_authentication_is_on(gateway_factory: GatewayFactory) -> None:
    key = {"ops": {"Hash": hash_key(new_key()), "Roles": ["admin"]}}
    gw = gateway_factory({"Authentication": {"ApiKeys": key}})
    assert requests.get(f"{gw.url}/system", timeout=5).status_code == 401
    assert probe(gw, "live") == (200, "live")
    assert probe(gw, "ready") == (200, "ready")


# --------------------------------------------------------------------------- drain
def test_sigterm_turns_ready_503_first_and_serves_through_the_drain_delay(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory({"Server": {"DrainDelaySeconds": 3}})
    assert probe(gw, "ready") == (200, "ready")
    assert gw.proc is not None
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: probe(gw, "ready")[0] == 503, timeout=5, what="ready 503") is True
    assert probe(gw, "ready") == (503, "draining")
    assert gw.get("/system").status_code == 200  # the proxy still serves while load balancers notice
    assert gw.proc.wait(timeout=gw.shutdown_timeout + 5) == 0
    assert time.monotonic() - t0 >= 3  # the listener stayed up for the whole delay
    assert "shutdown requested: draining" in gw.log_text()


def test_sigterm_lets_the_current_tus_patch_finish_and_the_client_resumes(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """SIGTERM while a PATCH is half sent: the client sends the rest, gets 204 with the new offset,
    the gateway exits 0; after a restart the offset is the same and tuspy finishes the upload."""
    gw = gateway_factory({"Tus": {"KeepAfterImport": True}})
    size, first = 8 * 1024 * 1024, 4 * 1024 * 1024
    src = tmp_path / "upload.bin"
    src.write_bytes(os.urandom(size))
    data = src.read_bytes()
    r = requests.post(gw.url + "/files/", headers={**TUS, "Upload-Length": str(size)}, timeout=10)
    url = r.headers["Location"]
    uid = upload_id(url)
    patch = RawRequest(gw.http_port, "PATCH", f"/files/{uid}",
                       {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": str(first)})
    try:
        patch.send(data[: first // 2])
        wait_file_size(gw.data_dir / "tus" / uid, 1)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "shutdown requested" in gw.log_text(), what="the gateway to begin its shutdown")
        patch.send(data[first // 2: first])
        status, headers, _ = patch.response()
    finally:
        patch.close()
    assert status == 204 and headers["upload-offset"] == str(first), (status, headers)
    assert gw.proc.wait(timeout=gw.shutdown_timeout + 5) == 0
    gw.start()
    head = requests.head(url, headers=TUS, timeout=10)
    assert head.headers["Upload-Offset"] == str(first)
    resumed = tus_client.TusClient(gw.url + "/files/").uploader(str(src), url=url, chunk_size=2 * 1024 * 1024)
    assert resumed.offset == first
    resumed.upload()
    assert (gw.data_dir / "tus" / uid).read_bytes() == data


def test_sigterm_during_a_storescu_burst_loses_no_acknowledged_instance(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """SIGTERM while storescu sends 150 instances on one association: the association may go on
    until the deadline (then it is aborted); every instance storescu got a success for is in
    Orthanc after the restart."""
    gw = gateway_factory(orthanc=fresh_orthanc)
    study = pydicom.uid.generate_uid()
    files = {}
    for i in range(150):
        path, uid = dicom_samples.make_instance(tmp_path / "burst" / f"IM{i:04d}.dcm", patient_id="BURST",
                                                patient_name="Burst^Stop", study_uid=study, InstanceNumber=i + 1)
        files[str(path)] = uid
    sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aet", "BURST", "-aec", gw.aet, "127.0.0.1",
                               str(gw.dicom_port), *files], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        fresh_orthanc.wait_for_instances(5, timeout=30)  # the burst is under way
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        out, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert gw.proc.wait(timeout=gw.shutdown_timeout + 5) == 0
    acknowledged = _acknowledged(out, files)
    assert len(acknowledged) >= 5, out[-2000:]
    gw.start()
    wait_until(lambda: acknowledged <= fresh_orthanc.sop_instance_uids(), timeout=60,
               what=f"the {len(acknowledged)} acknowledged instances in Orthanc")


def _acknowledged(storescu_output: str, files: dict[str, str]) -> set[str]:
    """SOP Instance UIDs of the files storescu -v reported a success status for."""
    done: set[str] = set()
    current = ""
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response" in line and "Success" in line and current in files:
            done.add(files[current])
    return done


def test_sigterm_while_starting_cancels_the_start_and_exits_cleanly(gateway_factory: GatewayFactory) -> None:
    """A start that would take 60 s (main.lua sleeps at load): SIGTERM ends it at once, exit 0."""
    gw = gateway_factory(scripts={"main.lua": 'OsExecute("sleep", "60")\nLogInfo("never loaded")\n'}, start=False)
    starter = threading.Thread(target=_start_quietly, args=(gw,), daemon=True)
    starter.start()
    assert wait_until(lambda: _probe_or_none(gw, "ready"), timeout=30, what="the ready probe") == (503, "starting")
    assert gw.proc is not None
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=gw.shutdown_timeout + 5) == 0
    assert time.monotonic() - t0 < gw.shutdown_timeout
    log = gw.log_text()
    assert "stopped while starting" in log and "never loaded" not in log, log[-3000:]


def _start_quietly(gw: GatewayProcess) -> None:
    with contextlib.suppress(BaseException):  # the start is cut short on purpose
        gw.start(60)
