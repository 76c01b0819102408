"""Orthanc's change callbacks, fired from the PACS's own records.

* :class:`ChangeFeed` reads ``GET /changes?since=N&limit=M`` and maps ``NewInstance`` to
  ``OnStoredInstance``, ``Stable*`` to ``OnStable*`` and ``UpdatedAttachment``/``UpdatedMetadata``
  to ``OnUpdated*``. The last sequence number delivered is kept in
  ``<DataFolder>/orthanc/changes.json`` so a restart resumes where it stopped: nothing replayed,
  nothing stored during the downtime missed.
* :class:`JobWatcher` diffs ``GET /jobs?expand`` for ``OnJobSubmitted/Success/Failure`` (Orthanc
  signals jobs to its Lua engine directly; they are not in ``/changes``).
* :class:`Deletions` fires ``OnDeleted*``: Orthanc never logs deletions in ``/changes``, so the
  gateway reports the deletions it performs or proxies (``DELETE /patients|studies|series|
  instances/{id}``), including the children and the emptied parents Orthanc removes with them.
* :class:`EventPump` delivers events in order, one at a time, off the request path.

Nothing here does any I/O unless a script defines one of the callbacks it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomproxy.scripting.host import ScriptHost
from dicomproxy.scripting.orthanc.pacs import LEVEL_OF, LEVELS, PARENT_KEY, PLURAL, Pacs, PacsError

log = logging.getLogger("dicomproxy.orthanc")

STABLE = {"StablePatient": "OnStablePatient", "StableStudy": "OnStableStudy", "StableSeries": "OnStableSeries"}
UPDATED = ("UpdatedAttachment", "UpdatedMetadata")
DELETED_CALLBACKS = tuple(f"OnDeleted{level}" for level in LEVELS)
CHANGE_CALLBACKS = (
    "OnStoredInstance",
    *STABLE.values(),
    *(f"OnUpdated{level}" for level in LEVELS),
    *DELETED_CALLBACKS,
)
JOB_CALLBACKS = ("OnJobSubmitted", "OnJobSuccess", "OnJobFailure")
PAGE = 100
DELETE_PATH = re.compile(r"/(patients|studies|series|instances)/([0-9a-fA-F-]+)/?")


# --------------------------------------------------------------------------- event pump
class EventPump:
    """A queue of ``(callback, args)`` delivered in order by one task, so a burst of events
    never runs callbacks in parallel and a request never waits for them."""

    def __init__(self, host: ScriptHost, maxsize: int = 10_000) -> None:
        self.host = host
        self.queue: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue(maxsize)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def submit(self, callback: str, *args: Any) -> None:
        if not self.host.defines(callback):
            return
        try:
            self.queue.put_nowait((callback, args))
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("%s%r dropped: %d events already wait for the scripts", callback, args, self.queue.qsize())
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            callback, args = await self.queue.get()
            try:
                await deliver(self.host, callback, *args)
            finally:
                self.queue.task_done()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until the queue is empty; for shutdown and tests."""
        if self._task is None or self._task.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def deliver(host: ScriptHost, callback: str, *args: Any) -> None:
    """Dispatch one event; a script error is logged (by the host) and does not stop the feed."""
    try:
        await host.dispatch(callback, *args)
    except Exception as e:  # LuaError and its subclasses, or a conversion problem
        log.debug("%s failed: %s", callback, e)


# --------------------------------------------------------------------------- deletions
@dataclass
class DeletePlan:
    level: str
    resource: str
    descendants: list[tuple[str, str]] = field(default_factory=list)  # bottom-up
    ancestors: list[tuple[str, str]] = field(default_factory=list)  # parent first


