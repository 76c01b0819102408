"""Forward spooled instances to the PACS: in arrival order per study, concurrently across
studies, each instance until the PACS accepts it, refuses it for good, or it has used up its
attempts. Nothing an instance does can wedge the others.

Scheduling: every study has a FIFO of spool entries. ``Dicom:ForwardConcurrency`` lanes each
lease one study at a time and send its head entries in order, so unrelated studies proceed in
parallel; after a batch a lane hands the study back so no study starves others. A lane keeps
its upstream association open across instances, keyed by the (calling, called) AE titles it was
opened with (:meth:`ForwardTarget.titles`: by default the modality's own, ``Dicom:Upstream:AeTitles``),
and re-associates when the next instance needs other titles or a presentation context it has
not proposed; so there are at most ``ForwardConcurrency`` forwarding associations.

Two kinds of trouble, kept apart (the issue: four instances Orthanc refused with 0xA700 were
retried forever and held every lane, nothing else was forwarded):

* **the instance's**: a status :class:`.statuses.RetryRule` retries (0xA7xx...), an association
  the PACS rejects permanently for its AE titles, a C-STORE aborted or timed out. The instance
  gets an attempt counted and its own backoff (``ForwardRetrySeconds`` doubling up to
  ``ForwardMaxRetrySeconds``), written to ``<seq>.state`` so a restart (even kill -9) goes on
  from there; it steps out of its study's queue while it waits, so the rest of the study and
  every other study keep going. After ``ForwardMaxAttempts`` it goes to ``failed/``.
* **the PACS's**: it cannot be reached (connection refused, timeout, transient A-ASSOCIATE-RJ,
  HTTP 5xx for STOW-RS). No instance is charged; the destination backs off as a whole
  (:class:`Destination`) and every lane waits for it, since nothing could be sent anyway.

Refused for good (a status not retried, a context the PACS will not take for a compressed
instance, a STOW FailedSOPSequence entry): moved to ``failed/`` with the reason, and
``on_failed`` runs (log line, ``forward.failed`` event). Never silently dropped.

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
import heapq
import json
import logging
import ssl
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from dicomproxy.dicom import presentation, statuses
from dicomproxy.dicom.presentation import ContextBook, NotAccepted
from dicomproxy.dicom.spool import MEMORY_COPY_MAX, Spool, SpoolEntry, file_meta
from dicomproxy.dicom.storage_scu import FileDataset, StorageScu
from dicomproxy.dicom.transcode import NO_TRANSCODING, Transcoding
from dicomproxy.dicom.ul.errors import AssociationRejected, UpperLayerError

log = logging.getLogger(__name__)

STUDY_BATCH = 64
# An upstream association idle this long is released: a PACS being restarted waits for open
# associations, and a trickle of instances re-associates in a few milliseconds anyway.
IDLE_CLOSE_SECONDS = 2.0
MEMORY_CACHE_BYTES = 256 << 20
STOW_BATCH = 32


class PermanentError(Exception):
    """The PACS refused this instance for good."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryLater(Exception):
    """This instance failed; try it again after its backoff (an attempt is counted)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(Exception):
    """The PACS cannot be reached now: nothing is charged to the instance."""


TransientError = Unreachable  # the name callers used before the two kinds were told apart


@dataclass
class ForwardResult:
    """What the PACS answered for one instance (handed to ``onInstanceStored``)."""

    status: int
    status_text: str
    via: str
    instance_id: str = ""
    retrieve_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    peer: str = ""  # the peer that stored it (a group's member; its ``describe()``)


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
    ae_titles: str = "Gateway"  # "Modality": the modality's calling AE and the called AE it asked for;
    # "Calling": the modality's calling AE and this peer's own AE title (a named destination: the called AE
    # the modality asked for is the gateway's, perhaps a virtual AE, not the destination's)
    tls: ssl.SSLContext | None = None  # Dicom:Upstream:Tls
    name: str = "default"  # the destination's name (Dicom:Routes, onCStore)
    members: Callable[[], list[ForwardTarget]] | None = None
    """A group: its members to try in order, each call (None: this target alone)."""

    def candidates(self) -> list[ForwardTarget]:
        return self.members() if self.members is not None else [self]
    transcoding: Transcoding = NO_TRANSCODING  # Dicom:Transcode
    report: Callable[[str, UpperLayerError | None], None] | None = None
    """How an association with a member went, by its ``name`` (:meth:`.destinations.Destinations.report`:
    the registry's passive ejection)."""

    def reported(self, error: UpperLayerError | None) -> None:
        if self.report is not None:
            self.report(self.name, error)

    def describe(self) -> str:
        if self.members is not None:
            return f"group {self.name}"
        return self.stow_url if self.via == "dicomweb" else f"{self.aet}@{self.host}:{self.port}"

    def titles(self, origin: dict[str, Any]) -> tuple[str, str]:
        """``(calling, called)`` AE titles for an instance from the association ``origin``."""
        if self.ae_titles == "Modality":
            return (str(origin.get("CallingAE") or self.calling_aet), str(origin.get("CalledAE") or self.aet))
        if self.ae_titles == "Calling":
            return str(origin.get("CallingAE") or self.calling_aet), self.aet
        return self.calling_aet, self.aet


class Destination:
    """The PACS as a whole: reachable, or backing off after it could not be reached. Read from
    any thread (the relay asks :attr:`down`), changed on the event loop."""

    def __init__(self, retry: float, max_retry: float) -> None:
        self.retry = retry
        self.max_retry = max_retry
        self.delay = 0.0
        self.ready_at = 0.0  # time.monotonic()
        self.last_error = ""
        self.last_error_at = 0.0

    @property
    def down(self) -> bool:
        return self.ready_at > time.monotonic()

    def wait(self) -> float:
        return max(0.0, self.ready_at - time.monotonic())

    def unreachable(self, error: str) -> float:
        now = time.monotonic()
        if now >= self.ready_at:  # lanes failing together count once
            self.delay = self.retry if not self.delay else min(self.delay * 2, self.max_retry)
            self.ready_at = now + self.delay
        self.last_error, self.last_error_at = error, time.time()
        return self.delay

    def reachable(self) -> bool:
        """True when this ends a spell of unreachability."""
        was = self.delay > 0
        self.delay, self.ready_at = 0.0, 0.0
        return was


DatasetReader = Callable[[], Awaitable[bytes]]
StoredCallback = Callable[[SpoolEntry, ForwardResult, DatasetReader], Awaitable[None]]
FailedCallback = Callable[[SpoolEntry, str], None]
SessionFactory = Callable[[], Awaitable[Any]]
Outcome = ForwardResult | PermanentError | RetryLater


class _DimseLane:
    def __init__(
        self, target: ForwardTarget, book: ContextBook, rule: statuses.RetryRule, index: int,
        on_context_refused: Callable[[], None] | None = None,
    ) -> None:
        self.target = target
        self.book = book
        self.rule = rule
        self.index = index
        self.on_context_refused = on_context_refused
        self.assoc: StorageScu | None = None
        self.titles: tuple[str, str] = ("", "")
        self.peer: ForwardTarget = target  # a group's member the association is with

    async def _associate(self, origin: dict[str, Any]) -> StorageScu:
        """Associate with the target, or with a group's first member that can be reached (one
        that cannot connect or associate is down: the next is tried)."""
        await self.close()
        unreachable: list[str] = []
        for peer in self.target.candidates():
            titles = peer.titles(origin)
            try:
                self.assoc = await StorageScu.connect(
                    peer.host, peer.port, called_aet=titles[1], calling_aet=titles[0], contexts=self.book.contexts(),
                    timeout=peer.connect_timeout, tls=peer.tls,
                )
            except AssociationRejected as e:
                peer.reported(e)
                if e.result == 1:  # permanent: these AE titles (this modality) are not welcome
                    raise RetryLater(f"{e} (calling AE {titles[0]}, called AE {titles[1]})") from None
                unreachable.append(f"{peer.describe()}: {e}")
                continue
            except UpperLayerError as e:
                peer.reported(e)
                unreachable.append(f"{peer.describe()}: {e}")
                continue
            peer.reported(None)
            self.titles, self.peer = titles, peer
            return self.assoc
        raise Unreachable("; ".join(unreachable))

    def _reusable(self, key: presentation.Pair, titles: tuple[str, str], new_pair: bool) -> bool:
        assoc = self.assoc
        if assoc is None or not assoc.is_open or new_pair or titles != self.titles:
            return False
        if self.target.members is not None and self.target.candidates()[0].name != self.peer.name:
            return False  # a group whose first choice changed (its primary is back): move to it
        idle = asyncio.get_running_loop().time() - assoc.last_used
        return idle <= IDLE_CLOSE_SECONDS and (key in assoc.accepted or key in assoc.rejected)

    async def send(self, entry: SpoolEntry, data: bytes | FileDataset) -> ForwardResult:
        key = (entry.sop_class, entry.transfer_syntax)
        titles = self.peer.titles(entry.origin)
        reused = self._reusable(key, titles, self.book.want(*key))
        assoc = self.assoc if reused and self.assoc is not None else await self._associate(entry.origin)
        try:
            status = await self._store(assoc, entry, data)
        except UpperLayerError as e:
            if not reused:
                raise RetryLater(str(e)) from None
            # An idle association the PACS dropped: one immediate retry on a fresh one.
            try:
                status = await self._store(await self._associate(entry.origin), entry, data)
            except UpperLayerError as e2:
                raise RetryLater(str(e2)) from None
        if statuses.is_stored(status.status):  # C-STORE answers no resource id
            return ForwardResult(status.status, str(status), "dimse", peer=self.peer.describe())
        what = f"{self.peer.describe()} refused the instance: status {status}"
        if self.rule.retried(status.status):
            raise RetryLater(what, status.status)
        raise PermanentError(what, status.status)

    async def _store(self, assoc: StorageScu, entry: SpoolEntry, data: bytes | FileDataset) -> Any:
        """The instance's own syntax if accepted; else an uncompressed one, re-encoded (transcoded
        from a compressed one with ``Dicom:Transcode`` ``ToAccepted``; the spool keeps the original)."""
        try:
            t = self.peer
            ts = presentation.choose(assoc.accepted, entry.sop_class, entry.transfer_syntax, t.describe(),
                                     t.transcoding)
            if ts != entry.transfer_syntax:
                raw = data if isinstance(data, bytes) else await _read_file(data)
                data = await asyncio.to_thread(presentation.transcode, raw, entry.transfer_syntax, ts, t.transcoding,
                                               f"{entry.sop_instance} for {t.describe()}")
        except NotAccepted as e:
            if self.on_context_refused is not None:
                self.on_context_refused()  # what the modality was told at negotiation is out of date
            raise PermanentError(str(e)) from None
        return await assoc.c_store(entry.sop_class, entry.sop_instance, ts, data, timeout=self.target.timeout)

    async def close(self) -> None:
        if self.assoc is not None:
            assoc, self.assoc = self.assoc, None
            await assoc.release()

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

    async def send_batch(self, entries: list[SpoolEntry], payloads: list[bytes]) -> list[Outcome]:
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
            raise Unreachable(f"STOW-RS to {self.target.stow_url} failed: {e!r}") from None
        if status >= 500 or status in (401, 403, 404, 408, 429):
            raise Unreachable(f"STOW-RS to {self.target.stow_url} answered HTTP {status}: {text[:200]}")
        if status not in (200, 202, 409):
            return [PermanentError(f"STOW-RS answered HTTP {status}: {text[:200]}") for _ in entries]
        return _stow_outcomes(entries, status, text)

    async def close(self) -> None:
        return None

    async def close_if_idle(self) -> None:
        return None


def _stow_outcomes(entries: list[SpoolEntry], status: int, text: str) -> list[Outcome]:
    try:
        answer = json.loads(text) if text.strip() else {}
    except ValueError:
        answer = {}
    failed: dict[str, int] = {}
    stored: dict[str, str] = {}
    for item in (answer.get("00081198") or {}).get("Value", []) or []:
        failed[_first(item, "00081155")] = int(_first(item, "00081197") or 0xC000)
    for item in (answer.get("00081199") or {}).get("Value", []) or []:
        stored[_first(item, "00081155")] = _first(item, "00081190")
    out: list[Outcome] = []
    for entry in entries:
        if entry.sop_instance in failed:
            code = failed[entry.sop_instance]
            what = f"STOW-RS refused the instance: FailureReason 0x{code:04X}"
            out.append(RetryLater(what, code) if (code & 0xFF00) == 0xA700 else PermanentError(what, code))
        elif status == 409 and entry.sop_instance not in stored:
            out.append(PermanentError("STOW-RS answered 409 without storing the instance", 409))
        else:
            out.append(ForwardResult(status, f"HTTP {status}", "dicomweb", entry.sop_instance,
                                     stored.get(entry.sop_instance, "")))
    return out


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
        max_attempts: int = 10,
        retry_rule: statuses.RetryRule | None = None,
        on_stored: StoredCallback | None = None,
        on_failed: FailedCallback | None = None,
        session_factory: SessionFactory | None = None,
        on_context_refused: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.on_context_refused = on_context_refused
        self.target = target
        self.concurrency = max(1, concurrency)
        self.retry = retry
        self.max_retry = max_retry
        self.max_attempts = max_attempts
        self.rule = retry_rule or statuses.RetryRule()
        self.on_stored = on_stored
        self.on_failed = on_failed
        self.session_factory = session_factory
        self.destination = Destination(retry, max_retry)
        self._queues: dict[str, deque[SpoolEntry]] = {}
        self._ready: deque[str] = deque()
        self._queued_or_leased: set[str] = set()
        self._delayed: list[tuple[float, int, SpoolEntry]] = []  # (next attempt, seq, entry): a heap
        self._sending: dict[int, SpoolEntry] = {}
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

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, recovered: list[SpoolEntry] = ()) -> None:  # type: ignore[assignment]
        self.launch(recovered)

    def launch(self, recovered: list[SpoolEntry] = ()) -> None:  # type: ignore[assignment]
        """:meth:`start` from synchronous code on the loop (a destination's first instance)."""
        self._cond = asyncio.Condition()
        for entry in recovered:
            self._schedule(entry)
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
        self._schedule(entry)
        if self._cond is not None and self._waiting:
            asyncio.ensure_future(self._notify())

    def _schedule(self, entry: SpoolEntry) -> None:
        if entry.next_at > time.time():
            self._drop_copy(entry)
            heapq.heappush(self._delayed, (entry.next_at, entry.seq, entry))
        else:
            self._add(entry)

    def _add(self, entry: SpoolEntry) -> None:
        if entry.data is not None:
            if self._cached + len(entry.data) > MEMORY_CACHE_BYTES:
                entry.data = None  # a long queue (PACS down): read from disk when its turn comes
            else:
                self._cached += len(entry.data)
        key = entry.key
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        q.append(entry)
        if key not in self._queued_or_leased:
            self._queued_or_leased.add(key)
            self._ready.append(key)

    def _drop_copy(self, entry: SpoolEntry) -> None:
        if entry.data is not None:
            self._cached -= len(entry.data)
            entry.data = None

    def _promote(self) -> float:
        """Move the entries whose backoff is over back into their studies; returns the seconds
        until the next one is due (or a long time)."""
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, entry = heapq.heappop(self._delayed)
            self._add(entry)
        return self._delayed[0][0] - now if self._delayed else IDLE_CLOSE_SECONDS / 2

    async def _notify(self) -> None:
        assert self._cond is not None
        async with self._cond:
            self._cond.notify()

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values()) + len(self._delayed) + len(self._sending)

    @property
    def delayed(self) -> int:
        return len(self._delayed)

    @property
    def retrying(self) -> int:
        """Instances in backoff, plus one while the PACS cannot be reached."""
        return len(self._delayed) + (1 if self.destination.down else 0)

    # -- lanes ----------------------------------------------------------------------------
    async def _lane(self, index: int) -> None:
        assert self._cond is not None
        lane: _DimseLane | _StowLane
        if self.target.via == "dicomweb":
            if self.session_factory is None:
                raise RuntimeError("ForwardVia dicomweb needs an HTTP session factory")
            lane = _StowLane(self.target, self.session_factory)
        else:
            lane = _DimseLane(self.target, self._book, self.rule, index, self.on_context_refused)
        try:
            while not self._stopping:
                wait = self.destination.wait()
                if wait > 0:
                    await lane.close_if_idle()
                    await asyncio.sleep(wait)
                    continue
                due = self._promote()
                if not self._ready:
                    await self._idle(lane, due)
                    continue
                study = self._ready.popleft()
                try:
                    await self._drain(lane, study)
                finally:
                    await self._hand_back(study)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(lane.close())

    async def _idle(self, lane: _DimseLane | _StowLane, due: float) -> None:
        assert self._cond is not None
        self._waiting += 1
        try:
            # asyncio.timeout, never wait_for: on 3.11 wait_for runs the wait in a task of its own,
            # and a stop() landing while that wait times out let this lane leave the ``async with``
            # before the wait had the lock back; the lock then stayed taken and the other lanes'
            # waits, which refuse cancellation until they get it, hung stop() or asyncio.run()'s
            # final cancel forever (the SIGTERM hang: a dump of a hung gateway showed two orphaned
            # ``Condition.wait()`` tasks "cancelling" at ``await self.acquire()``;
            # tests/dicom/test_forwarder.py).
            async with self._cond, asyncio.timeout(max(0.01, min(due, IDLE_CLOSE_SECONDS / 2))):
                await self._cond.wait()
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1
        if not self._ready:
            await lane.close_if_idle()  # outside the lock: a release may take seconds

    async def _hand_back(self, study: str) -> None:
        assert self._cond is not None
        q = self._queues.get(study)
        if q:
            self._ready.append(study)
            async with self._cond:
                self._cond.notify()
        else:
            self._queues.pop(study, None)
            self._queued_or_leased.discard(study)

    async def _drain(self, lane: _DimseLane | _StowLane, study: str) -> None:
        q = self._queues[study]
        sent = 0
        while q and sent < STUDY_BATCH and not self._stopping and not self.destination.down:
            n = min(len(q), STOW_BATCH) if isinstance(lane, _StowLane) else 1
            batch = [q.popleft() for _ in range(n)]
            for entry in batch:
                self._sending[entry.seq] = entry
            try:
                if isinstance(lane, _StowLane):
                    reached = await self._stow(lane, batch)
                else:
                    reached = await self._dimse(lane, batch[0])
            finally:
                for entry in batch:
                    self._sending.pop(entry.seq, None)
            if not reached:  # the PACS cannot be reached: the batch goes back, in order
                q.extendleft(reversed(batch))
                return
            sent += n

    # -- one attempt ----------------------------------------------------------------------
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

    async def _dimse(self, lane: _DimseLane, entry: SpoolEntry) -> bool:
        """One C-STORE; False when the PACS could not be reached (the entry is not charged)."""
        data = await self._source(entry)
        if data is None:
            return True
        result: Outcome
        try:
            result = await lane.send(entry, data)
        except Unreachable as e:
            if isinstance(data, bytes) and len(data) <= MEMORY_COPY_MAX:
                entry.data = data  # keep the copy for the next try
                self._cached += len(data)
            self._unreachable(str(e))
            return False
        except (PermanentError, RetryLater) as e:
            result = e
        except Exception as e:  # a bug must not lose the instance nor end the lane
            log.exception("forwarding %s failed", entry.sop_instance)
            result = RetryLater(f"gateway error: {e!r}")
        await self._outcome(entry, result, data if isinstance(data, bytes) else None)
        return True

    async def _stow(self, lane: _StowLane, batch: list[SpoolEntry]) -> bool:
        payloads: list[bytes] = []
        live: list[SpoolEntry] = []
        for entry in batch:
            data = await self._read(entry)
            if data is not None:
                live.append(entry)
                payloads.append(data)
        if not live:
            return True
        try:
            results = await lane.send_batch(live, payloads)
        except Unreachable as e:
            self._unreachable(str(e))
            return False
        except Exception as e:  # a bug must not lose the instances nor end the lane
            log.exception("forwarding a STOW-RS batch failed")
            results = [RetryLater(f"gateway error: {e!r}") for _ in live]
        for entry, data, result in zip(live, payloads, results, strict=True):
            await self._outcome(entry, result, data)
        return True

    async def _outcome(self, entry: SpoolEntry, result: Outcome, data: bytes | None) -> None:
        entry.attempts += 1
        if isinstance(result, ForwardResult):
            if self.destination.reachable():
                log.info("forwarding to %s works again", self.target.describe())
            await self._stored(entry, result, data)
        elif isinstance(result, RetryLater):
            self.destination.reachable()
            await self._retry_later(entry, str(result), result.status)
        else:
            await self._fail(entry, str(result), result.status)

    def _unreachable(self, error: str) -> None:
        delay = self.destination.unreachable(error)
        self.last_error, self.last_error_at = error, time.time()
        log.warning("forward to %s failed (%s); trying again in %.1fs", self.target.describe(), error, delay)

    async def _retry_later(self, entry: SpoolEntry, error: str, status: int | None) -> None:
        self.last_error, self.last_error_at = error, time.time()
        if self.max_attempts and entry.attempts >= self.max_attempts:
            entry.failed_attempt(error, time.time(), 0.0)
            await self._fail(entry, f"gave up after {entry.attempts} attempts: {error}", status)
            return
        delay = min(self.retry * 2 ** (entry.attempts - 1), self.max_retry)
        now = time.time()
        entry.failed_attempt(error, now, now + delay)
        try:
            await asyncio.to_thread(self.spool.save_state, entry)
        except OSError as e:
            log.error("cannot write the forwarding state of %s: %s", entry.path, e)
        log.warning("forward of %s (study %s) failed, attempt %d of %s (%s); trying it again in %.1fs",
                    entry.sop_instance, entry.study, entry.attempts, self.max_attempts or "unlimited", error, delay)
        self._schedule(entry)

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

    async def _fail(self, entry: SpoolEntry, reason: str, status: int | None) -> None:
        if not entry.last_error:
            entry.failed_attempt(reason, time.time(), 0.0)
        try:
            where = await asyncio.to_thread(self.spool.fail, entry, reason, status=status)
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

    # -- what the API shows ---------------------------------------------------------------
    def snapshot(self, limit: int = 100) -> dict[str, Any]:
        """What waits, per study (at most ``limit`` studies, the oldest first): counts by state,
        bytes (the data sets'), the oldest instance's reception and age, the last error. One pass
        over the queue (100 000 waiting: ~0.1 s on the loop; the page asks every 5 s)."""
        per: dict[str, dict[str, Any]] = {}

        def row(entry: SpoolEntry) -> dict[str, Any]:
            r = per.get(entry.key)
            if r is None:
                r = per[entry.key] = {"study": entry.study, "patientId": entry.patient_id,
                                      "callingAe": entry.origin.get("CallingAE", ""), "waiting": 0, "delayed": 0,
                                      "sending": 0, "oldestSeq": entry.seq, "nextAttemptAt": "", "bytes": 0,
                                      "oldestReceived": entry.received or now, "lastError": ""}
            r["oldestSeq"] = min(r["oldestSeq"], entry.seq)
            r["bytes"] += max(entry.length, 0)
            if entry.received:
                r["oldestReceived"] = min(r["oldestReceived"], entry.received)
            if entry.last_error:
                r["lastError"] = entry.last_error
            return r

        now = time.time()

        for q in self._queues.values():
            for entry in q:
                row(entry)["waiting"] += 1
        for entry in self._sending.values():
            row(entry)["sending"] += 1
        for next_at, _, entry in sorted(self._delayed):
            r = row(entry)
            r["delayed"] += 1
            r["nextAttemptAt"] = r["nextAttemptAt"] or _iso(next_at)
        studies = sorted(per.values(), key=lambda r: r["oldestSeq"])
        oldest = min((r["oldestReceived"] for r in studies), default=0.0)
        for r in studies[:limit]:
            r["oldestAgeSeconds"] = round(max(0.0, now - r["oldestReceived"]), 1)
            r["oldestReceived"] = _iso(r["oldestReceived"])
        d = self.destination
        return {
            "name": self.target.name,
            "destination": self.target.describe(),
            "via": self.target.via,
            "reachable": not d.down,
            "retryAt": _iso(time.time() + d.wait()) if d.down else "",
            "lastError": d.last_error or self.last_error,
            "waiting": sum(r["waiting"] for r in studies),
            "delayed": len(self._delayed),
            "sending": len(self._sending),
            "bytes": sum(r["bytes"] for r in studies),
            "oldestAgeSeconds": round(max(0.0, now - oldest), 1) if oldest else 0.0,
            "studiesTotal": len(studies),
            "studies": studies[:limit],
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""
