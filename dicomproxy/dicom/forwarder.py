"""Forward spooled instances to the PACS: in arrival order per study, concurrently across
studies, with retries and backoff, each instance until the PACS accepts or refuses it.

Scheduling: every study has a FIFO of spool entries. ``Dicom:ForwardConcurrency`` lanes each
lease one study at a time and send its head entries in order, so one study is never sent out
of order while unrelated studies proceed in parallel. A lane keeps its upstream association
open across instances (and re-negotiates only when an instance needs a presentation context
it has not proposed yet); after a batch it hands the study back so no study starves others.

Outcomes per instance:

* accepted (success or warning status, or STOW-RS stored it): ``on_stored`` runs (the Lua
  ``onInstanceStored`` event and the "instance stored" hook), then it leaves the spool;
* transient trouble (PACS unreachable, association rejected or aborted, timeouts, "out of
  resources" 0xA7xx, HTTP 5xx): retried after ``ForwardRetrySeconds``, doubling up to
  ``ForwardMaxRetrySeconds``; the study waits, so order holds. With ``ForwardMaxAttempts`` > 0
  an instance is given up after that many attempts;
* refused for good (any other failure status, a context the PACS will not accept for a
  compressed instance, STOW FailedSOPSequence): moved to the spool's ``failed/`` folder and
  ``on_failed`` runs (log line, ``forward.failed`` bus event). Never silently dropped.

At least once: an entry leaves the spool only after the PACS's answer (and after
``on_stored``), and lanes never hold the same study, so a healthy run sends each instance once.
If the connection dies after the PACS stored an instance but before its answer arrived, or the
gateway stops between the answer and the removal, the instance is sent again: a PACS keys
instances on SOPInstanceUID, so it still holds one copy, but its "stored" events may fire twice.

Large instances are sent from the spool file in pieces (:class:`.storage_scu.FileDataset`),
never read into memory whole; instances up to ``spool.MEMORY_COPY_MAX`` come from the copy the
receiving thread kept, within :data:`MEMORY_CACHE_BYTES` in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from dicomproxy.dicom import presentation
from dicomproxy.dicom.presentation import ContextBook, NotAccepted
from dicomproxy.dicom.spool import MEMORY_COPY_MAX, Spool, SpoolEntry, file_meta
from dicomproxy.dicom.storage_scu import FileDataset, StorageScu
from dicomproxy.dicom.ul.errors import UpperLayerError

log = logging.getLogger(__name__)

STUDY_BATCH = 64
# An upstream association idle this long is released: a PACS being restarted waits for open
# associations, and a trickle of instances re-associates in a few milliseconds anyway.
IDLE_CLOSE_SECONDS = 2.0
MEMORY_CACHE_BYTES = 256 << 20


class PermanentError(Exception):
    """The PACS refused this instance for good."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(Exception):
    """Try again later (the PACS is unreachable, busy or out of resources)."""


@dataclass
class ForwardResult:
    """What the PACS answered for one instance (handed to ``onInstanceStored``)."""

    status: int
    status_text: str
    via: str
    instance_id: str = ""
    retrieve_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ForwardTarget:
    via: str  # "dimse" | "dicomweb"
    aet: str = ""
    host: str = ""
    port: int = 0
    calling_aet: str = "DICOMPROXY"
    stow_url: str = ""
    timeout: float = 60.0
    connect_timeout: float = 10.0

    def describe(self) -> str:
        return self.stow_url if self.via == "dicomweb" else f"{self.aet}@{self.host}:{self.port}"


DatasetReader = Callable[[], Awaitable[bytes]]
StoredCallback = Callable[[SpoolEntry, ForwardResult, DatasetReader], Awaitable[None]]
FailedCallback = Callable[[SpoolEntry, str], None]
SessionFactory = Callable[[], Awaitable[Any]]


