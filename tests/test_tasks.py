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

import pytest

from dicomproxy import task_log
from dicomproxy.notify.events import EventBus
from dicomproxy.tasks import NotFailed, TaskQueue, listed, matches


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


def test_a_quarantined_task_is_flagged_filtered_and_can_be_run_again(tmp_path: Path) -> None:
    async def handler(args: dict[str, Any]) -> str:
        task_log.current().add("info", "ran")  # type: ignore[union-attr]
        return "ran"

    def new_queue() -> TaskQueue:
        queue = TaskQueue(tmp_path, workers=1, max_restarts=0)
        queue.register("lua", handler)
        return queue

    task_id = new_queue().submit("lua", {}, title="t")
    crash_while_running(tmp_path, task_id)
    queue = new_queue()

    async def go() -> dict[str, Any]:
        await queue.start()
        try:
            task = queue.get(task_id)
            assert task is not None and task["state"] == "failed" and task["quarantined"] is True
            assert matches(task, "quarantined") and matches(task, "failed") and not matches(task, "done")
            again = queue.rerun(task_id)
            assert again is not None and again["reruns"] == 1 and not again["quarantined"]
            return await queue.wait(task_id, timeout=10)
        finally:
            await queue.stop()

    done = asyncio.run(go())
    assert done["state"] == "done" and [line["text"] for line in done["log"]] == ["ran"]
    assert listed(done)["logLines"] == 1 and "log" not in listed(done)
    with pytest.raises(NotFailed, match="only a failed task"):
        queue.rerun(task_id)
    assert queue.rerun("no-such-task") is None
    saved = json.loads((tmp_path / f"{task_id}.json").read_text())  # the log is kept with the task
    assert saved["log"][0]["text"] == "ran" and saved["reruns"] == 1


def test_a_task_log_keeps_the_last_lines_within_its_bounds() -> None:
    log = task_log.TaskLog()
    for i in range(task_log.MAX_LINES + 50):
        log.add("info", f"line {i}")
    assert len(log.lines) == task_log.MAX_LINES and log.dropped == 50
    assert log.lines[-1]["text"] == f"line {task_log.MAX_LINES + 49}"  # the end of a run says why it failed
    big = task_log.TaskLog()
    for _ in range(40):
        big.add("error", "x" * 5000)  # each cut at MAX_LINE characters
    assert all(len(line["text"]) == task_log.MAX_LINE for line in big.lines)
    assert big.size <= task_log.MAX_BYTES and big.dropped == 40 - len(big.lines)
