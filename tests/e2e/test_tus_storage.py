"""Locks across processes (tusd's filelocker protocol), expiration, crash recovery on disk."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests

from dicomproxy.tus.expiry import ExpirySweeper
from dicomproxy.tus.locks import LockManager
from dicomproxy.tus.store import FileStore
from tests.peers import GatewayProcess, wait_until
from tests.tus.test_support import (
    OCTET,
    TUS,
    RawRequest,
    TusProcessServer,
    thread_server,
    upload_id,
)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not us: a lock holder from another process."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def test_lock_held_by_another_live_process_times_out(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    with thread_server(tmp_path / "up", lock_timeout=1.0) as tus:
        url = tus.create(10)
        uid = upload_id(url)
        (tus.folder / f"{uid}.lock").write_text(f"{sleeper.pid}\n")
        t0 = time.monotonic()
        r = tus.head(url)
        assert r.status_code == 500 and r.text == ""  # HEAD: no body
        r = tus.patch(url, 0, b"abc")
        assert r.status_code == 500 and r.text.startswith("ERR_LOCK_TIMEOUT: ")
        assert 1.0 <= time.monotonic() - t0 < 6
        assert (tus.folder / f"{uid}.stop").exists()  # the holder was asked to let go
        assert (tus.folder / f"{uid}.lock").read_text() == f"{sleeper.pid}\n"  # and its lock respected
        assert (tus.folder / uid).read_bytes() == b""


def test_stale_locks_do_not_block(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    with thread_server(tmp_path / "up", lock_timeout=5.0) as tus:
        url = tus.create(10)
        uid = upload_id(url)
        lock = tus.folder / f"{uid}.lock"
        for content in (f"{dead.pid}\n", "garbage\n", ""):
            lock.write_text(content)
            t0 = time.monotonic()
            assert tus.head(url).status_code == 200
            assert time.monotonic() - t0 < 2.5  # not held until the 5 s lock timeout
            assert not lock.exists()
        # A PID that is alive now but started after the lock was written: a reused PID.
        lock.write_text(f"{os.getpid()}\n")
        os.utime(lock, (time.time() - 10 * 86400, time.time() - 10 * 86400))
        assert tus.head(url).status_code == 200


def test_another_process_is_asked_to_release(tmp_path: Path) -> None:
    """Two servers on one folder: a HEAD on one interrupts a stalled PATCH on the other."""
    folder = tmp_path / "shared"
    other = TusProcessServer(folder, tmp_path / "other.log").start()
    try:
        with thread_server(folder) as tus:
            url = tus.create(5_000_000)
            uid = upload_id(url)
            stalled = RawRequest(other.port, "PATCH", f"/files/{uid}",
                                 {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "5000000"})
            try:
                stalled.send(b"z" * 300_000)
                wait_until(lambda: (folder / f"{uid}.lock").exists(), what="the other process to lock")
                head = tus.head(url)  # asks via <id>.stop; the other process polls for it
                assert head.status_code == 200
                assert head.headers["Upload-Offset"] == "300000"
                status, _, body = stalled.response(timeout=10)
                assert status == 400 and body.startswith(b"ERR_UPLOAD_INTERRUPTED: ")
            finally:
                stalled.close()
            assert tus.patch(url, 300_000, b"y" * 4_700_000).status_code == 204
            assert (folder / uid).read_bytes() == b"z" * 300_000 + b"y" * 4_700_000
    finally:
        other.stop()


def test_unverified_checksummed_chunk_is_rolled_back_after_a_crash(tmp_path: Path) -> None:
    with thread_server(tmp_path / "up") as tus:
        url = tus.create(100)
        uid = upload_id(url)
        assert tus.patch(url, 0, b"a" * 10).status_code == 204
        # What a crash in the middle of a PATCH with Upload-Checksum leaves behind.
        (tus.folder / f"{uid}.chk").write_text("10")
        with open(tus.folder / uid, "ab") as f:
            f.write(b"unverified")
        assert tus.head(url).headers["Upload-Offset"] == "10"
        assert (tus.folder / uid).read_bytes() == b"a" * 10
        assert not (tus.folder / f"{uid}.chk").exists()


# --------------------------------------------------------------------------- expiration
def test_upload_expires_header_and_410(tmp_path: Path) -> None:
    with thread_server(tmp_path / "up", expire_after=3) as tus:
        url = tus.create(10)
        r = tus.patch(url, 0, b"abc")
        expires = parsedate_to_datetime(r.headers["Upload-Expires"]).timestamp()
        assert abs(expires - (time.time() + 3)) < 2
        time.sleep(max(0.0, expires - time.time()) + 1.2)
        r = tus.patch(url, 3, b"def")
        assert r.status_code == 410 and r.text.startswith("ERR_UPLOAD_EXPIRED: ")
        assert tus.head(url).status_code == 404  # and it is gone
        assert not (tus.folder / upload_id(url)).exists()


def test_sweep_removes_only_expired_unfinished_uploads(tmp_path: Path) -> None:
    with thread_server(tmp_path / "up") as tus:
        idle = tus.create(10)
        tus.patch(idle, 0, b"abc")
        finished = tus.create(3)
        tus.patch(finished, 0, b"abc")
        partial = tus.create(2, {"Upload-Concat": "partial"})
        tus.patch(partial, 0, b"ab")
        fresh = tus.create(10)

        async def sweep(now: float) -> list[str]:
            # A second LockManager on the folder, as another process would see it.
            sweeper = ExpirySweeper(FileStore(tus.folder), LockManager(tus.folder), 60, 3600)
            return await sweeper.sweep(now)

        assert asyncio.run(sweep(time.time())) == []
        fresh_path = tus.folder / upload_id(fresh)
        os.utime(fresh_path, None)
        os.utime(tus.folder / f"{upload_id(fresh)}.info", None)
        for u in (idle, finished, partial):
            for p in (tus.folder / upload_id(u), tus.folder / f"{upload_id(u)}.info"):
                os.utime(p, (time.time() - 120, time.time() - 120))
        removed = asyncio.run(sweep(time.time()))
        assert sorted(removed) == sorted([upload_id(idle), upload_id(partial)])
        assert tus.head(idle).status_code == 404 and tus.head(partial).status_code == 404
        assert tus.head(finished).status_code == 200 and tus.head(fresh).status_code == 200


def test_sweep_skips_locked_uploads(tmp_path: Path) -> None:
    with thread_server(tmp_path / "up") as tus:
        url = tus.create(1_000_000)
        uid = upload_id(url)
        busy = RawRequest(tus.port, "PATCH", f"/files/{uid}",
                          {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "1000000"})
        try:
            busy.send(b"q" * 1000)
            wait_until(lambda: (tus.folder / f"{uid}.lock").exists(), what="the PATCH to hold the lock")
            sweeper = ExpirySweeper(FileStore(tus.folder), LockManager(tus.folder), 1, 3600)
            assert asyncio.run(sweeper.sweep(time.time() + 3600)) == []
            assert (tus.folder / f"{uid}.info").exists()
        finally:
            busy.close()


def test_gateway_sweeps_expired_uploads(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory({"Tus": {"ExpireAfter": "00:00:01", "SweepIntervalSeconds": 0.2}})
    r = requests.post(gw.url + "/files/", headers={**TUS, "Upload-Length": "100"}, timeout=10)
    assert r.status_code == 201 and r.headers["Upload-Expires"].endswith("GMT")
    url = r.headers["Location"]
    uid = upload_id(url)
    folder = gw.data_dir / "tus"
    wait_until(lambda: not (folder / f"{uid}.info").exists() and not (folder / uid).exists(), timeout=10,
               what="the sweep to remove the expired upload")
    assert requests.head(url, headers=TUS, timeout=10).status_code == 404



def test_completion_interrupted_by_a_crash_runs_at_next_start(tmp_path: Path) -> None:
    folder = tmp_path / "up"
    with thread_server(folder) as tus:
        url = tus.create(4)
        tus.patch(url, 0, b"done")
        uid = upload_id(url)
        wait_until(lambda: tus.completed, what="the completion callback")
        assert not (folder / f"{uid}.pending").exists()  # handed over: marker gone
    # As if the process had died between storing the last byte and handing the upload over.
    (folder / f"{uid}.pending").touch()
    (folder / "0123456789abcdef0123456789abcdef.pending").touch()  # an upload that is gone
    with thread_server(folder) as tus:
        done = wait_until(lambda: tus.completed, what="the completion to be run again at start-up")
        assert [u.id for u in done] == [uid] and done[0].path.read_bytes() == b"done"
        wait_until(lambda: not list(folder.glob("*.pending")), what="the markers to be cleared")


def test_stalled_body_times_out_and_keeps_what_arrived(tmp_path: Path) -> None:
    with thread_server(tmp_path / "up", read_timeout=0.6) as tus:
        url = tus.create(1_000_000)
        uid = upload_id(url)
        stalled = RawRequest(tus.port, "PATCH", f"/files/{uid}",
                             {**TUS, "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": "1000000"})
        try:
            stalled.send(b"s" * 123_456)
            t0 = time.monotonic()
            status, _, body = stalled.response(timeout=10)
            assert status == 500 and body.startswith(b"ERR_READ_TIMEOUT: ")  # 5XX: clients retry
            assert 0.4 < time.monotonic() - t0 < 5
        finally:
            stalled.close()
        assert tus.head(url).headers["Upload-Offset"] == "123456"
        assert not (tus.folder / f"{uid}.lock").exists()  # the lock was let go


@pytest.mark.parametrize("fsync", ["patch", "none"])
def test_fsync_policies_store_the_same_bytes(tmp_path: Path, fsync: str) -> None:
    data = os.urandom(9 * 1024 * 1024 + 7)  # more than two write batches
    with thread_server(tmp_path / "up", fsync=fsync) as tus:
        url = tus.create(len(data))
        half = len(data) // 2
        assert tus.patch(url, 0, data[:half]).headers["Upload-Offset"] == str(half)
        assert tus.patch(url, half, data[half:]).headers["Upload-Offset"] == str(len(data))
        assert (tus.folder / upload_id(url)).read_bytes() == data
        wait_until(lambda: tus.completed, what="the completion callback")
