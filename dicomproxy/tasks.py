"""The background task queue: persisted, run by a small worker pool, listed at /dicomproxy/tasks.

A task is a kind (``lua``, ``tus-import``, ...) plus JSON arguments. Each task is one JSON file
under ``<DataFolder>/tasks/``, written atomically (temp file + rename + fsync) *before*
``submit`` returns, so a task accepted is a task that will run: after a crash, tasks still
``queued`` or ``running`` are queued again at start-up (a task may therefore run twice if the
process died while it ran; handlers are written to be safe to repeat).

A task found ``running`` at start-up was interrupted by the process ending (a graceful stop puts
it back to ``queued``). One that ends the process itself (``os.exit`` in its Lua, a crash in a
native module) would be re-run at every start and kill the gateway each time, so a task found
``running`` more than ``max_restarts`` times (``Lua:TaskMaxRestarts``) is quarantined instead:
``failed``, with the reason, ``"quarantined": true`` and a ``task.failed`` event.

What the task's script printed or logged is kept with it (``log``, bounded: :mod:`.task_log`).
A failed task (quarantined included) may be run again (:meth:`TaskQueue.rerun`; ``POST
/dicomproxy/tasks/{id}/rerun``, for admins and the task's owner): the same id, queued again,
``reruns`` counted, error and log cleared.

Several workers (``Server:Workers``): the folder is the queue. Worker 0 runs the tasks
(``runs``) and, every :data:`ADOPT_SECONDS`, adopts the queued files another worker wrote
(``shared``); the others only write them (``submit``) and read them (``get``, ``list``): a task
submitted anywhere runs once, in worker 0, and is listed the same by every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from dicomproxy import task_log
from dicomproxy.notify.events import EventBus

log = logging.getLogger("dicomproxy.tasks")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
QUARANTINED = "quarantined"  # a failed task the process died under too often: a filter, not a state
STATES = (QUEUED, RUNNING, DONE, FAILED, QUARANTINED)


class NotFailed(Exception):
    """Only a failed task can be run again; the message says what it is."""


def matches(task: dict[str, Any], state: str) -> bool:
    """``state`` as the list filters it: a real state, or ``quarantined`` (failed, quarantined)."""
    if state == QUARANTINED:
        return bool(task.get("quarantined"))
    return bool(task["state"] == state)


def listed(task: dict[str, Any]) -> dict[str, Any]:
    """The task as the list shows it: the log's length, not the log."""
    out = {k: v for k, v in task.items() if k != "log"}
    out["logLines"] = len(task.get("log") or ())
    return out
ADOPT_SECONDS = 0.5  # worker 0 looks for tasks other workers submitted this often


class ReportedFailure(Exception):
    """A task failure its handler has already announced with its own event (``import.failed``):
    the queue records it as failed but emits no second ``task.failed``."""


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def visible_to(task: dict[str, Any], user: str | None, admin: bool) -> bool:
    """A task with an owner (a TUS import) is seen by its owner and by admins only; one without
    (a Lua task, the gateway's own) by every caller, as before owners existed."""
    owner = task.get("owner")
    return admin or owner is None or owner == user