class Deletions:
    """Reports ``OnDeleted*`` for deletions the gateway performs or proxies.

    Before the DELETE, the resource's children (for the levels whose callback is defined) and
    its parents are read; after it, Orthanc's ``RemainingAncestor`` tells which parents went
    with it. Events are delivered bottom-up: instances, series, studies, patient.
    """

    def __init__(self, pacs: Pacs, host: ScriptHost, pump: EventPump) -> None:
        self.pacs = pacs
        self.host = host
        self.pump = pump

    def watching(self) -> bool:
        return any(self.host.defines(c) for c in DELETED_CALLBACKS)

    @staticmethod
    def parse(path: str) -> tuple[str, str] | None:
        m = DELETE_PATH.fullmatch(path.split("?", 1)[0])
        return (LEVEL_OF[m.group(1)], m.group(2)) if m else None

    async def plan(self, level: str, resource: str) -> DeletePlan | None:
        wanted = {lvl for lvl in LEVELS if self.host.defines(f"OnDeleted{lvl}")}
        if not wanted:
            return None
        plan = DeletePlan(level, resource)
        depth = LEVELS.index(level)
        try:
            for lower in reversed(LEVELS[depth + 1 :]):
                if lower in wanted:
                    children = await self.pacs.get(f"/{PLURAL[level]}/{resource}/{PLURAL[lower]}") or []
                    plan.descendants += [(lower, c["ID"]) for c in children if isinstance(c, dict) and "ID" in c]
            current_level, current = level, resource
            while current_level != "Patient" and wanted & set(LEVELS[: LEVELS.index(current_level)]):
                info = await self.pacs.get(f"/{PLURAL[current_level]}/{current}")
                current = info[PARENT_KEY[current_level]]
                current_level = LEVELS[LEVELS.index(current_level) - 1]
                plan.ancestors.append((current_level, current))
        except (PacsError, KeyError, TypeError) as e:
            log.debug("cannot plan OnDeleted* for %s %s: %s", level, resource, e)
            return None
        return plan

    def report(self, plan: DeletePlan, answer: bytes) -> None:
        """After a successful DELETE: queue the OnDeleted* events its answer implies."""
        try:
            payload = json.loads(answer or b"{}")
        except ValueError:
            return
        if not isinstance(payload, dict) or "RemainingAncestor" not in payload:
            return
        remaining = payload["RemainingAncestor"]
        kept = LEVELS.index(remaining["Type"]) if isinstance(remaining, dict) and remaining.get("Type") in LEVELS \
            else -1
        deleted = [*plan.descendants, (plan.level, plan.resource)]
        deleted += [(lvl, rid) for lvl, rid in plan.ancestors if LEVELS.index(lvl) > kept]
        for lvl, rid in deleted:
            self.pump.submit(f"OnDeleted{lvl}", rid)

    async def delete(self, uri: str, headers: dict[str, str] | None = None) -> bytes:
        """``DELETE uri`` on the PACS, reporting OnDeleted* when ``uri`` is a resource."""
        target = self.parse(uri) if self.watching() else None
        plan = await self.plan(*target) if target else None
        answer = await self.pacs.request("DELETE", uri, headers=headers)
        if plan is not None:
            self.report(plan, answer)
        return answer

    async def proxied(self, app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run a DELETE through the gateway's app, then report what the PACS deleted."""
        target = self.parse(scope["path"])
        plan = await self.plan(*target) if target else None
        if plan is None:
            await app(scope, receive, send)
            return
        status = 0
        body: list[bytes] = []
        size = 0

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and size < 65536:
                chunk = message.get("body", b"")
                body.append(chunk)
                size += len(chunk)
            await send(message)

        await app(scope, receive, capture)
        if status == 200:
            self.report(plan, b"".join(body))


# --------------------------------------------------------------------------- the change feed
class CursorFile:
    """``<DataFolder>/orthanc/changes.json``: the last delivered change and the PACS it came from."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.path = path
        self.upstream = upstream

    def load(self) -> int | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("upstream") != self.upstream or not isinstance(data.get("seq"), int):
            return None
        return data["seq"]

    def save(self, seq: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"seq": seq, "upstream": self.upstream, "saved": time.time()}))
        os.replace(tmp, self.path)


OriginLookup = Callable[[str, dict[str, Any], dict[str, Any]], "tuple[dict[str, Any], dict[str, Any]] | None"]


class ChangeFeed:
    """Polls the PACS's ``/changes`` and delivers the mapped callbacks, in order."""

    def __init__(self, pacs: Pacs, host: ScriptHost, cursor_file: CursorFile, origin: OriginLookup) -> None:
        self.pacs = pacs
        self.host = host
        self.cursor_file = cursor_file
        self.origin = origin
        self.cursor: int | None = None
        self._first_activation = True
        self.delivered = 0

    def active(self) -> bool:
        return any(self.host.defines(c) for c in CHANGE_CALLBACKS)

    def deactivate(self) -> None:
        """No script wants changes now: when one does again, start from that moment."""
        self.cursor = None

    async def _start_cursor(self) -> int:
        if self._first_activation:
            self._first_activation = False
            saved = self.cursor_file.load()
            if saved is not None:
                log.info("Orthanc change feed resumes after change %d", saved)
                return saved
        last = (await self.pacs.get("/changes?last")) or {}
        seq = int(last.get("Last", 0))
        self.cursor_file.save(seq)
        log.info("Orthanc change feed starts after change %d", seq)
        return seq

    async def poll(self) -> None:
        """Deliver every change after the cursor (page by page), then return."""
        if self.cursor is None:
            self.cursor = await self._start_cursor()
        while True:
            page = await self.pacs.get(f"/changes?since={self.cursor}&limit={PAGE}") or {}
            changes = page.get("Changes") or []
            for change in changes:
                await self._deliver(change)
                self.cursor = max(self.cursor, int(change.get("Seq", self.cursor)))
            if not changes:
                last = page.get("Last")
                if isinstance(last, int) and last < self.cursor:
                    log.warning("the PACS's change log restarted (its last change is %d, ours %d)", last, self.cursor)
                    self.cursor = last
                    self.cursor_file.save(self.cursor)
                return
            self.cursor_file.save(self.cursor)
            if page.get("Done", True):
                return

    async def _deliver(self, change: dict[str, Any]) -> None:
        kind = change.get("ChangeType")
        rid = change.get("ID")
        level = change.get("ResourceType")
        if not isinstance(rid, str) or level not in LEVELS:
            return
        if kind == "NewInstance":
            if self.host.defines("OnStoredInstance"):
                await self._stored_instance(rid)
        elif kind in STABLE:
            callback = STABLE[kind]
            if self.host.defines(callback):
                await self._stable(callback, level, rid)
        elif kind in UPDATED:
            await self._simple(f"OnUpdated{level}", rid)
        elif kind == "Deleted":  # not logged by Orthanc 1.x; other PACSes may report it
            await self._simple(f"OnDeleted{level}", rid)
        else:
            return
        self.delivered += 1

    async def _simple(self, callback: str, rid: str) -> None:
        if self.host.defines(callback):
            await deliver(self.host, callback, rid)

    async def _stored_instance(self, rid: str) -> None:
        try:
            tags, metadata = await asyncio.gather(
                self.pacs.get(f"/instances/{rid}/simplified-tags"),
                self.pacs.get(f"/instances/{rid}/metadata?expand"),
            )
        except PacsError as e:
            if e.status == 404:
                log.debug("OnStoredInstance skipped: instance %s was deleted before it could be read", rid)
                return
            raise
        looked_up = self.origin(rid, tags or {}, metadata or {})
        if looked_up is None:
            return
        metadata, origin = looked_up
        await deliver(self.host, "OnStoredInstance", rid, tags or {}, metadata, origin)

    async def _stable(self, callback: str, level: str, rid: str) -> None:
        try:
            info, metadata = await asyncio.gather(
                self.pacs.get(f"/{PLURAL[level]}/{rid}"),
                self.pacs.get(f"/{PLURAL[level]}/{rid}/metadata?expand"),
            )
        except PacsError as e:
            if e.status == 404:
                return
            raise
        tags = (info or {}).get("MainDicomTags") or {}
        await deliver(self.host, callback, rid, tags, metadata or {})


def origin_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Orthanc's ``origin`` table, rebuilt from the metadata the PACS stored with the instance."""
    kind = metadata.get("Origin") or "Unknown"
    origin: dict[str, Any] = {"RequestOrigin": kind}
    if kind == "DicomProtocol":
        origin.update(RemoteIp=metadata.get("RemoteIP", ""), RemoteAet=metadata.get("RemoteAET", ""),
                      CalledAet=metadata.get("CalledAET", ""))
    elif kind == "RestApi":
        origin.update(RemoteIp=metadata.get("RemoteIP", ""), Username=metadata.get("HttpUsername", ""))
    return origin


class LuaStored:
    """Instances the scripts stored themselves (``ModifyInstance``, ``RestApiPost('/instances')``):
    their ``OnStoredInstance`` says ``RequestOrigin = "Lua"`` and carries ``ModifiedFrom``, as
    in Orthanc, so the loop guards of Orthanc's sample scripts work. Bounded, in memory."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._items: OrderedDict[str, dict[str, str]] = OrderedDict()

    def add(self, instance_id: str, **metadata: str) -> None:
        self._items[instance_id] = metadata
        self._items.move_to_end(instance_id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, instance_id: str) -> dict[str, str] | None:
        return self._items.pop(instance_id, None)


# --------------------------------------------------------------------------- jobs
class JobWatcher:
    """``OnJobSubmitted`` / ``OnJobSuccess`` / ``OnJobFailure`` from the PACS's job list."""

    def __init__(self, pacs: Pacs, host: ScriptHost) -> None:
        self.pacs = pacs
        self.host = host
        self.states: dict[str, str] | None = None

    def active(self) -> bool:
        return any(self.host.defines(c) for c in JOB_CALLBACKS)

    def deactivate(self) -> None:
        self.states = None

    async def poll(self) -> None:
        jobs = await self.pacs.get("/jobs?expand") or []
        current = {j["ID"]: str(j.get("State", "")) for j in jobs if isinstance(j, dict) and "ID" in j}
        if self.states is None:  # first look: what already exists is not news
            self.states = current
            return
        for job_id, state in current.items():
            before = self.states.get(job_id)
            if before is None and self.host.defines("OnJobSubmitted"):
                await deliver(self.host, "OnJobSubmitted", job_id)
            if state != before and state in ("Success", "Failure"):
                callback = "OnJobSuccess" if state == "Success" else "OnJobFailure"
                if self.host.defines(callback):
                    await deliver(self.host, callback, job_id)
        self.states = current


# --------------------------------------------------------------------------- the component
class OrthancEvents:
    """Runs the change feed, the job watcher and ``OnHeartBeat``; each does I/O only while some
    script defines one of its callbacks (checked every poll interval: a set lookup)."""

    def __init__(
        self,
        host: ScriptHost,
        feed: ChangeFeed,
        jobs: JobWatcher,
        pump: EventPump,
        *,
        poll_interval: float,
        heartbeat_period: float,
        on_tick: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.host = host
        self.feed = feed
        self.jobs = jobs
        self.pump = pump
        self.poll_interval = poll_interval
        self.heartbeat_period = heartbeat_period
        self.on_tick = on_tick
        self.on_stop = on_stop
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error: str | None = None
        self.heartbeats = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._poll_loop()))
        if self.heartbeat_period > 0:
            self._tasks.append(loop.create_task(self._heartbeat_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.pump.drain(2.0)
        await self.pump.stop()
        if self.on_stop is not None:
            await self.on_stop()

    async def _poll_loop(self) -> None:
        delay = self.poll_interval
        while True:
            try:
                if self.on_tick is not None:
                    await self.on_tick()
                for source in (self.feed, self.jobs):
                    if source.active():
                        await source.poll()
                    else:
                        source.deactivate()
                if self.last_error:
                    log.info("the PACS answers again; Orthanc change callbacks resume")
                self.last_error = None
                delay = self.poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as e:
                message = str(e) or type(e).__name__
                if message != self.last_error:
                    log.warning("Orthanc change callbacks: %s (retrying)", message)
                self.last_error = message
                delay = min(max(delay * 2, self.poll_interval), 10.0)
            await asyncio.sleep(delay)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_period)
            if self.host.defines("OnHeartBeat"):
                self.heartbeats += 1
                await deliver(self.host, "OnHeartBeat")

    def health(self) -> dict[str, Any]:
        return {
            "ok": self.last_error is None,
            "changesCursor": self.feed.cursor,
            "changesDelivered": self.feed.delivered,
            "lastError": self.last_error,
            "heartbeats": self.heartbeats,
            "queued": self.pump.queue.qsize(),
        }
