"""The DICOM side: a pynetdicom AE in front of the PACS, with a durable store-and-forward
spool and the DICOM Lua events. ``install(gateway)`` wires it into the gateway process.

Modules: ``scp`` (the listening AE, association policy, C-ECHO, C-STORE), ``spool`` (durable
queue on disk), ``forwarder`` (C-STORE or STOW-RS to the PACS), ``scu`` (the light requester
the forwarder and commands use), ``find`` (C-FIND), ``retrieve`` (C-MOVE / C-GET),
``datasets`` (Dataset <-> Lua tables), ``session`` (per-association Lua scope),
``commands`` (``InternalCmdRun`` send / echo).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from dicomproxy.dicom import commands as dicom_commands
from dicomproxy.dicom import datasets
from dicomproxy.dicom.acceptor import DicomListener
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.forwarder import Forwarder, ForwardResult, ForwardTarget
from dicomproxy.dicom.scp import TRANSFER_SYNTAXES, DicomServer
from dicomproxy.dicom.session import LuaBridge
from dicomproxy.dicom.spool import Spool, SpoolEntry
from dicomproxy.dicom.store import StoreService
from dicomproxy.host import Host
from dicomproxy.scripting.orthanc.pacs import orthanc_id

log = logging.getLogger(__name__)

__all__ = ["DicomComponent", "install"]


class DicomComponent:
    """Start/stop order: spool (recover), forwarder, then the listening AE; reverse on stop."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        settings = gateway.settings
        self.settings = settings.dicom
        self.bridge = LuaBridge(
            gateway.lua,
            timeout=settings.lua.timeout_ms / 1000.0 + 5.0,
            fail_open=settings.lua.fail_open,
        )
        self.spool = Spool(self.settings.spool_folder)
        up = settings.upstream
        if self.settings.forward_via == "dicomweb":
            target = ForwardTarget(
                via="dicomweb",
                stow_url=f"{up.url}{up.dicomweb_root}/studies",
                timeout=up.read_timeout,
                connect_timeout=up.connect_timeout,
            )
        else:
            u = self.settings.upstream
            target = ForwardTarget(
                via="dimse",
                aet=u.aet,
                host=u.host,
                port=u.port,
                calling_aet=self.settings.aet,
                timeout=max(30.0, up.read_timeout),
                connect_timeout=up.connect_timeout,
            )
        self.target = target
        self.audit = DicomAudit(gateway.audit, self.settings, "dimse" if target.via == "dimse" else target.describe())
        metrics = gateway.metrics
        self.m_forwarded = metrics.counter("dicomproxy_dicom_forwarded_total", "Instances the PACS accepted")
        self.m_failed = metrics.counter(
            "dicomproxy_dicom_forward_failed_total", "Instances the PACS refused for good (moved to failed/)"
        )
        counters = {
            "received": metrics.counter("dicomproxy_dicom_received_total", "C-STORE instances accepted and spooled"),
            "rejected": metrics.counter("dicomproxy_dicom_rejected_total", "C-STORE instances refused by a script"),
            "store_errors": metrics.counter("dicomproxy_dicom_store_errors_total", "C-STORE failures (bad data, disk)"),
        }
        metrics.gauge("dicomproxy_dicom_spool_depth", "Instances waiting in the spool", func=lambda: self.spool.depth)
        metrics.gauge(
            "dicomproxy_dicom_failed_folder",
            "Instances in the spool's failed folder",
            func=lambda: self.spool.failed_count,
        )
        self.forwarder = Forwarder(
            self.spool,
            target,
            concurrency=self.settings.forward_concurrency,
            retry=self.settings.forward_retry,
            max_retry=self.settings.forward_max_retry,
            max_attempts=self.settings.forward_max_attempts,
            on_stored=self._on_stored,
            on_failed=self._on_failed,
            session_factory=self._session,
        )
        self.store = StoreService(self.bridge, self.spool, self.forwarder.enqueue, counters, audit=self.audit)
        self.server = DicomServer(self.settings, self.bridge, self.store, audit=self.audit)
        self.listener = DicomListener(
            self.settings, self.bridge, self.store, transfer_syntaxes=TRANSFER_SYNTAXES, handoff=self.server,
            audit=self.audit,
        )
        self.started = False

    async def _session(self) -> Any:
        return await self.gateway.upstream.session()

    # -- component ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.port == 0:
            log.info("DICOM side is off (Dicom:Port is 0)")
            return
        self.store.loop = asyncio.get_running_loop()
        recovered = await asyncio.to_thread(self.spool.open)
        await self.forwarder.start(recovered)
        await self.server.start()
        await self.listener.start()
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        await self.listener.stop()
        await self.server.stop()
        await self.forwarder.stop()
        self.audit.flush(everything=True)
        await asyncio.to_thread(self.store.close)
        self.spool.close()
        self.started = False

    # -- health ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        if self.settings.port == 0:
            return {"ok": True, "enabled": False}
        f = self.forwarder
        return {
            "ok": self.listener.listening and self.server.listening and f.retrying == 0,
            "enabled": True,
            "listening": f"{self.settings.aet}@{self.settings.host}:{self.settings.port}"
            if self.server.listening
            else "",
            "upstream": self.target.describe(),
            "forwardVia": self.target.via,
            "spoolDepth": self.spool.depth,
            "failed": self.spool.failed_count,
            "forwarded": f.forwarded,
            "retrying": f.retrying > 0,
            "lastForwardError": f.last_error,
            "lastForwardErrorAt": _iso(f.last_error_at),
            "activeAssociations": self.listener.active,
        }

    # -- forwarder callbacks (event loop) -------------------------------------------------
    async def _on_stored(self, entry: SpoolEntry, result: ForwardResult, data: bytes) -> None:
        self.m_forwarded.inc()
        self.audit.forwarded(entry)
        host = self.gateway.lua
        assoc = {
            "CallingAE": entry.origin.get("CallingAE", ""),
            "CalledAE": entry.origin.get("CalledAE", ""),
            "RemoteIp": entry.origin.get("RemoteIp", ""),
            "RemotePort": entry.origin.get("RemotePort", 0),
        }
        if host.defines("onInstanceStored"):
            info = {
                **entry.info(),
                "Status": result.status,
                "StatusText": result.status_text,
                "ForwardVia": result.via,
                "Upstream": self.target.describe(),
                "Attempts": entry.attempts,
                "RetrieveURL": result.retrieve_url,
            }
            await self._dispatch("onInstanceStored", info, assoc)
        # With STOW-RS the instance reaches Orthanc over its REST side, and the Orthanc layer
        # fires OnStoredInstance from Orthanc's /changes; over DIMSE it is ours to fire, with the
        # modality's origin (the layer skips instances whose RemoteAET is the gateway's).
        if result.via == "dimse" and host.defines("OnStoredInstance"):
            try:
                ds = datasets.decode(data, entry.transfer_syntax)
                tags = datasets.dataset_to_table(ds)
            except Exception as e:
                log.error("OnStoredInstance: cannot decode %s for its tags: %s", entry.sop_instance, e)
                tags = {}
            metadata = {
                "RemoteAET": assoc["CallingAE"],
                "CalledAET": assoc["CalledAE"],
                "RemoteIP": assoc["RemoteIp"],
                "TransferSyntax": entry.transfer_syntax,
                "SopClassUid": entry.sop_class,
                "ReceptionDate": time.strftime("%Y%m%dT%H%M%S", time.localtime(entry.received or time.time())),
                "Origin": "DicomProtocol",
            }
            origin = {
                "RequestOrigin": "DicomProtocol",
                "RemoteIp": assoc["RemoteIp"],
                "RemoteAet": assoc["CallingAE"],
                "CalledAet": assoc["CalledAE"],
            }
            # Orthanc scripts pass instanceId to RestApiGet('/instances/' .. id): give Orthanc's own id
            # (SHA-1 of the four UIDs) when the PACS did not say it, not the SOP Instance UID.
            instance_id = result.instance_id or orthanc_id(
                entry.patient_id, entry.study, entry.series, entry.sop_instance
            )
            await self._dispatch("OnStoredInstance", instance_id, tags, metadata, origin)

    async def _dispatch(self, name: str, *args: Any) -> None:
        try:
            await self.gateway.lua.dispatch(name, *args)
        except Exception as e:
            log.error("%s failed: %s", name, e)

    def _on_failed(self, entry: SpoolEntry, reason: str) -> None:
        self.m_failed.inc()
        self.audit.forwarded(entry, ok=False, reason=reason)
        self.gateway.bus.emit(
            "forward.failed",
            f"Forwarding failed: {entry.sop_instance}",
            f"{reason}. From {entry.origin.get('CallingAE', '?')}, study {entry.study}; the instance is kept in "
            f"{self.spool.failed_dir}.",
            "/dicomproxy/ui",
            sop_instance=entry.sop_instance,
            study=entry.study,
            reason=reason,
        )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


def install(gateway: Host) -> None:
    """Add the DICOM component, its health and metrics, and the send/echo commands."""
    component = DicomComponent(gateway)
    gateway.add_component(component)
    gateway.add_health("dicom", component.health)
    settings = component.settings

    async def send(args: str) -> dict[str, Any]:
        try:
            return await dicom_commands.send(args, settings)
        except dicom_commands.CommandError as e:
            raise _command_error(str(e)) from None

    async def echo(args: str) -> dict[str, Any]:
        try:
            return await dicom_commands.echo(args, settings)
        except dicom_commands.CommandError as e:
            raise _command_error(str(e)) from None

    gateway.commands.register("send", send, dicom_commands.SEND_USAGE)
    gateway.commands.register("echo", echo, dicom_commands.ECHO_USAGE)


def _command_error(message: str) -> Exception:
    """A clean Lua error (LuaExportError) when the core provides it."""
    try:
        from dicomproxy_middleware import LuaExportError
    except ImportError:  # pragma: no cover - the core always has it
        return ValueError(message)
    return LuaExportError(message)
