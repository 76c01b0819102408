"""The upload folder's limits (:mod:`dicomproxy.tus.quota`) on a real folder."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dicomproxy.tus import errors
from dicomproxy.tus.errors import TusError
from dicomproxy.tus.quota import UploadQuota
from dicomproxy.tus.store import FileStore, Upload


def make(store: FileStore, owner: str | None, size: int, data: bytes = b"", deferred: bool = False) -> Upload:
    upload = store.create(Upload(id="", size=size, size_is_deferred=deferred, owner=owner))
    upload.path.write_bytes(data)
    upload.offset = len(data)
    return upload


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "uploads")
    s.ensure_folder()
    return s


def test_scan_counts_bytes_and_unfinished_uploads_per_owner(store: FileStore) -> None:
    make(store, "alice", 10, b"12345")  # unfinished
    make(store, "alice", 3, b"abc")  # complete
    make(store, "bob", 0, b"xy", deferred=True)  # unfinished (length not declared yet)
    make(store, None, 4, b"")  # anonymous, unfinished
    quota = UploadQuota(store, max_unfinished=10)
    asyncio.run(quota.refresh(force=True))
    assert quota.used == 10
    assert quota._count("alice") == 1 and quota._count("bob") == 1 and quota._count(None) == 1


def test_grant_stops_at_max_bytes_and_a_recount_sees_deletions(store: FileStore) -> None:
    first = make(store, "alice", 100, b"x" * 60)

    async def main() -> tuple[int, int, int]:
        quota = UploadQuota(store, max_bytes=100, refresh_interval=0)
        await quota.refresh(force=True)
        granted = await quota.grant(70)  # 40 left
        first.path.write_bytes(b"x" * 60 + b"y" * granted)  # the writer stores what it was granted
        refused = await quota.grant(10)  # full, recount or not
        store.terminate(first.id)  # deleted behind the quota's back (an import, the sweep, tusd)
        again = await quota.grant(10)  # the recount before refusing finds the room
        return granted, refused, again

    assert asyncio.run(main()) == (40, 0, 10)


def test_admit_refuses_a_declared_length_that_does_not_fit(store: FileStore) -> None:
    async def main() -> None:
        quota = UploadQuota(store, max_bytes=1000)
        await quota.refresh(force=True)
        await quota.admit("alice", 1000)
        with pytest.raises(TusError) as e:
            await quota.admit("alice", 1001)
        assert e.value.code == "ERR_STORAGE_FULL" and e.value.status == 507
        assert e.value.headers["Retry-After"]

    asyncio.run(main())


def test_min_free_disk_keeps_the_disk_from_filling(store: FileStore) -> None:
    st = os.statvfs(store.folder)
    free = st.f_bavail * st.f_frsize

    async def main() -> tuple[int, int]:
        roomy = UploadQuota(store, min_free_bytes=free // 2)
        full = UploadQuota(store, min_free_bytes=free * 2)
        return await roomy.grant(1000), await full.grant(1000)

    assert asyncio.run(main()) == (1000, 0)


def test_unfinished_uploads_per_owner(store: FileStore) -> None:
    async def main() -> None:
        quota = UploadQuota(store, max_unfinished=2, refresh_interval=0)
        await quota.refresh(force=True)
        a1 = make(store, "alice", 10)
        quota.created(a1)
        quota.created(make(store, "alice", 10))
        await quota.admit("bob", 10)  # bob has none
        with pytest.raises(TusError) as e:
            await quota.admit("alice", 10)
        assert e.value.code == "ERR_TOO_MANY_UPLOADS" and e.value.status == 429
        a1.path.write_bytes(b"x" * 10)  # finished (the next recount sees it even without the event)
        await quota.admit("alice", 10)

    asyncio.run(main())


def test_finished_and_removed_events_update_the_counts(store: FileStore) -> None:
    quota = UploadQuota(store, max_unfinished=5)
    u = make(store, "alice", 10, b"12345")
    quota.created(u)
    assert quota._count("alice") == 1
    quota.finished(u)
    assert quota._count("alice") == 0
    quota.used = 5
    quota.removed(u)
    assert quota.used == 0


def test_unlimited_quota_never_refuses(store: FileStore) -> None:
    async def main() -> int:
        quota = UploadQuota(store)
        await quota.admit(None, 2**62)
        return await quota.grant(2**40)

    assert asyncio.run(main()) == 2**40
    assert errors.STORAGE_FULL.status == 507
