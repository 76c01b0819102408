"""Bounded uploads through the whole stack (issue 10, item 11): the gateway process in front of a
real Orthanc; tuspy and raw HTTP.

``Tus:MaxSize`` is finite by default; a full folder (``Tus:MaxStorageGB``) answers 507
``ERR_STORAGE_FULL`` in tusd's format and keeps what it stored, so the client resumes later;
unfinished uploads per user are capped; 40 stalled PATCHes hold no more than the buffer budget;
a concatenation that repeats a partial is refused before a byte is written; a zip bomb, and a
ZIP over the ratio cap, are refused and nothing of them reaches Orthanc.
"""

from __future__ import annotations

import base64
import io
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from tests.observe import RssSampler
from tests.peers import GatewayProcess, OrthancServer, wait_until
from tests.tus.test_support import OCTET, TUS, RawRequest, upload_id, wait_file_size

GatewayFactory = Callable[..., GatewayProcess]
MIB = 1024 * 1024


def create(gw: GatewayProcess, headers: dict[str, str]) -> requests.Response:
    return requests.post(gw.url + "/files/", headers={**TUS, **headers}, timeout=10)


def patch(url: str, offset: int, data: bytes, **extra: str) -> requests.Response:
    return requests.patch(url, data=data, timeout=60,
                          headers={**TUS, "Content-Type": OCTET, "Upload-Offset": str(offset), **extra})


