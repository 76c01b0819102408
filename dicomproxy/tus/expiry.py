"""The expiration sweep: unfinished uploads idle for ``Tus:ExpireAfter`` are deleted.

An upload expires ``ExpireAfter`` after its last activity (the newer mtime of its data and
``.info`` files: every stored chunk moves it), which is what ``Upload-Expires`` announces.
Finished uploads are kept (the import deletes them, or ``Tus:KeepAfterImport`` keeps them on
purpose); partial uploads are only ingredients of a final upload and expire even when full.

The sweep never interrupts a request: an upload whose lock is held, here or by another
process, is skipped until the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from dicomproxy.tus.errors import TusError
from dicomproxy.tus.locks import LockManager
from dicomproxy.tus.store import FileStore

log = logging.getLogger(__name__)


class ExpirySweeper:
    """A component (``start``/``stop``) that runs :meth:`sweep` every ``interval`` seconds."""

    def __init__(self, store: FileStore, locks: LockManager, expire_after: float, interval: float) -> None:
        self.store = store
        self.locks = locks
        self.expire_after = expire_after
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.expire_after > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tus-expiry-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:  # one bad file must not stop future sweeps
                log.exception("tus: expiry sweep failed")

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete the expired uploads now; returns their ids."""
        now = time.time() if now is None else now
        removed: list[str] = []
        for n, upload_id in enumerate(list(self.store.ids())):
            if n and n % 100 == 0:
                await asyncio.sleep(0)  # thousands of uploads must not stall the loop
            lock = self.locks.try_acquire(upload_id)
            if lock is None:
                continue
            try:
                try:
                    upload = self.store.get(upload_id)
                except TusError:
                    continue  # .info without data file: left for an operator
                if upload.complete and not upload.is_partial:
                    continue
                if self.store.last_activity(upload) + self.expire_after <= now:
                    self.store.terminate(upload_id)
                    removed.append(upload_id)
                    log.info("tus: expired upload %s removed (offset %d of %s)", upload_id, upload.offset,
                             "?" if upload.size_is_deferred else upload.size)
            except (OSError, ValueError) as e:
                log.warning("tus: expiry sweep skipped %s: %s", upload_id, e)
            finally:
                await lock.release()
        return removed
