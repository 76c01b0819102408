"""The expiration sweep of ``Tus:Store`` ``s3``: :mod:`.expiry`'s rules on the bucket.

An unfinished upload (or a partial one, finished or not) idle for ``Tus:ExpireAfter`` is
removed as a DELETE removes it: its multipart upload aborted, its object, ``.info``, ``.part``
and ``.pending`` objects deleted. Idle is counted from its last activity (the newest
``LastModified`` of its ``.info``, parts and ``.part``; see :mod:`.s3store`), which is what
``Upload-Expires`` announces. As in the file store's sweep, an upload whose lock is held (by a
request on any replica) is skipped until the next round, never interrupted.

One replica sweeps at a time: each round begins by taking the lock ``expiry-sweep`` with the
upload locks' own ``try_acquire`` (on Redis with ``Cluster:Redis``: ``SET NX PX`` with a lease
renewed while the sweep runs, so a replica killed mid-sweep frees it within
``Cluster:LockLeaseSeconds``; without it, the lock file of :mod:`.locks` in the upload
folder). A replica that finds it taken skips the round: the other is sweeping the same bucket.
The name cannot be an upload's (S3 upload ids contain a ``+``).

A sweep costs one LIST per 1000 keys under the prefix, then per upload a GET of its ``.info``
to learn its id and :meth:`~.s3store.S3Store.state`'s GET, LIST-parts and HEAD.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from dicomproxy.tus.errors import TusError
from dicomproxy.tus.expiry import PeriodicSweep
from dicomproxy.tus.s3store import split_id

if TYPE_CHECKING:
    from dicomproxy.tus.s3app import S3TusApp

log = logging.getLogger(__name__)

SWEEP_LOCK = "expiry-sweep"


class S3ExpirySweeper(PeriodicSweep):
    """The bucket's sweep: runs :meth:`sweep` every ``interval`` seconds."""

    task_name = "tus-s3-expiry-sweep"
    failure = "tus: S3 expiry sweep failed"  # S3 or Redis away for a round must not stop future sweeps

    def __init__(self, app: S3TusApp, expire_after: float, interval: float) -> None:
        super().__init__(expire_after, interval)
        self.app = app

    async def sweep(self, now: float | None = None) -> list[str] | None:
        """Delete the expired uploads now; their ids, or None if another replica holds the sweep."""
        lease = await self.app._try_lock(SWEEP_LOCK)
        if lease is None:
            log.debug("tus: another replica is sweeping the bucket; skipping this round")
            return None
        try:
            return await self._sweep(time.time() if now is None else now)
        finally:
            await lease.release()

    async def _sweep(self, now: float) -> list[str]:
        s3 = self.app.s3
        removed: list[str] = []
        for upload_id in await s3.upload_ids():
            lock = await self.app._try_lock(upload_id)
            if lock is None:
                continue  # a request holds it: not idle
            try:
                state = await s3.state(upload_id)
                upload = state.upload
                if upload.complete and not upload.is_partial:
                    continue
                last = state.last_activity
                if state.completed:  # a finished partial: its object's LastModified is its last byte
                    last = max(last, await s3.object_modified(upload_id))
                if last + self.expire_after <= now:
                    await s3.terminate(upload_id)
                    await self.app.s3_quota.removed(split_id(upload_id)[0])
                    removed.append(upload_id)
                    log.info("tus: expired upload %s removed from S3 (offset %d of %s)", upload_id, upload.offset,
                             "?" if upload.size_is_deferred else upload.size)
            except TusError:
                continue  # deleted meanwhile
            finally:
                await lock.release()
        return removed
