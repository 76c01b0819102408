"""The task queue's part in a shutdown (dicomproxy/tasks.py): drain, settle, stop.

The crash-loop guard is in test_tasks.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from dicomproxy.tasks import TaskQueue


async def test_drain_starts_nothing_new_and_settle_waits_for_the_running_task(tmp_path: Path) -> None:
    queue = TaskQueue(tmp_path, workers=1)
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[int] = []

    async def handler(args: dict[str, Any]) -> str:
        ran.append(args["n"])
        started.set()
        await release.wait()
        return "ok"

    queue.register("t", handler)
    await queue.start()
    first, second = queue.submit("t", {"n": 1}), queue.submit("t", {"n": 2})
    await started.wait()
    queue.drain()
    asyncio.get_running_loop().call_later(0.2, release.set)
    await queue.settle(time.monotonic() + 10)
    await queue.stop()
    assert ran == [1]  # the second never started: it waits on disk for the next start
    assert queue.get(first)["state"] == "done"  # type: ignore[index]
    assert queue.get(second)["state"] == "queued"  # type: ignore[index]


async def test_a_task_running_past_the_deadline_is_queued_again(tmp_path: Path) -> None:
    queue = TaskQueue(tmp_path, workers=1)
    started = asyncio.Event()

    async def handler(args: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(60)

    queue.register("t", handler)
    await queue.start()
    task_id = queue.submit("t", {})
    await started.wait()
    queue.drain()
    await queue.settle(time.monotonic() + 0.2)  # returns at the deadline
    await queue.stop()
    again = TaskQueue(tmp_path, workers=1)
    again.register("t", handler)
    again._load_all()
    assert again.get(task_id)["state"] == "queued"  # type: ignore[index]
