"""Stream an ASGI request body onto the end of an upload's data file.

The body arrives from uvicorn in messages of 64 KB or so. Handing each one to a thread (what
``aiofiles`` does per ``write``) costs a thread hop per message; instead the messages are
gathered into batches of a few MB and each batch is written with one ``os.writev`` in a
worker thread, while the event loop keeps receiving the next batch (double buffering). At
most two batches are in memory per request, so a 1 GB body never is. ``bench/tus_bench.py``
measures both ways.

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

BATCH_BYTES = 4 * 1024 * 1024
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


class BodyWriter:
    """One request body -> one file descriptor. ``interrupt()`` may be called from any task.

    ``batch_bytes=0`` writes every message as it comes with ``aiofiles`` instead (one thread
    hop per message): kept to measure the difference (``bench/tus_bench.py --write-mode``).
    """

    def __init__(
        self,
        executor: Executor | None,
        batch_bytes: int = BATCH_BYTES,
        writeback: bool = True,
        read_timeout: float = 60.0,
    ) -> None:
        self._executor = executor
        self._writeback = writeback
        self._batch_bytes = batch_bytes
        self._read_timeout = read_timeout
        self._task: asyncio.Task[Any] | None = None
        self._receiving = False
        self._interrupted = False
        self._timed_out = False
        self._cancelled_by_us = False
        self._last_read = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def interrupt(self) -> None:
        """Stop reading the body as soon as possible; what was received is still written."""
        self._interrupted = True
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

    async def _receive(self, receive: Receive) -> dict[str, Any] | None:
        """``receive()`` that an :meth:`interrupt` can break out of; None when interrupted."""
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
        chunks: list[bytes] = []
        buffered = 0
        accepted = 0
        pending: asyncio.Future[int] | None = None
        more = True

        async def wait_pending() -> None:
            nonlocal pending
            if pending is not None:
                fut, pending = pending, None
                result.written += await _await_write(fut)

        afile = None
        if self._batch_bytes == 0:
            afile = await aiofiles.open(fd, "ab", buffering=0, closefd=False)

        async def flush() -> None:
            nonlocal pending, chunks, buffered
            await wait_pending()
            if chunks and afile is not None:
                for c in chunks:
                    if hasher is not None:
                        hasher.update(c)
                    await afile.write(c)
                    result.written += len(c)
                chunks, buffered = [], 0
            elif chunks:
                pending = loop.run_in_executor(self._executor, _write_batch, fd, chunks, hasher, self._writeback)
                chunks, buffered = [], 0

        try:
            while more:
                message = await self._receive(receive)
                if message is None:
                    result.interrupted = True
                    break
                if message["type"] == "http.disconnect":
                    result.disconnected = True
                    break
                body = message.get("body", b"")
                more = bool(message.get("more_body", False))
                if body:
                    room = limit - accepted
                    if len(body) > room:
                        body = body[: max(room, 0)]
                        result.exceeded = True
                        more = False
                    if body:
                        chunks.append(body)
                        buffered += len(body)
                        accepted += len(body)
                if buffered >= self._batch_bytes:
                    await flush()
                if self._interrupted:
                    result.interrupted = True
                    break
            await flush()
            await wait_pending()
        finally:
            # On a cancellation or a disk error, never leave a write running behind the
            # caller's back: the caller releases the upload's lock right after this returns.
            if pending is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
            if afile is not None:
                await afile.close()
            if self._watchdog is not None:
                self._watchdog.cancel()
        if self._timed_out:
            result.interrupted = False
            result.timed_out = True
        if expected is not None and result.written < expected and not result.exceeded:
            result.incomplete = True
        return result


async def _await_write(fut: asyncio.Future[int]) -> int:
    """Await a batch write; if the task is cancelled meanwhile, let the write finish first."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.shield(fut)
        raise
