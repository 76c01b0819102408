"""Gateway replicas sharing uploads: Tus:Store s3 (SeaweedFS) and Cluster:Redis (redis-server).

Every PATCH of one upload may land on either replica; a replica killed with -9 in the middle of
a PATCH leaves an upload the other resumes; a request on one replica makes the holder on the
other let go. The bytes are checked in the bucket (tusd's s3store layout) and in Orthanc.

The deployment example (docs/deploy/compose) runs here as it is written: three replicas with its
appsettings.Cluster.json (hosts swapped for loopback peers) and lua/main.lua, behind Debian's nginx
with its nginx.conf (tests/peers.py ``nginx_conf_on_loopback``); tuspy and tus-js-client upload
through it, and an SSE client on one replica sees what another raised.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from tusclient import client as tus_client

from tests.peers import (
    DEPLOY_NGINX_CONF,
    REPO_ROOT,
    GatewayProcess,
    NginxBalancer,
    OrthancServer,
    RedisServer,
    SeaweedServer,
    run_node,
    wait_until,
)

TUS = {"Tus-Resumable": "1.0.0"}
MIB = 1024 * 1024


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path / "seaweed").start()
    yield server
    server.stop()


@pytest.fixture
def replicas(gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,
             seaweed: SeaweedServer) -> tuple[GatewayProcess, GatewayProcess]:
    settings = {
        "Cluster": {"Redis": redis_server.url, "LockLeaseSeconds": 2},
        "Tus": {"Store": "s3", "KeepAfterImport": True,
                "S3": {"Bucket": seaweed.bucket, "Prefix": "tus", "Endpoint": seaweed.endpoint,
                       "AccessKey": "test", "SecretKey": "test", "PartSizeMB": 5}},
    }
    return gateway_factory(settings), gateway_factory(settings)


def _on(gateway: GatewayProcess, url: str) -> str:
    """The same upload URL on another replica (what a round-robin load balancer does)."""
    return gateway.url + urlsplit(url).path


def _dicom(tmp_path: Path, dicom_samples: Any, pid: str, rows: int) -> Path:
    path, _ = dicom_samples.make_instance(tmp_path / f"{pid}.dcm", patient_id=pid, patient_name="Replica^Test",
                                          size=(rows, rows))
    return Path(path)


def _object_id(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1].rpartition("+")[0]


def _imported(orthanc: OrthancServer, pid: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = orthanc.rest_post("/tools/find", json={"Level": "Instance",
                                                                         "Query": {"PatientID": pid}})
    return found


def _taken_over_then_marker_put_back(a: GatewayProcess, seaweed: SeaweedServer, path: Path) -> tuple[str, str]:
    """Upload ``path`` through ``a``, whose script takes the completion over (no import), wait until
    its ``.pending`` marker is cleared, then put the marker back: the bucket as a replica killed
    between the last byte and the hand-over leaves it. (upload id, object id)."""
    a.write_script("main.lua", "function onTusFileComplete(metadata) return true end\n")
    a.wait_for_log("main.lua", timeout=10)
    uploader = tus_client.TusClient(a.url + "/files/").uploader(str(path), chunk_size=200_000)
    uploader.upload()
    upload = urlsplit(uploader.url).path.rsplit("/", 1)[-1]
    a.wait_for_log(f"tus: upload {upload} handled by onTusFileComplete", timeout=20)
    oid = _object_id(uploader.url)
    wait_until(lambda: f"tus/{oid}.pending" not in seaweed.keys(), timeout=10, what="the marker cleared")
    seaweed.client().put_object(Bucket=seaweed.bucket, Key=f"tus/{oid}.pending", Body=upload.encode())
    return upload, oid


def _import_tasks(*gateways: GatewayProcess) -> list[dict[str, Any]]:
    """Every replica lists the cluster's tasks (the imports are cluster tasks with Tus:Store s3): by id."""
    tasks = {t["id"]: t for g in gateways if g.proc is not None and g.proc.poll() is None
             for t in g.get("/dicomproxy/tasks").json() if t["kind"] == "tus-import"}
    return list(tasks.values())


