"""The Redis upload lock against a real redis-server: two managers are two replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dicomproxy.tus import errors
from dicomproxy.tus.redislock import LOCK_PREFIX, RedisLockManager
from tests.peers import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLockManager, RedisLockManager]]:
    a = RedisLockManager(redis_server.url, lease=1.5)
    b = RedisLockManager(redis_server.url, lease=1.5)
    await a.start()
    await b.start()
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_the_holder_on_another_replica_is_asked_to_let_go(
        replicas: tuple[RedisLockManager, RedisLockManager]) -> None:
    a, b = replicas
    asked = asyncio.Event()
    held = await a.acquire("u1", asked.set, within=1)

    async def holder() -> None:  # a PATCH that stops when asked, as the TUS app's do
        await asyncio.wait_for(asked.wait(), 5)
        await held.release()

    task = asyncio.create_task(holder())
    t0 = time.monotonic()
    second = await b.acquire("u1", lambda: None, within=5)
    assert time.monotonic() - t0 < 2 and asked.is_set()
    await task
    assert b.is_held("u1") and not a.is_held("u1")
    await second.release()
    assert await a.redis.get(LOCK_PREFIX + "u1") is None


async def test_a_holder_that_does_not_let_go_times_the_request_out(
        replicas: tuple[RedisLockManager, RedisLockManager]) -> None:
    a, b = replicas
    asked: list[bool] = []
    held = await a.acquire("u2", lambda: asked.append(True), within=1)
    with pytest.raises(errors.TusError) as info:
        await b.acquire("u2", lambda: None, within=0.6)
    assert info.value.code == "ERR_LOCK_TIMEOUT" and asked == [True]
    assert await b.try_acquire("u2") is None  # never interrupts
    await asyncio.sleep(2)  # renewed beyond its 1.5 s lease while held
    assert a.is_held("u2") and await a.redis.get(LOCK_PREFIX + "u2") == held.token.encode()
    await held.release()


async def test_a_dead_replicas_lock_expires_with_its_lease(redis_server: RedisServer,
                                                          replicas: tuple[RedisLockManager, RedisLockManager]) -> None:
    _, b = replicas
    dead = RedisLockManager(redis_server.url, lease=1.0)
    await dead.start()
    lock = await dead.acquire("u3", lambda: None, within=1)
    assert lock.renewer is not None
    lock.renewer.cancel()  # the replica is gone: nobody renews, nobody answers release requests
    t0 = time.monotonic()
    taken = await b.acquire("u3", lambda: None, within=5)
    assert 0.3 < time.monotonic() - t0 < 2.5
    await taken.release()
    dead._held.clear()  # its lock is long gone; close its connections and listener (no release)
    await dead.aclose()


async def test_a_holder_whose_lease_was_lost_is_stopped(replicas: tuple[RedisLockManager, RedisLockManager]) -> None:
    a, _ = replicas
    stopped = asyncio.Event()
    held = await a.acquire("u4", stopped.set, within=1)
    await a.redis.set(LOCK_PREFIX + "u4", "someone-else")  # the lease ran out and another replica took it
    await asyncio.wait_for(stopped.wait(), 3)
    await held.release()
    assert await a.redis.get(LOCK_PREFIX + "u4") == b"someone-else"  # never deletes another's lock