def assert_tusd_error(r: requests.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.text.startswith(code + ": ") and r.text.endswith("\n"), r.text
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["Tus-Resumable"] == "1.0.0"


def metric(gw: GatewayProcess, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", gw.get("/dicomproxy/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def wait_failed_import(gw: GatewayProcess) -> dict[str, Any]:
    def failed() -> dict[str, Any]:
        found = [t for t in gw.get("/dicomproxy/tasks").json() if t["kind"] == "tus-import"]
        return next((t for t in found if t["state"] == "failed"), {})

    return wait_until(failed, timeout=60, what="the import to fail")


def import_failed_events(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [n for n in gw.get("/dicomproxy/notifications").json() if n["kind"] == "import.failed"]


def test_max_size_is_finite_by_default(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory()
    r = requests.options(gw.url + "/files/", timeout=10)
    assert r.headers["Tus-Max-Size"] == str(20 * 1024**3)
    assert_tusd_error(create(gw, {"Upload-Length": str(20 * 1024**3 + 1)}), 413, "ERR_MAX_SIZE_EXCEEDED")
    assert create(gw, {"Upload-Length": str(20 * 1024**3)}).status_code == 201


def test_a_full_store_answers_507_keeps_what_fit_and_resumes_once_space_is_freed(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory({"Tus": {"MaxStorageGB": 3 / 1024}})  # 3 MiB
    first = create(gw, {"Upload-Length": str(2 * MIB)}).headers["Location"]
    assert patch(first, 0, os.urandom(2 * MIB)).status_code == 204  # not DICOM: its import fails, it is kept
    # A declared length that does not fit is refused at once, before any byte is sent.
    full = create(gw, {"Upload-Length": str(2 * MIB)})
    assert_tusd_error(full, 507, "ERR_STORAGE_FULL")
    assert int(full.headers["Retry-After"]) > 0
    # A deferred length learns it while sending: what fits is stored, the rest refused.
    data = os.urandom(2 * MIB)
    url = create(gw, {"Upload-Defer-Length": "1"}).headers["Location"]
    assert_tusd_error(patch(url, 0, data), 507, "ERR_STORAGE_FULL")
    offset = int(requests.head(url, headers=TUS, timeout=10).headers["Upload-Offset"])
    assert offset == MIB  # exactly the room that was left
    # tuspy sees the same answer.
    with pytest.raises(TusCommunicationError) as e:
        tus_client.TusClient(gw.url + "/files/").uploader(file_stream=io.BytesIO(b"x" * 100)).upload()
    assert e.value.status_code == 507
    # The first upload is deleted: the same client resumes where it stopped and finishes.
    assert requests.delete(first, headers=TUS, timeout=10).status_code == 204
    r = patch(url, offset, data[offset:], **{"Upload-Length": str(len(data))})
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data))
    assert (gw.data_dir / "tus" / upload_id(url)).read_bytes() == data
    assert "Tus:MaxStorageGB" in gw.log_text()


def test_unfinished_uploads_per_user_are_capped(gateway_factory: GatewayFactory) -> None:
    users = {"alice": "a", "bob": "b"}
    gw = gateway_factory({"Authentication": {"Users": users}, "Tus": {"MaxUploadsPerUser": 2}})
    alice, bob = {"Authorization": _basic("alice", "a")}, {"Authorization": _basic("bob", "b")}
    urls = [create(gw, {**alice, "Upload-Length": "3"}).headers["Location"] for _ in range(2)]
    assert_tusd_error(create(gw, {**alice, "Upload-Length": "3"}), 429, "ERR_TOO_MANY_UPLOADS")
    assert create(gw, {**bob, "Upload-Length": "3"}).status_code == 201  # per user
    assert patch(urls[0], 0, b"abc", **alice).status_code == 204  # finished: no longer counted
    assert create(gw, {**alice, "Upload-Length": "3"}).status_code == 201
    assert_tusd_error(create(gw, {**alice, "Upload-Length": "3"}), 429, "ERR_TOO_MANY_UPLOADS")
    assert requests.delete(urls[1], headers={**TUS, **alice}, timeout=10).status_code == 204
    assert create(gw, {**alice, "Upload-Length": "3"}).status_code == 201
    assert "Tus:MaxUploadsPerUser" in gw.log_text()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_40_stalled_patches_stay_within_the_buffer_budget(gateway_factory: GatewayFactory) -> None:
    """Each client sends 3 MB of an 8 MB PATCH and stops. Before the budget, each request kept its
    3 MB in memory until its read timeout: 40 of them held ~120 MB."""
    budget_mb = 16
    gw = gateway_factory({"Tus": {"WriteBufferMB": budget_mb, "KeepAfterImport": True}})
    assert gw.proc is not None
    warm = create(gw, {"Upload-Length": str(8 * MIB)}).headers["Location"]
    assert patch(warm, 0, os.urandom(8 * MIB)).status_code == 204  # threads and heap warmed up
    chunk = os.urandom(3 * MIB)
    ids = [upload_id(create(gw, {"Upload-Length": str(8 * MIB)}).headers["Location"]) for _ in range(40)]
    requests_: list[RawRequest] = []
    try:
        with RssSampler(gw.proc.pid) as rss:
            for uid in ids:
                req = RawRequest(gw.http_port, "PATCH", f"/files/{uid}", {
                    **TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": str(8 * MIB)})
                requests_.append(req)
                req.send(chunk)
            # The positive sign: every stalled request's 3 MB is on disk (none filled a 4 MB batch).
            for uid in ids:
                wait_file_size(gw.data_dir / "tus" / uid, 3 * MIB, timeout=30)
            wait_until(lambda: metric(gw, "dicomproxy_tus_buffered_bytes") == 0, what="no bytes buffered")
        print(f"RSS growth with 40 stalled PATCHes: {rss.growth_mb:.1f} MB (budget {budget_mb} MB)")
        assert rss.growth_mb < budget_mb + 24, rss.growth_mb  # 120 MB held before
        # The clients are still connected and may go on: one finishes its upload.
        requests_[0].send(os.urandom(5 * MIB))
        status, headers, _ = requests_[0].response()
        assert status == 204 and headers["upload-offset"] == str(8 * MIB)
    finally:
        for req in requests_:
            req.close()


def test_a_concatenation_repeating_a_partial_is_refused_before_a_byte_is_written(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory()
    part = create(gw, {"Upload-Length": str(1280 * 1024), "Upload-Concat": "partial"}).headers["Location"]
    assert patch(part, 0, os.urandom(1280 * 1024)).status_code == 204
    folder = gw.data_dir / "tus"
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    header = "final;" + " ".join([f"/files/{upload_id(part)}"] * 40)  # ~1.7 KB asking for 50 MiB
    r = create(gw, {"Upload-Concat": header})
    assert_tusd_error(r, 400, "ERR_INVALID_CONCAT")
    assert "more than once" in r.text
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == before


def bomb_zip(path: Path, good: bytes, expanded: int) -> None:
    """A study ZIP with one real instance and one DICOM-looking member of zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IM0001.dcm", good)
        with zf.open("IM0002.dcm", "w") as out:
            out.write(b"\0" * 128 + b"DICM")
            for _ in range(expanded // MIB):
                out.write(bytes(MIB))


def test_a_zip_bomb_is_refused_and_nothing_reaches_orthanc(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    gw = gateway_factory()
    good, _ = dicom_samples.make_instance(patient_id="BOMB", patient_name="Zip^Bomb")
    path = tmp_path / "study.zip"
    bomb_zip(path, good, 300 * MIB)
    assert path.stat().st_size < 400_000  # ~300 KB that would expand to 300 MiB
    tus_client.TusClient(gw.url + "/files/").uploader(str(path), metadata={"filename": "study.zip"}).upload()
    failed = wait_failed_import(gw)
    assert "IM0002.dcm" in failed["error"] and "Tus:ZipMaxRatio" in failed["error"]
    event = wait_until(lambda: import_failed_events(gw), what="an import.failed event")[0]
    assert "study.zip" in event["title"] and "Tus:ZipMaxRatio" in event["body"]
    assert fresh_orthanc.instance_count() == 0  # not even the good instance: the ZIP is refused whole
    assert "tus import: batch" not in gw.log_text()  # no STOW-RS batch was sent at all


def test_the_ratio_cap_applies_to_each_member(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    # Generated 1024x1024 images (a repeating gradient) compress about 95:1.
    path, uids = dicom_samples.make_zip(tmp_path / "s.zip", n_instances=2, size=(1024, 1024), patient_id="RATIO")
    strict = gateway_factory({"Tus": {"ZipMaxRatio": 50}})
    tus_client.TusClient(strict.url + "/files/").uploader(str(path), metadata={"filename": "s.zip"}).upload()
    assert "Tus:ZipMaxRatio (50)" in wait_failed_import(strict)["error"]
    assert fresh_orthanc.instance_count() == 0
    default = gateway_factory()  # 100: the same study is imported
    tus_client.TusClient(default.url + "/files/").uploader(str(path), metadata={"filename": "s.zip"}).upload()
    fresh_orthanc.wait_for_instances(2, timeout=60)
    assert fresh_orthanc.sop_instance_uids() == set(uids)
