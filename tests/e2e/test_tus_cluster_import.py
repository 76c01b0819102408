"""TUS imports through the cluster's task queue (Tus:Store s3 + Cluster:Redis): any replica runs
the import, reading the object from the bucket, and one whose replica died runs again elsewhere,
exactly once.

Replica A's upstream is a small forwarding proxy in front of the real Orthanc that holds every
STOW-RS POST without answering: A's import is then provably under way (the proxy saw its POST)
and not finished when A is killed with -9. Replica B, started afterwards on the real Orthanc,
takes the task over once A's lease (``Cluster:TaskLeaseSeconds``) ran out.
"""

from __future__ import annotations

import http.server
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from tusclient import client as tus_client

from tests.e2e.test_tus_replicas import _dicom, _imported, _object_id, redis_server, seaweed  # noqa: F401
from tests.peers import GatewayProcess, OrthancServer, RedisServer, SeaweedServer, wait_until


class _HoldingProxy:
    """Forwards to ``target``; a POST whose path ends in ``/studies`` is read, counted and held."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.stows = 0
        self.stow_seen = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.command == "POST" and self.path.rstrip("/").endswith("/studies"):
                    proxy.stows += 1
                    proxy.stow_seen.set()
                    proxy.release.wait(120)  # never answered while the test runs
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, proxy.target + self.path, data=body, headers=headers,
                                     timeout=30, stream=False)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> _HoldingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def holding(orthanc: OrthancServer) -> Iterator[_HoldingProxy]:
    proxy = _HoldingProxy(orthanc.http_url).start()
    yield proxy
    proxy.stop()


def _settings(redis: RedisServer, weed: SeaweedServer, keep: bool) -> dict[str, Any]:
    return {
        "Cluster": {"Redis": redis.url, "LockLeaseSeconds": 2, "TaskLeaseSeconds": 2},
        "Tus": {"Store": "s3", "KeepAfterImport": keep,
                "S3": {"Bucket": weed.bucket, "Prefix": "tus", "Endpoint": weed.endpoint,
                       "AccessKey": "test", "SecretKey": "test", "PartSizeMB": 5}},
    }


def _import_tasks(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [t for t in gateway.get("/dicomproxy/tasks").json() if t["kind"] == "tus-import"]


def test_a_replica_killed_during_the_import_another_imports_it_once(
        tmp_path: Path, gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer, orthanc: OrthancServer, holding: _HoldingProxy,  # noqa: F811
        dicom_samples: Any) -> None:
    a = gateway_factory({**_settings(redis_server, seaweed, keep=False), "Upstream": {"Url": holding.url}})
    b = gateway_factory(_settings(redis_server, seaweed, keep=False), start=False)
    pid = "CLIMP-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 1700)  # ~5.5 MiB: two parts
    payload = path.read_bytes()
    uploader = tus_client.TusClient(a.url + "/files/").uploader(str(path), chunk_size=2 * 1024 * 1024,
                                                              metadata={"filename": path.name})
    uploader.upload()  # the final PATCH is acknowledged
    oid = _object_id(uploader.url)
    assert holding.stow_seen.wait(30), "A's import never reached its upstream"
    running = wait_until(lambda: [t for t in _import_tasks(a) if t["state"] == "running"], timeout=10,
                         what="the import task running on A")
    task_id = running[0]["id"]
    assert task_id == f"tus-import-{oid}"
    replica_a = running[0]["replica"]
    assert f"tus/{oid}.pending" not in seaweed.keys()  # handed over: the task queue owns it now
    a.kill9()
    b.start()  # its upstream is the real Orthanc; it takes the task over after A's 2 s lease
    done = wait_until(lambda: [t for t in _import_tasks(b) if t["state"] == "done"], timeout=60,
                      what="the import task done on B")
    assert len(_import_tasks(b)) == 1 and done[0]["id"] == task_id
    assert done[0]["replica"] != replica_a and done[0]["restarts"] == 1 and done[0]["attempts"] == 2
    ids = _imported(orthanc, pid)
    assert len(ids) == 1 and orthanc.rest_get(f"/instances/{ids[0]}/file") == payload
    assert holding.stows == 1  # A's only attempt, held; B's went straight to Orthanc
    assert "stopped while it ran" in b.log_text()
    # imported: the object, .info and markers deleted from the bucket; B's local copy removed
    wait_until(lambda: not [k for k in seaweed.keys() if oid in k], timeout=30, what="the upload deleted from S3")
    assert not list((b.data_dir / "tus").glob(".s3-*.tmp"))


def test_a_completion_handed_over_twice_queues_one_import(
        tmp_path: Path, gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer,  # noqa: F811
        seaweed: SeaweedServer, orthanc: OrthancServer, dicom_samples: Any) -> None:  # noqa: F811
    a = gateway_factory(_settings(redis_server, seaweed, keep=True))
    b = gateway_factory(_settings(redis_server, seaweed, keep=True), start=False)
    pid = "CLTWICE-" + uuid.uuid4().hex[:8]
    path = _dicom(tmp_path, dicom_samples, pid, 300)
    uploader = tus_client.TusClient(a.url + "/files/").uploader(str(path), chunk_size=200_000)
    uploader.upload()
    upload = urlsplit(uploader.url).path.rsplit("/", 1)[-1]
    oid = _object_id(uploader.url)
    first = wait_until(lambda: [t for t in _import_tasks(a) if t["state"] == "done"], timeout=60,
                       what="the import done")
    # A killed after submitting the import but before clearing its marker: the marker is back
    seaweed.client().put_object(Bucket=seaweed.bucket, Key=f"tus/{oid}.pending", Body=upload.encode())
    b.start()  # B finds the marker at start-up and hands the upload over again
    b.wait_for_log(f"tus: upload {upload} finished without its completion handed over", timeout=20)
    wait_until(lambda: f"tus/{oid}.pending" not in seaweed.keys(), timeout=20, what="the marker cleared by B")
    b.wait_for_log(f"queued for import as task tus-import-{oid}", timeout=10)
    tasks = _import_tasks(b)
    assert len(tasks) == 1 and tasks[0]["id"] == first[0]["id"] and tasks[0]["attempts"] == 1
    assert tasks[0]["state"] == "done"
    assert len(_imported(orthanc, pid)) == 1
    assert requests.head(b.url + "/files/" + upload, headers={"Tus-Resumable": "1.0.0"}, timeout=10).status_code == 200


def test_s3_patch_header_checks_are_the_file_stores(gateway_factory: Callable[..., GatewayProcess],
                                                    seaweed: SeaweedServer) -> None:  # noqa: F811
    """One helper (headers.patch_headers) checks a PATCH for both stores: same statuses and codes."""
    tus = {"Tus-Resumable": "1.0.0"}
    s3 = gateway_factory({"Tus": {"Store": "s3", "S3": {
        "Bucket": seaweed.bucket, "Prefix": "hdr", "Endpoint": seaweed.endpoint, "AccessKey": "test",
        "SecretKey": "test", "PartSizeMB": 5}}})
    files = gateway_factory({})
    answers = []
    for g in (s3, files):
        r = requests.post(g.url + "/files/", headers={**tus, "Upload-Length": "10"}, timeout=10)
        url = g.url + urlsplit(r.headers["Location"]).path
        deferred = requests.post(g.url + "/files/", headers={**tus, "Upload-Defer-Length": "1"}, timeout=10)
        durl = g.url + urlsplit(deferred.headers["Location"]).path
        octet = {**tus, "Content-Type": "application/offset+octet-stream"}
        cases = [
            (url, {**tus, "Content-Type": "text/plain", "Upload-Offset": "0"}),
            (url, {**octet, "Upload-Offset": "-1"}),
            (url, {**octet}),
            (url, {**octet, "Upload-Offset": "0", "Upload-Length": "10"}),  # not deferred
            (durl, {**octet, "Upload-Offset": "0", "Upload-Length": "x"}),
            (url, {**octet, "Upload-Offset": "3"}),
        ]
        got = []
        for target, headers in cases:
            r = requests.patch(target, data=b"abc", headers=headers, timeout=10)
            got.append((r.status_code, r.text.split(":")[0].strip()))
        answers.append(got)
    assert answers[0] == answers[1], answers
    assert [s for s, _ in answers[0]] == [400, 400, 400, 400, 400, 409]
