"""Per-upload locks with tusd's semantics, inside one process and across processes.

Every TUS request on an upload holds that upload's lock while it runs. A request that finds
the lock taken does not queue behind it: it *asks the holder to let go* and waits (up to
``Tus:LockTimeoutSeconds``, 20 s by default, tusd's value). The holder, typically a ``PATCH``
whose client vanished without closing the connection, stops reading, keeps the bytes it has
stored and answers ``ERR_UPLOAD_INTERRUPTED``. This is what lets a client that lost its
connection resume at once instead of waiting for the dead request to time out.

Across processes the protocol is tusd's ``filelocker`` (and its ``lockfile`` package), so the
gateway and a tusd sharing a folder exclude each other:

* ``<id>.lock`` holds the holder's PID. It is created atomically by hard-linking a temporary
  file, so exactly one process wins.
* A lock whose PID is not running, or whose PID now belongs to a process started after the
  lock was written (PID reuse after a restart), is stale and is removed: a gateway killed with
  ``-9`` never blocks an upload.
* ``<id>.stop`` is the "please release" signal: an acquirer creates it, the holder polls for it.

Inside the process a registry of held locks short-cuts all of this: the holder is asked to let
go directly and its release is awaited on an event, with no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from dicomproxy.tus import errors

log = logging.getLogger(__name__)

ReleaseRequest = Callable[[], None]

# How far a lock file's mtime may precede its owner's start time before the lock counts as
# left over from an earlier process with the same PID (/proc's boot time has 1 s granularity).
_PID_REUSE_SLACK = 2.0


class UploadLock:
    """A held lock. ``release()`` it exactly once (``async with`` does that)."""

    def __init__(self, manager: LockManager, upload_id: str, on_release_request: ReleaseRequest) -> None:
        self.upload_id = upload_id
        self._manager = manager
        self._on_release_request = on_release_request
        self._asked = False
        self.released = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    def request_release(self) -> None:
        """Ask the holder to finish early (called at most once per lock)."""
        if self._asked or self.released.is_set():
            return
        self._asked = True
        log.debug("tus: asking the holder of %s to release its lock", self.upload_id)
        try:
            self._on_release_request()
        except Exception:  # the acquirer must not fail because the holder's callback did
            log.exception("tus: release callback for %s failed", self.upload_id)

    async def release(self) -> None:
        self._manager._release(self)

    async def __aenter__(self) -> UploadLock:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class LockManager:
    """Hands out :class:`UploadLock` objects for uploads stored in ``folder``."""

    def __init__(self, folder: Path, *, holder_poll: float = 0.5, acquirer_poll: float = 0.1) -> None:
        self.folder = Path(folder)
        self.holder_poll = holder_poll
        self.acquirer_poll = acquirer_poll
        self._held: dict[str, UploadLock] = {}
        self._pid = os.getpid()

    def _lock_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.lock"

    def _stop_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.stop"

    def is_held(self, upload_id: str) -> bool:
        return upload_id in self._held

    async def acquire(self, upload_id: str, on_release_request: ReleaseRequest, within: float) -> UploadLock:
        """Take the lock, asking any current holder to let go; ``LOCK_TIMEOUT`` after ``within`` s."""
        deadline = time.monotonic() + within
        while True:
            holder = self._held.get(upload_id)
            if holder is not None:
                holder.request_release()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.LOCK_TIMEOUT
                try:
                    await asyncio.wait_for(holder.released.wait(), remaining)
                except TimeoutError:
                    raise errors.LOCK_TIMEOUT from None
                continue  # another waiter may have been quicker: look again
            if self._try_file_lock(upload_id):
                lock = UploadLock(self, upload_id, on_release_request)
                self._held[upload_id] = lock
                with contextlib.suppress(FileNotFoundError):
                    self._stop_path(upload_id).unlink()  # an old request was for an old holder
                lock._poller = asyncio.get_running_loop().create_task(self._poll_stop(lock))
                return lock
            # Held by another process: ask it to let go (tusd's .stop file) and retry.
            with contextlib.suppress(OSError):
                self._stop_path(upload_id).touch()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.LOCK_TIMEOUT
            await asyncio.sleep(min(self.acquirer_poll, remaining))

    def try_acquire(self, upload_id: str) -> UploadLock | None:
        """Take the lock only if nobody holds it; never interrupts anyone (for the sweeper)."""
        if upload_id in self._held or not self._try_file_lock(upload_id):
            return None
        lock = UploadLock(self, upload_id, lambda: None)
        self._held[upload_id] = lock
        return lock

    def _release(self, lock: UploadLock) -> None:
        if lock.released.is_set():
            return
        if self._held.get(lock.upload_id) is lock:
            del self._held[lock.upload_id]
        if lock._poller is not None:
            lock._poller.cancel()
        try:
            path = self._lock_path(lock.upload_id)
            if self._read_pid(path) == self._pid:
                path.unlink()
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self._stop_path(lock.upload_id).unlink()
        lock.released.set()

    async def _poll_stop(self, lock: UploadLock) -> None:
        stop = self._stop_path(lock.upload_id)
        while not lock.released.is_set():
            await asyncio.sleep(self.holder_poll)
            if stop.exists():
                lock.request_release()
                return

    # -- the lock file (tus/lockfile's algorithm) ------------------------------------------
    def _try_file_lock(self, upload_id: str, attempts: int = 3) -> bool:
        path = self._lock_path(upload_id)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}")
        try:
            with open(tmp, "w") as f:
                f.write(f"{self._pid}\n")
        except FileNotFoundError:
            raise errors.NOT_FOUND from None  # the folder itself is gone
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            try:
                if os.path.samefile(tmp, path):
                    return True
            except FileNotFoundError:
                return False  # somebody removed it in between: retry on the next round
            if not self._is_stale(path):
                return False
            log.info("tus: removing stale lock %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return attempts > 0 and self._try_file_lock(upload_id, attempts - 1)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() and int(text) > 0 else None

    def _is_stale(self, path: Path) -> bool:
        pid = self._read_pid(path)
        if pid is None:
            return path.exists()  # junk content: stale (tusd deletes it too)
        if not _pid_running(pid):
            return True
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return False
        started = _process_start_time(pid)
        return started is not None and started > written + _PID_REUSE_SLACK


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped process is a zombie: it holds nothing any more
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _process_start_time(pid: int) -> float | None:
    """Epoch seconds at which ``pid`` started (Linux ``/proc``), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[19])  # field 22 of /proc/<pid>/stat, counted after "(comm) "
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
