"""What the upload folder may hold: bytes, free disk space, and unfinished uploads per user.

* ``Tus:MaxStorageGB`` caps the bytes of all uploads' data files together;
* ``Tus:MinFreeDiskGB`` keeps that much space free on the folder's file system (the task queue,
  the DICOM spool and the logs usually live on the same disk, and a gateway that filled it would
  stop storing what modalities send);
* ``Tus:MaxUploadsPerUser`` caps the unfinished uploads one owner may have (each is two files;
  without it one user could create uploads until the file system runs out of inodes).

Bytes are granted before they are written: the body writer asks for each batch (:meth:`grant`)
and stores only what it is given, so a PATCH that meets the limit keeps every byte it was
granted and the client resumes once imports have freed space (the store is a resumable one).
A creation whose declared length does not fit is refused at once (:meth:`admit`), before any
byte is sent.

The counts are kept in memory and corrected by a scan of the folder (:meth:`refresh`, in a
thread): at start, and again before anything is refused, at most every ``refresh_interval``
seconds. Deletions by the sweep, by an import or by another process are therefore seen at the
latest when they matter. Between scans the byte count may be short by the bytes granted but
not yet on disk, which the buffer budget (:mod:`.buffers`) bounds; ``statvfs`` is read on
every grant (a system call, about 1 µs, once per 4 MB batch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from dicomproxy.tus import errors
from dicomproxy.tus.store import FileStore, Upload, owner_of

log = logging.getLogger(__name__)

GB = 1_000_000_000
_UNLIMITED = 2**63 - 1


@dataclass
class _Scan:
    used: int = 0
    unfinished: dict[str | None, set[str]] = field(default_factory=dict)


class UploadQuota:
    """Byte and count limits of one upload folder; 0 turns a limit off."""

    def __init__(
        self,
        store: FileStore,
        *,
        max_bytes: int = 0,
        min_free_bytes: int = 0,
        max_unfinished: int = 0,
        executor: Executor | None = None,
        refresh_interval: float = 2.0,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.max_unfinished = max_unfinished
        self.refresh_interval = refresh_interval
        self._executor = executor
        self.used = 0
        self._unfinished: dict[str | None, set[str]] = {}
        self._scanned_at = float("-inf")
        self._scanning: asyncio.Future[_Scan] | None = None

    # -- limits ----------------------------------------------------------------------------
    def room(self) -> int:
        """Bytes that may still be written (a large number when no limit applies)."""
        room = _UNLIMITED
        if self.max_bytes > 0:
            room = self.max_bytes - self.used
        if self.min_free_bytes > 0:
            try:
                st = os.statvfs(self.store.folder)
            except FileNotFoundError:
                return 0
            room = min(room, st.f_bavail * st.f_frsize - self.min_free_bytes)
        return max(room, 0)

    async def grant(self, n: int) -> int:
        """Take up to ``n`` bytes of room for a write; returns how many may be written."""
        room = self.room()
        if room < n:
            await self.refresh()
            room = self.room()
        granted = min(n, room)
        self.used += granted
        if granted < n:
            log.warning("tus: upload storage full: %d of %d bytes granted (%s)", granted, n, self.describe())
        return granted

    def refund(self, n: int) -> None:
        """Give back granted bytes that were not written."""
        self.used = max(0, self.used - n)

    async def admit(self, owner: str | None, size: int) -> None:
        """May ``owner`` create an upload of ``size`` bytes (0: deferred or empty)? Raises
        ``TOO_MANY_UPLOADS`` or ``STORAGE_FULL``."""
        if self.max_unfinished > 0 and self._count(owner) >= self.max_unfinished:
            await self.refresh()
            if self._count(owner) >= self.max_unfinished:
                log.warning("tus: %s has %d unfinished uploads (Tus:MaxUploadsPerUser = %d); creation refused",
                            owner or "the anonymous user", self._count(owner), self.max_unfinished)
                raise errors.TOO_MANY_UPLOADS
        need = max(size, 1)
        if self.room() < need:
            await self.refresh()
            if self.room() < need:
                log.warning("tus: upload of %d bytes refused: %s", size, self.describe())
                raise errors.STORAGE_FULL.with_headers(**{"Retry-After": "60"})

    def describe(self) -> str:
        """The limits and where they stand, naming the keys to raise (for log lines)."""
        parts = []
        if self.max_bytes > 0:
            parts.append(f"{self.used / GB:.2f} of Tus:MaxStorageGB = {self.max_bytes / GB:g} GB used")
        if self.min_free_bytes > 0:
            parts.append(f"Tus:MinFreeDiskGB = {self.min_free_bytes / GB:g} GB kept free on the disk")
        return "; ".join(parts) + "; raise the limit, free disk space or wait for imports to finish"

    # -- bookkeeping -----------------------------------------------------------------------
    def created(self, upload: Upload) -> None:
        if self.max_unfinished > 0 and not upload.complete:
            self._unfinished.setdefault(upload.owner, set()).add(upload.id)

    def finished(self, upload: Upload) -> None:
        self._discard(upload.id, upload.owner)

    def removed(self, upload: Upload) -> None:
        self._discard(upload.id, upload.owner)
        self.refund(upload.offset)

    def _discard(self, upload_id: str, owner: str | None) -> None:
        ids = self._unfinished.get(owner)
        if ids is not None:
            ids.discard(upload_id)
            if not ids:
                del self._unfinished[owner]

    def _count(self, owner: str | None) -> int:
        return len(self._unfinished.get(owner, ()))

    # -- the folder scan -------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        """Recount the folder in a thread (at most every ``refresh_interval`` s unless ``force``)."""
        if self._scanning is not None:
            await asyncio.shield(self._scanning)
            return
        if not force and time.monotonic() - self._scanned_at < self.refresh_interval:
            return
        loop = asyncio.get_running_loop()
        self._scanning = loop.run_in_executor(self._executor, self.scan)
        try:
            result = await asyncio.shield(self._scanning)
        finally:
            self._scanning = None
        self._scanned_at = time.monotonic()
        self.used = result.used
        self._unfinished = result.unfinished

    def scan(self) -> _Scan:
        """Blocking: the bytes of every data file and, if counted, the unfinished uploads."""
        out = _Scan()
        for upload_id in list(self.store.ids()):
            try:
                size = self.store.data_path(upload_id).stat().st_size
            except FileNotFoundError:
                continue
            out.used += size
            if self.max_unfinished <= 0:
                continue
            try:
                info = self.store.read_info(upload_id)
            except (errors.TusError, ValueError, OSError):
                continue
            deferred = bool(info.get("SizeIsDeferred"))
            if deferred or size < int(info.get("Size") or 0):
                out.unfinished.setdefault(owner_of(info), set()).add(upload_id)
        return out
