"""The background task queue shared by replicas on Redis (``Cluster:Redis``).

The same face as :class:`dicomproxy.tasks.TaskQueue` (states, owners, re-run, quarantine, the
task log), kept in Redis instead of ``<DataFolder>/tasks/``:

* ``dicomproxy:tasks`` - a hash, task id -> the task's JSON record (state, error, log, owner,
  and ``replica``: who ran it last). ``dicomproxy:tasks:finished`` - a sorted set of finished
  ids by finish time: past ``Cluster:TaskKeep`` the oldest are removed (bounded retention).
* ``dicomproxy:tasks:queue`` - a Redis Stream with the consumer group ``workers``: submitting
  is ``HSET`` + ``XADD`` in one ``MULTI`` (durable in Redis before ``submit`` returns, or refused
  with :class:`~dicomproxy.cluster.redis.ClusterUnavailable`: never silently dropped). A replica
  takes an entry with ``XREADGROUP`` (it is then pending, owned by that replica), renews the
  lease while the task runs (``XCLAIM ... JUSTID`` resets the entry's idle time every third of
  ``Cluster:TaskLeaseSeconds``) and acknowledges it (``XACK`` + ``XDEL``) once the record says
  done or failed.
* A replica that died (kill -9, power) stops renewing: after the lease another replica's
  ``XAUTOCLAIM`` moves the entry to itself - atomically, so exactly one replica re-runs it per
  death - and counts the death in ``restarts``; past ``Lua:TaskMaxRestarts`` it is quarantined
  (failed, ``quarantined``, a ``task.failed`` event), as the one-machine queue does at start-up.
* A graceful stop puts a running task back in the queue (a new entry, not a restart).

Why Streams and not ``BLMOVE`` + lease keys: the consumer group already keeps who holds what and
for how long (the pending entries list), and ``XAUTOCLAIM`` hands one over atomically, so no
hand-written lease bookkeeping is needed. A task may run twice only if its replica lost Redis
for longer than the lease while still running it; handlers are written to be safe to repeat.

Tasks of a kind in ``local_kinds`` stay on this replica's disk queue (:class:`TaskQueue`, as
without Redis), listed with the cluster's: with ``Tus:Store`` ``file`` that is ``tus-import`` (it
reads the upload from this replica's ``TusUploadFolder``, which no other replica has). With
``Tus:Store`` ``s3`` the object is in the bucket, so the import is a cluster task like any other:
any replica runs it (streaming the object from S3), and one whose replica died is run again
elsewhere after the lease.

``submit``, ``rerun``, ``get`` and ``list`` are synchronous (their callers are: Lua's
``LuaBackgroundWorker``, the API); they use a blocking client with a 1 s timeout - one loopback
round trip when Redis is up, a clear error when it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import redis
import redis.asyncio

from dicomproxy import task_log
from dicomproxy.cluster.redis import PREFIX, ClusterUnavailable, unavailable, where
from dicomproxy.notify.events import EventBus
from dicomproxy.tasks import (
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Handler,
    NotFailed,
    ReportedFailure,
    TaskQueue,
    _jsonable,
)

log = logging.getLogger("dicomproxy.cluster.tasks")

RECORDS = PREFIX + "tasks"
FINISHED = PREFIX + "tasks:finished"
QUEUE = PREFIX + "tasks:queue"
GROUP = "workers"
BLOCK_MS = 1000  # one XREADGROUP waits this long; shutdown and reclaiming are checked between
LOCAL_KINDS = frozenset({"tus-import"})  # with the file store: read a file only this replica has
SAVE_TRIES = 5
SUBMIT_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
return 1
"""  # a task id already recorded is not queued twice
RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""  # writing a finished task's record: tries with backoff before leaving it to the lease