def _check_stored_once(orthanc: OrthancServer, seaweed: SeaweedServer, url: str, payload: bytes, pid: str,
                       *gateways: GatewayProcess) -> None:
    oid = _object_id(url)
    info = json.loads(seaweed.get(f"tus/{oid}.info"))
    assert info["ID"] == urlsplit(url).path.rsplit("/", 1)[-1] and info["Storage"]["Type"] == "s3store"
    ids = wait_until(lambda: _imported(orthanc, pid), timeout=60, what="the upload imported into Orthanc")
    assert len(ids) == 1
    assert orthanc.rest_get(f"/instances/{ids[0]}/file") == payload  # byte-identical in the PACS
    done = wait_until(lambda: [t for t in _import_tasks(*gateways) if t["state"] == "done"], timeout=30,
                      what="the import task done")
    assert len(_import_tasks(*gateways)) == 1 and len(done) == 1  # imported once, by one replica


def test_tuspy_patches_alternate_between_replicas(tmp_path: Path, replicas: tuple[GatewayProcess, GatewayProcess],
                                                  seaweed: SeaweedServer, orthanc: OrthancServer,
                                                  dicom_samples: Any) -> None:
    a, b = replicas
    pid = "REPL-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 1800)  # ~6.2 MiB: two S3 parts and a .part in between
    payload = path.read_bytes()
    uploader = tus_client.TusClient(a.url + "/files/").uploader(str(path), chunk_size=MIB + 4321,
                                                              metadata={"filename": path.name})
    uploader.set_url(uploader.create_url())
    hops = []
    n = 0
    while uploader.offset < len(payload):
        target = (a, b)[n % 2]
        uploader.set_url(_on(target, uploader.url))
        uploader.upload_chunk()
        hops.append(target.http_port)
        n += 1
        if uploader.offset < len(payload):  # the other replica sees the offset the bucket holds
            other = (a, b)[n % 2]
            head = requests.head(_on(other, uploader.url), headers=TUS, timeout=10)
            assert head.headers["Upload-Offset"] == str(uploader.offset)
    assert len(set(hops)) == 2 and n >= 6
    assert seaweed.get(f"tus/{_object_id(uploader.url)}") == payload  # byte-identical in S3
    assert f"tus/{_object_id(uploader.url)}.part" not in seaweed.keys()
    _check_stored_once(orthanc, seaweed, uploader.url, payload, pid, a, b)


def test_tus_js_client_resumes_on_the_other_replica(tmp_path: Path,
                                                   replicas: tuple[GatewayProcess, GatewayProcess],
                                                   seaweed: SeaweedServer, orthanc: OrthancServer,
                                                   dicom_samples: Any) -> None:
    a, b = replicas
    pid = "REPLJS-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 1700)
    payload = path.read_bytes()
    # tus-js-client uploads 3 MiB or so to A and aborts; a second client resumes at B's URL.
    script = """
const tus = require('tus-js-client'); const fs = require('fs');
const [endpoint, file, uploadUrl, stopAt] = process.argv.slice(1);
const data = fs.readFileSync(file);
const opts = {endpoint, chunkSize: 1024 * 1024, metadata: {filename: 'js.dcm'}, uploadSize: data.length,
  onError: e => { console.error(String(e)); process.exit(1); },
  onSuccess: () => { console.log(up.url); process.exit(0); }};
if (uploadUrl) opts.uploadUrl = uploadUrl;
if (stopAt !== '0') { opts.onChunkComplete = (c, sent) => { if (sent >= Number(stopAt)) {
  up.abort().then(() => { console.log(up.url); process.exit(0); }); } }; }
const up = new tus.Upload(data, opts);
up.start();
"""
    first = run_node(script, a.url + "/files/", str(path), "", str(3 * MIB), timeout=60)
    url = first.stdout.strip().splitlines()[-1]
    head = requests.head(_on(b, url), headers=TUS, timeout=10)
    # the abort may cut the next chunk short: what was stored of it counts too
    assert 3 * MIB <= int(head.headers["Upload-Offset"]) < len(payload)
    run_node(script, b.url + "/files/", str(path), _on(b, url), "0", timeout=60)
    assert seaweed.get(f"tus/{_object_id(url)}") == payload
    _check_stored_once(orthanc, seaweed, url, payload, pid, a, b)


