"""Stream an ASGI request body onto the end of an upload's data file.

The body arrives from uvicorn in messages of 64 KB or so. Handing each one to a thread (what
``aiofiles`` does per ``write``) costs a thread hop per message; instead the messages are
gathered into batches of a few MB and each batch is written with one ``os.writev`` in a
worker thread, while the event loop keeps receiving the next batch (double buffering). At
most two batches are in memory per request, so a 1 GB body never is. ``bench/tus_bench.py``
measures both ways. All requests together hold at most ``Tus:WriteBufferMB`` (see
:mod:`.buffers`), and a batch whose first byte is a second old is written even if not full, so
a stalled client holds nothing for long.

Bytes are written to the file descriptor directly (no user-space buffer), so once a batch is
written it is in the kernel and survives the process being killed; ``fsync`` (durability
against power loss) is the caller's policy (see ``Tus:Fsync``).

A chunk with ``Upload-Checksum`` is hashed in the same worker thread as it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import aiofiles

from dicomproxy.tus.buffers import BufferBudget

BATCH_BYTES = 4 * 1024 * 1024
MAX_HOLD_SECONDS = 1.0  # a batch older than this is written out even if not full
_IOV_MAX = 512

Receive = Callable[[], Awaitable[dict[str, Any]]]


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass
class WriteResult:
    written: int = 0
    disconnected: bool = False  # the client went away before the body ended
    exceeded: bool = False  # the body went past ``limit``; the excess was not stored
    interrupted: bool = False  # another request asked for the lock
    timed_out: bool = False  # no body bytes for ``read_timeout`` seconds
    incomplete: bool = False  # the body ended before ``expected`` bytes
    storage_full: bool = False  # the quota granted less than the body; the rest was not stored
    busy: bool = False  # no room in the buffer budget within its wait; the rest was not read


def _start_writeback(fd: int, nbytes: int) -> None:
    """Ask the kernel to start writing the last ``nbytes`` of ``fd`` to disk, without waiting.

    Dirty pages would otherwise pile up until the final ``fsync`` has to write the whole
    upload at once (1.3 s per GB here); started early, the write-out overlaps the transfer.
    """
    if _sync_file_range is None:
        return
    end = os.lseek(fd, 0, os.SEEK_END)
    _sync_file_range(fd, ctypes.c_int64(end - nbytes), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None


def _write_batch(fd: int, chunks: list[bytes], hasher: Hasher | None, writeback: bool) -> int:
    """Blocking: hash and append ``chunks``; returns bytes written (all of them, or raises)."""
    if hasher is not None:
        for c in chunks:
            hasher.update(c)
    total = 0
    for i in range(0, len(chunks), _IOV_MAX):
        group = chunks[i : i + _IOV_MAX]
        want = sum(len(c) for c in group)
        n = os.writev(fd, group)
        total += n
        if n < want:  # short write (rare on regular files): finish the rest piece by piece
            view = memoryview(b"".join(group))[n:]
            while view:
                k = os.write(fd, view)
                view = view[k:]
                total += k
    if writeback:
        _start_writeback(fd, total)
    return total


class Grantor(Protocol):
    """Where a batch asks for room on disk (:class:`~dicomproxy.tus.quota.UploadQuota`)."""

    async def grant(self, n: int, /) -> int: ...


class BodyWriter:
    """One request body -> one file descriptor. ``interrupt()`` may be called from any task.

    ``batch_bytes=0`` writes every message as it comes with ``aiofiles`` instead (one thread
    hop per message): kept to measure the difference (``bench/tus_bench.py --write-mode``).

    ``budget`` (shared by all requests) bounds the body bytes held in memory; ``quota`` grants
    each batch its room on disk. A batch is also written out once its oldest byte is
    ``max_hold`` seconds old (0: only full batches), so a client that stalls does not sit on
    its share of the budget.
    """

    def __init__(
        self,
        executor: Executor | None,
        batch_bytes: int = BATCH_BYTES,
        writeback: bool = True,
        read_timeout: float = 60.0,
        *,
        budget: BufferBudget | None = None,
        quota: Grantor | None = None,
        max_hold: float = MAX_HOLD_SECONDS,
    ) -> None:
        self._executor = executor
        self._writeback = writeback
        self._batch_bytes = batch_bytes
        self._read_timeout = read_timeout
        self._budget = budget
        self._quota = quota
        self._max_hold = max_hold
        self._task: asyncio.Task[Any] | None = None
        self._receiving = False
        self._interrupted = False
        self._timed_out = False
        self._cancelled_by_us = False
        self._last_read = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._batches: _Batches | None = None

    def interrupt(self) -> None:
        """Stop reading the body as soon as possible; what was received is still written."""
        self._interrupted = True
        self._cancel_receive()

    def _cancel_receive(self) -> None:
        if self._receiving and self._task is not None and not self._cancelled_by_us:
            self._cancelled_by_us = True
            self._task.cancel()

    def _watch(self) -> None:
        """A client that stops sending holds the upload's lock: give up after ``read_timeout``
        (tusd's network timeout). One timer per request, re-armed, not one per message."""
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_read
        if idle >= self._read_timeout and self._receiving:
            self._timed_out = True
            self.interrupt()
            return
        self._watchdog = loop.call_later(max(self._read_timeout - idle, 0.05), self._watch)

    def _arm_hold(self) -> None:
        if self._hold_timer is None and self._max_hold > 0:
            self._hold_timer = asyncio.get_running_loop().call_later(self._max_hold, self._hold_expired)

    def _hold_expired(self) -> None:
        """The oldest buffered byte is ``max_hold`` old: have the loop write the batch out."""
        self._hold_timer = None
        b = self._batches
        if b is None or not b.buffered:
            return  # armed again by the next message kept
        age = asyncio.get_running_loop().time() - b.first_at
        if age < self._max_hold:  # a newer batch than the one the timer was set for
            self._hold_timer = asyncio.get_running_loop().call_later(self._max_hold - age, self._hold_expired)
        elif self._receiving:
            self._cancel_receive()  # _receive returns None without an interrupt: write the batch
        # else the loop is busy writing or waiting for room; it checks the age on the next message

    async def _receive(self, receive: Receive) -> dict[str, Any] | None:
        """``receive()`` that :meth:`interrupt` (or the hold timer) can break out of; None then."""
        if self._interrupted:
            return None
        self._receiving = True
        try:
            message = await receive()
            self._last_read = asyncio.get_running_loop().time()
            return message
        except asyncio.CancelledError:
            task = self._task
            if self._cancelled_by_us and task is not None and task.uncancel() == 0:
                self._cancelled_by_us = False
                return None
            raise
        finally:
            self._receiving = False

    async def write(
        self,
        receive: Receive,
        fd: int,
        limit: int,
        hasher: Hasher | None = None,
        expected: int | None = None,
    ) -> WriteResult:
        """Append the body to ``fd``; keep at most ``limit`` bytes. Raises ``OSError`` on disk errors.

        When this returns, everything counted in ``written`` has been handed to the kernel.
        ``expected`` (the Content-Length) only serves to flag a body that ended early.
        """
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        if self._read_timeout > 0:
            self._watchdog = loop.call_later(self._read_timeout, self._watch)
        result = WriteResult()
        afile = None
        if self._batch_bytes == 0:
            afile = await aiofiles.open(fd, "ab", buffering=0, closefd=False)
        b = self._batches = _Batches(self._executor, fd, hasher, self._writeback, afile, self._budget, self._quota)
        try:
            await self._pump(receive, limit, b, result)
            await b.flush()
            await b.drain()
        finally:
            # On a cancellation or a disk error, never leave a write running behind the
            # caller's back: the caller releases the upload's lock right after this returns.
            await b.close()
            if afile is not None:
                await afile.close()
            for timer in (self._watchdog, self._hold_timer):
                if timer is not None:
                    timer.cancel()
        result.written = b.written
        result.storage_full = b.storage_full
        if self._timed_out:
            result.interrupted = False
            result.timed_out = True
        if expected is not None and result.written < expected and not result.exceeded:
            result.incomplete = True
        return result

    async def _pump(self, receive: Receive, limit: int, b: _Batches, result: WriteResult) -> None:
        """Receive until the body ends, ``limit`` is reached, or something stops the request."""
        loop = asyncio.get_running_loop()
        accepted = 0
        more = True
        while more and not b.storage_full:
            message = await self._receive(receive)
            if message is None:
                if self._interrupted:
                    result.interrupted = True
                    return
                await b.flush()  # held too long (the client paused): write it, keep reading
                continue
            if message["type"] == "http.disconnect":
                result.disconnected = True
                return
            body = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > limit - accepted:
                body = body[: max(limit - accepted, 0)]
                result.exceeded = True
                more = False
            if body:
                accepted += len(body)
                if not await self._keep(body, b):
                    result.busy = True
                    return
            if b.buffered >= self._batch_bytes or self._held_too_long(b, loop.time()):
                await b.flush()
            if self._interrupted:
                result.interrupted = True
                return

    def _held_too_long(self, b: _Batches, now: float) -> bool:
        return self._max_hold > 0 and b.buffered > 0 and now - b.first_at >= self._max_hold

    async def _keep(self, body: bytes, b: _Batches) -> bool:
        """Buffer ``body`` within the budget; False if no room came in time (it is written anyway)."""
        budget = self._budget
        n = len(body)
        if budget is None or budget.try_take(n):
            b.add(body, n if budget is not None else 0)
        else:
            await b.flush()  # first give back our own share, so that waiting cannot deadlock
            await b.drain()
            if not await budget.take(n):
                b.add(body, 0)  # it is in memory already: store it, then give up on the rest
                await b.flush()
                return False
            b.add(body, n)
        self._arm_hold()
        return True


class _Batches:
    """The bytes received and not yet written (``chunks``) plus the one batch being written."""

    def __init__(
        self,
        executor: Executor | None,
        fd: int,
        hasher: Hasher | None,
        writeback: bool,
        afile: Any,
        budget: BufferBudget | None,
        quota: Grantor | None,
    ) -> None:
        self._executor = executor
        self._fd = fd
        self._hasher = hasher
        self._writeback = writeback
        self._afile = afile
        self._budget = budget
        self._quota = quota
        self.chunks: list[bytes] = []
        self.buffered = 0  # bytes in chunks
        self._taken = 0  # of which counted in the budget
        self.first_at = 0.0  # loop time at which the oldest buffered byte arrived
        self._pending: asyncio.Future[int] | None = None
        self.written = 0
        self.storage_full = False

    def add(self, body: bytes, taken: int) -> None:
        if not self.buffered:
            self.first_at = asyncio.get_running_loop().time()
        self.chunks.append(body)
        self.buffered += len(body)
        self._taken += taken

    async def flush(self) -> None:
        """Wait for the batch being written, then hand the buffered bytes to a thread."""
        await self.drain()
        if not self.chunks:
            return
        chunks, n, taken = self.chunks, self.buffered, self._taken
        self.chunks, self.buffered, self._taken = [], 0, 0
        if self._quota is not None:
            granted = await self._quota.grant(n)
            if granted < n:
                self.storage_full = True
                chunks = _first_bytes(chunks, granted)
        if self._afile is not None:
            try:
                for c in chunks:
                    if self._hasher is not None:
                        self._hasher.update(c)
                    await self._afile.write(c)
                    self.written += len(c)
            finally:
                self._give_back(taken)
            return
        if not chunks:
            self._give_back(taken)
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(
            self._executor, _write_batch, self._fd, chunks, self._hasher, self._writeback
        )
        if taken:  # back to the budget as soon as the bytes are in the kernel, not when next awaited
            self._pending.add_done_callback(lambda _: self._give_back(taken))

    async def drain(self) -> None:
        """Wait for the batch being written."""
        if self._pending is None:
            return
        fut, self._pending = self._pending, None
        self.written += await _await_write(fut)

    async def close(self) -> None:
        """Let a write still running finish; give the bytes still buffered back to the budget."""
        if self._pending is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._pending)
        self._give_back(self._taken)
        self._taken = 0
        self.chunks, self.buffered = [], 0

    def _give_back(self, n: int) -> None:
        if n and self._budget is not None:
            self._budget.give_back(n)


def _first_bytes(chunks: list[bytes], n: int) -> list[bytes]:
    """The first ``n`` bytes of ``chunks``."""
    out: list[bytes] = []
    for c in chunks:
        if n <= 0:
            break
        out.append(c[:n])
        n -= len(c)
    return out


async def _await_write(fut: asyncio.Future[int]) -> int:
    """Await a batch write; if the task is cancelled meanwhile, let the write finish first."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.shield(fut)
        raise