class _DimseLane:
    def __init__(self, target: ForwardTarget, book: ContextBook, index: int) -> None:
        self.target = target
        self.book = book
        self.index = index
        self.assoc: StorageScu | None = None

    async def _associate(self) -> StorageScu:
        if self.assoc is not None:
            await self.assoc.release()
        t = self.target
        try:
            self.assoc = await StorageScu.connect(
                t.host, t.port, called_aet=t.aet, calling_aet=t.calling_aet, contexts=self.book.contexts(),
                timeout=t.connect_timeout,
            )
        except UpperLayerError as e:
            self.assoc = None
            raise TransientError(str(e)) from None
        return self.assoc

    async def send(self, entry: SpoolEntry, data: bytes | FileDataset) -> ForwardResult:
        key = (entry.sop_class, entry.transfer_syntax)
        new_pair = self.book.want(*key)
        assoc = self.assoc
        reused = assoc is not None and assoc.is_open and not new_pair
        if assoc is not None and reused:
            idle = asyncio.get_running_loop().time() - assoc.last_used
            if idle > IDLE_CLOSE_SECONDS or (key not in assoc.accepted and key not in assoc.rejected):
                reused = False
        if not reused:
            assoc = await self._associate()
        assert assoc is not None
        try:
            status = await self._store(assoc, entry, data)
        except UpperLayerError as e:
            if not reused:
                raise TransientError(str(e)) from None
            # An idle association the PACS dropped: one immediate retry on a fresh one.
            try:
                status = await self._store(await self._associate(), entry, data)
            except UpperLayerError as e2:
                raise TransientError(str(e2)) from None
        if status.is_success or status.is_warning:
            return ForwardResult(status.status, str(status), "dimse")  # C-STORE answers no resource id
        if status.is_out_of_resources:
            raise TransientError(f"{self.target.describe()} is out of resources: status {status}")
        raise PermanentError(f"{self.target.describe()} refused the instance: status {status}", status.status)

    async def _store(self, assoc: StorageScu, entry: SpoolEntry, data: bytes | FileDataset) -> Any:
        """The instance's own syntax if accepted; else an uncompressed one, re-encoded."""
        try:
            ts = presentation.choose(assoc.accepted, entry.sop_class, entry.transfer_syntax, self.target.describe())
            if ts != entry.transfer_syntax:
                raw = data if isinstance(data, bytes) else await _read_file(data)
                data = await asyncio.to_thread(presentation.transcode, raw, entry.transfer_syntax, ts)
        except NotAccepted as e:
            raise PermanentError(str(e)) from None
        return await assoc.c_store(entry.sop_class, entry.sop_instance, ts, data, timeout=self.target.timeout)

    async def close(self) -> None:
        if self.assoc is not None:
            await self.assoc.release()
            self.assoc = None

    async def close_if_idle(self) -> None:
        if self.assoc is not None and (
            not self.assoc.is_open or asyncio.get_running_loop().time() - self.assoc.last_used > IDLE_CLOSE_SECONDS
        ):
            await self.close()


async def _read_file(source: FileDataset) -> bytes:
    def read() -> bytes:
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            return f.read(source.length if source.length >= 0 else -1)

    return await asyncio.to_thread(read)


class _StowLane:
    """STOW-RS to ``Upstream:Url`` + ``Upstream:DicomWebRoot`` + ``/studies``, one study batch per request."""

    def __init__(self, target: ForwardTarget, session_factory: SessionFactory) -> None:
        self.target = target
        self.session_factory = session_factory

    async def send_batch(
        self, entries: list[SpoolEntry], payloads: list[bytes]
    ) -> list[ForwardResult | PermanentError]:
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for entry, data in zip(entries, payloads, strict=True):
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            parts.append(
                file_meta(entry.sop_class, entry.sop_instance, entry.transfer_syntax, entry.origin.get("CallingAE", ""))
            )
            parts.append(data)
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        body = b"".join(parts)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        client = await self.session_factory()  # the gateway's upstream httpx client
        try:
            async with asyncio.timeout(self.target.timeout):
                resp = await client.post(
                    self.target.stow_url, content=body, headers=headers,
                    timeout=httpx.Timeout(self.target.timeout, connect=self.target.connect_timeout),
                )
            status, text = resp.status_code, resp.text
        except (TimeoutError, httpx.HTTPError, OSError) as e:
            raise TransientError(f"STOW-RS to {self.target.stow_url} failed: {e!r}") from None
        if status >= 500 or status in (401, 403, 404, 408, 429):
            raise TransientError(f"STOW-RS to {self.target.stow_url} answered HTTP {status}: {text[:200]}")
        if status not in (200, 202, 409):
            return [PermanentError(f"STOW-RS answered HTTP {status}: {text[:200]}") for _ in entries]
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {}
        failed: dict[str, int] = {}
        stored: dict[str, str] = {}
        for item in (answer.get("00081198") or {}).get("Value", []) or []:
            uid = _first(item, "00081155")
            failed[uid] = int(_first(item, "00081197") or 0xC000)
        for item in (answer.get("00081199") or {}).get("Value", []) or []:
            stored[_first(item, "00081155")] = _first(item, "00081190")
        out: list[ForwardResult | PermanentError] = []
        for entry in entries:
            if entry.sop_instance in failed:
                code = failed[entry.sop_instance]
                if (code & 0xFF00) == 0xA700:
                    raise TransientError(f"STOW-RS: PACS out of resources (0x{code:04X})")
                out.append(PermanentError(f"STOW-RS refused the instance: FailureReason 0x{code:04X}", code))
            elif status == 409 and entry.sop_instance not in stored:
                out.append(PermanentError("STOW-RS answered 409 without storing the instance", 409))
            else:
                out.append(
                    ForwardResult(
                        status, f"HTTP {status}", "dicomweb", entry.sop_instance, stored.get(entry.sop_instance, "")
                    )
                )
        return out

    async def close(self) -> None:
        return None

    async def close_if_idle(self) -> None:
        return None


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [""]
    return values[0]


