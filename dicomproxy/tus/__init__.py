"""TUS uploads (issue 3): a tusd-compatible resumable upload server inside the gateway.

``install(gateway)`` wires the pieces into the gateway:

* the ASGI app (:class:`~dicomproxy.tus.protocol.TusApp`) is mounted at ``Tus:BasePath``;
* a component starts the upload folder and the expiry sweep, and on shutdown waits for
  completion callbacks still running;
* a finished upload fires ``onTusFileComplete(metadata)`` (singleton, then transient engine)
  with every ``Upload-Metadata`` pair plus ``fileId``, ``path`` and ``size``; unless a script
  returns true, a ``tus-import`` task (owned by the upload's owner, so that only they and
  admins see it) sends it to the PACS with STOW-RS (:mod:`~dicomproxy.tus.importer`; a ZIP
  within the limits of :mod:`~dicomproxy.tus.archive`; with ``Tus:Store`` ``s3`` and
  ``Cluster:Redis`` a cluster task that any replica runs, streaming the object from the bucket,
  and runs again elsewhere if its replica dies), deletes it on success (unless
  ``Tus:KeepAfterImport``), keeps it on failure, and emits ``upload.imported`` / ``import.failed``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dicomproxy.audit import codes as audit_codes
from dicomproxy.audit import events as audit_events
from dicomproxy.tus.archive import ArchiveRefused, ZipLimits
from dicomproxy.tus.expiry import ExpirySweeper
from dicomproxy.tus.importer import ImportFailed, StowClient
from dicomproxy.tus.protocol import TusApp
from dicomproxy.tus.redislock import RedisLockManager
from dicomproxy.tus.s3app import S3TusApp
from dicomproxy.tus.s3copy import S3Copy
from dicomproxy.tus.s3expiry import S3ExpirySweeper
from dicomproxy.tus.s3store import is_valid_s3_id, split_id
from dicomproxy.tus.store import Upload, is_valid_id

__all__ = ["TusApp", "TusFeature", "Upload", "install", "TASK_KIND", "CALLBACK"]

from dicomproxy.host import Host
from dicomproxy.tasks import ReportedFailure

log = logging.getLogger(__name__)

TASK_KIND = "tus-import"
CALLBACK = "onTusFileComplete"


def install(gateway: Host) -> TusFeature:
    feature = TusFeature(gateway)
    gateway.mount(gateway.settings.tus.base_path, feature.app)
    gateway.add_component(feature)
    gateway.tasks.register(TASK_KIND, feature.run_import)
    gateway.add_health("tus", feature.health)
    return feature


class TusFeature:
    """The TUS server plus what happens to a finished upload."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self.settings = gateway.settings.tus
        self.app: TusApp = self._app(gateway)
        self.sweeper: ExpirySweeper | S3ExpirySweeper
        if isinstance(self.app, S3TusApp):
            self.sweeper = S3ExpirySweeper(self.app, self.settings.expire_after, self.settings.sweep_interval)
        else:
            self.sweeper = ExpirySweeper(
                self.app.store, self.app.locks, self.settings.expire_after, self.settings.sweep_interval
            )
        up = gateway.settings.upstream
        self.stow_url = gateway.upstream.url(f"{up.dicomweb_root}/studies")  # no user:password@ (logged)
        zip_limits = ZipLimits(self.settings.zip_max_expanded, self.settings.zip_max_ratio,
                               self.settings.zip_max_members)
        self.stow = StowClient(self.stow_url, gateway.upstream.client, self.settings.import_batch_size,
                               connect_timeout=up.connect_timeout, read_timeout=max(up.read_timeout, 60),
                               zip_limits=zip_limits)
        m = gateway.metrics
        self._m_imported = m.counter("dicomproxy_tus_imports_total", "TUS imports by outcome", labels=("outcome",))
        self._m_instances = m.counter(
            "dicomproxy_tus_imported_instances_total", "instances stored by TUS imports"
        )

    def _app(self, gateway: Host) -> TusApp:
        """The file store's app, or the S3 one (with Redis locks when ``Cluster:Redis`` is set)."""
        if self.settings.store != "s3":
            return TusApp(self.settings, self.on_complete, metrics=gateway.metrics, fsync=self.settings.fsync)
        cluster = gateway.settings.cluster
        locks = None
        if cluster.redis:
            locks = RedisLockManager(cluster.redis, password=cluster.redis_password, lease=cluster.lock_lease)
        else:
            log.warning("tus: Tus:Store is s3 without Cluster:Redis: upload locks are local to this host, so "
                        "only one replica may serve these uploads")
        return S3TusApp(self.settings, self.on_complete, metrics=gateway.metrics, redis_locks=locks)

    # -- component -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.app.startup(recover=self.gateway.worker.owner)
        # Server:Workers: one sweep per host (the folder every worker shares); with S3, each host's
        # sweeper takes the cluster-wide sweep lock per round, so one replica sweeps the bucket at a time
        if self.gateway.worker.owner:
            await self.sweeper.start()

    async def stop(self) -> None:
        await self.sweeper.stop()
        await self.app.aclose()

    def health(self) -> dict[str, Any]:
        folder = self.settings.upload_folder
        if isinstance(self.app, S3TusApp):
            s3 = self.settings.s3
            return {"ok": True, "store": "s3", "bucket": s3.bucket, "prefix": s3.prefix,
                    "basePath": self.settings.base_path,
                    "locks": "redis" if self.app.redis_locks is not None else "local"}
        quota = self.app.quota
        return {"ok": folder.is_dir(), "folder": str(folder), "basePath": self.settings.base_path,
                "storageUsedBytes": quota.used, "storageRoomBytes": min(quota.room(), 2**53)}

    # -- completion ------------------------------------------------------------------------
    async def on_complete(self, upload: Upload) -> None:
        """Run the script hook; unless it handled the file, queue the default import."""
        metadata = dict(upload.metadata)
        metadata.update(fileId=upload.id, path=self._where(upload), size=str(upload.size))
        handled = False
        host = self.gateway.lua
        if host.defines(CALLBACK):
            try:
                result = await host.dispatch(CALLBACK, metadata)
                handled = bool(result.handled)
            except Exception as e:  # a broken script must not lose the upload: import it
                log.error("tus: %s failed for upload %s: %s; running the default import",
                          CALLBACK, upload.id, e)
        if handled:
            log.info("tus: upload %s handled by %s", upload.id, CALLBACK)
            return
        name = upload.metadata.get("filename") or upload.metadata.get("name") or upload.id
        task_id = self.gateway.tasks.submit(
            TASK_KIND,
            {"fileId": upload.id, "path": self._where(upload), "size": upload.size, "filename": name,
             "owner": upload.owner or ""},
            title=f"Import TUS upload {name}",
            owner=upload.owner,
            task_id=self._task_id(upload),
        )
        log.info("tus: upload %s queued for import as task %s", upload.id, task_id)

    def _task_id(self, upload: Upload) -> str | None:
        """S3: one id per upload (``tus-import-<objectId>``), so a completion handed over twice
        (a replica killed after submitting, before clearing the ``.pending`` marker; the next
        replica hands it over again) queues one import."""
        if isinstance(self.app, S3TusApp):
            return f"tus-import-{split_id(upload.id)[0]}"
        return None

    def _where(self, upload: Upload) -> str:
        """The upload's bytes: a file's path, or ``s3://bucket/key``."""
        if isinstance(self.app, S3TusApp):
            return f"s3://{self.settings.s3.bucket}/{self.app.s3.key(split_id(upload.id)[0])}"
        return str(upload.path)

    # -- the tus-import task ---------------------------------------------------------------
    async def run_import(self, args: dict[str, Any]) -> dict[str, Any]:
        upload_id = str(args.get("fileId", ""))
        name = str(args.get("filename") or upload_id)
        if isinstance(self.app, S3TusApp):
            if not is_valid_s3_id(upload_id):
                raise ImportFailed(f"invalid upload id {upload_id!r}")
            async with S3Copy(self.app.s3, upload_id, self.settings.upload_folder) as copy:
                return await self._import(copy.path, upload_id, name, args)
        if not is_valid_id(upload_id):
            raise ImportFailed(f"invalid upload id {upload_id!r}")
        path = self.app.store.data_path(upload_id)
        if not path.is_file():
            raise ImportFailed(f"upload {upload_id} ({name}) is gone from {self.settings.upload_folder}")
        return await self._import(Path(path), upload_id, name, args)

    async def _import(self, path: Path, upload_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            report = await self.stow.import_file(path)
        except (ImportFailed, ArchiveRefused) as e:
            self._failed(upload_id, name, str(e), args)
            raise ReportedFailure(str(e)) from None
        summary = {"fileId": upload_id, "filename": name, **report.summary()}
        if report.instances == 0:
            why = f"{name}: not DICOM (neither a DICOM file nor a ZIP of DICOM files)"
            self._failed(upload_id, name, why, args)
            raise ReportedFailure(why)
        self._m_instances.inc(len(report.stored))
        if not report.ok:
            first = report.failed[0]
            why = (f"{name}: {len(report.failed)} of {report.instances} instances failed "
                   f"(first: {first['sop']}: {first['reason']})")
            self._failed(upload_id, name, why, args)
            raise ReportedFailure(why)
        self._m_imported.inc(outcome="stored")
        self._audit(args, report.studies, len(report.stored), "")
        log.info("tus: upload %s (%s) imported: %d instances", upload_id, name, len(report.stored))
        self.gateway.bus.emit(
            "upload.imported",
            f"Upload imported: {name}",
            f"{len(report.stored)} instance(s) stored in the PACS"
            + (f", {len(report.skipped)} non-DICOM file(s) skipped" if report.skipped else ""),
            "/dicomproxy/tasks",
            **summary,
        )
        if not self.settings.keep_after_import:
            await self._delete(upload_id)
        return summary

    def _audit(self, args: dict[str, Any], study_urls: set[str], stored: int, why: str) -> None:
        """DICOM Instances Transferred: the upload's studies, from the gateway to the PACS, for its owner."""
        studies = [audit_events.Study(url.rstrip("/").rsplit("/", 1)[-1]) for url in sorted(study_urls)]
        text = f"TUS upload {args.get('filename') or args.get('fileId')}: {stored} instance(s) stored" + (
            f"; {why}" if why else "")
        self.gateway.audit.record(audit_events.instances_transferred(
            studies, audit_events.Participant(audit_events.SELF, False, audit_codes.SOURCE),
            audit_events.peer(self.stow_url, "", requestor=False, role=audit_codes.DESTINATION),
            action="R", ok=not why, reason=text,
            requestor=audit_events.peer(str(args.get("owner") or "anonymous"), "", requestor=True)))

    def _failed(self, upload_id: str, name: str, why: str, args: dict[str, Any]) -> None:
        self._m_imported.inc(outcome="failed")
        self._audit(args, set(), 0, why)
        log.error("tus: import of upload %s failed; the upload is kept: %s", upload_id, why)
        self.gateway.bus.emit("import.failed", f"Import failed: {name}", why, "/dicomproxy/tasks",
                              fileId=upload_id, filename=name)

    async def _delete(self, upload_id: str) -> None:
        if isinstance(self.app, S3TusApp):
            try:
                removed = await self.app.remove(upload_id)
            except Exception as e:
                log.warning("tus: imported upload %s not deleted from S3: %s", upload_id, e)
                return
            if not removed:
                log.warning("tus: imported upload %s not deleted from S3: a request holds it", upload_id)
            return
        try:
            lock = await self.app.locks.acquire(upload_id, lambda: None, self.settings.lock_timeout)
        except Exception as e:
            log.warning("tus: imported upload %s not deleted (lock: %s)", upload_id, e)
            return
        try:
            self.app.store.terminate(upload_id)
        finally:
            await lock.release()
