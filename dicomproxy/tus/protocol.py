"""The TUS 1.0.0 server as a pure ASGI application, wire-compatible with tusd v2.

Core protocol plus the creation, creation-with-upload, creation-defer-length, termination,
concatenation, checksum and expiration extensions. The request flow, status codes, headers and
``ERR_...`` bodies follow tusd's ``unrouted_handler.go`` step by step (its middleware first:
method override, CORS, ``Tus-Resumable``, ``OPTIONS``, version check; then routing), so a
client or a deployment written against tusd sees no difference. Where tusd has nothing
(checksum, expiration) the tus specification is followed in tusd's style.

What tusd leaves to the deployment is decided here too, each rule in a module of its own: an
upload is its creator's (:mod:`.access`: anyone else but an admin gets the unknown-id 404), the
folder's limits (:mod:`.quota`: 507 ``ERR_STORAGE_FULL``, 429 ``ERR_TOO_MANY_UPLOADS``), one
budget for buffered body bytes (:mod:`.buffers`: 503 ``ERR_SERVER_BUSY`` after the wait), and
downloads only with ``Tus:AllowDownload`` (otherwise 405, as tusd's ``-disable-download``).

:class:`TusApp` is constructible on its own (``TusApp(settings, on_complete)``) and serves
requests whose full path starts with ``settings.base_path``. ``on_complete(upload)`` runs in
the background once the last byte of a non-partial upload is stored (and fsynced): the final
``PATCH`` is answered without waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dicomproxy.config.settings import TusSettings
from dicomproxy.metrics import Metrics
from dicomproxy.tus import errors
from dicomproxy.tus import headers as h
from dicomproxy.tus.access import Caller
from dicomproxy.tus.buffers import BufferBudget
from dicomproxy.tus.errors import TusError
from dicomproxy.tus.locks import LockManager
from dicomproxy.tus.quota import UploadQuota
from dicomproxy.tus.store import FileStore, Upload
from dicomproxy.tus.writer import BATCH_BYTES, BodyWriter, WriteResult

log = logging.getLogger(__name__)

OnComplete = Callable[[Upload], Awaitable[None]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

EXTENSIONS = (
    "creation,creation-with-upload,termination,concatenation,creation-defer-length,checksum"
)
FSYNC_POLICIES = ("complete", "patch", "none")
_UNLIMITED = 2**63 - 1


class _Response:
    """Status, headers and a small body; everything a TUS answer is."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.status = status
        self.headers = headers if headers is not None else {}
        self.body = body


