"""Quotas of Tus:Store s3 for the whole cluster (dicomproxy/tus/s3quota.py): two replicas on one
SeaweedFS bucket and one redis-server answer Tus:MaxUploadsPerUser and Tus:MaxStorageGB as one
file-store gateway answers them (same statuses, bodies, Retry-After), and the recount from the
bucket (Tus:S3:QuotaReconcileSeconds) gives back what the bucket no longer holds.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from tusclient import client as tus_client

from tests.e2e.test_tus_replicas import (  # noqa: F401
    _dicom,
    _imported,
    _object_id,
    _on,
    _taken_over_then_marker_put_back,
    redis_server,
    seaweed,
)
from tests.peers import GatewayProcess, OrthancServer, RedisServer, SeaweedServer, wait_until

TUS = {"Tus-Resumable": "1.0.0"}
KIB16 = 16 / (1024 * 1024)  # Tus:MaxStorageGB of exactly 16 384 bytes


def _s3(redis: RedisServer | None, weed: SeaweedServer, **tus: Any) -> dict[str, Any]:
    s3 = {"Bucket": weed.bucket, "Prefix": "tus", "Endpoint": weed.endpoint, "AccessKey": "test",
          "SecretKey": "test", "PartSizeMB": 5, "QuotaReconcileSeconds": tus.pop("reconcile", 60)}
    out: dict[str, Any] = {"Tus": {"Store": "s3", "KeepAfterImport": True, "S3": s3, **tus}}
    if redis is not None:
        out["Cluster"] = {"Redis": redis.url, "LockLeaseSeconds": 2}
    return out


def _post(gw: GatewayProcess, length: int) -> requests.Response:
    return requests.post(gw.url + "/files/", headers={**TUS, "Upload-Length": str(length)}, timeout=10)


def _patch(gw: GatewayProcess, location: str, data: bytes) -> requests.Response:
    return requests.patch(_on(gw, location), data=data, timeout=10, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})


def _delete(gw: GatewayProcess, location: str) -> requests.Response:
    return requests.delete(_on(gw, location), headers=TUS, timeout=10)


def _answers(rs: list[requests.Response]) -> list[tuple[int, str, str | None]]:
    return [(r.status_code, r.text, r.headers.get("Retry-After")) for r in rs]


def test_max_uploads_per_user_counts_both_replicas_as_the_file_store_counts_its_folder(
        gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer) -> None:  # noqa: F811
    a = gateway_factory(_s3(redis_server, seaweed, MaxUploadsPerUser=2))
    b = gateway_factory(_s3(redis_server, seaweed, MaxUploadsPerUser=2))
    f = gateway_factory({"Tus": {"MaxUploadsPerUser": 2, "KeepAfterImport": True}})

    def run(first: GatewayProcess, other: GatewayProcess) -> list[requests.Response]:
        made = [_post(first, 10), _post(first, 10)]
        out = [*made, _post(other, 10)]  # the 3rd, on the OTHER replica
        out.append(_patch(other, made[0].headers["Location"], b"x" * 10))  # one finishes ...
        out += [_post(other, 10), _post(first, 10)]  # ... one more fits, then none
        out.append(_delete(first, made[1].headers["Location"]))  # one is terminated ...
        out += [_post(other, 10), _post(first, 10)]  # ... one more fits, then none
        return out

    s3, fs = run(a, b), run(f, f)
    assert [r.status_code for r in s3] == [201, 201, 429, 204, 201, 429, 204, 201, 429]
    assert _answers(s3) == _answers(fs)  # the file store's statuses, bodies and headers
    assert s3[2].text == "ERR_TOO_MANY_UPLOADS: too many unfinished uploads; finish or delete some first\n"
    assert "Tus:MaxUploadsPerUser = 2, whole cluster" in b.log_text()


def test_max_storage_is_reserved_at_creation_for_every_replica(
        gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer) -> None:  # noqa: F811
    a = gateway_factory(_s3(redis_server, seaweed, MaxStorageGB=KIB16))
    b = gateway_factory(_s3(redis_server, seaweed, MaxStorageGB=KIB16))
    f = gateway_factory({"Tus": {"MaxStorageGB": KIB16, "KeepAfterImport": True}})

    def run(one: GatewayProcess, two: GatewayProcess) -> list[requests.Response]:
        first = _post(one, 10_000)
        out = [first, _patch(two, first.headers["Location"], b"y" * 10_000)]  # stored (not DICOM: kept)
        out += [_post(two, 7_000), _post(one, 6_000)]  # 10 000 + 7 000 > 16 384; 6 000 fits
        return out

    s3, fs = run(a, b), run(f, f)
    assert [r.status_code for r in s3] == [201, 204, 507, 201]
    assert _answers(s3) == _answers(fs)
    assert s3[2].text == "ERR_STORAGE_FULL: the upload storage is full; retry later\n"
    assert s3[2].headers["Retry-After"] == "60"
    # Where the stores differ on purpose: S3 reserves the declared 6 000 bytes at creation (a part is
    # sent whole, never cut short), the file store counts bytes as they are written.
    assert _post(b, 1_000).status_code == 507 and _post(f, 1_000).status_code == 201
    assert _delete(b, s3[3].headers["Location"]).status_code == 204  # terminated: its bytes are free
    assert _post(a, 6_000).status_code == 201
    assert "Tus:MaxStorageGB" in b.log_text() and "whole cluster" in b.log_text()


def test_the_recount_gives_back_what_the_bucket_no_longer_holds(
        gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer) -> None:  # noqa: F811
    settings = _s3(redis_server, seaweed, MaxStorageGB=KIB16, reconcile=1)
    a, b = gateway_factory(settings), gateway_factory(settings)
    s3 = seaweed.client()
    held = _post(a, 10_000)
    assert held.status_code == 201 and _post(b, 10_000).status_code == 507
    # the bucket's lifecycle rule aborts the multipart upload (its .info stays): nothing told the count
    upload = urlsplit(held.headers["Location"]).path.rsplit("/", 1)[-1]
    oid, _, multipart = upload.rpartition("+")
    s3.abort_multipart_upload(Bucket=seaweed.bucket, Key=f"tus/{oid}", UploadId=multipart)
    again = wait_until(lambda: (r := _post(b, 10_000)).status_code == 201 and r, timeout=20,
                       what="the space of the aborted upload given back by a recount")
    # its .info deleted by hand (a replica killed mid-terminate leaves the same count behind)
    oid2 = _object_id(again.headers["Location"])
    s3.delete_object(Bucket=seaweed.bucket, Key=f"tus/{oid2}.info")
    wait_until(lambda: _post(a, 10_000).status_code == 201, timeout=20,
               what="the space of the deleted upload given back by a recount")
    logs = a.log_text() + b.log_text()
    assert "S3 upload quota recounted from the bucket" in logs


def test_without_redis_one_replica_counts_in_memory_and_recounts_too(
        gateway_factory: Callable[..., GatewayProcess], seaweed: SeaweedServer) -> None:  # noqa: F811
    gw = gateway_factory(_s3(None, seaweed, MaxUploadsPerUser=1, reconcile=1))
    first = _post(gw, 10)
    refused = _post(gw, 10)
    assert (first.status_code, refused.status_code) == (201, 429)
    assert refused.text.startswith("ERR_TOO_MANY_UPLOADS:")
    seaweed.client().delete_object(Bucket=seaweed.bucket, Key=f"tus/{_object_id(first.headers['Location'])}.info")
    wait_until(lambda: _post(gw, 10).status_code == 201, timeout=20, what="the count recounted from the bucket")


def test_a_running_replica_hands_over_a_completion_a_killed_one_left_pending(
        tmp_path: Path, gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer, orthanc: OrthancServer, dicom_samples: Any) -> None:  # noqa: F811
    settings = _s3(redis_server, seaweed, reconcile=1)
    a, b = gateway_factory(settings), gateway_factory(settings)  # both running before the marker exists
    pid = "S3QPEND-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 300)
    payload = path.read_bytes()
    # A imports nothing; then A killed between the last byte and the hand-over: the marker is there,
    # A is gone (-9)
    upload, oid = _taken_over_then_marker_put_back(a, seaweed, path)
    a.kill9()
    # B, running since before, finds it in a recount round (no restart) and imports it, once
    ids = wait_until(lambda: _imported(orthanc, pid), timeout=60, what="the upload imported by B")
    assert len(ids) == 1 and orthanc.rest_get(f"/instances/{ids[0]}/file") == payload
    assert f"tus: upload {upload} finished without its completion handed over" in b.log_text()
    wait_until(lambda: f"tus/{oid}.pending" not in seaweed.keys(), timeout=10, what="the marker cleared by B")


class _Silent:
    """A TCP server that accepts and never answers: a hook's ``HttpGet`` to it hangs (``seen`` once it
    connected), so a replica can be killed while it holds an upload's hand-over."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hang"
        self.seen = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.seen.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[_Silent]:
    server = _Silent()
    yield server
    server.close()


