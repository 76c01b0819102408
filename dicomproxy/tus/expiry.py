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
import logging
import time
from typing import ClassVar

from dicomproxy.background import BackgroundTask, every
from dicomproxy.tus.errors import TusError
from dicomproxy.tus.locks import LockManager
from dicomproxy.tus.store import FileStore

log = logging.getLogger(__name__)


class PeriodicSweep:
    """What both expiry sweeps are as a component (this file store's, and the bucket's in
    :mod:`.s3expiry`): ``start`` runs :meth:`sweep` every ``interval`` seconds if
    ``expire_after`` is set, ``stop`` cancels it and waits for its end. A round that fails is
    logged (``failure``, on the subclass's module logger) and the next one runs."""

    task_name: ClassVar[str]
    failure: ClassVar[str]

    def __init__(self, expire_after: float, interval: float) -> None:
        self.expire_after = expire_after
        self.interval = interval
        self._sweeping = BackgroundTask(self.task_name)

    async def start(self) -> None:
        if self.expire_after > 0:
            self._sweeping.start(lambda: every(self.interval, self.sweep, self._failed))

    async def stop(self) -> None:
        await self._sweeping.stop()

    def _failed(self, _: Exception) -> None:
        logging.getLogger(type(self).__module__).exception(self.failure)

    async def sweep(self, now: float | None = None) -> list[str] | None:
        """One round now (each store's own); the ids removed, or None if the round was skipped."""
        raise NotImplementedError


class ExpirySweeper(PeriodicSweep):
    """The file store's sweep: runs :meth:`sweep` every ``interval`` seconds."""

    task_name = "tus-expiry-sweep"
    failure = "tus: expiry sweep failed"  # one bad file must not stop future sweeps

    def __init__(self, store: FileStore, locks: LockManager, expire_after: float, interval: float) -> None:
        super().__init__(expire_after, interval)
        self.store = store
        self.locks = locks

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