class TusApp:
    """ASGI app for ``settings.base_path``; see the module docstring."""

    def __init__(
        self,
        settings: TusSettings,
        on_complete: OnComplete | None = None,
        *,
        metrics: Metrics | None = None,
        fsync: str = "complete",
        write_threads: int = 4,
        write_batch: int = BATCH_BYTES,
        holder_poll: float = 0.5,
        read_timeout: float = 60.0,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.settings = settings
        self.base_path = settings.base_path  # always "/.../" (normalised by settings)
        self.on_complete = on_complete
        self.fsync = fsync
        self.write_batch = write_batch
        self.read_timeout = read_timeout
        self.store = FileStore(settings.upload_folder)
        self.locks = LockManager(settings.upload_folder, holder_poll=holder_poll)
        self._executor = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="tus-io")
        self.budget = BufferBudget(settings.write_buffer, settings.write_buffer_wait)
        self.quota = UploadQuota(
            self.store,
            max_bytes=settings.max_storage,
            min_free_bytes=settings.min_free_disk,
            max_unfinished=settings.max_uploads_per_user,
            executor=self._executor,
        )
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self.extensions = EXTENSIONS + (",expiration" if settings.expire_after > 0 else "")
        m = metrics or Metrics()
        self._m_requests = m.counter("dicomproxy_tus_requests_total", "TUS requests by method", labels=("method",))
        self._m_errors = m.counter("dicomproxy_tus_errors_total", "TUS error responses by code", labels=("code",))
        self._m_created = m.counter("dicomproxy_tus_uploads_created_total", "TUS uploads created")
        self._m_finished = m.counter("dicomproxy_tus_uploads_finished_total", "TUS uploads completed")
        self._m_terminated = m.counter("dicomproxy_tus_uploads_terminated_total", "TUS uploads terminated")
        self._m_bytes = m.counter("dicomproxy_tus_bytes_received_total", "bytes stored by TUS PATCH/POST")
        m.gauge("dicomproxy_tus_buffered_bytes", "TUS body bytes held in memory (Tus:WriteBufferMB)",
                lambda: self.budget.in_use)
        m.gauge("dicomproxy_tus_storage_used_bytes", "bytes of the TUS upload folder's uploads",
                lambda: self.quota.used)

    # -- lifecycle -------------------------------------------------------------------------
    async def startup(self, recover: bool = True) -> None:
        """Create the folder, count what it holds; hand over completions a crash interrupted
        (``<id>.pending``) when ``recover`` (with ``Server:Workers``: worker 0 only, so once)."""
        self.store.ensure_folder()
        await self.quota.refresh(force=True)
        if self.on_complete is None or not recover:
            return
        for upload_id in self.store.pending_ids():
            try:
                upload = self.store.get(upload_id)
            except TusError:
                self.store.clear_pending(upload_id)
                continue
            if upload.complete and not upload.is_partial:
                log.info("tus: upload %s finished before a restart; running its completion now", upload_id)
                self._spawn(self._complete(upload), f"completion of upload {upload_id}")

    async def aclose(self, grace: float = 30) -> None:
        """Wait for running completion callbacks (bounded), then stop the I/O threads."""
        self._closing = True
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=grace)
            for task in pending:
                task.cancel()
        self._executor.shutdown(wait=True)

    def _spawn(self, coro: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("tus: %s failed", what)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        """For tests and shutdown: wait until every completion callback has run."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        hdrs = h.first_values(scope.get("headers", ()))
        method = scope["method"]
        if method == "POST" and hdrs.get("x-http-method-override"):
            method = hdrs["x-http-method-override"]
        self._m_requests.inc(method=method)
        base: dict[str, str] = {}
        origin = hdrs.get("origin")
        if origin:
            base["Access-Control-Allow-Origin"] = origin
            base["Vary"] = "Origin"
            if method == "OPTIONS":
                base["Access-Control-Allow-Methods"] = h.CORS_ALLOW_METHODS
                base["Access-Control-Allow-Headers"] = h.CORS_ALLOW_HEADERS
                base["Access-Control-Max-Age"] = h.CORS_MAX_AGE
            else:
                base["Access-Control-Expose-Headers"] = h.CORS_EXPOSE_HEADERS
        base["Tus-Resumable"] = h.TUS_VERSION
        base["X-Content-Type-Options"] = "nosniff"
        try:
            resp = await self._route(scope, receive, method, hdrs, Caller.from_scope(scope))
        except TusError as e:
            resp = self._error(e)
        except Exception as e:  # tusd answers unexpected failures with 500 and the message
            log.exception("tus: %s %s failed", method, scope.get("path"))
            resp = self._error(TusError("ERR_INTERNAL_SERVER_ERROR", str(e) or type(e).__name__, 500))
        if method == "HEAD":
            resp.body = b""
            if scope["method"] != "HEAD":  # HEAD by X-HTTP-Method-Override: a real, empty body
                resp.headers.pop("Content-Length", None)
        await self._send(send, resp, base)

    def _error(self, e: TusError) -> _Response:
        self._m_errors.inc(code=e.code)
        return _Response(e.status, {"Content-Type": "text/plain; charset=utf-8", **e.headers}, e.body)

    async def _send(self, send: Send, resp: _Response, base: dict[str, str]) -> None:
        merged = {**base, **resp.headers}
        merged.setdefault("Content-Length", str(len(resp.body)))
        raw = [(k.lower().encode("latin-1"), _header_bytes(v)) for k, v in merged.items()]
        if isinstance(resp, _FileResponse):
            try:
                await send({"type": "http.response.start", "status": resp.status, "headers": raw})
                await self._send_file(send, resp)
            finally:
                os.close(resp.fd)
            return
        await send({"type": "http.response.start", "status": resp.status, "headers": raw})
        await send({"type": "http.response.body", "body": resp.body})

    async def _send_file(self, send: Send, resp: _FileResponse) -> None:
        """Stream a download in 1 MB pieces from a descriptor opened under the lock."""
        loop = asyncio.get_running_loop()
        remaining = resp.length
        while remaining > 0:
            piece = await loop.run_in_executor(self._executor, os.read, resp.fd, min(remaining, 1 << 20))
            if not piece:
                break
            remaining -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": remaining > 0})
        if remaining > 0:  # the file shrank under us: end the body; the client sees it short
            await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(
        self, scope: Scope, receive: Receive, method: str, hdrs: dict[str, str], caller: Caller
    ) -> _Response:
        if method == "OPTIONS":
            # 200, not 204: some browsers reject a preflight answered with 204 (tusd's comment).
            out = {"Tus-Version": h.TUS_VERSION, "Tus-Extension": self.extensions,
                   "Tus-Checksum-Algorithm": ",".join(h.CHECKSUM_ALGORITHMS)}
            if self.settings.max_size > 0:
                out["Tus-Max-Size"] = str(self.settings.max_size)
            return _Response(200, out)
        if method not in ("GET", "HEAD") and hdrs.get("tus-resumable") != h.TUS_VERSION:
            raise errors.UNSUPPORTED_VERSION.with_headers(**{"Tus-Version": h.TUS_VERSION})
        path: str = scope.get("path", "")
        if path.startswith(self.base_path):
            rel = path[len(self.base_path):]
        elif path == self.base_path.rstrip("/"):
            rel = ""
        else:
            raise errors.NOT_FOUND
        upload_id = rel.strip("/")
        if not upload_id:
            if method == "POST":
                return await self._post(scope, receive, hdrs, caller)
            return _Response(405, {"Allow": "POST", "Content-Type": "text/plain; charset=utf-8"},
                             b"method not allowed")
        if method == "HEAD":
            return await self._head(scope, upload_id, hdrs, caller)
        if method == "PATCH":
            return await self._patch(receive, upload_id, hdrs, caller)
        if method == "GET" and self.settings.allow_download:
            return await self._get(upload_id, caller)
        if method == "DELETE":
            return await self._delete(upload_id, caller)
        # tusd with -disable-download answers a GET like any other unknown method.
        allow = "GET, HEAD, PATCH, DELETE" if self.settings.allow_download else "HEAD, PATCH, DELETE"
        return _Response(405, {"Allow": allow, "Content-Type": "text/plain; charset=utf-8"},
                         b"method not allowed")

    # -- helpers ---------------------------------------------------------------------------
    def _location(self, scope: Scope, hdrs: dict[str, str], upload_id: str) -> str:
        host, proto = h.host_and_proto(hdrs, scope)
        return f"{proto}://{host}{self.base_path}{upload_id}"

    def _expires_at(self, upload: Upload) -> float | None:
        if self.settings.expire_after <= 0 or upload.complete:
            return None
        return self.store.last_activity(upload) + self.settings.expire_after

    def _expiry_header(self, upload: Upload, out: dict[str, str]) -> None:
        at = self._expires_at(upload)
        if at is not None:
            out["Upload-Expires"] = h.http_date(at)

    async def _lock(self, upload_id: str, caller: Caller, on_release: Callable[[], None] = lambda: None) -> Any:
        """The upload's lock, for its owner or an admin; anyone else gets ``NOT_FOUND``.

        Checked before the lock is asked for: asking interrupts the request that holds it.
        Unknown ids get no lock file either (no litter in the folder)."""
        self._check_access(upload_id, caller)
        return await self.locks.acquire(upload_id, on_release, self.settings.lock_timeout)

    def _check_access(self, upload_id: str, caller: Caller) -> None:
        owner = self.store.owner(upload_id)  # NOT_FOUND for an unknown id
        if not caller.may_access(owner):
            log.info("tus: %s may not access upload %s (owner %s): answered as not found",
                     caller.user or "the anonymous user", upload_id, owner or "none")
            raise errors.NOT_FOUND

    def _get_live(self, upload_id: str) -> Upload:
        """Read an upload (lock held); an expired unfinished one is removed and answers 410."""
        upload = self.store.get(upload_id)
        at = self._expires_at(upload)
        if at is not None and at < time.time():
            log.info("tus: upload %s expired; removing it", upload_id)
            self.store.terminate(upload_id)
            self.quota.removed(upload)
            raise errors.UPLOAD_EXPIRED
        return upload

    # -- POST: creation, creation-with-upload, creation-defer-length, concatenation ---------
    async def _post(self, scope: Scope, receive: Receive, hdrs: dict[str, str], caller: Caller) -> _Response:
        contains_chunk = hdrs.get("content-type") == h.OFFSET_OCTET_STREAM
        is_partial, is_final, partial_ids = h.parse_concat(hdrs.get("upload-concat", ""), self.base_path)
        partials: list[Upload] = []
        deferred = False
        if is_final:
            if contains_chunk:
                raise errors.MODIFY_FINAL
            partials = self._partials(partial_ids, caller)
            size = sum(part.size for part in partials)
        else:
            size, deferred = self._new_length(
                hdrs.get("upload-length", ""), hdrs.get("upload-defer-length", "")
            )
        if self.settings.max_size > 0 and size > self.settings.max_size:
            raise errors.MAX_SIZE_EXCEEDED
        if is_final:
            await self._reserve(size)  # the concatenation writes all of it at once
        else:
            await self.quota.admit(caller.user, size)
        upload = Upload(
            id="",
            size=size,
            size_is_deferred=deferred,
            metadata=h.parse_metadata(hdrs.get("upload-metadata")),
            is_partial=is_partial,
            is_final=is_final,
            partial_uploads=partial_ids if is_final else None,
            owner=caller.user,
        )
        self.store.ensure_folder()
        self.store.create(upload)
        self.quota.created(upload)
        self._m_created.inc()
        out = {"Location": self._location(scope, hdrs, upload.id)}
        log.info("tus: created upload %s (size %s, metadata %s)", upload.id,
                 "deferred" if deferred else size, list(upload.metadata))
        if is_final:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.store.concat, upload, partials)
            self._finished(upload)
        if contains_chunk:
            writer = self._writer()
            lock = await self.locks.acquire(upload.id, writer.interrupt, self.settings.lock_timeout)
            try:
                # The Location goes out even if the chunk fails, as tusd does.
                try:
                    await self._write_chunk(receive, hdrs, upload, writer, out)
                except TusError as e:
                    raise e.with_headers(Location=out["Location"]) from None
            finally:
                await lock.release()
        elif not deferred and size == 0 and not is_final:
            await self._fsync_path(upload)
            self._finished(upload)
        self._expiry_header(upload, out)
        return _Response(201, out)

    def _partials(self, ids: list[str], caller: Caller) -> list[Upload]:
        """The partial uploads a final one is made of: each listed once, each the caller's."""
        if len(set(ids)) != len(ids):
            raise errors.CONCAT_REPEATED  # one 2 KB header could otherwise write gigabytes
        partials = []
        for pid in ids:
            self._check_access(pid, caller)
            part = self.store.get(pid)
            if not part.is_partial:
                raise errors.CONCAT_NOT_PARTIAL
            if not part.complete:
                raise errors.UPLOAD_NOT_FINISHED
            partials.append(part)
        return partials

    async def _reserve(self, size: int) -> None:
        granted = await self.quota.grant(size)
        if granted < size:
            self.quota.refund(granted)
            raise errors.STORAGE_FULL.with_headers(**{"Retry-After": "60"})

    def _new_length(self, length: str, defer: str) -> tuple[int, bool]:
        """tusd's ``validateNewUploadLengthHeaders``."""
        if length and defer:
            raise errors.AMBIGUOUS_UPLOAD_LENGTH
        if defer and defer != "1":
            raise errors.INVALID_UPLOAD_DEFER_LENGTH
        if defer == "1":
            return 0, True
        n = h.parse_int(length)
        if n is None or n < 0:
            raise errors.INVALID_UPLOAD_LENGTH
        return n, False

    # -- HEAD ------------------------------------------------------------------------------
    async def _head(self, scope: Scope, upload_id: str, hdrs: dict[str, str], caller: Caller) -> _Response:
        async with await self._lock(upload_id, caller):
            upload = self._get_live(upload_id)
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
            out["Content-Length"] = str(upload.size)  # tusd does this too
        self._expiry_header(upload, out)
        return _Response(200, out)

    # -- PATCH -----------------------------------------------------------------------------
    async def _patch(self, receive: Receive, upload_id: str, hdrs: dict[str, str], caller: Caller) -> _Response:
        patch = h.patch_headers(hdrs)
        offset = patch.offset
        writer = self._writer()
        async with await self._lock(upload_id, caller, writer.interrupt):
            upload = self._get_live(upload_id)
            if upload.is_final:
                raise errors.MODIFY_FINAL
            if offset != upload.offset:
                # tusd sends no offset here; the IETF resumable-upload draft asks for it.
                raise errors.MISMATCHED_OFFSET.with_headers(**{"Upload-Offset": str(upload.offset)})
            out: dict[str, str] = {}
            if upload.complete:
                out["Upload-Offset"] = str(offset)
                return _Response(204, out)
            length = patch.declared_length(upload.size_is_deferred, upload.offset, self.settings.max_size)
            if length is not None:
                self.store.declare_length(upload, length)
            await self._write_chunk(receive, hdrs, upload, writer, out)
            self._expiry_header(upload, out)
            return _Response(204, out)

    def _writer(self) -> BodyWriter:
        return BodyWriter(self._executor, self.write_batch, writeback=self.fsync != "none",
                          read_timeout=self.read_timeout, budget=self.budget, quota=self.quota)

    async def _write_chunk(
        self, receive: Receive, hdrs: dict[str, str], upload: Upload, writer: BodyWriter, out: dict[str, str]
    ) -> None:
        """tusd's ``writeChunk`` plus checksum verification; sets ``Upload-Offset`` in ``out``."""
        length = h.parse_int(hdrs.get("content-length"))
        offset = upload.offset
        if not upload.size_is_deferred:
            if length is not None and offset + length > upload.size:
                raise errors.SIZE_EXCEEDED
            limit = upload.size - offset
        elif self.settings.max_size > 0:
            if length is not None and offset + length > self.settings.max_size:
                raise errors.MAX_SIZE_EXCEEDED
            limit = self.settings.max_size - offset
        else:
            limit = _UNLIMITED
        if length is not None:
            limit = min(limit, length)
        hasher = None
        expected_digest = b""
        checksum = h.checksum_of(hdrs)
        if checksum is not None:
            algorithm, expected_digest = checksum
            hasher = h.CHECKSUM_ALGORITHMS[algorithm]()
            self.store.begin_verified_chunk(upload)
        failure: TusError | None = None
        fd = os.open(upload.path, os.O_WRONLY | os.O_APPEND)
        try:
            result = await writer.write(receive, fd, limit, hasher, expected=length)
            new_offset = offset + result.written
            if hasher is not None:
                whole = _failure(result, self._closing) is None
                if not whole or hasher.digest() != expected_digest:
                    # The chunk cannot be verified (or failed): it is not accepted at all.
                    os.ftruncate(fd, offset)
                    self.quota.refund(result.written)
                    new_offset = offset
                    if whole:
                        failure = errors.CHECKSUM_MISMATCH
                self.store.end_verified_chunk(upload)
            upload.offset = new_offset
            if self.fsync == "patch" or (self.fsync == "complete" and upload.complete):
                await asyncio.get_running_loop().run_in_executor(self._executor, os.fsync, fd)
        finally:
            os.close(fd)
        self._m_bytes.inc(new_offset - offset)
        out["Upload-Offset"] = str(new_offset)
        log.debug("tus: %s: stored %d bytes at %d", upload.id, new_offset - offset, offset)
        if upload.complete:
            self._finished(upload)
        failure = errors.SIZE_EXCEEDED if result.exceeded else _failure(result, self._closing) or failure
        if failure is not None:
            raise failure

    async def _fsync_path(self, upload: Upload) -> None:
        if self.fsync == "none":
            return

        def sync() -> None:
            fd = os.open(upload.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.get_running_loop().run_in_executor(self._executor, sync)

    def _finished(self, upload: Upload) -> None:
        self._m_finished.inc()
        self.quota.finished(upload)
        log.info("tus: upload %s complete (%d bytes%s)", upload.id, upload.size,
                 ", partial" if upload.is_partial else "")
        if upload.is_partial or self.on_complete is None:
            return  # a partial upload is only an ingredient of a final one
        self.store.mark_pending(upload.id)
        self._spawn(self._complete(upload), f"completion of upload {upload.id}")

    async def _complete(self, upload: Upload) -> None:
        assert self.on_complete is not None
        await self.on_complete(upload)
        self.store.clear_pending(upload.id)  # only once handed over: a crash before retries it

    # -- GET (tusd's download; not part of the protocol) ------------------------------------
    async def _get(self, upload_id: str, caller: Caller) -> _Response:
        async with await self._lock(upload_id, caller):
            upload = self._get_live(upload_id)
            # Opened under the lock: a DELETE right after cannot cut the download short.
            fd = os.open(upload.path, os.O_RDONLY) if upload.offset else -1
        content_type, disposition = _content_type(upload.metadata)
        out = {"Content-Type": content_type, "Content-Disposition": disposition,
               "Content-Length": str(upload.offset)}
        if fd < 0:
            return _Response(204, out)  # nothing uploaded yet (tusd answers the same)
        return _FileResponse(200, out, fd, upload.offset)

    # -- DELETE ----------------------------------------------------------------------------
    async def _delete(self, upload_id: str, caller: Caller) -> _Response:
        async with await self._lock(upload_id, caller):
            upload = self.store.get(upload_id)
            self.store.terminate(upload_id)
            self.quota.removed(upload)
        self._m_terminated.inc()
        log.info("tus: upload %s terminated", upload_id)
        return _Response(204)


def _failure(result: WriteResult, closing: bool) -> TusError | None:
    """The error a body that did not arrive whole ends the request with (None: it did)."""
    if result.storage_full:
        return errors.STORAGE_FULL.with_headers(**{"Retry-After": "60"})
    if result.busy:
        return errors.SERVER_BUSY.with_headers(**{"Retry-After": "5"})
    if result.timed_out:
        return errors.READ_TIMEOUT
    if result.interrupted:
        return errors.SERVER_SHUTDOWN if closing else errors.UPLOAD_INTERRUPTED
    if result.disconnected or result.incomplete:
        return errors.UNEXPECTED_EOF
    return None


class _FileResponse(_Response):
    """A download: the body is read from an open descriptor in pieces, never whole."""

    __slots__ = ("fd", "length")

    def __init__(self, status: int, headers: dict[str, str], fd: int, length: int) -> None:
        super().__init__(status, headers)
        self.fd = fd
        self.length = length


def _header_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


# tusd's mimeInlineBrowserWhitelist: types a browser may show inline; everything else downloads.
_INLINE_TYPES = frozenset({
    "text/plain", "image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "audio/wave",
    "audio/wav", "audio/x-wav", "audio/x-pn-wav", "audio/webm", "audio/ogg", "video/mp4", "video/webm",
    "video/ogg", "application/ogg",
})


def _content_type(meta: dict[str, str]) -> tuple[str, str]:
    """tusd's ``filterContentType``: never let an upload be rendered as HTML by a browser."""
    filetype = meta.get("filetype", "")
    base = filetype.split(";")[0].strip().lower()
    if base and "/" in base and " " not in base:
        content_type = filetype
        disposition = "inline" if base in _INLINE_TYPES else "attachment"
    else:
        content_type, disposition = "application/octet-stream", "attachment"
    if "filename" in meta:
        name = meta["filename"].replace("\\", "\\\\").replace('"', '\\"')
        disposition += f';filename="{name}"'
    return content_type, disposition
