"""The body writer's memory bounds (:mod:`dicomproxy.tus.writer`): a fake ASGI ``receive`` feeds
real files through real threads; the budget and the quota are the real classes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dicomproxy.tus.buffers import BufferBudget
from dicomproxy.tus.quota import UploadQuota
from dicomproxy.tus.store import FileStore
from dicomproxy.tus.writer import BodyWriter, WriteResult

MSG = 64 * 1024


class Body:
    """An ASGI ``receive``: ``data`` in 64 KB messages; then, if ``stall``, nothing ever again."""

    def __init__(self, data: bytes, stall: bool = False) -> None:
        self.pieces = [data[i: i + MSG] for i in range(0, len(data), MSG)]
        self.stall = stall
        self.delivered = asyncio.Event()

    async def __call__(self) -> dict[str, Any]:
        if self.pieces:
            piece = self.pieces.pop(0)
            more = bool(self.pieces) or self.stall
            if not self.pieces:
                self.delivered.set()
            await asyncio.sleep(0)
            return {"type": "http.request", "body": piece, "more_body": more}
        await asyncio.Event().wait()  # a client that stopped sending
        raise AssertionError("unreachable")


async def write(
    path: Path, receive: Callable[[], Awaitable[dict[str, Any]]], writer: BodyWriter, limit: int = 1 << 40
) -> WriteResult:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return await writer.write(receive, fd, limit)
    finally:
        os.close(fd)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - it watches files and counters, not an event
            await asyncio.sleep(0.01)


def test_a_stalled_body_is_written_out_and_gives_its_budget_back(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)  # under one 4 MB batch

    async def main() -> tuple[WriteResult, int]:
        budget = BufferBudget(64 * 1024 * 1024, wait=5)
        with ThreadPoolExecutor(2) as pool:
            writer = BodyWriter(pool, budget=budget, max_hold=0.2)
            body = Body(data, stall=True)
            task = asyncio.create_task(write(tmp_path / "u", body, writer))
            await body.delivered.wait()
            # The positive sign: the bytes reach the file although the batch never filled up.
            await until(lambda: (tmp_path / "u").stat().st_size == len(data))
            await until(lambda: budget.in_use == 0)
            assert not task.done()  # still reading: the client may go on
            writer.interrupt()
            return await task, budget.peak

    result, peak = asyncio.run(main())
    assert result.written == len(data) and result.interrupted
    assert 0 < peak <= len(data)
    assert (tmp_path / "u").read_bytes() == data


def test_bodies_larger_than_the_budget_arrive_whole(tmp_path: Path) -> None:
    bodies = [os.urandom(2 * 1024 * 1024 + i) for i in range(6)]

    async def main() -> tuple[list[WriteResult], int]:
        budget = BufferBudget(256 * 1024, wait=10)
        with ThreadPoolExecutor(4) as pool:
            results = await asyncio.gather(*(
                write(tmp_path / f"u{i}", Body(b), BodyWriter(pool, budget=budget)) for i, b in enumerate(bodies)
            ))
        return list(results), budget.peak

    results, peak = asyncio.run(main())
    assert peak <= 256 * 1024
    for i, (r, b) in enumerate(zip(results, bodies, strict=True)):
        assert r.written == len(b) and not r.busy
        assert (tmp_path / f"u{i}").read_bytes() == b


def test_no_room_within_the_wait_stores_what_came_and_answers_busy(tmp_path: Path) -> None:
    async def main() -> WriteResult:
        budget = BufferBudget(MSG * 4, wait=0.3)
        with ThreadPoolExecutor(2) as pool:
            hog = Body(os.urandom(MSG * 4), stall=True)
            hog_task = asyncio.create_task(write(tmp_path / "hog", hog, BodyWriter(pool, budget=budget, max_hold=0)))
            await until(lambda: budget.in_use == MSG * 4)  # the stalled body holds the whole budget
            result = await write(tmp_path / "late", Body(os.urandom(MSG * 3)), BodyWriter(pool, budget=budget))
            hog_task.cancel()
            await asyncio.gather(hog_task, return_exceptions=True)
            assert budget.in_use == 0  # the cancelled writer gave its share back
            return result

    result = asyncio.run(main())
    assert result.busy and result.written == MSG
    assert (tmp_path / "late").stat().st_size == MSG  # the message it had was stored


def test_the_quota_grants_each_batch_and_the_rest_is_not_stored(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "uploads")
    store.ensure_folder()
    data = os.urandom(1024 * 1024)

    async def main() -> WriteResult:
        quota = UploadQuota(store, max_bytes=300_000, refresh_interval=3600)
        await quota.refresh(force=True)
        with ThreadPoolExecutor(2) as pool:
            return await write(store.folder / "u", Body(data), BodyWriter(pool, batch_bytes=MSG, quota=quota))

    result = asyncio.run(main())
    assert result.storage_full and result.written == 300_000
    assert (store.folder / "u").read_bytes() == data[:300_000]
