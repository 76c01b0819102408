"""Tus:Store s3 has the file store's extensions: checksum, download, expiration, concatenation.

Each test sends the same requests to a file-store TusApp and to an S3TusApp on a real SeaweedFS
(``weed server -s3``), both under a real uvicorn, and compares what they answer (status,
``ERR_...`` body, headers); then checks what the bucket holds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dicomproxy.config.settings import TusS3Settings
from dicomproxy.tus.redislock import RedisLockManager
from dicomproxy.tus.s3app import S3TusApp
from dicomproxy.tus.s3expiry import SWEEP_LOCK, S3ExpirySweeper
from tests.peers import RedisServer, SeaweedServer, wait_until
from tests.tus.test_support import OCTET, TUS, RawRequest, TusThreadServer, tus_settings, upload_id

MIB = 1024 * 1024
PREFIX = "ext/"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


def s3_settings(weed: SeaweedServer) -> TusS3Settings:
    return TusS3Settings.model_validate({"Bucket": weed.bucket, "Prefix": PREFIX, "Endpoint": weed.endpoint,
                                         "AccessKey": "test", "SecretKey": "test", "PartSizeMB": 5})


class S3ThreadServer(TusThreadServer):
    """:class:`TusThreadServer` with the S3 app (``Tus:Store`` ``s3``) on ``weed``'s bucket."""

    def __init__(self, folder: Path, weed: SeaweedServer, **settings: Any) -> None:
        super().__init__(folder, store="s3", s3=s3_settings(weed), **settings)
        self.app = S3TusApp(self.settings, self._on_complete, read_timeout=60)
        self.server.config.app = self.app


@pytest.fixture
def pair(tmp_path: Path, seaweed: SeaweedServer) -> Iterator[tuple[TusThreadServer, S3ThreadServer]]:
    file = TusThreadServer(tmp_path / "file", allow_download=True).start()
    s3 = S3ThreadServer(tmp_path / "s3", seaweed, allow_download=True).start()
    yield file, s3
    file.stop()
    s3.stop()


def digest(algo: str, data: bytes) -> str:
    return f"{algo} {base64.b64encode(hashlib.new(algo, data).digest()).decode()}"


def answer(r: requests.Response, *names: str) -> tuple[Any, ...]:
    """What the two stores must agree on: status, body, the named headers."""
    return (r.status_code, r.text, *(r.headers.get(n) for n in names))


def object_key(url: str) -> str:
    return PREFIX + upload_id(url).rpartition("+")[0]


def parts(weed: SeaweedServer, url: str) -> int | None:
    """Parts of the upload's multipart upload (None once it is completed or aborted)."""
    object_id, _, multipart_id = upload_id(url).rpartition("+")
    client = weed.client()
    try:
        res = client.list_parts(Bucket=weed.bucket, Key=PREFIX + object_id, UploadId=multipart_id)
    except client.exceptions.NoSuchUpload:
        return None
    return len(res.get("Parts", ()))


# --------------------------------------------------------------------------- OPTIONS
def test_options_advertise_what_the_file_store_does(pair: tuple[TusThreadServer, S3ThreadServer]) -> None:
    file, s3 = pair
    f, s = (requests.options(t.url, timeout=10) for t in (file, s3))
    assert s.headers["Tus-Checksum-Algorithm"] == f.headers["Tus-Checksum-Algorithm"]
    assert s.headers["Tus-Extension"] == f.headers["Tus-Extension"]
    assert {"checksum", "expiration", "concatenation"} <= set(s.headers["Tus-Extension"].split(","))


# --------------------------------------------------------------------------- checksum
@pytest.mark.parametrize("algo", ["sha1", "md5", "sha256", "sha512"])
def test_checksum_answers_as_the_file_store(pair: tuple[TusThreadServer, S3ThreadServer], seaweed: SeaweedServer,
                                            algo: str) -> None:
    answers: list[list[tuple[Any, ...]]] = []
    for tus in pair:
        url = tus.create(8)
        steps = [
            tus.patch(url, 0, b"abcd", {"Upload-Checksum": digest(algo, b"abcd")}),
            tus.patch(url, 4, b"efgh", {"Upload-Checksum": digest(algo, b"abcd")}),  # wrong digest: 460
            tus.head(url),
            tus.patch(url, 4, b"ef", {"Upload-Checksum": "crc99 AAAA"}),
            tus.patch(url, 4, b"ef", {"Upload-Checksum": algo}),
            tus.patch(url, 4, b"ef", {"Upload-Checksum": f"{algo} not*base64"}),
            tus.head(url),
            tus.patch(url, 4, b"efgh", {"Upload-Checksum": digest(algo, b"efgh")}),
        ]
        answers.append([answer(r, "Upload-Offset", "Content-Type") for r in steps])
        if isinstance(tus, S3ThreadServer):
            assert seaweed.get(object_key(url)) == b"abcdefgh"
    file, s3 = answers
    assert s3 == file
    assert s3[1][:2] == (460, "ERR_CHECKSUM_MISMATCH: checksum mismatch\n") and s3[2][2] == "4"