def test_a_replica_killed_during_the_hand_over_is_relieved_by_a_running_one(
        tmp_path: Path, gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer, orthanc: OrthancServer, dicom_samples: Any, silent: _Silent) -> None:  # noqa: F811
    settings = _s3(redis_server, seaweed, reconcile=1)
    a = gateway_factory({**settings, "Lua": {"TimeoutMs": 120_000}})
    b = gateway_factory(settings)
    pid = "S3QKILL-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 300)
    payload = path.read_bytes()
    # A's hook hangs inside the hand-over (its upload lock held, the .pending marker in the bucket)
    a.write_script("main.lua", f"function onTusFileComplete(metadata) HttpGet('{silent.url}') return true end\n")
    a.wait_for_log("main.lua", timeout=10)
    uploader = tus_client.TusClient(a.url + "/files/").uploader(str(path), chunk_size=200_000)
    uploader.upload()
    upload = urlsplit(uploader.url).path.rsplit("/", 1)[-1]
    oid = _object_id(uploader.url)
    assert silent.seen.wait(20), "A's hook never called out"
    assert f"tus/{oid}.pending" in seaweed.keys()
    # recount rounds run meanwhile (each on whichever replica takes the round's lease) and leave the
    # marker alone: its lock is A's, a hand-over under way
    def rounds() -> int:
        return sum(gw.log_text().count("S3 upload quota recounted") for gw in (a, b))
    before = rounds()
    wait_until(lambda: rounds() >= before + 2, timeout=20, what="two recount rounds while A holds the hand-over")
    for gw in (a, b):
        assert f"tus: upload {upload} finished without its completion handed over" not in gw.log_text()
    a.kill9()
    # A's lock lease (2 s) runs out; B, running since before, takes the marker in a later round
    ids = wait_until(lambda: _imported(orthanc, pid), timeout=60, what="the upload imported by B")
    assert len(ids) == 1 and orthanc.rest_get(f"/instances/{ids[0]}/file") == payload
    assert f"tus: upload {upload} finished without its completion handed over" in b.log_text()
    wait_until(lambda: f"tus/{oid}.pending" not in seaweed.keys(), timeout=10, what="the marker cleared by B")