def replica_id() -> str:
    """This process in the cluster: host, pid and a random part (a restarted pid is a new replica)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisTaskQueue:
    def __init__(
        self, url: str, aio: redis.asyncio.Redis, sync: redis.Redis, *, workers: int = 2,
        bus: EventBus | None = None, keep: int = 500, max_restarts: int = 3, lease: float = 30.0,
        local: TaskQueue | None = None, local_kinds: frozenset[str] = LOCAL_KINDS,
    ) -> None:
        self.local = local
        self.local_kinds = local_kinds if local is not None else frozenset()
        self.url = url
        self.redis = aio
        self.sync = sync
        self.workers = max(1, workers)
        self.bus = bus
        self.keep = keep
        self.max_restarts = max_restarts
        self.lease = lease
        self.replica = replica_id()
        self._handlers: dict[str, Handler] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._slot = asyncio.Event()
        self._counts: dict[str, int] = {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        self._counted_at = 0.0
        self._lost: set[str] = set()  # entries whose lease another replica took over
        self._renew_script: Any = None
        self.error: str | None = None  # the last Redis error of the dispatcher, None while Redis answers
        self.ran = 0
        self.reclaimed = 0

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler
        if self.local is not None:
            self.local.register(kind, handler)

    # ------------------------------------------------------------------ synchronous API
    def _call(self, fn: Any) -> Any:
        """One blocking Redis call. While the dispatcher knows Redis is down (it retries every
        few seconds) this fails at once: a blackholed Redis must not hold the event loop for the
        timeout on every status request."""
        if self.error is not None:
            raise ClusterUnavailable(self.error)
        try:
            return fn()
        except redis.RedisError as e:
            raise unavailable(self.url, e) from e

    def submit(self, kind: str, args: dict[str, Any], title: str = "", owner: str | None = None, *,
               task_id: str | None = None) -> str:
        """Store and queue a task in Redis; returns its id. Refused (:class:`ClusterUnavailable`)
        when Redis cannot take it: a task accepted is a task that will run on some replica.
        ``task_id``: a task already recorded under it is not queued again (one script, ``HSETNX``
        then ``XADD``: atomic across replicas)."""
        if kind not in self._handlers:
            raise ValueError(f"no handler for task kind {kind!r}; known: {', '.join(sorted(self._handlers))}")
        if self.local is not None and kind in self.local_kinds:
            return self.local.submit(kind, args, title, owner, task_id=task_id)
        if task_id is None:
            task_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:12]
        task = {
            "id": task_id, "kind": kind, "title": title or kind, "args": _jsonable(args), "state": QUEUED,
            "created": time.time(), "started": None, "finished": None, "result": None, "error": None,
            "attempts": 0, "restarts": 0, "owner": owner, "submittedBy": self.replica, "replica": None,
        }

        def store() -> None:
            self.sync.eval(SUBMIT_ONCE, 2, RECORDS, QUEUE, task_id, json.dumps(task))

        self._call(store)
        return task_id

    def rerun(self, task_id: str) -> dict[str, Any] | None:
        """Queue a failed task again (as :meth:`dicomproxy.tasks.TaskQueue.rerun`); atomic across
        replicas (``WATCH``): two admins pressing re-run at once queue it once."""
        if self.local is not None and self.local.get(task_id) is not None:
            return self.local.rerun(task_id)
        result: dict[str, Any] | None = None

        def again(pipe: Any) -> None:
            nonlocal result
            raw = pipe.hget(RECORDS, task_id)
            if raw is None:
                result = None
                return
            task = json.loads(raw)
            if task["state"] != FAILED:
                raise NotFailed(f"task {task_id} is {task['state']}: only a failed task can be run again")
            task.update(state=QUEUED, started=None, finished=None, error=None, result=None, restarts=0,
                        quarantined=False, log=[], logDropped=0, reruns=task.get("reruns", 0) + 1)
            pipe.multi()
            pipe.hset(RECORDS, task_id, json.dumps(task))
            pipe.zrem(FINISHED, task_id)
            pipe.xadd(QUEUE, {"id": task_id})
            result = task

        self._call(lambda: self.sync.transaction(again, RECORDS))
        return result

    def get(self, task_id: str) -> dict[str, Any] | None:
        if self.local is not None and (mine := self.local.get(task_id)) is not None:
            return mine
        raw = self._call(lambda: self.sync.hget(RECORDS, task_id))
        return json.loads(raw) if raw is not None else None

    def list(self) -> list[dict[str, Any]]:
        """Every replica's tasks, newest first."""
        raw = self._call(lambda: self.sync.hvals(RECORDS))
        here = self.local.list() if self.local is not None else []
        return sorted([*(json.loads(r) for r in raw), *here], key=lambda t: t["created"], reverse=True)

    def counts(self) -> dict[str, int]:
        """By state, across the cluster; computed at most once a second (health and metrics ask
        often), the last known counts while Redis is down."""
        if time.monotonic() - self._counted_at >= 1.0:
            self._counted_at = time.monotonic()
            try:
                out = {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0}
                for t in self.list():
                    out[t["state"]] = out.get(t["state"], 0) + 1
                self._counts = out
            except ClusterUnavailable as e:
                log.warning("task counts: %s", e)
        return dict(self._counts)

    async def wait(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        if self.local is not None and self.local.get(task_id) is not None:
            return await self.local.wait(task_id, timeout)
        while time.monotonic() < deadline:
            raw = await self.redis.hget(RECORDS, task_id)
            task = json.loads(raw) if raw else None
            if task and task["state"] in (DONE, FAILED):
                return dict(task)
            await asyncio.sleep(0.05)
        raise TimeoutError(f"task {task_id} did not finish within {timeout} s")

    def status(self) -> dict[str, Any]:
        """The ``cluster`` part of ``/dicomproxy/health``."""
        return {"ok": self.error is None, "redis": where(self.url), "replica": self.replica,
                "tasksRunHere": self.ran, "tasksReclaimed": self.reclaimed,
                **({"error": self.error} if self.error else {})}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.local is not None:
            await self.local.start()
        try:
            await self.redis.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        except redis.RedisError as e:
            # Start anyway: health shows it, the dispatcher retries; submit refuses meanwhile.
            self.error = str(unavailable(self.url, e))
            log.error("%s", self.error)
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch())

    def drain(self) -> None:
        """Shutdown began: take no new task (the queue is in Redis: another replica takes them)."""
        self._draining = True
        self._slot.set()
        if self.local is not None:
            self.local.drain()

    async def settle(self, until: float) -> None:
        if self.local is not None:
            await self.local.settle(until)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await self._idle.wait()
        if self._running:
            log.warning("%d task(s) still running at the shutdown deadline: queued again for another replica",
                        len(self._running))

    async def stop(self) -> None:
        self._draining = True
        tasks = [*self._running, *([self._loop_task] if self._loop_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()
        if self.local is not None:
            await self.local.stop()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        with contextlib.suppress(Exception):
            self.sync.close()

    # ------------------------------------------------------------------ dispatching
    async def _dispatch(self) -> None:
        """Take tasks while there is a free worker: first those whose holder died, then new ones.
        Redis errors: logged once, retried with backoff (at most 5 s apart), shown in health."""
        backoff = 0.1
        next_reclaim = 0.0
        while not self._draining:
            free = self.workers - len(self._running)
            if free <= 0:
                self._slot.clear()
                await self._slot.wait()
                continue
            try:
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + max(0.2, self.lease / 3)
                    free -= await self._reclaim(free)
                if free > 0 and not self._draining:
                    got: Any = await self.redis.xreadgroup(
                        GROUP, self.replica, {QUEUE: ">"}, count=free, block=BLOCK_MS)
                    for _stream, entries in got or ():
                        for entry_id, fields in entries:
                            self._spawn(entry_id, fields.get("id", ""), reclaimed=False)
                if self.error is not None:
                    log.warning("Redis at %s (Cluster:Redis) answers again", where(self.url))
                self.error = None
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # Redis restarted empty, or the stream was deleted
                    with contextlib.suppress(redis.RedisError):
                        await self.redis.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
                    continue
                backoff = await self._failed(e, backoff)
            except (redis.RedisError, OSError) as e:
                backoff = await self._failed(e, backoff)

    async def _failed(self, e: BaseException, backoff: float) -> float:
        message = str(unavailable(self.url, e))
        if self.error is None:
            log.error("task queue: %s; retrying", message)
        self.error = message
        await asyncio.sleep(backoff)
        return min(backoff * 2, 5.0)

    async def _reclaim(self, free: int) -> int:
        """Entries whose holder stopped renewing for a lease: moved here (atomically) and run."""
        answer: Any = await self.redis.xautoclaim(
            QUEUE, GROUP, self.replica, min_idle_time=int(self.lease * 1000), start_id="0-0", count=free)
        claimed: list[tuple[str, dict[str, str]]] = answer[1]
        for entry_id, fields in claimed:
            if not fields:  # the entry was deleted meanwhile (acknowledged by its holder)
                await self.redis.xack(QUEUE, GROUP, entry_id)
                continue
            self.reclaimed += 1
            self._spawn(entry_id, fields.get("id", ""), reclaimed=True)
        return len(claimed)

    def _spawn(self, entry_id: str, task_id: str, reclaimed: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._take(entry_id, task_id, reclaimed))
        self._running.add(task)
        self._idle.clear()

        def done(t: asyncio.Task[None]) -> None:
            self._running.discard(t)
            if not self._running:
                self._idle.set()
            self._slot.set()
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s: %r", task_id, t.exception())

        task.add_done_callback(done)

    async def _ack(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(QUEUE, GROUP, entry_id)
        pipe.xdel(QUEUE, entry_id)
        await pipe.execute()

    async def _take(self, entry_id: str, task_id: str, reclaimed: bool) -> None:
        raw = await self.redis.hget(RECORDS, task_id)
        task = json.loads(raw) if raw else None
        if task is None or task["state"] not in (QUEUED, RUNNING):
            await self._ack(entry_id)  # pruned, or finished and acknowledged late: nothing to run
            return
        if reclaimed and task["state"] == RUNNING:
            task["restarts"] = task.get("restarts", 0) + 1
            if task["restarts"] > self.max_restarts:
                await self._quarantine(entry_id, task)
                return
            log.warning("task %s (%s): its replica %s stopped while it ran (%d of %d restarts); running it here",
                        task_id, task["title"], task.get("replica"), task["restarts"], self.max_restarts)
        loop = asyncio.get_running_loop()
        run = loop.create_task(self._run(entry_id, task))
        renew = loop.create_task(self._renew(entry_id, run))
        try:
            await run
        except asyncio.CancelledError:
            if entry_id not in self._lost:
                raise
            self._lost.discard(entry_id)
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew

    async def _renew(self, entry_id: str, run: asyncio.Task[None]) -> None:
        """Keep the lease: reset the entry's idle time while the task runs - only while this
        replica still holds it (one script: a plain ``XCLAIM`` would take it back from a replica
        that reclaimed it while this one was cut off). Lost: this run stops, its outcome unwritten."""
        while True:
            await asyncio.sleep(max(0.1, self.lease / 3))
            try:
                if self._renew_script is None:
                    self._renew_script = self.redis.register_script(RENEW)
                held = await self._renew_script(keys=[QUEUE], args=[GROUP, entry_id, self.replica])
            except redis.RedisError as e:
                log.warning("task lease of entry %s not renewed: %s", entry_id, unavailable(self.url, e))
                continue
            if not held:
                log.error("task lease of entry %s lost (this replica was cut off from Redis for longer than "
                          "Cluster:TaskLeaseSeconds): another replica runs the task; stopping it here", entry_id)
                self._lost.add(entry_id)
                run.cancel()
                return

    async def _quarantine(self, entry_id: str, task: dict[str, Any]) -> None:
        message = (
            f"a replica stopped {task['restarts']} times while this task ran (it may end the process: os.exit, "
            f"a crash); quarantined after {self.max_restarts} restarts (Lua:TaskMaxRestarts). Submit it again "
            "once the cause is fixed"
        )
        task.update(state=FAILED, finished=time.time(), error=message, quarantined=True)
        await self._finish(entry_id, task)
        log.error("task %s (%s) quarantined: %s", task["id"], task["title"], message)
        if self.bus is not None:
            self.bus.emit("task.failed", f"Task quarantined: {task['title']}", message, "/dicomproxy/tasks",
                          task_id=task["id"])

    async def _run(self, entry_id: str, task: dict[str, Any]) -> None:
        handler = self._handlers.get(task["kind"])
        lines = task_log.TaskLog()
        task.update(state=RUNNING, started=time.time(), attempts=task.get("attempts", 0) + 1, log=lines.lines,
                    logDropped=0, replica=self.replica)
        await self.redis.hset(RECORDS, task["id"], json.dumps(task))
        self.ran += 1
        token = task_log.use(lines)
        try:
            if handler is None:
                raise RuntimeError(f"no handler for task kind {task['kind']!r} on replica {self.replica}")
            result = await handler(task["args"])
        except asyncio.CancelledError:
            task_log.done(token)
            if entry_id not in self._lost:  # shutting down: back to the queue (lost: another replica has it)
                await asyncio.shield(self._requeue(entry_id, task))
            raise
        except Exception as e:
            task_log.done(token)
            message = str(e) or type(e).__name__
            task.update(state=FAILED, finished=time.time(), error=message, logDropped=lines.dropped)
            log.error("task %s (%s) failed: %s", task["id"], task["title"], message)
            if self.bus is not None and not isinstance(e, ReportedFailure):
                self.bus.emit("task.failed", f"Task failed: {task['title']}", message,
                              "/dicomproxy/tasks", task_id=task["id"])
        else:
            task_log.done(token)
            task.update(state=DONE, finished=time.time(), result=_jsonable(result), logDropped=lines.dropped)
        await self._finish(entry_id, task)

    async def _requeue(self, entry_id: str, task: dict[str, Any]) -> None:
        """Shutdown: the task goes back to the queue as a new entry (not counted as a restart)."""
        task["state"] = QUEUED
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(RECORDS, task["id"], json.dumps(task))
            pipe.xadd(QUEUE, {"id": task["id"]})
            pipe.xack(QUEUE, GROUP, entry_id)
            pipe.xdel(QUEUE, entry_id)
            await pipe.execute()
        except redis.RedisError as e:  # left pending: another replica reclaims it after the lease
            log.error("task %s not put back in the queue (%s): another replica takes it after the lease",
                      task["id"], unavailable(self.url, e))

    async def _finish(self, entry_id: str, task: dict[str, Any]) -> None:
        """Record the outcome, then acknowledge; retried with backoff. If Redis stays down the
        entry stays pending and another replica runs the task again after the lease."""
        delay = 0.1
        for attempt in range(SAVE_TRIES):
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.hset(RECORDS, task["id"], json.dumps(task))
                pipe.zadd(FINISHED, {task["id"]: task["finished"] or time.time()})
                pipe.xack(QUEUE, GROUP, entry_id)
                pipe.xdel(QUEUE, entry_id)
                await pipe.execute()
                break
            except redis.RedisError as e:
                if attempt == SAVE_TRIES - 1:
                    log.error("task %s finished (%s) but its record was not saved: %s", task["id"], task["state"],
                              unavailable(self.url, e))
                    return
                await asyncio.sleep(delay)
                delay *= 2
        await self._prune()

    async def _prune(self) -> None:
        excess = await self.redis.zcard(FINISHED) - self.keep
        if excess <= 0:
            return
        old = await self.redis.zrange(FINISHED, 0, excess - 1)
        if old:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hdel(RECORDS, *old)
            pipe.zrem(FINISHED, *old)
            await pipe.execute()