def test_a_mismatched_patch_across_parts_appends_nothing(pair: tuple[TusThreadServer, S3ThreadServer],
                                                         seaweed: SeaweedServer) -> None:
    """12 MiB after a 1 MiB .part: would be two 5 MiB parts and a new .part; all of it is refused."""
    _, s3 = pair
    head_part, chunk, rest = os.urandom(MIB), os.urandom(12 * MIB), os.urandom(3 * MIB)
    url = s3.create(16 * MIB)
    assert s3.patch(url, 0, head_part).status_code == 204
    part_key = object_key(url) + ".part"
    assert parts(seaweed, url) == 0 and part_key in seaweed.keys()
    bad = s3.patch(url, MIB, chunk, {"Upload-Checksum": digest("sha256", chunk[:-1] + b"!")})
    assert (bad.status_code, bad.text) == (460, "ERR_CHECKSUM_MISMATCH: checksum mismatch\n")
    assert s3.head(url).headers["Upload-Offset"] == str(MIB)
    assert parts(seaweed, url) == 0 and seaweed.get(part_key) == head_part  # the .part is as it was
    good = s3.patch(url, MIB, chunk, {"Upload-Checksum": digest("sha256", chunk)})
    assert good.status_code == 204 and good.headers["Upload-Offset"] == str(13 * MIB)
    assert parts(seaweed, url) == 2  # the staged chunk replayed into 5 MiB parts as an unchecked one would be
    done = s3.patch(url, 13 * MIB, rest, {"Upload-Checksum": digest("md5", rest)})
    assert done.status_code == 204 and done.headers["Upload-Offset"] == str(16 * MIB)
    assert seaweed.get(object_key(url)) == head_part + chunk + rest
    assert not list((s3.folder).glob(".s3chk-*"))  # staged anonymously: nothing left in the folder


def test_a_checksummed_patch_cut_short_appends_nothing(pair: tuple[TusThreadServer, S3ThreadServer],
                                                       seaweed: SeaweedServer) -> None:
    for tus in pair:
        url = tus.create(1_000_000)
        data = b"q" * 1_000_000
        req = RawRequest(tus.port, "PATCH", "/files/" + upload_id(url),
                         {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "1000000",
                          "Upload-Checksum": digest("sha1", data)})
        req.send(data[:400_000])
        time.sleep(0.3)  # the server reads what was sent (nothing to watch: it is staged, not stored)
        req.close()
        # the positive sign: the lock is free again and the offset is what it was
        wait_until(lambda tus=tus, url=url: tus.head(url).headers.get("Upload-Offset") == "0", timeout=10,
                   what="the upload free again at offset 0")
        assert tus.patch(url, 0, data, {"Upload-Checksum": digest("sha1", data)}).status_code == 204
    assert seaweed.get(object_key(url)) == data


def test_creation_with_upload_verifies_the_checksum(pair: tuple[TusThreadServer, S3ThreadServer]) -> None:
    answers = []
    for tus in pair:
        hdrs = {**TUS, "Upload-Length": "6", "Content-Type": OCTET}
        bad = requests.post(tus.url, data=b"abcdef", timeout=10,
                            headers={**hdrs, "Upload-Checksum": digest("sha1", b"nope")})
        good = requests.post(tus.url, data=b"abcdef", timeout=10,
                             headers={**hdrs, "Upload-Checksum": digest("sha1", b"abcdef")})
        answers.append([answer(r, "Upload-Offset") for r in (bad, good)]
                       + [tus.head(bad.headers["Location"]).headers["Upload-Offset"]])
    assert answers[0] == answers[1] and answers[1][0][0] == 460 and answers[1][2] == "0"


# --------------------------------------------------------------------------- download
def test_download_answers_as_the_file_store(pair: tuple[TusThreadServer, S3ThreadServer]) -> None:
    names = ("Content-Type", "Content-Disposition", "Content-Length")
    answers = []
    for tus in pair:
        url = tus.create(6, {"Upload-Metadata": "filename eC5odG1s,filetype dGV4dC9odG1s"})  # x.html, text/html
        empty = requests.get(url, timeout=10)
        tus.patch(url, 0, b"<b>hi!")
        full = requests.get(url, timeout=10)
        answers.append([answer(r, *names) for r in (empty, full)])
        assert full.content == b"<b>hi!"
    assert answers[1] == answers[0]
    assert answers[1][1][:2] == (200, "<b>hi!") and answers[1][1][3].startswith("attachment")  # never inline


