"""Real TUS clients against the TUS server: tuspy (Python) and tus-js-client (under node)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from tusclient import client as tus_client

from tests.peers import JS_DIR, run_node
from tests.tus.test_support import TUS, TusThreadServer, completed_ids, read_info, upload_id


@pytest.fixture
def tus(tmp_path: Path) -> Iterator[TusThreadServer]:
    server = TusThreadServer(tmp_path / "uploads").start()
    yield server
    server.stop()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "payload.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    return path


# --------------------------------------------------------------------------- tuspy
def test_tuspy_chunked_with_metadata_and_checksum(tus: TusThreadServer, payload: Path) -> None:
    uploader = tus_client.TusClient(tus.url).uploader(
        str(payload), chunk_size=256 * 1024, metadata={"filename": "payload.bin", "PatientID": "P-1"},
        upload_checksum=True,  # tuspy sends Upload-Checksum: sha1 on every chunk
    )
    uploader.upload()
    uid = upload_id(uploader.url)
    assert (tus.folder / uid).read_bytes() == payload.read_bytes()
    assert read_info(tus.folder, uid)["MetaData"] == {"filename": "payload.bin", "PatientID": "P-1"}
    assert completed_ids(tus, 1) == [uid]
    assert tus.completed[0].metadata["PatientID"] == "P-1"


def test_tuspy_interrupted_and_resumed(tus: TusThreadServer, payload: Path) -> None:
    first = tus_client.TusClient(tus.url).uploader(str(payload), chunk_size=512 * 1024)
    first.upload(stop_at=1024 * 1024)  # the client stops ("crashes") after 1 MB
    assert tus.head(first.url).headers["Upload-Offset"] == str(1024 * 1024)
    assert tus.completed == []
    # A new client resumes from the URL: it asks the server for the offset (HEAD) and goes on.
    second = tus_client.TusClient(tus.url).uploader(str(payload), url=first.url, chunk_size=512 * 1024)
    assert second.offset == 1024 * 1024
    second.upload()
    assert (tus.folder / upload_id(first.url)).read_bytes() == payload.read_bytes()
    assert completed_ids(tus, 1) == [upload_id(first.url)]


def test_tuspy_deferred_length(tus: TusThreadServer, payload: Path) -> None:
    size = payload.stat().st_size
    r = requests.post(tus.url, headers={**TUS, "Upload-Defer-Length": "1"}, timeout=10)
    assert r.status_code == 201
    url = r.headers["Location"]
    # The length is unknown while streaming: tuspy PATCHes without Upload-Length ...
    streaming = tus_client.TusClient(tus.url).uploader(str(payload), url=url, chunk_size=1024 * 1024)
    streaming.upload(stop_at=3 * 1024 * 1024)
    assert tus.head(url).headers["Upload-Defer-Length"] == "1"
    # ... and the last chunk declares it.
    last = tus_client.TusClient(tus.url, headers={"Upload-Length": str(size)}).uploader(
        str(payload), url=url, chunk_size=1024 * 1024)
    last.upload()
    head = tus.head(url)
    assert head.headers["Upload-Length"] == str(size) and head.headers["Upload-Offset"] == str(size)
    assert (tus.folder / upload_id(url)).read_bytes() == payload.read_bytes()
    assert completed_ids(tus, 1) == [upload_id(url)]


def test_tuspy_concatenation(tus: TusThreadServer, payload: Path) -> None:
    data = payload.read_bytes()
    cut = len(data) // 3
    pieces = [data[:cut], data[cut : 2 * cut], data[2 * cut :]]
    urls = []
    for piece in pieces:
        r = requests.post(tus.url, headers={**TUS, "Upload-Length": str(len(piece)), "Upload-Concat": "partial"},
                          timeout=10)
        assert r.status_code == 201
        tus_client.TusClient(tus.url).uploader(file_stream=io.BytesIO(piece), url=r.headers["Location"],
                                               chunk_size=300 * 1024).upload()
        urls.append(r.headers["Location"])
    r = requests.post(tus.url, headers={**TUS, "Upload-Concat": "final;" + " ".join(urls)}, timeout=10)
    assert r.status_code == 201
    final = upload_id(r.headers["Location"])
    assert (tus.folder / final).read_bytes() == data
    assert completed_ids(tus, 1) == [final]


# --------------------------------------------------------------------------- tus-js-client
def node_upload(endpoint: str, path: Path, **opts: object) -> dict[str, object]:
    script = (JS_DIR / "tus_upload.js").read_text()
    proc = run_node(script, endpoint, str(path), json.dumps(opts), timeout=120, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"tus-js-client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    result = json.loads(lines[-1])
    assert result["ok"], result
    return result


def test_tus_js_client_chunked_metadata(tus: TusThreadServer, payload: Path) -> None:
    result = node_upload(tus.url, payload, chunkSize=512 * 1024,
                         metadata={"filename": "payload.bin", "filetype": "application/zip"})
    uid = upload_id(str(result["url"]))
    assert result["chunks"] == 7
    assert (tus.folder / uid).read_bytes() == payload.read_bytes()
    assert read_info(tus.folder, uid)["MetaData"] == {"filename": "payload.bin", "filetype": "application/zip"}
    assert completed_ids(tus, 1) == [uid]


def test_tus_js_client_abort_and_resume(tus: TusThreadServer, payload: Path) -> None:
    result = node_upload(tus.url, payload, chunkSize=512 * 1024, abortAfterChunks=3)
    assert result["resumedFrom"] == 3 * 512 * 1024  # it asked the server (HEAD) and went on
    assert (tus.folder / upload_id(str(result["url"]))).read_bytes() == payload.read_bytes()


def test_tus_js_client_parallel_uploads_concatenation(tus: TusThreadServer, payload: Path) -> None:
    result = node_upload(tus.url, payload, parallelUploads=3, metadata={"filename": "p.bin"})
    uid = upload_id(str(result["url"]))
    info = read_info(tus.folder, uid)
    assert info["IsFinal"] is True and len(info["PartialUploads"]) == 3
    assert (tus.folder / uid).read_bytes() == payload.read_bytes()
    assert completed_ids(tus, 1) == [uid]  # only the final upload is a finished file


def test_tus_js_client_deferred_length(
    tus: TusThreadServer, payload: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomproxy.tus")
    result = node_upload(tus.url, payload, deferLength=True, chunkSize=1024 * 1024)
    uid = upload_id(str(result["url"]))
    assert f"created upload {uid} (size deferred" in caplog.text
    assert read_info(tus.folder, uid)["SizeIsDeferred"] is False
    assert (tus.folder / uid).read_bytes() == payload.read_bytes()
    assert completed_ids(tus, 1) == [uid]
