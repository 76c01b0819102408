"""The TUS server on an S3 bucket (``Tus:Store`` ``s3``): :class:`~.protocol.TusApp` with
:mod:`.s3store` underneath, for replicas behind a load balancer.

The wire protocol is the file store's (same statuses, headers and ``ERR_...`` bodies); what
differs is where the bytes go. A PATCH streams its body into S3 parts of ``Tus:S3:PartSizeMB``:
it holds at most one part in memory (taken from the ``Tus:WriteBufferMB`` budget before the
first byte is read, so many PATCHes at once wait or get 503 instead of exhausting memory), and
while a part is being sent it does not read further (TCP back-pressure reaches the client).
What is left below S3's 5 MiB minimum when a PATCH ends (body done, client gone, interrupted by
another request) goes to the ``.part`` object, as tusd does; the next PATCH, on whichever
replica, prepends it. The final PATCH uploads the last part and completes the multipart upload
before it is answered, then that replica runs ``onTusFileComplete`` and submits the import:
with ``Cluster:Redis`` a cluster task (any replica runs it, reading the object from the bucket;
another runs it again if that replica dies), with the id ``tus-import-<objectId>`` so that a
second hand-over queues nothing. A ``<objectId>.pending`` marker, written before the multipart
upload is completed and deleted once the completion is handed over (under the upload's lock),
lets another replica hand over a completion a crash interrupted: any replica at its start, and
the running ones at each quota recount (below), taking only markers whose upload lock is free.

The extensions are the file store's, answered as it answers them (``tests/tus/test_s3_extensions.py``
sends the same requests to both and compares): creation, creation-with-upload,
creation-defer-length, termination, and

* checksum: a PATCH with ``Upload-Checksum`` is staged in an anonymous local file and replayed
  into the parts only once its digest matches (:meth:`S3TusApp._write_verified`: S3 cannot
  take a part back; memory stays one part plus 1 MiB);
* download (``Tus:AllowDownload``): a finished upload's object streamed in 1 MiB pieces; an
  unfinished one with bytes is tusd's s3store's 400 ``ERR_INCOMPLETE_UPLOAD`` (S3 reads no part
  before completion);
* expiration: ``Upload-Expires`` from the bucket's ``LastModified`` (:mod:`.s3store`), 410 and
  removal on access, and :mod:`.s3expiry`'s sweep, one replica at a time;
* concatenation: ``UploadPartCopy`` of partials of 5 MiB or more, else the partials streamed
  through this replica into parts (:meth:`S3TusApp._concat`, tusd's ``ConcatUploads``).

``Tus:MaxStorageGB`` and ``Tus:MaxUploadsPerUser`` are counted for the whole cluster by
:mod:`.s3quota` (in Redis with ``Cluster:Redis``; declared lengths reserved at creation, the
file store's 507/429 answers; recounted from the bucket every ``Tus:S3:QuotaReconcileSeconds``);
``Tus:MinFreeDiskGB`` does not apply to the bucket.

The lock of each request is :mod:`.redislock`'s with ``Cluster:Redis`` (any replica), else
:mod:`.locks`' (one replica: processes of one host).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

from dicomproxy.config.settings import TusSettings
from dicomproxy.metrics import Metrics
from dicomproxy.tus import errors
from dicomproxy.tus import headers as h
from dicomproxy.tus.access import Caller
from dicomproxy.tus.errors import TusError
from dicomproxy.tus.protocol import OnComplete, Receive, Scope, Send, TusApp, _content_type, _Response
from dicomproxy.tus.redislock import RedisLockManager
from dicomproxy.tus.s3quota import S3Quota
from dicomproxy.tus.s3store import MIN_PART, Part, S3State, S3Store, split_id
from dicomproxy.tus.store import Upload, new_id

log = logging.getLogger(__name__)

S3_EXTENSIONS = "creation,creation-with-upload,termination,concatenation,creation-defer-length,checksum"
MAX_PARTS = 10_000  # S3's limit of parts per multipart upload
# tusd's s3store answers a download of an unfinished upload so: S3 cannot read parts before completion.
INCOMPLETE_UPLOAD = TusError("ERR_INCOMPLETE_UPLOAD", "cannot stream non-finished upload", 400)
STAGE_PIECE = 1 << 20  # a checksummed PATCH is staged and replayed in pieces of this size


class _Source(Protocol):
    """Where a :class:`_PartWriter` reads ASGI ``http.request`` messages from (None: stopped)."""

    async def next(self) -> dict[str, Any] | None: ...


class _Body:
    """``receive()`` that another request (the lock's release request) or a read timeout can stop."""

    def __init__(self, receive: Receive, read_timeout: float) -> None:
        self._receive = receive
        self._read_timeout = read_timeout if read_timeout > 0 else None
        self.stop = asyncio.Event()
        self.interrupted = False
        self.timed_out = False

    def interrupt(self) -> None:
        self.interrupted = True
        self.stop.set()

    async def next(self) -> dict[str, Any] | None:
        if self.stop.is_set():
            return None
        recv = asyncio.ensure_future(self._receive())
        stop = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({recv, stop}, timeout=self._read_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if recv in done:
            return recv.result()
        recv.cancel()
        if not done:
            self.timed_out = True
        return None


class S3TusApp(TusApp):
    """``TusApp`` whose uploads live in ``settings.s3``'s bucket; ``locks`` may be a Redis lock manager."""

    def __init__(self, settings: TusSettings, on_complete: OnComplete | None = None, *,
                 metrics: Metrics | None = None, redis_locks: RedisLockManager | None = None,
                 read_timeout: float = 60.0) -> None:
        super().__init__(settings, on_complete, metrics=metrics, read_timeout=read_timeout)
        self.s3 = S3Store(settings.s3)
        self.part_size = settings.s3.part_size
        self.redis_locks = redis_locks
        if redis_locks is not None:
            self.locks = redis_locks  # type: ignore[assignment]  # same acquire()/is_held() protocol
        self.extensions = S3_EXTENSIONS + (",expiration" if settings.expire_after > 0 else "")
        # S3 takes at most 10 000 parts: with Tus:S3:PartSizeMB parts, that is the largest upload.
        s3_max = self.part_size * MAX_PARTS
        self._max_size = min(settings.max_size, s3_max) if settings.max_size > 0 else s3_max
        self.s3_quota = S3Quota(self.s3, max_bytes=settings.max_storage, max_unfinished=settings.max_uploads_per_user,
                                period=settings.s3.quota_reconcile,
                                redis=redis_locks.redis if redis_locks is not None else None,
                                also=self._recover_pending_free if on_complete is not None else None)

    async def startup(self, recover: bool = True) -> None:
        """Open the bucket (and Redis); with ``recover`` (one process per host is enough: the
        hand-over is exclusive anyway) run completions a crash left behind."""
        self.store.ensure_folder()  # the local lock files without Redis; imports' temporary copies
        await self.s3.open()
        if self.redis_locks is not None:
            await self.redis_locks.start()
        if recover and self.on_complete is not None:
            await self._recover_pending()
        await self.s3_quota.start()

    async def aclose(self, grace: float = 30) -> None:
        await self.s3_quota.aclose()
        await super().aclose(grace)
        if self.redis_locks is not None:
            await self.redis_locks.aclose()
        await self.s3.aclose()

    async def _route(self, scope: Scope, receive: Receive, method: str, hdrs: dict[str, str],
                     caller: Caller) -> _Response:
        resp = await super()._route(scope, receive, method, hdrs, caller)
        if method == "OPTIONS":
            resp.headers["Tus-Max-Size"] = str(self._max_size)
        return resp

    # -- access and state ------------------------------------------------------------------
    async def _locked(self, upload_id: str, caller: Caller, on_release: Callable[[], None] = lambda: None) -> Any:
        owner = await self.s3.owner(upload_id)  # NOT_FOUND for an unknown id
        if not caller.may_access(owner):
            log.info("tus: %s may not access upload %s: answered as not found", caller.user or "anonymous", upload_id)
            raise errors.NOT_FOUND
        return await self.locks.acquire(upload_id, on_release, self.settings.lock_timeout)

    def _s3_expires_at(self, state: S3State) -> float | None:
        """As the file store's ``_expires_at``: unfinished uploads, ``Tus:ExpireAfter`` after the last activity."""
        if self.settings.expire_after <= 0 or state.upload.complete:
            return None
        return state.last_activity + self.settings.expire_after

    def _s3_expiry_header(self, state: S3State, out: dict[str, str], now: bool = False) -> None:
        """``Upload-Expires``; ``now``: the request just stored bytes (what its LastModified is)."""
        at = self._s3_expires_at(state)
        if at is not None:
            out["Upload-Expires"] = h.http_date(time.time() + self.settings.expire_after if now else at)

    async def _live(self, upload_id: str) -> S3State:
        """The upload's state (lock held); an expired unfinished one is removed and answers 410."""
        state = await self.s3.state(upload_id)
        at = self._s3_expires_at(state)
        if at is not None and at < time.time():
            log.info("tus: upload %s expired; removing it from S3", upload_id)
            await self.s3.terminate(upload_id)
            await self.s3_quota.removed(split_id(upload_id)[0])
            raise errors.UPLOAD_EXPIRED
        return state

    # -- POST ------------------------------------------------------------------------------
    async def _post(self, scope: Scope, receive: Receive, hdrs: dict[str, str], caller: Caller) -> _Response:
        contains_chunk = hdrs.get("content-type") == h.OFFSET_OCTET_STREAM
        is_partial, is_final, partial_ids = h.parse_concat(hdrs.get("upload-concat", ""), self.base_path)
        partials: list[S3State] = []
        deferred = False
        if is_final:
            if contains_chunk:
                raise errors.MODIFY_FINAL
            partials = await self._s3_partials(partial_ids, caller)
            size = sum(p.upload.size for p in partials)
        else:
            size, deferred = self._new_length(hdrs.get("upload-length", ""), hdrs.get("upload-defer-length", ""))
        if size > self._max_size:
            raise errors.MAX_SIZE_EXCEEDED
        upload = Upload(id="", size=size, size_is_deferred=deferred,
                        metadata=h.parse_metadata(hdrs.get("upload-metadata")), is_partial=is_partial,
                        is_final=is_final, partial_uploads=partial_ids if is_final else None, owner=caller.user)
        object_id = new_id()
        # 429/507 as the file store; a final upload is finished at once and needs its bytes only
        await self.s3_quota.reserve(object_id, caller.user, size, unfinished=not is_final)
        try:
            await self.s3.create(upload, object_id=object_id)
        except BaseException:
            await self.s3_quota.removed(object_id)
            raise
        self._m_created.inc()
        out = {"Location": self._location(scope, hdrs, upload.id)}
        log.info("tus: created upload %s in S3 (size %s, metadata %s)", upload.id,
                 "deferred" if deferred else size, list(upload.metadata))
        state = S3State(upload)
        if is_final:
            async with await self.locks.acquire(upload.id, lambda: None, self.settings.lock_timeout):
                await self._concat(state, partials)
            upload.offset = size
            self._finished(upload)
        elif contains_chunk or (not deferred and size == 0):
            body = _Body(receive, self.read_timeout)
            async with await self.locks.acquire(upload.id, body.interrupt, self.settings.lock_timeout):
                try:
                    await self._write_s3(body, hdrs, state, out, read=contains_chunk)
                except TusError as e:
                    raise e.with_headers(Location=out["Location"]) from None
        self._s3_expiry_header(state, out, now=True)
        return _Response(201, out)

    async def _s3_partials(self, ids: list[str], caller: Caller) -> list[S3State]:
        """The partial uploads a final one is made of (the file store's checks, in its order)."""
        if len(set(ids)) != len(ids):
            raise errors.CONCAT_REPEATED
        partials = []
        for pid in ids:
            owner = await self.s3.owner(pid)  # NOT_FOUND for an unknown id
            if not caller.may_access(owner):
                raise errors.NOT_FOUND
            state = await self.s3.state(pid)
            if not state.upload.is_partial:
                raise errors.CONCAT_NOT_PARTIAL
            if not state.upload.complete:
                raise errors.UPLOAD_NOT_FINISHED
            partials.append(state)
        return partials

    async def _concat(self, final: S3State, partials: list[S3State]) -> None:
        """tusd's ``ConcatUploads``: each partial becomes one part of the final upload by
        ``UploadPartCopy`` (the bucket copies; no byte passes through the gateway) when every
        partial has S3's 5 MiB minimum; otherwise the partials' objects are streamed through
        this replica into parts, one part in memory (tusd downloads them to a file instead)."""
        upload_id = final.upload.id
        if partials and len(partials) <= MAX_PARTS and all(p.upload.size >= MIN_PART for p in partials):
            for number, partial in enumerate(partials, start=1):
                final.parts.append(await self.s3.copy_part(upload_id, number, partial.upload.id, partial.upload.size))
            if self.on_complete is not None:
                await self.s3.mark_pending(upload_id)
            await self.s3.complete(upload_id, final.parts)
            final.completed = True
            log.info("tus: upload %s: %d partial uploads concatenated by UploadPartCopy", upload_id, len(partials))
            return
        log.info("tus: upload %s: %d partial uploads concatenated through this replica (one is below 5 MiB)",
                 upload_id, len(partials))
        if not await self.budget.take(self.part_size):
            raise errors.SERVER_BUSY.with_headers(**{"Retry-After": "5"})
        try:
            source = _ObjectsSource(self.s3, [p.upload.id for p in partials])
            try:
                await _PartWriter(self.s3, final, self.part_size, pending=self.on_complete is not None).run(
                    source, final.upload.size)
            finally:
                await source.aclose()
        finally:
            self.budget.give_back(self.part_size)

    # -- HEAD ------------------------------------------------------------------------------
    async def _head(self, scope: Scope, upload_id: str, hdrs: dict[str, str], caller: Caller) -> _Response:
        async with await self._locked(upload_id, caller):
            state = await self._live(upload_id)
        upload = state.upload
        out = {"Cache-Control": "no-store", "Upload-Offset": str(upload.offset)}
        if upload.is_partial:
            out["Upload-Concat"] = "partial"
        if upload.is_final:
            urls = " ".join(self._location(scope, hdrs, pid) for pid in upload.partial_uploads or [])
            out["Upload-Concat"] = f"final;{urls}"
        if upload.metadata:
            out["Upload-Metadata"] = h.serialize_metadata(upload.metadata)
        if upload.size_is_deferred:
            out["Upload-Defer-Length"] = "1"
        else:
            out["Upload-Length"] = str(upload.size)
            out["Content-Length"] = str(upload.size)
        self._s3_expiry_header(state, out)
        return _Response(200, out)

    # -- PATCH -----------------------------------------------------------------------------
    async def _patch(self, receive: Receive, upload_id: str, hdrs: dict[str, str], caller: Caller) -> _Response:
        patch = h.patch_headers(hdrs)  # the file store's checks, in its order
        offset = patch.offset
        body = _Body(receive, self.read_timeout)
        async with await self._locked(upload_id, caller, body.interrupt):
            state = await self._live(upload_id)
            upload = state.upload
            if upload.is_final:
                raise errors.MODIFY_FINAL
            if offset != upload.offset:
                raise errors.MISMATCHED_OFFSET.with_headers(**{"Upload-Offset": str(upload.offset)})
            out: dict[str, str] = {}
            if upload.complete:
                out["Upload-Offset"] = str(offset)
                return _Response(204, out)
            length = patch.declared_length(upload.size_is_deferred, upload.offset, self._max_size)
            if length is not None:
                await self.s3_quota.grow(split_id(upload_id)[0], length)
                upload.size, upload.size_is_deferred = length, False
                await self.s3.write_info(upload)
            await self._write_s3(body, hdrs, state, out)
            self._s3_expiry_header(state, out, now=True)
            return _Response(204, out)

    def _limit(self, upload: Upload, length: int | None) -> int:
        """How many body bytes this request may store (tusd's ``writeChunk`` checks)."""
        offset = upload.offset
        if not upload.size_is_deferred:
            if length is not None and offset + length > upload.size:
                raise errors.SIZE_EXCEEDED
            limit = upload.size - offset
        else:
            if length is not None and offset + length > self._max_size:
                raise errors.MAX_SIZE_EXCEEDED
            limit = self._max_size - offset
        return min(limit, length) if length is not None else limit

    async def _write_s3(self, body: _Body, hdrs: dict[str, str], state: S3State, out: dict[str, str],
                        read: bool = True) -> None:
        """Stream the body into parts; sets ``Upload-Offset``; completes the upload on its last byte."""
        upload = state.upload
        length = h.parse_int(hdrs.get("content-length"))
        limit = self._limit(upload, length) if read else 0
        checksum = h.checksum_of(hdrs) if read else None
        if not await self.budget.take(self.part_size):
            raise errors.SERVER_BUSY.with_headers(**{"Retry-After": "5"})
        try:
            if checksum is None:
                outcome = await _PartWriter(self.s3, state, self.part_size, self._pending(state)).run(body, limit)
                failure = self._failure_of(outcome, body, length)
            else:
                outcome, failure = await self._write_verified(body, limit, length, checksum, state)
        finally:
            self.budget.give_back(self.part_size)
        received = outcome.received
        self._m_bytes.inc(received)
        upload.offset += received
        out["Upload-Offset"] = str(upload.offset)
        if upload.complete:
            await self.s3_quota.finished(split_id(upload.id)[0])
            self._finished(upload)
        if failure is not None:
            raise failure

    async def _write_verified(self, body: _Body, limit: int, length: int | None, checksum: tuple[str, bytes],
                              state: S3State) -> tuple[_Outcome, TusError | None]:
        """A PATCH with ``Upload-Checksum``: nothing reaches the upload before the digest matches.

        S3 cannot take a part back out of a multipart upload, and a ``.part`` rewritten with
        unverified bytes would be read by another replica's HEAD; so the body is first staged in
        an anonymous local file (``O_TMPFILE`` in the upload folder: a crash leaves nothing behind)
        and hashed as it is written, in pieces of 1 MiB. Only if it arrived whole and its digest
        matches is it replayed from that file into the parts, exactly as an unchecked body would
        have been streamed. Memory: the one part of ``Tus:S3:PartSizeMB`` (from
        ``Tus:WriteBufferMB``, as any PATCH) plus a 1 MiB piece; local disk: the PATCH's bytes,
        for as long as the request lasts. A body cut short or not matching appends nothing
        (the file store rolls its chunk back the same way) and answers as it does: 460
        ``ERR_CHECKSUM_MISMATCH``, or the reason the body ended early."""
        algorithm, expected = checksum
        hasher = h.CHECKSUM_ALGORITHMS[algorithm]()
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(self._executor, _anonymous_file, self.settings.upload_folder)
        try:
            staged = await _stage(body, fd, limit, hasher, loop, self._executor)
            cut = self._cut_short(staged, body, length)
            if cut is not None or hasher.digest() != expected:
                log.info("tus: upload %s: checksummed chunk of %d bytes %s; nothing appended", state.upload.id,
                         staged.received, "cut short" if cut is not None else "did not match its digest")
                refused = _Outcome()
                refused.exceeded = staged.exceeded
                failure = errors.SIZE_EXCEEDED if staged.exceeded else cut or errors.CHECKSUM_MISMATCH
                return refused, failure
            await loop.run_in_executor(self._executor, os.lseek, fd, 0, os.SEEK_SET)
            replay = _FileSource(fd, staged.received, loop, self._executor)
            outcome = await _PartWriter(self.s3, state, self.part_size, self._pending(state)).run(
                replay, staged.received)
            outcome.exceeded = staged.exceeded
            return outcome, errors.SIZE_EXCEEDED if staged.exceeded else None
        finally:
            os.close(fd)

    def _failure_of(self, outcome: _Outcome, body: _Body, length: int | None) -> TusError | None:
        if outcome.exceeded:
            return errors.SIZE_EXCEEDED
        return self._cut_short(outcome, body, length)

    def _cut_short(self, outcome: _Outcome, body: _Body, length: int | None) -> TusError | None:
        """The error of a body that did not arrive whole (None: it did, up to the limit)."""
        if body.timed_out:
            return errors.READ_TIMEOUT
        if body.interrupted:
            return errors.SERVER_SHUTDOWN if self._closing else errors.UPLOAD_INTERRUPTED
        if outcome.disconnected or (length is not None and outcome.received < length and not outcome.exceeded):
            return errors.UNEXPECTED_EOF
        return None

    def _pending(self, state: S3State) -> bool:
        """Whether the completion leaves a ``.pending`` marker: not for a partial upload (only an
        ingredient of a final one, as in the file store), nor without a completion to hand over."""
        return self.on_complete is not None and not state.upload.is_partial

    def _finished(self, upload: Upload) -> None:
        self._m_finished.inc()
        log.info("tus: upload %s complete in S3 (%d bytes%s)", upload.id, upload.size,
                 ", partial" if upload.is_partial else "")
        if self.on_complete is not None and not upload.is_partial:
            self._spawn(self._hand_over(upload.id), f"completion of upload {upload.id}")

    async def _hand_over(self, upload_id: str) -> None:
        """Run the completion once in the cluster: under the upload's lock, only while its
        ``.pending`` marker (written before the multipart upload was completed) is there."""
        assert self.on_complete is not None
        async with await self.locks.acquire(upload_id, lambda: None, self.settings.lock_timeout):
            await self._hand_over_held(upload_id)

    async def _hand_over_held(self, upload_id: str) -> None:
        assert self.on_complete is not None
        if not await self.s3.is_pending(upload_id):
            return  # another replica handed it over already
        state = await self.s3.state(upload_id)
        if not state.upload.complete:
            return  # a crash before the last part: the client's next PATCH finishes it
        await self.on_complete(state.upload)
        await self.s3.clear_pending(upload_id)

    async def _recover_pending(self) -> None:
        """At start-up: completions a crashed replica did not hand over (any replica may take them)."""
        for upload_id in await self.s3.pending_ids():
            log.info("tus: upload %s finished without its completion handed over; running it now", upload_id)
            self._spawn(self._hand_over(upload_id), f"completion of upload {upload_id}")

    async def _recover_pending_free(self) -> None:
        """At each quota recount this replica ran: markers whose upload lock is free (a replica
        died between the last byte and the hand-over; a held lock is a hand-over under way)."""
        for upload_id in await self.s3.pending_ids():
            lock = await self._try_lock(upload_id)
            if lock is None:
                continue
            log.info("tus: upload %s finished without its completion handed over; running it now", upload_id)
            self._spawn(self._hand_over_with(lock, upload_id), f"completion of upload {upload_id}")

    async def _hand_over_with(self, lock: Any, upload_id: str) -> None:
        try:
            await self._hand_over_held(upload_id)
        finally:
            await lock.release()

    # -- GET, DELETE -----------------------------------------------------------------------
    async def _get(self, upload_id: str, caller: Caller) -> _Response:
        """tusd's download, headers as the file store's. S3 reads no part of a multipart upload
        before it is completed: an unfinished upload with bytes answers as tusd's s3store does."""
        async with await self._locked(upload_id, caller):
            state = await self._live(upload_id)
            upload = state.upload
            content_type, disposition = _content_type(upload.metadata)
            out = {"Content-Type": content_type, "Content-Disposition": disposition,
                   "Content-Length": str(upload.offset)}
            if not upload.offset:
                return _Response(204, out)  # nothing uploaded yet (tusd and the file store answer the same)
            if not state.completed:
                raise INCOMPLETE_UPLOAD
            # Opened under the lock, as the file store opens its descriptor: the GET has begun
            # before a DELETE waiting for the lock can remove the object.
            stream = await self.s3.open_object(upload_id)
        return _S3Response(200, out, stream, upload.offset)

    async def _send(self, send: Send, resp: _Response, base: dict[str, str]) -> None:
        if not isinstance(resp, _S3Response):
            await super()._send(send, resp, base)
            return
        merged = {**base, **resp.headers}
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in merged.items()]
        async with resp.stream as stream:
            await send({"type": "http.response.start", "status": resp.status, "headers": raw})
            remaining = resp.length
            while remaining > 0:
                piece = await stream.read(min(remaining, STAGE_PIECE))
                if not piece:
                    break
                remaining -= len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": remaining > 0})
            if remaining > 0:  # the object is shorter than the upload's size: end the body short
                await send({"type": "http.response.body", "body": b""})

    async def _delete(self, upload_id: str, caller: Caller) -> _Response:
        async with await self._locked(upload_id, caller):
            await self.s3.terminate(upload_id)
        await self.s3_quota.removed(split_id(upload_id)[0])
        self._m_terminated.inc()
        log.info("tus: upload %s terminated", upload_id)
        return _Response(204)

    async def remove(self, upload_id: str) -> bool:
        """Delete an imported upload unless a request holds it (then it stays: log, no interruption)."""
        lock = await self._try_lock(upload_id)
        if lock is None:
            return False
        try:
            await self.s3.terminate(upload_id)
        finally:
            await lock.release()
        await self.s3_quota.removed(split_id(upload_id)[0])
        return True

    async def _try_lock(self, upload_id: str) -> Any:
        if self.redis_locks is not None:
            return await self.redis_locks.try_acquire(upload_id)
        return self.locks.try_acquire(upload_id)


class _Outcome:
    __slots__ = ("received", "exceeded", "disconnected")

    def __init__(self) -> None:
        self.received = 0  # body bytes stored (in parts or the .part object)
        self.exceeded = False
        self.disconnected = False


class _PartWriter:
    """One PATCH body into the upload's parts: at most one part buffered, tusd's part rules."""

    def __init__(self, s3: S3Store, state: S3State, part_size: int, pending: bool = True) -> None:
        self.s3 = s3
        self.state = state
        self.part_size = part_size
        self.pending = pending
        self.buf = bytearray()
        self.carried = 0  # bytes of the .part object taken back into buf (already counted in the offset)

    async def run(self, body: _Source, limit: int) -> _Outcome:
        outcome = _Outcome()
        upload_id = self.state.upload.id
        if self.state.incomplete_size:
            self.buf += await self.s3.get_incomplete(upload_id)
            # tusd's order: delete first, so a crash can only make the offset smaller, never count twice
            await self.s3.delete_incomplete(upload_id)
            self.carried = len(self.buf)
        # An S3 failure while pumping raises past _end: storing a later tail after a part that
        # failed would leave a hole; without it the offset is what the bucket holds.
        await self._pump(body, limit, outcome)
        await self._end(outcome)
        return outcome

    async def _pump(self, body: _Source, limit: int, outcome: _Outcome) -> None:
        more = limit > 0
        taken = 0
        while more:
            message = await body.next()
            if message is None:
                return
            if message["type"] == "http.disconnect":
                outcome.disconnected = True
                return
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(chunk) > limit - taken:
                chunk = chunk[: limit - taken]
                outcome.exceeded = True
                more = False
            taken += len(chunk)
            self.buf += chunk
            outcome.received += len(chunk)
            while len(self.buf) >= self.part_size:
                await self._send_part(self.part_size)

    async def _send_part(self, n: int) -> None:
        """Send the first ``n`` buffered bytes as the next part (no copy of the part itself)."""
        data = self.buf
        self.buf = bytearray(data[n:])
        del data[n:]
        number = (self.state.parts[-1].number if self.state.parts else 0) + 1
        part: Part = await self.s3.upload_part(self.state.upload.id, number, data)
        self.state.parts.append(part)
        self.carried = max(self.carried - n, 0)

    async def _end(self, outcome: _Outcome) -> None:
        """Store the tail: the last part and completion, a short part, or the ``.part`` object."""
        upload = self.state.upload
        total = upload.offset + outcome.received
        if not upload.size_is_deferred and total == upload.size:
            if self.buf or not self.state.parts:
                await self._send_part(len(self.buf))
            if self.pending:
                await self.s3.mark_pending(upload.id)  # before: a crash right after completing loses nothing
            await self.s3.complete(upload.id, self.state.parts)
            self.state.completed = True
        elif len(self.buf) >= MIN_PART:
            await self._send_part(len(self.buf))
        elif self.buf:
            await self.s3.put_incomplete(upload.id, self.buf)
        self.buf = bytearray()



class _S3Response(_Response):
    """A download: the object's body stream, sent in pieces of 1 MiB, never whole."""

    __slots__ = ("stream", "length")

    def __init__(self, status: int, headers: dict[str, str], stream: Any, length: int) -> None:
        super().__init__(status, headers)
        self.stream = stream
        self.length = length


def _anonymous_file(folder: Any) -> int:
    """A file with no name in ``folder`` (``O_TMPFILE`` where the kernel has it): gone when closed."""
    os.makedirs(folder, exist_ok=True)
    f = tempfile.TemporaryFile(dir=folder, prefix=".s3chk-")  # noqa: SIM115 - the descriptor is kept
    fd = os.dup(f.fileno())
    f.close()
    return fd


def _write_hashed(fd: int, chunks: list[bytes], hasher: Any) -> None:
    for c in chunks:
        hasher.update(c)
    data = b"".join(chunks)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _stage(body: _Body, fd: int, limit: int, hasher: Any, loop: asyncio.AbstractEventLoop,
                 executor: Any) -> _Outcome:
    """Read the body into ``fd`` (at most ``limit`` bytes), hashing it, 1 MiB per thread hop."""
    outcome = _Outcome()
    chunks: list[bytes] = []
    held = 0
    more = limit > 0
    while more:
        message = await body.next()
        if message is None:
            break
        if message["type"] == "http.disconnect":
            outcome.disconnected = True
            break
        chunk = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(chunk) > limit - outcome.received:
            chunk = chunk[: limit - outcome.received]
            outcome.exceeded = True
            more = False
        if chunk:
            chunks.append(chunk)
            held += len(chunk)
            outcome.received += len(chunk)
        if held >= STAGE_PIECE:
            await loop.run_in_executor(executor, _write_hashed, fd, chunks, hasher)
            chunks, held = [], 0
    if chunks:
        await loop.run_in_executor(executor, _write_hashed, fd, chunks, hasher)
    return outcome


class _FileSource:
    """A staged body read back as ASGI messages of 1 MiB, for :class:`_PartWriter`."""

    def __init__(self, fd: int, length: int, loop: asyncio.AbstractEventLoop, executor: Any) -> None:
        self._fd = fd
        self._remaining = length
        self._loop = loop
        self._executor = executor

    async def next(self) -> dict[str, Any] | None:
        if self._remaining <= 0:
            return {"type": "http.request", "body": b"", "more_body": False}
        piece = await self._loop.run_in_executor(self._executor, os.read, self._fd,
                                                 min(self._remaining, STAGE_PIECE))
        if not piece:
            raise OSError("the staged chunk is shorter than what was written")
        self._remaining -= len(piece)
        return {"type": "http.request", "body": piece, "more_body": self._remaining > 0}


class _ObjectsSource:
    """Finished objects one after the other as ASGI messages of 1 MiB (the small-partials concatenation)."""

    def __init__(self, s3: S3Store, upload_ids: list[str]) -> None:
        self._s3 = s3
        self._ids = list(upload_ids)
        self._stream: Any = None

    async def next(self) -> dict[str, Any] | None:
        while True:
            if self._stream is None:
                if not self._ids:
                    return {"type": "http.request", "body": b"", "more_body": False}
                self._stream = await self._s3.open_object(self._ids.pop(0))
            piece = await self._stream.read(STAGE_PIECE)
            if piece:
                return {"type": "http.request", "body": piece, "more_body": True}
            await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()