def test_download_of_a_large_upload_streams_and_an_unfinished_one_is_refused(
        pair: tuple[TusThreadServer, S3ThreadServer]) -> None:
    _, s3 = pair
    data = os.urandom(11 * MIB + 17)
    url = s3.create(len(data), {"Upload-Metadata": "filetype " + base64.b64encode(b"image/png").decode()})
    s3.patch(url, 0, data[:MIB])
    r = requests.get(url, timeout=10)  # the file store streams what it has; S3 has no object before completion
    assert (r.status_code, r.text) == (400, "ERR_INCOMPLETE_UPLOAD: cannot stream non-finished upload\n")
    s3.patch(url, MIB, data[MIB:])
    with requests.get(url, timeout=30, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
        assert r.headers["Content-Type"] == "image/png" and r.headers["Content-Disposition"] == "inline"
        pieces = list(r.iter_content(MIB))
    assert b"".join(pieces) == data


def test_download_off_is_405_as_the_file_store(tmp_path: Path, seaweed: SeaweedServer) -> None:
    file = TusThreadServer(tmp_path / "f").start()
    s3 = S3ThreadServer(tmp_path / "s", seaweed).start()
    try:
        got = [answer(requests.get(t.create(1), timeout=10), "Allow") for t in (file, s3)]
    finally:
        file.stop()
        s3.stop()
    assert got[0] == got[1] and got[1][0] == 405


# --------------------------------------------------------------------------- expiration
def test_upload_expires_headers_as_the_file_store(pair: tuple[TusThreadServer, S3ThreadServer]) -> None:
    seen = []
    for tus in pair:
        post = requests.post(tus.url, headers={**TUS, "Upload-Length": "4"}, timeout=10)
        url = post.headers["Location"]
        patch = tus.patch(url, 0, b"ab")
        head = tus.head(url)
        done = tus.patch(url, 2, b"cd")
        seen.append([("Upload-Expires" in r.headers) for r in (post, patch, head, done, tus.head(url))])
        expires = time.mktime(time.strptime(head.headers["Upload-Expires"], "%a, %d %b %Y %H:%M:%S GMT"))
        assert abs(expires - time.timezone - (time.time() + 86400)) < 10  # Tus:ExpireAfter from the last PATCH
    assert seen[0] == seen[1] == [True, True, True, False, False]  # finished uploads do not expire


def test_an_expired_upload_answers_410_and_is_removed(tmp_path: Path, seaweed: SeaweedServer) -> None:
    file = TusThreadServer(tmp_path / "f", expire_after=2).start()
    s3 = S3ThreadServer(tmp_path / "s", seaweed, expire_after=2).start()
    try:
        urls = [t.create(10) for t in (file, s3)]
        for t, url in zip((file, s3), urls, strict=True):
            t.patch(url, 0, b"abc")
        # (a Response with a 4XX status is falsy: hand wait_until a list)
        got = [wait_until(lambda t=t, url=url: (r := t.head(url)).status_code == 410 and [r], timeout=15,
                          what="the upload expired")[0] for t, url in zip((file, s3), urls, strict=True)]
        again = [t.patch(url, 3, b"d") for t, url in zip((file, s3), urls, strict=True)]
    finally:
        file.stop()
        s3.stop()
    assert [answer(r) for r in got] == [(410, "")] * 2  # HEAD: no body
    assert answer(again[0]) == answer(again[1]) and again[1].status_code == 404  # removed on the 410
    assert not [k for k in seaweed.keys() if k.startswith(object_key(urls[1]))]


async def _sweeper(weed: SeaweedServer, folder: Path, redis_url: str | None) -> tuple[S3TusApp, S3ExpirySweeper]:
    settings = tus_settings(folder, store="s3", s3=s3_settings(weed), expire_after=3600)
    locks = RedisLockManager(redis_url, lease=2) if redis_url else None
    app = S3TusApp(settings, redis_locks=locks)
    await app.startup(recover=False)
    return app, S3ExpirySweeper(app, settings.expire_after, settings.sweep_interval)


def test_the_sweep_removes_expired_unfinished_uploads_one_replica_at_a_time(
        tmp_path: Path, seaweed: SeaweedServer) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    tus = S3ThreadServer(tmp_path / "s3", seaweed).start()
    try:
        stale = tus.create(8 * MIB)
        tus.patch(stale, 0, os.urandom(6 * MIB))  # one part and a .part
        finished = tus.create(3)
        tus.patch(finished, 0, b"abc")
        deferred = tus.create(headers={"Upload-Defer-Length": "1"})
        partial = tus.create(2, {"Upload-Concat": "partial"})
        tus.patch(partial, 0, b"pp")  # finished, but only an ingredient: partials expire all the same

        async def main() -> tuple[Any, ...]:
            (app_a, a), (app_b, b) = [await _sweeper(seaweed, tmp_path / n, redis.url) for n in ("a", "b")]
            try:
                assert await a.sweep() == []  # nothing idle for an hour yet
                held = await app_b._try_lock(SWEEP_LOCK)  # replica B is sweeping
                skipped = await a.sweep(now=time.time() + 7200)
                await held.release()
                removed = await a.sweep(now=time.time() + 7200)
                return skipped, removed
            finally:
                await app_a.aclose()
                await app_b.aclose()

        skipped, removed = asyncio.run(main())
    finally:
        tus.stop()
        redis.stop()
    assert skipped is None
    # (the bucket is the module's: other tests' unfinished uploads go too)
    assert {upload_id(u) for u in (stale, deferred, partial)} <= set(removed)
    assert upload_id(finished) not in removed
    keys = seaweed.keys()
    assert not [k for k in keys if any(k.startswith(object_key(u)) for u in (stale, deferred, partial))]
    assert parts(seaweed, stale) is None  # the multipart upload is aborted
    assert seaweed.get(object_key(finished)) == b"abc"  # finished uploads are kept


# --------------------------------------------------------------------------- concatenation
def _concat_steps(tus: TusThreadServer, a_data: bytes, b_data: bytes) -> tuple[list[tuple[Any, ...]], str]:
    a = tus.create(len(a_data), {"Upload-Concat": "partial"})
    b = tus.create(len(b_data), {"Upload-Concat": "partial", "Upload-Metadata": "filename Yg=="})
    steps = [tus.head(a)]
    tus.patch(a, 0, a_data)
    steps.append(requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{a} {b}"}, timeout=10))
    tus.patch(b, 0, b_data)
    steps.append(requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{a} {a}"}, timeout=10))
    steps.append(requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{a} {b}", "Content-Type": OCTET},
                               data=b"x", timeout=10))
    whole = tus.create(1)
    tus.patch(whole, 0, b"w")
    steps.append(requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{whole}"}, timeout=10))
    rel_b = "/files/" + upload_id(b)
    final = requests.post(tus.url, headers={**TUS, "Upload-Concat": f"final;{a} {rel_b}",
                                            "Upload-Metadata": "filename YWIuemlw"}, timeout=30)  # ab.zip
    url = final.headers["Location"]
    steps += [final, tus.head(url), tus.patch(url, len(a_data) + len(b_data), b"z"), requests.get(url, timeout=30)]
    names = ("Upload-Offset", "Upload-Length", "Content-Length")
    out = [(*answer(r, *names), "Upload-Expires" in r.headers) for r in steps]
    head = steps[-3]
    out.append((head.headers["Upload-Concat"] == f"final;{a} {b}",))
    return out, url


@pytest.mark.parametrize("sizes", [(3, 4), (5 * MIB, 5 * MIB + 3)], ids=["download", "part-copy"])
def test_concatenation_answers_as_the_file_store(pair: tuple[TusThreadServer, S3ThreadServer],
                                                  seaweed: SeaweedServer, sizes: tuple[int, int],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Small partials are streamed through the gateway; partials of 5 MiB or more are copied by the
    bucket (UploadPartCopy), each one part of the final upload, as tusd's s3store does."""
    a_data, b_data = os.urandom(sizes[0]), os.urandom(sizes[1])
    file, s3 = pair
    (f_steps, f_url), (s_steps, s_url) = (_concat_steps(t, a_data, b_data) for t in (file, s3))
    assert s_steps == f_steps
    assert s_steps[-3][0] == 403 and s_steps[-2][0] == 200 and s_steps[-1] == (True,)  # PATCH; GET; HEAD's list
    assert seaweed.get(object_key(s_url)) == a_data + b_data
    how = "by UploadPartCopy" if min(sizes) >= 5 * MIB else "through this replica"
    assert f"tus: upload {upload_id(s_url)}: 2 partial uploads concatenated {how}" in caplog.text
    assert (file.folder / upload_id(f_url)).read_bytes() == a_data + b_data
    final = wait_until(lambda: [u for u in s3.completed if u.id == upload_id(s_url)], timeout=20,
                       what="the final upload handed over")
    assert len(final) == 1 and final[0].metadata == {"filename": "ab.zip"} and final[0].is_final
    assert len(s3.completed) == 2 and not [u for u in s3.completed if u.is_partial]  # `whole` and the final
    assert not [k for k in seaweed.keys() if k.endswith(".pending")]
