"""dicomproxy/tus/s3quota.py against a real redis-server and SeaweedFS: the check and the reservation
are one step for all replicas (two counters on one Redis, many POSTs at once, never one too many),
and a recount from the bucket neither drops a reservation made while it listed nor keeps one the
bucket no longer holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from dicomproxy.config.settings import TusS3Settings
from dicomproxy.tus import errors
from dicomproxy.tus.s3quota import S3Quota
from dicomproxy.tus.s3store import S3Store
from dicomproxy.tus.store import Upload, new_id
from tests.peers import RedisServer, SeaweedServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
async def store(weed: SeaweedServer) -> AsyncIterator[S3Store]:
    settings = TusS3Settings.model_validate({"Bucket": weed.bucket, "Prefix": "q" + new_id()[:8],
                                             "Endpoint": weed.endpoint, "AccessKey": "t", "SecretKey": "t"})
    s3 = S3Store(settings)
    await s3.open()
    yield s3
    await s3.aclose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def test_two_replicas_never_grant_one_upload_too_many(store: S3Store, client: aioredis.Redis) -> None:
    one, two = (S3Quota(store, max_bytes=0, max_unfinished=5, period=60, redis=client) for _ in range(2))

    async def try_one(q: S3Quota) -> bool:
        try:
            await q.reserve(new_id(), "alice", 10)
        except errors.TusError as e:
            assert e is errors.TOO_MANY_UPLOADS
            return False
        return True

    t0 = time.perf_counter()
    granted = await asyncio.gather(*(try_one((one, two)[i % 2]) for i in range(40)))
    per_call = (time.perf_counter() - t0) / 40
    assert sum(granted) == 5
    await one.reserve(new_id(), "bob", 10)  # per user
    print(f"reserve (one Lua script, EVALSHA): {per_call * 1e3:.2f} ms per call, 40 at once")


async def test_bytes_reserved_at_creation_and_freed_at_removal(store: S3Store, client: aioredis.Redis) -> None:
    q = S3Quota(store, max_bytes=1000, max_unfinished=0, period=60, redis=client)
    a = new_id()
    await q.reserve(a, None, 600)
    with pytest.raises(errors.TusError) as e:
        await q.reserve(new_id(), None, 401)
    assert e.value.status == 507 and e.value.headers == {"Retry-After": "60"}
    await q.finished(a)
    assert await q.used() == 600  # stored, not yet imported: still counted
    await q.removed(a)
    await q.removed(a)  # twice (terminate, then the recount): freed once
    assert await q.used() == 0
    await q.reserve(new_id(), None, 1000)


async def _create(store: S3Store, q: S3Quota, owner: str, size: int) -> Upload:
    upload = Upload(id="", size=size, owner=owner)
    oid = new_id()
    await q.reserve(oid, owner, size)
    await store.create(upload, object_id=oid)
    return upload


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "in-process"])
async def test_recount_keeps_fresh_reservations_and_drops_what_the_bucket_lost(
        store: S3Store, client: aioredis.Redis, shared: bool) -> None:
    q = S3Quota(store, max_bytes=10_000, max_unfinished=3, period=60, redis=client if shared else None)
    kept = await _create(store, q, "carol", 4000)
    lost = await _create(store, q, "carol", 5000)
    await q.reserve(new_id(), "carol", 500)  # reserved, its .info not written yet (a POST in flight)
    assert await q.used() == 9500
    oid = lost.id.partition("+")[0]
    await store.client.abort_multipart_upload(Bucket=store.bucket, Key=store.key(oid),
                                              UploadId=lost.id.partition("+")[2])  # the lifecycle rule
    assert await q.reconcile() == 9500  # fresh (inside GRACE): the live count stands
    q.grace = 0  # as a later round sees them: the aborted upload and the .info-less reservation go
    assert await q.reconcile() == 4000
    await q.reserve(new_id(), "carol", 10)
    await q.reserve(new_id(), "carol", 10)
    with pytest.raises(errors.TusError) as e:
        await q.reserve(new_id(), "carol", 10)  # recounted: one unfinished upload, plus these two
    assert e.value is errors.TOO_MANY_UPLOADS
    later = S3Quota(store, max_bytes=10_000, max_unfinished=3, period=60, redis=client if shared else None)
    scan = await later.scan()
    assert {k: (f.owner, f.size, f.open) for k, f in scan.uploads.items()} == {
        kept.id.partition("+")[0]: ("carol", 4000, True)}
    t0 = time.perf_counter()
    await later.scan()
    print(f"scan of 2 .info objects: {(time.perf_counter() - t0) * 1e3:.1f} ms")


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "in-process"])
async def test_a_deferred_length_is_reserved_when_declared(store: S3Store, client: aioredis.Redis,
                                                           shared: bool) -> None:
    q = S3Quota(store, max_bytes=1000, max_unfinished=0, period=60, redis=client if shared else None)
    deferred, other = new_id(), new_id()
    await q.reserve(deferred, "dave", 0)  # Upload-Defer-Length: 1 (needs one byte of room, reserves none)
    await q.reserve(other, "dave", 300)
    with pytest.raises(errors.TusError) as e:
        await q.grow(deferred, 701)  # the PATCH that declares the length: 300 + 701 > 1000
    assert e.value.status == 507
    await q.grow(deferred, 700)
    assert await q.used() == 1000
    await q.removed(deferred)
    assert await q.used() == 300


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "in-process"])
async def test_a_final_upload_needs_bytes_but_no_unfinished_slot(store: S3Store, client: aioredis.Redis,
                                                                 shared: bool) -> None:
    q = S3Quota(store, max_bytes=100, max_unfinished=1, period=60, redis=client if shared else None)
    await q.reserve(new_id(), "erin", 40)  # the one unfinished upload erin may have
    final = new_id()
    await q.reserve(final, "erin", 60, unfinished=False)  # concatenation: finished as it is created
    with pytest.raises(errors.TusError) as e:
        await q.reserve(new_id(), "frank", 0)  # full: even a deferred upload needs one byte of room
    assert e.value.status == 507
    await q.reserve(new_id(), "erin", 0, unfinished=False)  # an empty final upload needs none (file store)
    await q.removed(final)
    assert await q.used() == 40