class Queue(Protocol):
    """What the gateway and features use of a task queue: :class:`TaskQueue` (this machine) or
    :class:`dicomproxy.cluster.tasks.RedisTaskQueue` (shared by replicas, ``Cluster:Redis``)."""

    def register(self, kind: str, handler: Handler) -> None: ...
    def submit(self, kind: str, args: dict[str, Any], title: str = "", owner: str | None = None, *,
               task_id: str | None = None) -> str: ...
    def rerun(self, task_id: str) -> dict[str, Any] | None: ...
    def get(self, task_id: str) -> dict[str, Any] | None: ...
    def list(self) -> list[dict[str, Any]]: ...
    def counts(self) -> dict[str, int]: ...
    async def wait(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def drain(self) -> None: ...
    async def settle(self, until: float) -> None: ...


class TaskQueue:
    def __init__(
        self, folder: Path, *, workers: int = 2, bus: EventBus | None = None, keep: int = 500, max_restarts: int = 3,
        runs: bool = True, shared: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.runs = runs  # False: another process runs them; this one submits and reads the folder
        self.shared = shared  # other processes submit to the folder: adopt their tasks
        self.workers = max(1, workers)
        self.bus = bus
        self.keep = keep
        self.max_restarts = max_restarts
        self._handlers: dict[str, Handler] = {}
        self._tasks: dict[str, dict[str, Any]] = {}
        self._queue: asyncio.Queue[str] | None = None
        self._runners: list[asyncio.Task[None]] = []
        self._pending_before_start: list[str] = []
        self._seen: dict[str, int] = {}  # task id -> its file's mtime_ns when last looked at (shared)
        self._draining = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    # ------------------------------------------------------------------ persistence
    def _path(self, task_id: str) -> Path:
        return self.folder / f"{task_id}.json"

    def _save(self, task: dict[str, Any]) -> None:
        path = self._path(task["id"])
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(task, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load_all(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("*.json")):
            try:
                task = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                log.error("task file %s is unreadable (%s); moved aside", path, e)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            self._tasks[task["id"]] = task
        for task in sorted(self._tasks.values(), key=lambda t: t["created"]):
            if task["state"] == RUNNING:
                task["restarts"] = task.get("restarts", 0) + 1
                if task["restarts"] > self.max_restarts:
                    self._quarantine(task)
                    continue
                log.warning("task %s (%s) was running when the process stopped (%d of %d restarts); running it "
                            "again", task["id"], task["title"], task["restarts"], self.max_restarts)
                task["state"] = QUEUED
                self._save(task)
            if task["state"] == QUEUED:
                self._pending_before_start.append(task["id"])

    def _quarantine(self, task: dict[str, Any]) -> None:
        """A task the process died under more than ``max_restarts`` times: failed, never re-run."""
        message = (
            f"the gateway stopped {task['restarts']} times while this task ran (it may end the process: os.exit, "
            f"a crash); quarantined after {self.max_restarts} restarts (Lua:TaskMaxRestarts). Submit it again "
            "once the cause is fixed"
        )
        task.update(state=FAILED, finished=time.time(), error=message, quarantined=True)
        self._save(task)
        log.error("task %s (%s) quarantined: %s", task["id"], task["title"], message)
        if self.bus is not None:
            self.bus.emit("task.failed", f"Task quarantined: {task['title']}", message, "/dicomproxy/tasks",
                          task_id=task["id"])

    # ------------------------------------------------------------------ API
    def submit(self, kind: str, args: dict[str, Any], title: str = "", owner: str | None = None, *,
               task_id: str | None = None) -> str:
        """Persist and queue a task; returns its id. Safe to call before :meth:`start`.

        ``owner``: the user the task is for (a TUS import: the upload's owner); only they and
        admins see it at ``/dicomproxy/tasks`` (:func:`visible_to`). ``task_id`` (letters,
        digits, ``-``): submitting it again while it is known queues nothing (a completion
        handed over twice after a crash imports once)."""
        if kind not in self._handlers:
            raise ValueError(f"no handler for task kind {kind!r}; known: {', '.join(sorted(self._handlers))}")
        if task_id is not None:
            if self.get(task_id) is not None or self._path(task_id).exists():
                return task_id
        else:
            task_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:12]
        task = {
            "id": task_id,
            "kind": kind,
            "title": title or kind,
            "args": _jsonable(args),
            "state": QUEUED,
            "created": time.time(),
            "started": None,
            "finished": None,
            "result": None,
            "error": None,
            "attempts": 0,
            "restarts": 0,
            "owner": owner,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        self._save(task)
        if not self.runs:
            return task_id
        self._tasks[task_id] = task
        if self._queue is not None:
            self._queue.put_nowait(task_id)
        else:
            self._pending_before_start.append(task_id)
        return task_id

    def rerun(self, task_id: str) -> dict[str, Any] | None:
        """Queue a failed task again (the same id; attempts go on, ``reruns`` + 1, restarts,
        error, result and log cleared). None when there is no such task; :class:`NotFailed` when
        it has not failed. Outside worker 0 the task's file is rewritten as queued, and worker 0
        adopts it (:data:`ADOPT_SECONDS`)."""
        task = self.get(task_id)
        if task is None:
            return None
        if task["state"] != FAILED:
            raise NotFailed(f"task {task_id} is {task['state']}: only a failed task can be run again")
        task.update(state=QUEUED, started=None, finished=None, error=None, result=None, restarts=0,
                    quarantined=False, log=[], logDropped=0, reruns=task.get("reruns", 0) + 1)
        self._save(task)
        if not self.runs:
            return task
        if self._queue is not None:
            self._queue.put_nowait(task_id)
        else:
            self._pending_before_start.append(task_id)
        return task

    def get(self, task_id: str) -> dict[str, Any] | None:
        if not self.runs:
            return self._read(self._path(task_id))
        return self._tasks.get(task_id)

    def list(self) -> list[dict[str, Any]]:
        return sorted(self._all().values(), key=lambda t: t["created"], reverse=True)

    def _all(self) -> dict[str, dict[str, Any]]:
        if self.runs:
            return self._tasks
        found = (self._read(path) for path in self.folder.glob("*.json"))
        return {t["id"]: t for t in found if t is not None}

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            task: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return task

    def counts(self) -> dict[str, int]:
        out = {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        for t in self._all().values():
            out[t["state"]] = out.get(t["state"], 0) + 1
        return out

    async def wait(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.get(task_id)
            if task and task["state"] in (DONE, FAILED):
                return task
            await asyncio.sleep(0.05)
        raise TimeoutError(f"task {task_id} did not finish within {timeout} s")

    # ------------------------------------------------------------------ running
    async def start(self) -> None:
        if not self.runs:
            self.folder.mkdir(parents=True, exist_ok=True)
            return
        self._load_all()
        self._queue = asyncio.Queue()
        for task_id in self._pending_before_start:
            self._queue.put_nowait(task_id)
        self._pending_before_start.clear()
        loop = asyncio.get_running_loop()
        self._runners = [loop.create_task(self._worker(i)) for i in range(self.workers)]
        if self.shared:
            self._runners.append(loop.create_task(self._adopt_loop(), name="tasks-adopt"))

    async def _adopt_loop(self) -> None:
        while not self._draining:
            await asyncio.sleep(ADOPT_SECONDS)
            self._adopt()

    def _adopt(self) -> None:
        """Queue the tasks another worker wrote since the last look (written whole: temp + rename):
        a new file, or a known task's file another worker put back to ``queued`` (a run again).
        A file is read only when its mtime changed (a stat each, ~2 us; 500 tasks: ~1 ms a look)."""
        assert self._queue is not None
        for path in self.folder.glob("*.json"):
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if self._seen.get(path.stem) == mtime:
                continue
            self._seen[path.stem] = mtime
            known = self._tasks.get(path.stem)
            if known is not None and known["state"] in (QUEUED, RUNNING):
                continue  # ours while it is queued or running: the file is what we wrote
            task = self._read(path)
            if task is None or task.get("id") != path.stem or task["state"] != QUEUED and known is not None:
                continue
            self._tasks[task["id"]] = task
            if task["state"] == QUEUED:
                self._queue.put_nowait(task["id"])

    async def stop(self) -> None:
        for r in self._runners:
            r.cancel()
        for r in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await r
        self._runners.clear()

    def drain(self) -> None:
        """Shutdown began: start no new task (those queued stay queued on disk for the next start)."""
        self._draining = True

    async def settle(self, until: float) -> None:
        """Let the running tasks finish until ``until`` (``time.monotonic()``); one still running
        at ``stop()`` is cancelled and queued again (run again at the next start)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await self._idle.wait()
        if self._busy:
            log.warning("%d task(s) still running at the shutdown deadline: queued again for the next start",
                        self._busy)

    async def _worker(self, n: int) -> None:
        assert self._queue is not None
        while not self._draining:
            task_id = await self._queue.get()
            task = self._tasks.get(task_id)
            if task is None or task["state"] != QUEUED or self._draining:
                continue
            self._busy += 1
            self._idle.clear()
            try:
                await self._run(task)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _run(self, task: dict[str, Any]) -> None:
        handler = self._handlers.get(task["kind"])
        lines = task_log.TaskLog()  # a run's log: a restart after a crash starts a new one
        task.update(state=RUNNING, started=time.time(), attempts=task.get("attempts", 0) + 1, log=lines.lines,
                    logDropped=0)
        self._save(task)
        token = task_log.use(lines)
        try:
            if handler is None:
                raise RuntimeError(f"no handler for task kind {task['kind']!r}")
            result = await handler(task["args"])
        except asyncio.CancelledError:
            task["state"] = QUEUED  # shutting down: leave it queued for the next start
            self._save(task)
            raise
        except Exception as e:
            message = str(e) or type(e).__name__
            task.update(state=FAILED, finished=time.time(), error=message)
            log.error("task %s (%s) failed: %s", task["id"], task["title"], message)
            if self.bus is not None and not isinstance(e, ReportedFailure):
                self.bus.emit("task.failed", f"Task failed: {task['title']}", message,
                              "/dicomproxy/tasks", task_id=task["id"])
        else:
            task.update(state=DONE, finished=time.time(), result=_jsonable(result))
        finally:
            task_log.done(token)
            task["logDropped"] = lines.dropped
        self._save(task)
        self._prune()

    def _prune(self) -> None:
        finished = [t for t in self._tasks.values() if t["state"] in (DONE, FAILED)]
        if len(finished) <= self.keep:
            return
        finished.sort(key=lambda t: t["finished"] or 0)
        for t in finished[: len(finished) - self.keep]:
            self._tasks.pop(t["id"], None)
            with contextlib.suppress(OSError):
                self._path(t["id"]).unlink()