def _partial(gw: GatewayProcess, data: bytes) -> str:
    r = requests.post(gw.url + "/files/", timeout=10, headers={
        **TUS, "Upload-Length": str(len(data)), "Upload-Concat": "partial"})
    assert r.status_code == 201, r.text
    assert _patch(gw, r.headers["Location"], data).status_code == 204
    return urlsplit(r.headers["Location"]).path


def _final(gw: GatewayProcess, paths: list[str]) -> requests.Response:
    return requests.post(gw.url + "/files/", headers={**TUS, "Upload-Concat": "final;" + " ".join(paths)},
                         timeout=10)


def test_a_final_upload_reserves_its_bytes_as_the_file_stores_concatenation(
        gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer) -> None:  # noqa: F811
    limits = {"MaxStorageGB": KIB16, "MaxUploadsPerUser": 2}
    a = gateway_factory(_s3(redis_server, seaweed, **limits))
    b = gateway_factory(_s3(redis_server, seaweed, **limits))
    f = gateway_factory({"Tus": {**limits, "KeepAfterImport": True}})

    def run(one: GatewayProcess, two: GatewayProcess) -> list[requests.Response]:
        small = [_partial(one, b"p" * 3000), _partial(two, b"q" * 3000)]  # finished: not counted as open
        fits = _final(two, small)  # 6 000 + 6 000 <= 16 384; a final upload is not an unfinished one
        big = [_partial(one, b"r" * 1500), _partial(two, b"s" * 1500)]
        return [fits, _final(one, small + big)]  # 15 000 + 9 000 > 16 384

    s3, fs = run(a, b), run(f, f)
    assert [r.status_code for r in s3] == [201, 507]
    assert [(r.status_code, r.headers.get("Retry-After")) for r in s3] == \
        [(r.status_code, r.headers.get("Retry-After")) for r in fs]
    assert s3[1].text == fs[1].text


def test_an_expired_upload_gives_its_space_back_when_swept(
        gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer) -> None:  # noqa: F811
    settings = _s3(redis_server, seaweed, MaxStorageGB=KIB16, ExpireAfter=2, SweepIntervalSeconds=0.5,
                   reconcile=3600)  # the sweep frees it, not a recount
    a, b = gateway_factory(settings), gateway_factory(settings)
    held = _post(a, 10_000)
    assert held.status_code == 201 and _post(b, 10_000).status_code == 507
    wait_until(lambda: _post(b, 10_000).status_code == 201, timeout=30, what="the space of the expired upload")
    logs = a.log_text() + b.log_text()
    assert f"expired upload {urlsplit(held.headers['Location']).path.rsplit('/', 1)[-1]} removed" in logs