class Forwarder:
    def __init__(
        self,
        spool: Spool,
        target: ForwardTarget,
        *,
        concurrency: int = 4,
        retry: float = 2.0,
        max_retry: float = 60.0,
        max_attempts: int = 0,
        on_stored: StoredCallback | None = None,
        on_failed: FailedCallback | None = None,
        session_factory: SessionFactory | None = None,
    ) -> None:
        self.spool = spool
        self.target = target
        self.concurrency = max(1, concurrency)
        self.retry = retry
        self.max_retry = max_retry
        self.max_attempts = max_attempts
        self.on_stored = on_stored
        self.on_failed = on_failed
        self.session_factory = session_factory
        self._queues: dict[str, deque[SpoolEntry]] = {}
        self._ready: deque[str] = deque()
        self._queued_or_leased: set[str] = set()
        self._cond: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._book = ContextBook()
        self._cached = 0
        self._waiting = 0  # lanes waiting for work: only then does enqueue need to wake one
        self.forwarded = 0
        self.failed = 0
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_success_at = 0.0
        self.retrying = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, recovered: list[SpoolEntry] = ()) -> None:  # type: ignore[assignment]
        self._cond = asyncio.Condition()
        for entry in recovered:
            self._add(entry)
        for i in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._lane(i), name=f"dicom-forward-{i}"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    # -- queueing (event-loop thread only) -------------------------------------------------
    def enqueue(self, entry: SpoolEntry) -> None:
        """Called on the loop (``loop.call_soon_threadsafe`` from the SCP threads)."""
        self._add(entry)
        if self._cond is not None and self._waiting:
            asyncio.ensure_future(self._notify())

    def _add(self, entry: SpoolEntry) -> None:
        if entry.data is not None:
            if self._cached + len(entry.data) > MEMORY_CACHE_BYTES:
                entry.data = None  # a long queue (PACS down): read from disk when its turn comes
            else:
                self._cached += len(entry.data)
        key = entry.study or entry.sop_instance
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        q.append(entry)
        if key not in self._queued_or_leased:
            self._queued_or_leased.add(key)
            self._ready.append(key)

    async def _notify(self) -> None:
        assert self._cond is not None
        async with self._cond:
            self._cond.notify()

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    # -- lanes ----------------------------------------------------------------------------
    async def _lane(self, index: int) -> None:
        assert self._cond is not None
        lane: _DimseLane | _StowLane
        if self.target.via == "dicomweb":
            if self.session_factory is None:
                raise RuntimeError("ForwardVia dicomweb needs an HTTP session factory")
            lane = _StowLane(self.target, self.session_factory)
        else:
            lane = _DimseLane(self.target, self._book, index)
        try:
            while not self._stopping:
                if not self._ready:
                    self._waiting += 1
                    try:
                        # asyncio.timeout, never wait_for: on 3.11 wait_for runs the wait in a task of
                        # its own, and a stop() landing while that wait times out let this lane leave
                        # the ``async with`` before the wait had the lock back; the lock then stayed
                        # taken and the other lanes' waits, which refuse cancellation until they get
                        # it, hung stop() or asyncio.run()'s final cancel forever (the SIGTERM hang:
                        # a dump of a hung gateway showed two orphaned ``Condition.wait()`` tasks
                        # "cancelling" at ``await self.acquire()``; tests/dicom/test_forwarder.py).
                        async with self._cond, asyncio.timeout(IDLE_CLOSE_SECONDS / 2):
                            await self._cond.wait()
                    except TimeoutError:
                        pass
                    finally:
                        self._waiting -= 1
                    if not self._ready:
                        await lane.close_if_idle()  # outside the lock: a release may take seconds
                        continue
                study = self._ready.popleft()
                try:
                    await self._drain(lane, study)
                finally:
                    q = self._queues.get(study)
                    if q:
                        self._ready.append(study)
                        async with self._cond:
                            self._cond.notify()
                    else:
                        self._queues.pop(study, None)
                        self._queued_or_leased.discard(study)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(lane.close())

    async def _drain(self, lane: _DimseLane | _StowLane, study: str) -> None:
        q = self._queues[study]
        sent = 0
        while q and sent < STUDY_BATCH and not self._stopping:
            if isinstance(lane, _StowLane):
                batch = [q[i] for i in range(min(len(q), 32))]
                await self._with_retry(functools.partial(self._stow, lane, batch))
                for _ in batch:
                    q.popleft()
                sent += len(batch)
            else:
                entry = q[0]
                await self._with_retry(functools.partial(self._dimse, lane, entry))
                q.popleft()
                sent += 1

    async def _with_retry(self, attempt: Callable[[], Awaitable[None]]) -> None:
        delay = self.retry
        counted = False
        try:
            while True:
                try:
                    await attempt()
                    if counted:
                        log.info("forwarding to %s works again", self.target.describe())
                    return
                except TransientError as e:
                    if not counted:
                        self.retrying += 1
                        counted = True
                    self.last_error = str(e)
                    self.last_error_at = time.time()
                    log.warning("forward to %s failed (%s); retrying in %.1fs", self.target.describe(), e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry)
        finally:
            if counted:
                self.retrying -= 1

    async def _read(self, entry: SpoolEntry) -> bytes | None:
        """The data set in memory (the cached copy, else read from the spool file)."""
        if entry.data is not None:
            data, entry.data = entry.data, None
            self._cached -= len(data)
            return data
        try:
            return await asyncio.to_thread(self.spool.read_dataset, entry)
        except FileNotFoundError:
            log.error("spool file %s vanished before forwarding; skipping", entry.path)
            return None

    async def _source(self, entry: SpoolEntry) -> bytes | FileDataset | None:
        """What a C-STORE sends: the cached copy, or the spool file read in pieces as it is sent."""
        if entry.data is not None or 0 <= entry.length <= MEMORY_COPY_MAX:
            return await self._read(entry)
        if not await asyncio.to_thread(entry.path.exists):
            log.error("spool file %s vanished before forwarding; skipping", entry.path)
            return None
        return FileDataset(entry.path, entry.data_offset, entry.length)

    async def _dimse(self, lane: _DimseLane, entry: SpoolEntry) -> None:
        data = await self._source(entry)
        if data is None:
            return
        entry.attempts += 1
        try:
            result = await lane.send(entry, data)
        except PermanentError as e:
            self._fail(entry, str(e), e.status)
            return
        except TransientError:
            if self.max_attempts and entry.attempts >= self.max_attempts:
                self._fail(entry, f"gave up after {entry.attempts} attempts: {self.last_error}", None)
                return
            raise
        await self._stored(entry, result, data if isinstance(data, bytes) else None)

    async def _stow(self, lane: _StowLane, batch: list[SpoolEntry]) -> None:
        payloads: list[bytes] = []
        live: list[SpoolEntry] = []
        for entry in batch:
            data = await self._read(entry)
            if data is not None:
                live.append(entry)
                payloads.append(data)
        if not live:
            return
        for entry in live:
            entry.attempts += 1
        try:
            results = await lane.send_batch(live, payloads)
        except TransientError:
            if self.max_attempts and live[0].attempts >= self.max_attempts:
                for entry in live:
                    self._fail(entry, f"gave up after {entry.attempts} attempts: {self.last_error}", None)
                return
            raise
        for entry, data, result in zip(live, payloads, results, strict=True):
            if isinstance(result, PermanentError):
                self._fail(entry, str(result), result.status)
            else:
                await self._stored(entry, result, data)

    async def _stored(self, entry: SpoolEntry, result: ForwardResult, data: bytes | None) -> None:
        self.forwarded += 1
        self.last_success_at = time.time()
        if self.on_stored is not None:

            async def read() -> bytes:
                if data is not None:
                    return data
                return await asyncio.to_thread(self.spool.read_dataset, entry)

            try:
                await self.on_stored(entry, result, read)
            except Exception:
                log.exception("onInstanceStored handling failed for %s", entry.sop_instance)
        self.spool.remove(entry)

    def _fail(self, entry: SpoolEntry, reason: str, status: int | None) -> None:
        try:
            where = self.spool.fail(entry, reason, status=status)
        except OSError as e:
            log.error("could not move %s to the failed folder: %s", entry.path, e)
            where = entry.path
        self.failed += 1
        self.last_error = reason
        self.last_error_at = time.time()
        log.error(
            "forward of %s (study %s, from %s) to %s failed for good: %s; kept in %s",
            entry.sop_instance,
            entry.study,
            entry.origin.get("CallingAE", "?"),
            self.target.describe(),
            reason,
            where,
        )
        if self.on_failed is not None:
            try:
                self.on_failed(entry, reason)
            except Exception:
                log.exception("forward.failed handling failed")