def _slow_patch(gateway: GatewayProcess, url: str, offset: int, total: int, first: bytes) -> socket.socket:
    """A PATCH that declares ``total`` bytes and sends only ``first`` (then keeps the connection)."""
    path = urlsplit(url).path
    sock = socket.create_connection(("127.0.0.1", gateway.http_port), timeout=30)
    head = (f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.http_port}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {total}\r\n\r\n")
    sock.sendall(head.encode() + first)
    return sock


def _create(gateway: GatewayProcess, size: int, name: str) -> str:
    r = requests.post(gateway.url + "/files/", headers={**TUS, "Upload-Length": str(size),
                                                         "Upload-Metadata": "filename " + _b64(name)}, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.headers["Location"])


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_replica_killed_mid_patch_the_other_resumes(tmp_path: Path,
                                                   replicas: tuple[GatewayProcess, GatewayProcess],
                                                   seaweed: SeaweedServer, orthanc: OrthancServer,
                                                   dicom_samples: Any) -> None:
    a, b = replicas
    pid = "REPLKILL-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 2000)  # ~7.6 MiB
    payload = path.read_bytes()
    url = _create(a, len(payload), path.name)
    sock = _slow_patch(a, url, 0, len(payload), payload[: 5 * MIB + 12345])
    oid = _object_id(url)
    # the first 5 MiB part reaches the bucket while the PATCH still runs; then A dies
    wait_until(lambda: _parts(seaweed, url) == 1, timeout=30, what="A's first part in S3")
    a.kill9()
    sock.close()
    t0 = time.monotonic()
    head = requests.head(_on(b, url), headers=TUS, timeout=30)  # waits out A's lease (2 s), then answers
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(5 * MIB)
    assert time.monotonic() - t0 < 10
    resumed = tus_client.TusClient(b.url + "/files/").uploader(str(path), url=_on(b, url), chunk_size=2 * MIB)
    assert resumed.offset == 5 * MIB
    resumed.upload()
    assert seaweed.get(f"tus/{oid}") == payload
    ids = wait_until(lambda: _imported(orthanc, pid), timeout=60, what="the upload imported into Orthanc")
    assert len(ids) == 1 and orthanc.rest_get(f"/instances/{ids[0]}/file") == payload
    done = wait_until(lambda: [t for t in _import_tasks(b) if t["state"] == "done"], timeout=30, what="import")
    assert len(done) == 1


def _parts(seaweed: SeaweedServer, url: str, prefix: str = "tus/") -> int:
    """Parts of the upload's multipart upload in the bucket (0 once completed)."""
    object_id, _, multipart_id = urlsplit(url).path.rsplit("/", 1)[-1].rpartition("+")
    client = seaweed.client()
    try:
        res = client.list_parts(Bucket=seaweed.bucket, Key=prefix + object_id, UploadId=multipart_id)
    except client.exceptions.NoSuchUpload:
        return 0
    return len(res.get("Parts", ()))


