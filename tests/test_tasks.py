"""The task queue's crash-loop guard (dicomproxy/tasks.py, issue 10 item 12), in-process: a task
found ``running`` at start-up is run again, and quarantined as failed, with its reason and a
``task.failed`` event, once that has happened more than ``max_restarts`` times. The same through
a real gateway killed with SIGKILL: tests/e2e/test_engines.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from dicomproxy.notify.events import EventBus
from dicomproxy.tasks import TaskQueue


def crash_while_running(folder: Path, task_id: str) -> None:
    """What a process killed during the task leaves on disk: the task ``running``."""
    path = folder / f"{task_id}.json"
    task = json.loads(path.read_text())
    task["state"] = "running"
    path.write_text(json.dumps(task))


async def start_and_settle(queue: TaskQueue, task_id: str) -> dict[str, Any]:
    await queue.start()
    try:
        return await queue.wait(task_id, timeout=10)
    finally:
        await queue.stop()


def test_a_task_the_process_dies_under_is_quarantined_after_max_restarts(tmp_path: Path) -> None:
    events: list[Any] = []
    bus = EventBus()
    bus.subscribe(events.append)
    runs: list[str] = []

    async def handler(args: dict[str, Any]) -> str:
        runs.append(args["n"])
        return "ran"

    def new_queue() -> TaskQueue:
        queue = TaskQueue(tmp_path, workers=1, bus=bus, max_restarts=2)
        queue.register("lua", handler)
        return queue

    task_id = new_queue().submit("lua", {"n": "x"}, title="main-task.lua:die")
    for restarts in (1, 2):  # found running twice: run again each time
        crash_while_running(tmp_path, task_id)
        done = asyncio.run(start_and_settle(new_queue(), task_id))
        assert done["state"] == "done" and done["restarts"] == restarts
    assert len(runs) == 2
    crash_while_running(tmp_path, task_id)  # the third time: quarantined, not run
    queue = new_queue()
    failed = asyncio.run(start_and_settle(queue, task_id))
    assert len(runs) == 2
    assert failed["state"] == "failed" and failed["restarts"] == 3
    assert "quarantined after 2 restarts (Lua:TaskMaxRestarts)" in failed["error"]
    assert json.loads((tmp_path / f"{task_id}.json").read_text())["state"] == "failed"
    (event,) = [e for e in events if e.kind == "task.failed"]
    assert event.data["task_id"] == task_id and "quarantined" in event.body


def test_a_graceful_stop_does_not_count(tmp_path: Path) -> None:
    """Stopping the gateway while a task runs puts it back to queued: not a restart."""
    started = asyncio.Event()

    async def slow(args: dict[str, Any]) -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    async def stop_while_running() -> str:
        queue = TaskQueue(tmp_path, workers=1, max_restarts=0)
        queue.register("lua", slow)
        task_id = queue.submit("lua", {})
        await queue.start()
        await started.wait()
        await queue.stop()
        return task_id

    task_id = asyncio.run(stop_while_running())
    on_disk = json.loads((tmp_path / f"{task_id}.json").read_text())
    assert on_disk["state"] == "queued" and on_disk["restarts"] == 0