def test_a_request_on_one_replica_makes_the_holder_on_the_other_let_go(
        replicas: tuple[GatewayProcess, GatewayProcess], seaweed: SeaweedServer) -> None:
    a, b = replicas
    url = _create(a, 4 * MIB, "held.bin")
    sent = 1 * MIB + 777
    sock = _slow_patch(a, url, 0, 4 * MIB, b"x" * sent)
    time.sleep(0.5)  # A reads what was sent: the bytes sit in its buffer, below a part
    t0 = time.monotonic()
    head = requests.head(_on(b, url), headers=TUS, timeout=30)
    elapsed = time.monotonic() - t0
    # A stored what it had (in the .part object: below S3's 5 MiB minimum) and let go at once
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(sent)
    assert elapsed < 5, elapsed
    answer = sock.recv(65536).decode("latin-1")
    sock.close()
    assert answer.startswith("HTTP/1.1 400") and "ERR_UPLOAD_INTERRUPTED" in answer, answer
    assert f"tus/{_object_id(url)}.part" in seaweed.keys()


def test_a_second_patch_on_the_other_replica_interrupts_the_first(
        replicas: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, b = replicas
    url = _create(a, 4 * MIB, "twice.bin")
    sent = 300_000
    sock = _slow_patch(a, url, 0, 4 * MIB, b"y" * sent)
    time.sleep(0.5)
    # a client that believes it is still at 0 (its first PATCH seemed dead) tries again on B:
    # A lets go, and B answers with the offset the bucket holds (tusd: 409 ERR_MISMATCHED_OFFSET)
    r = requests.patch(_on(b, url), data=b"z" * 1000, timeout=30, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 409 and "ERR_MISMATCHED_OFFSET" in r.text
    assert r.headers["Upload-Offset"] == str(sent)
    assert "ERR_UPLOAD_INTERRUPTED" in sock.recv(65536).decode("latin-1")
    sock.close()
    rest = b"w" * (4 * MIB - sent)  # the right offset goes on, on either replica
    r = requests.patch(_on(b, url), data=rest, timeout=30, headers={
        **TUS, "Upload-Offset": str(sent), "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(4 * MIB)


def test_tuspy_through_nginx_round_robin(tmp_path: Path, replicas: tuple[GatewayProcess, GatewayProcess],
                                         seaweed: SeaweedServer, orthanc: OrthancServer,
                                         dicom_samples: Any) -> None:
    a, b = replicas
    lb = NginxBalancer(tmp_path / "nginx", [a.http_port, b.http_port]).start()
    try:
        pid = "REPLLB-" + uuid.uuid4().hex[:8]
        path = _dicom(tmp_path, dicom_samples, pid, 1600)
        payload = path.read_bytes()
        before = [g.metric("dicomproxy_tus_requests_total", method="PATCH") for g in (a, b)]
        uploader = tus_client.TusClient(lb.url + "/files/").uploader(str(path), chunk_size=MIB,
                                                                   metadata={"filename": path.name})
        uploader.upload()
        assert urlsplit(uploader.url).port == lb.port  # the Location names the balancer
        patches = [g.metric("dicomproxy_tus_requests_total", method="PATCH") - n
                   for g, n in zip((a, b), before, strict=True)]
        assert all(p >= 1 for p in patches) and sum(patches) >= 5, patches  # both replicas took PATCHes
        assert seaweed.get(f"tus/{_object_id(uploader.url)}") == payload
        _check_stored_once(orthanc, seaweed, uploader.url, payload, pid, a, b)
    finally:
        lb.stop()


# --------------------------------------------------------------------------- one replica, no Redis
@pytest.fixture
def single(gateway_factory: Callable[..., GatewayProcess], seaweed: SeaweedServer) -> GatewayProcess:
    return gateway_factory({"Tus": {"Store": "s3", "MaxSize": 0, "S3": {  # MaxSize 0: S3's own limit
        "Bucket": seaweed.bucket, "Prefix": "one/", "Endpoint": seaweed.endpoint, "AccessKey": "test",
        "SecretKey": "test", "PartSizeMB": 5}}})


def test_s3_without_redis_one_replica_imports_then_deletes(tmp_path: Path, single: GatewayProcess,
                                                          seaweed: SeaweedServer, orthanc: OrthancServer,
                                                          dicom_samples: Any) -> None:
    pid = "S3ONE-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 400)
    payload = path.read_bytes()
    uploader = tus_client.TusClient(single.url + "/files/").uploader(str(path), chunk_size=100_000)
    uploader.upload()
    assert "upload locks are local to this host" in single.log_text()
    assert single.get("/dicomproxy/health").json()["tus"]["locks"] == "local"
    ids = wait_until(lambda: _imported(orthanc, pid), timeout=60, what="the upload imported into Orthanc")
    assert orthanc.rest_get(f"/instances/{ids[0]}/file") == payload
    oid = _object_id(uploader.url)
    # imported: the object, its .info and .part are gone from the bucket (Tus:KeepAfterImport false)
    wait_until(lambda: not [k for k in seaweed.keys() if oid in k], timeout=30, what="the upload deleted from S3")
    assert not list((single.data_dir / "tus").glob(".s3-*.tmp"))  # the import's local copy is removed


def _peak_rss(gateway: GatewayProcess) -> int:
    assert gateway.proc is not None
    status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def _cpu_seconds(gateway: GatewayProcess) -> float:
    assert gateway.proc is not None
    stat = Path(f"/proc/{gateway.proc.pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_large_patch_holds_about_one_part_in_memory(tmp_path: Path, single: GatewayProcess,
                                                      seaweed: SeaweedServer) -> None:
    size = 96 * MIB
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    url = _create(single, size, "big.bin")
    single.get("/dicomproxy/health")
    peak_before = _peak_rss(single)
    cpu_before = _cpu_seconds(single)
    with open(path, "rb") as body:
        r = requests.patch(_on(single, url), data=body, timeout=300, headers={
            **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(size)})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(size)
    growth = _peak_rss(single) - peak_before
    print(f"gateway CPU for it: {_cpu_seconds(single) - cpu_before:.2f} s")
    options = requests.options(single.url + "/files/", headers=TUS, timeout=10)
    assert options.headers["Tus-Max-Size"] == str(5 * MIB * 10_000)  # 10 000 parts of Tus:S3:PartSizeMB
    assert "checksum" in options.headers["Tus-Extension"].split(",")
    too_big = requests.post(single.url + "/files/", headers={**TUS, "Upload-Length": str(5 * MIB * 10_000 + 1)},
                            timeout=10)
    assert too_big.status_code == 413
    print(f"peak RSS growth for one {size >> 20} MiB PATCH with 5 MiB parts: {growth / MIB:.1f} MiB")
    assert growth < 40 * MIB, growth  # a buffered upload would add 96 MiB or more
    assert _parts(seaweed, url, prefix="one/") == 0  # completed: ListParts has no upload any more


def test_a_completion_a_crash_interrupted_runs_on_the_next_replica_that_starts(
        tmp_path: Path, gateway_factory: Callable[..., GatewayProcess], replicas: tuple[GatewayProcess, GatewayProcess],
        seaweed: SeaweedServer, orthanc: OrthancServer, dicom_samples: Any) -> None:
    a, b = replicas
    pid = "REPLPEND-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 300)
    payload = path.read_bytes()
    # A's script takes the upload over (no import), then its marker is put back, as if A had been
    # killed before it handed the upload over
    upload, oid = _taken_over_then_marker_put_back(a, seaweed, path)
    b.stop()
    b.start()  # B (no script) finds the marker at start-up and runs the default import, once
    ids = wait_until(lambda: _imported(orthanc, pid), timeout=60, what="the upload imported into Orthanc")
    assert len(ids) == 1 and orthanc.rest_get(f"/instances/{ids[0]}/file") == payload
    assert f"tus: upload {upload} finished without its completion handed over" in b.log_text()
    wait_until(lambda: f"tus/{oid}.pending" not in seaweed.keys(), timeout=10, what="the marker cleared by B")
    assert len(_import_tasks(a, b)) == 1


# --------------------------------------------------------------------------- docs/deploy/compose, on loopback
EXAMPLE = REPO_ROOT / "docs" / "deploy" / "compose"
REPLICAS = ("gateway1", "gateway2", "gateway3")


class Stack:
    """The compose example's three replicas (by name) behind its nginx.conf."""

    def __init__(self, gateways: dict[str, GatewayProcess], lb: NginxBalancer) -> None:
        self.gateways, self.lb = gateways, lb
        self.by_port = {str(g.http_port): name for name, g in gateways.items()}

    def served(self, method: str, path: str) -> list[str]:
        """Which replica served each ``method path`` request, in order, from nginx's access log
        (the example's log format writes ``upstream=ADDR``)."""
        names = []
        for line in self.lb.access_log():
            if f'"{method} {path} ' in line:
                upstream = line.split("upstream=", 1)[1].split()[0]
                names.append(self.by_port[upstream.rsplit(":", 1)[1]])
        return names

    def served_all(self, method: str, path: str, count: int) -> list[str]:
        """``served`` once nginx has logged ``count`` of them (it logs a request after its answer)."""
        return wait_until(lambda: len(names := self.served(method, path)) >= count and names, timeout=10,
                          what=f"{count} {method} requests in nginx's access log")


def _example_settings(tmp_path: Path, redis_server: RedisServer, seaweed: SeaweedServer) -> dict[str, Any]:
    """docs/deploy/compose/appsettings.Cluster.json with its peers on loopback: Redis (no password
    here), the SeaweedFS bucket (its secret from a file, as in the example). The PACS, the listeners
    and the shutdown deadline stay the test defaults (the example's 5 s drain would slow teardown).
    KeepAfterImport: the object stays in the bucket, to be compared after the import."""
    example = json.loads((EXAMPLE / "appsettings.Cluster.json").read_text())
    secret = tmp_path / "s3-secret-key"
    secret.write_text("test\n")
    cluster = {k: v for k, v in example["Cluster"].items() if k != "RedisPasswordFile"}
    s3 = {**example["Tus"]["S3"], "Endpoint": seaweed.endpoint, "Bucket": seaweed.bucket, "SecretKeyFile": str(secret)}
    return {"Cluster": {**cluster, "Redis": redis_server.url}, "Lua": example["Lua"],
            "Tus": {**example["Tus"], "S3": s3, "KeepAfterImport": True}}


@pytest.fixture
def stack(tmp_path: Path, gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,
          seaweed: SeaweedServer) -> Iterator[Stack]:
    settings = _example_settings(tmp_path, redis_server, seaweed)
    main = (EXAMPLE / "lua" / "main.lua").read_text()
    gateways = {name: gateway_factory({**settings, "ExtraConfig": {"Replica": name}}, {"main.lua": main},
                                      register_modality=None, start=False)
                for name in REPLICAS}
    with ThreadPoolExecutor(len(gateways)) as pool:  # together: ~4 s instead of ~11 s one after the other
        list(pool.map(lambda g: g.start(), gateways.values()))
    lb = NginxBalancer(tmp_path / "nginx", [g.http_port for g in gateways.values()], example=DEPLOY_NGINX_CONF).start()
    try:
        yield Stack(gateways, lb)
    finally:
        lb.stop()


def test_the_example_tuspy_patches_land_on_three_replicas_behind_its_nginx(
        tmp_path: Path, stack: Stack, seaweed: SeaweedServer, orthanc: OrthancServer, dicom_samples: Any) -> None:
    ready = requests.get(stack.lb.url + "/dicomproxy/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    # the compose healthcheck (what nginx's depends_on waits for) passes against a replica as written
    check = yaml.safe_load((EXAMPLE / "docker-compose.yml").read_text())["services"]["gateway1"]["healthcheck"]
    cmd = [sys.executable, *check["test"][2:]]
    cmd[-1] = cmd[-1].replace("http://127.0.0.1:8080", stack.gateways["gateway1"].url)
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    pid = "DEPLOYPY-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 1800)  # ~6.2 MiB: 1 MiB PATCHes, S3 parts of 8 MiB
    payload = path.read_bytes()
    uploader = tus_client.TusClient(stack.lb.url + "/files/").uploader(str(path), chunk_size=MIB,
                                                                     metadata={"filename": path.name})
    uploader.set_url(uploader.create_url())
    assert urlsplit(uploader.url).port == stack.lb.port  # the Location names the balancer
    said = []
    while uploader.offset < len(payload):
        uploader.upload_chunk()
        said.append(uploader.request.response_headers["x-served-by"])  # lua/main.lua's onHttpResponse
    upload_path = urlsplit(uploader.url).path
    logged = stack.served_all("PATCH", upload_path, len(said))
    assert logged == said and len(said) >= 6  # nginx and the replicas agree on who served each PATCH
    assert set(said) == set(REPLICAS), said  # round robin: every replica took some
    assert seaweed.get(f"tus/{_object_id(uploader.url)}") == payload  # byte-identical in S3
    _check_stored_once(orthanc, seaweed, uploader.url, payload, pid, *stack.gateways.values())


TUS_JS_THROUGH = """
const tus = require('tus-js-client'); const fs = require('fs');
const [endpoint, file] = process.argv.slice(1);
const data = fs.readFileSync(file);
const up = new tus.Upload(data, {endpoint, chunkSize: 1024 * 1024, metadata: {filename: 'js.dcm'},
  uploadSize: data.length,
  onAfterResponse: (req, res) => {
    if (req.getMethod() === 'PATCH') console.log('PATCH ' + res.getHeader('X-Served-By')); },
  onError: e => { console.error(String(e)); process.exit(1); },
  onSuccess: () => { console.log('URL ' + up.url); process.exit(0); }});
up.start();
"""


def test_the_example_tus_js_client_upload_is_shared_by_the_replicas_and_imported_once(
        tmp_path: Path, stack: Stack, seaweed: SeaweedServer, orthanc: OrthancServer, dicom_samples: Any) -> None:
    pid = "DEPLOYJS-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 1500)  # ~4.3 MiB: five PATCHes
    payload = path.read_bytes()
    out = run_node(TUS_JS_THROUGH, stack.lb.url + "/files/", str(path), timeout=60).stdout.split("\n")
    url = next(line[4:] for line in out if line.startswith("URL "))
    said = [line[6:] for line in out if line.startswith("PATCH ")]
    assert urlsplit(url).port == stack.lb.port
    assert stack.served_all("PATCH", urlsplit(url).path, len(said)) == said and len(said) == 5
    assert len(set(said)) >= 2, said
    assert seaweed.get(f"tus/{_object_id(url)}") == payload
    _check_stored_once(orthanc, seaweed, url, payload, pid, *stack.gateways.values())


def test_an_sse_client_through_the_example_nginx_sees_what_another_replica_raised(
        tmp_path: Path, stack: Stack, dicom_samples: Any) -> None:
    stream = requests.get(stack.lb.url + "/dicomproxy/notifications/stream", stream=True, timeout=30)
    try:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        listener = stream.headers["X-Served-By"]  # the replica nginx gave the stream to
        assert stack.gateways[listener].metric("dicomproxy_notification_streams") == 1
        raiser = next(name for name in REPLICAS if name != listener)
        lines = stream.iter_lines(decode_unicode=True)

        def first_upload_event() -> dict[str, Any]:
            for line in lines:
                if line.startswith("data: ") and (event := json.loads(line[6:]))["title"] == "Upload received":
                    return dict(event)
            raise AssertionError("the stream ended")

        with ThreadPoolExecutor(1) as pool:
            seen = pool.submit(first_upload_event)
            # a small upload straight to another replica: its onTusFileComplete (lua/main.lua) raises it
            path = _dicom(tmp_path, dicom_samples, "DEPLOYSSE-" + uuid.uuid4().hex[:8], 64)
            tus_client.TusClient(stack.gateways[raiser].url + "/files/").uploader(
                str(path), chunk_size=MIB, metadata={"filename": path.name}).upload()
            event = seen.result(timeout=20)
        assert event["kind"] == "script" and event["body"].endswith(f" on {raiser}")
        assert event["body"].startswith(path.name)
    finally:
        stream.close()


def test_a_large_checksummed_patch_holds_about_one_part_in_memory(tmp_path: Path, single: GatewayProcess,
                                                                  seaweed: SeaweedServer) -> None:
    """Staged in an anonymous local file, then replayed into parts: RSS grows by about one part, as
    an unchecked PATCH; the cost is the local write and read back, measured against one here."""
    import base64
    import hashlib

    size = 48 * MIB
    path = tmp_path / "sum.bin"
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    digest = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    warm = _create(single, 6 * MIB, "warm.bin")  # the first PATCH opens the S3 connections: not measured
    assert requests.patch(_on(single, warm), data=os.urandom(6 * MIB), timeout=60, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}).status_code == 204
    seconds = {}
    for checked in (True, False):  # checksummed first: VmHWM is a high-water mark
        url = _create(single, size, "sum.bin")
        peak_before = _peak_rss(single)
        cpu_before = _cpu_seconds(single)
        extra = {"Upload-Checksum": f"sha256 {digest}"} if checked else {}
        t0 = time.monotonic()
        with open(path, "rb") as body:
            r = requests.patch(_on(single, url), data=body, timeout=300, headers={
                **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(size), **extra})
        seconds[checked] = (time.monotonic() - t0, _cpu_seconds(single) - cpu_before)
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(size), r.text
        growth = _peak_rss(single) - peak_before
        print(f"{'checksummed' if checked else 'unchecked'} {size >> 20} MiB PATCH: peak RSS growth "
              f"{growth / MIB:.1f} MiB, {seconds[checked][0]:.2f} s wall, {seconds[checked][1]:.2f} s CPU")
        assert growth < 40 * MIB, growth  # a PATCH kept in memory until verified would add 48 MiB or more
        assert _parts(seaweed, url, prefix="one/") == 0
        assert seaweed.get("one/" + _object_id(url)) == path.read_bytes()
    print(f"checksummed / unchecked: wall x{seconds[True][0] / seconds[False][0]:.2f}, "
          f"CPU x{seconds[True][1] / max(seconds[False][1], 0.01):.2f}")


def test_two_replicas_sweep_an_expired_upload_once(gateway_factory: Callable[..., GatewayProcess],
                                                   redis_server: RedisServer, seaweed: SeaweedServer) -> None:
    settings = {
        "Cluster": {"Redis": redis_server.url, "LockLeaseSeconds": 2},
        "Tus": {"Store": "s3", "ExpireAfter": "00:00:02", "SweepIntervalSeconds": 0.3,
                "S3": {"Bucket": seaweed.bucket, "Prefix": "tus", "Endpoint": seaweed.endpoint,
                       "AccessKey": "test", "SecretKey": "test", "PartSizeMB": 5}},
    }
    a, b = gateway_factory(settings), gateway_factory(settings)
    url = _create(a, 10 * MIB, "stale.bin")
    r = requests.patch(_on(b, url), data=b"s" * 1000, timeout=30, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 204 and r.headers["Upload-Expires"].endswith(" GMT")
    oid = _object_id(url)
    assert f"tus/{oid}.part" in seaweed.keys()
    wait_until(lambda: not [k for k in seaweed.keys() if oid in k], timeout=20, what="the sweep to remove the upload")
    assert _parts(seaweed, url) == 0  # the multipart upload is aborted (NoSuchUpload)
    removed = f"tus: expired upload {urlsplit(url).path.rsplit('/', 1)[-1]} removed from S3"
    wait_until(lambda: removed in a.log_text() + b.log_text(), timeout=10, what="the sweep's log line")
    assert (a.log_text() + b.log_text()).count(removed) == 1  # one replica swept it
    assert requests.head(_on(a, url), headers=TUS, timeout=10).status_code == 404
