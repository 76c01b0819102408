"""The DICOM side as one component of the gateway: builds its parts from ``Dicom:*``, starts and
stops them in order, reports health, and turns forwarding outcomes into Lua events, metrics,
app events and the "instance stored" hook.

Start order: spool (recover what a previous run left), forwarder, Query/Retrieve, then the ports
(``Dicom:Port``, and ``Dicom:Tls:Port`` when ``Dicom:Tls:Enabled``: two acceptors with one
dispatcher and one set of admission counts); stop in reverse. TLS contexts are built here,
once: a certificate, key or CA that cannot be used stops the start with the key's name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomproxy.dicom import datasets, statuses
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.destinations import Destinations, Peer
from dicomproxy.dicom.dimse import Command
from dicomproxy.dicom.dispatch import Dispatcher, PacsSide
from dicomproxy.dicom.forwarder import DatasetReader, Forwarder, ForwardResult, ForwardTarget
from dicomproxy.dicom.hooks import InstanceStored, StoredInstance
from dicomproxy.dicom.negotiation import NegotiationCache
from dicomproxy.dicom.qr.service import QueryRetrieve
from dicomproxy.dicom.routing import Router
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import Spool, SpoolEntry
from dicomproxy.dicom.spool_api import build_spool_api
from dicomproxy.dicom.statuses import RetryRule
from dicomproxy.dicom.store import StoreService
from dicomproxy.dicom.transcode import NO_TRANSCODING, Transcoding
from dicomproxy.dicom.ul import tls as dicom_tls
from dicomproxy.dicom.ul.acceptor import Acceptor, Admission, Limits
from dicomproxy.host import Host
from dicomproxy.metrics import DICOM_BUCKETS, FORWARD_BUCKETS

log = logging.getLogger("dicomproxy.dicom")

MAX_PDU = 1 << 20
"""The maximum P-DATA PDU length the gateway announces and accepts."""


def forward_target(gateway: Host) -> ForwardTarget:
    settings = gateway.settings
    dicom, up = settings.dicom, settings.upstream
    if dicom.forward_via == "dicomweb":
        return ForwardTarget(
            via="dicomweb", stow_url=gateway.upstream.url(f"{up.dicomweb_root}/studies"), timeout=up.read_timeout,
            connect_timeout=up.connect_timeout,
        )
    return ForwardTarget(
        via="dimse", aet=dicom.upstream.aet, host=dicom.upstream.host, port=dicom.upstream.port,
        calling_aet=dicom.aet, timeout=max(30.0, up.read_timeout), connect_timeout=up.connect_timeout,
        ae_titles=dicom.upstream.ae_titles, tls=dicom_tls.client_context(dicom.upstream, dicom.tls),
    )


def named_target(
    gateway: Host, destinations: Destinations, name: str, transcoding: Transcoding = NO_TRANSCODING
) -> ForwardTarget:
    """Where a destination named by ``Dicom:Routes`` / ``onCStore`` is: a server or modality over
    DIMSE with the modality's calling AE and its own AE title (``AeTitles`` ``Gateway``: the
    gateway's), or a group whose members are tried in the group's order."""
    settings = gateway.settings
    dicom, up = settings.dicom, settings.upstream

    def one(peer: Peer) -> ForwardTarget:
        ae = peer.ae
        titles = "Gateway" if getattr(ae, "ae_titles", "Modality") == "Gateway" else "Calling"
        return ForwardTarget(
            via="dimse", aet=ae.aet, host=ae.host, port=ae.port, calling_aet=dicom.aet,
            timeout=max(30.0, up.read_timeout), connect_timeout=up.connect_timeout, ae_titles=titles,
            tls=dicom_tls.client_context(ae, dicom.tls), name=peer.name, transcoding=transcoding.for_ae(ae),
            report=destinations.report,
        )

    if destinations.is_group(name):
        members = {p.name: one(p) for p in destinations.members(name)}
        first = next(iter(members.values()))
        return dataclasses.replace(first, name=name,
                                   members=lambda: [members[p.name] for p in destinations.peers(name)])
    return one(destinations.peers(name)[0])


class DicomComponent:
    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        settings = gateway.settings
        self.settings = s = settings.dicom
        self.bridge = LuaBridge(gateway.lua, timeout=settings.lua.timeout_ms / 1000.0 + 5.0,
                                fail_open=settings.lua.fail_open)
        self.spool = Spool(s.spool_folder)
        self.transcoding = Transcoding.of(s, gateway.metrics.counter(
            "dicomproxy_dicom_transcoded_total", "Instances transcoded for a destination that does not accept their "
            "transfer syntax (Dicom:Transcode), by source and target syntax and result (ok, failed)",
            labels=("from_syntax", "to_syntax", "result")))
        self.destinations = Destinations(settings, gateway.upstreams)
        self.target = dataclasses.replace(forward_target(gateway), transcoding=self.transcoding.for_ae(s.upstream),
                                          report=self.destinations.report)
        self.audit = DicomAudit(gateway.audit, s, "dimse" if self.target.via == "dimse" else self.target.describe())
        self.hook = gateway.hooks.get(InstanceStored)
        # Over DIMSE with the gateway's own AE titles the PACS records the gateway as the origin; with
        # the modality's (the default) it records the modality, as if it had sent the instance itself.
        gateway_titles = self.target.via == "dimse" and self.target.ae_titles == "Gateway"
        self.hook.forwarded_as = s.aet if s.port and gateway_titles else None
        self._metrics(gateway)
        self.router = Router(s.routes)
        self.forwarder = self._new_forwarder(self.target)
        self._launched = False  # the forwarders run: one made from now on starts at once
        self.forwarders: dict[str, Forwarder] = {"default": self.forwarder}
        """One per destination, each with its own lanes, backoff and failures (made at its first instance)."""
        self.store = StoreService(self.bridge, self.spool, self.enqueue, self.counters, audit=self.audit,
                                  router=self.router, destinations=self.destinations)
        self.limits = Limits(
            artim=s.artim_seconds, max_associations=s.max_associations, max_per_address=s.max_connections_per_address,
            max_connections=s.max_connections, max_pdu=MAX_PDU,
        )
        self.qr = QueryRetrieve(
            s, self.bridge, self.store, self.spool, max_pdu=MAX_PDU, idle=300.0, timeout=s.qr_timeout,
            connect_timeout=max(settings.upstream.connect_timeout, 1.0), max_dataset=s.max_dataset_mb << 20,
            audit=self.audit, destinations=self.destinations, transcoding=self.transcoding,
        )
        self.pacs: PacsSide | None = None
        if self.target.via == "dimse":
            self.pacs = PacsSide(self.target, self.forwarder.destination, s.store_mode,
                                 NegotiationCache(s.negotiation_cache_seconds), self._relayed,
                                 transcoding=self.target.transcoding)
            self.forwarder.on_context_refused = self.pacs.cache.clear
        self.dispatcher = Dispatcher(s, self.limits, self.bridge, self.store, self.spool, self.qr,
                                     max_dataset=s.max_dataset_mb << 20, audit=self.audit, pacs=self.pacs)
        self.api = build_spool_api(self.spool, self._snapshots, self._restored, gateway.audit)
        self.admission = Admission(self.limits)
        self.acceptors: list[Acceptor] = []
        if not s.tls.only:
            self.acceptors.append(Acceptor(s.host, s.port, self.limits, self.dispatcher, admission=self.admission))
        if s.tls.enabled:
            self.acceptors.append(Acceptor(
                s.host, s.tls.port, self.limits, self.dispatcher, label="DICOM TLS", admission=self.admission,
                tls=dicom_tls.server_context(s.tls), on_tls_refused=self._tls_refused,
                address_allowed=self.dispatcher.policy.address_allowed,
            ))
        for ae in s.modalities.values():
            dicom_tls.client_context(ae, s.tls)  # a file problem stops the start, not the first C-MOVE
        self.started = False

    # -- destinations (event loop) -------------------------------------------------------------
    def _new_forwarder(self, target: ForwardTarget) -> Forwarder:
        s = self.settings
        return Forwarder(
            self.spool, target, concurrency=s.forward_concurrency, retry=s.forward_retry,
            max_retry=s.forward_max_retry, max_attempts=s.forward_max_attempts,
            retry_rule=RetryRule(s.forward_retry_statuses), on_stored=self._on_stored,
            on_failed=self._on_failed, session_factory=self._session,
        )

    def _forwarder_for(self, name: str) -> Forwarder | None:
        """The destination's forwarder, made and started at its first instance; None when the name
        is no longer configured (an instance spooled before the configuration changed)."""
        forwarder = self.forwarders.get(name)
        if forwarder is None:
            if name not in self.destinations:
                return None
            target = named_target(self.gateway, self.destinations, name, self.transcoding)
            forwarder = self.forwarders[name] = self._new_forwarder(target)
            if self._launched:
                forwarder.launch()
        return forwarder

    def enqueue(self, entry: SpoolEntry) -> None:
        """A new instance (on the loop): a copy to each of its destinations' lanes."""
        self._dispatch(self.spool.copies_new(entry))

    def _restored(self, entry: SpoolEntry) -> None:
        """An instance back from failed/ (the spool API): where it had failed, not everywhere again."""
        self._dispatch(self.spool.copies(entry))

    def _dispatch(self, copies: list[SpoolEntry]) -> None:
        for copy in copies:
            forwarder = self._forwarder_for(copy.dest or "default")
            if forwarder is None:
                self._orphan(copy)
            else:
                forwarder.enqueue(copy)

    def _orphan(self, copy: SpoolEntry) -> None:
        reason = (f"its destination {copy.dest!r} is no longer configured (known: "
                  f"{', '.join(sorted(self.destinations.known))})")
        log.error("spool: %s (seq %d): %s; moved to failed/", copy.sop_instance, copy.seq, reason)
        copy.failed_attempt(reason, time.time(), 0.0)
        try:
            self.spool.fail(copy, reason)
        except OSError as e:
            log.error("could not move %s to the failed folder: %s", copy.path, e)

    def _snapshots(self, limit: int) -> list[dict[str, Any]]:
        return [f.snapshot(limit) for f in self.forwarders.values()]

    def _metrics(self, gateway: Host) -> None:
        metrics = gateway.metrics
        self.m_forwarded = metrics.counter("dicomproxy_dicom_forwarded_total", "Instances the PACS accepted")
        self.m_failed = metrics.counter(
            "dicomproxy_dicom_forward_failed_total", "Instances the PACS refused for good (moved to failed/)"
        )
        # the same two per destination (Dicom:Routes, onCStore: a configured name, so few series); new
        # series rather than a label on the two above, which dashboards and scripts read unlabelled
        self.m_dest_forwarded = metrics.counter(
            "dicomproxy_dicom_destination_forwarded_total", "Instances a destination accepted, by destination "
            "(default: Dicom:Upstream; a group counts as one destination)", labels=("destination",))
        self.m_dest_failed = metrics.counter(
            "dicomproxy_dicom_destination_forward_failed_total", "Instances a destination refused for good (moved "
            "to failed/), by destination", labels=("destination",))
        # the relay path's child, bound once (a labelled inc() looks the child up: ~0.25 µs more)
        self.m_relayed_default = self.m_dest_forwarded.metric.labels(destination="default")
        self.counters: dict[str, Any] = {
            "received": metrics.counter(
                "dicomproxy_dicom_received_total", "C-STORE instances accepted (spooled, or relayed and stored)"),
            "rejected": metrics.counter("dicomproxy_dicom_rejected_total", "C-STORE instances refused by a script"),
            "store_errors": metrics.counter("dicomproxy_dicom_store_errors_total", "C-STORE failures (bad data, disk)"),
            "relay_refused": metrics.counter(
                "dicomproxy_dicom_relay_refused_total", "Relayed C-STOREs the PACS answered with a failure status"),
            "store_seconds": metrics.histogram(
                "dicomproxy_dicom_store_seconds",
                "Seconds to answer a C-STORE, from the complete dataset to the status (parse, scripts, spool fsync, "
                "or the PACS's answer when relayed)",
                buckets=DICOM_BUCKETS,
            ),
        }
        self.m_forward_seconds = metrics.histogram(
            "dicomproxy_dicom_forward_seconds",
            "Seconds from an instance's reception to the PACS's acceptance (spool wait and retries included)",
            buckets=FORWARD_BUCKETS,
        )
        metrics.gauge("dicomproxy_dicom_spool_depth", "Instances waiting in the spool", func=lambda: self.spool.depth)
        metrics.gauge("dicomproxy_dicom_failed_folder", "Instances in the spool's failed folder",
                      func=lambda: self.spool.failed_count)
        metrics.gauge("dicomproxy_dicom_associations", "Established DICOM associations (Dicom:MaxAssociations)",
                      func=lambda: self.admission.associations)
        metrics.gauge("dicomproxy_dicom_connections", "Open DICOM connections (Dicom:MaxConnections)",
                      func=lambda: self.admission.connections)
        self.m_tls_refused = metrics.counter(
            "dicomproxy_dicom_tls_refused_total", "TLS handshakes refused on the DICOM TLS port, by reason "
            "(untrusted_certificate, no_certificate, protocol, timeout, closed)", labels=("reason",))

    def _tls_refused(self, refused: dicom_tls.HandshakeRefused) -> None:
        self.m_tls_refused.inc(reason=refused.kind.value)

    async def _session(self) -> Any:
        return await self.gateway.upstream.session()

    # -- component ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.port == 0:
            log.info("DICOM side is off (Dicom:Port is 0)")
            return
        self.store.loop = asyncio.get_running_loop()
        if _relay_mode(self.settings.store_mode) and self.pacs is None:
            log.info("Dicom:StoreMode %s needs Dicom:ForwardVia dimse; storing and forwarding over DICOMweb",
                     self.settings.store_mode)
        recovered = await asyncio.to_thread(self.spool.open)
        copies = await asyncio.to_thread(lambda: [c for e in recovered for c in self.spool.copies(e)])
        per: dict[str, list[SpoolEntry]] = {}
        for copy in copies:
            per.setdefault(copy.dest or "default", []).append(copy)
        for name, entries in per.items():
            forwarder = self._forwarder_for(name)
            if forwarder is None:
                for copy in entries:
                    self._orphan(copy)
            elif name != "default":
                forwarder.launch(entries)
        self.forwarder.launch(per.get("default", []))
        self._launched = True
        await self.qr.start()
        for acceptor in self.acceptors:
            await acceptor.start()
        self.started = True
        s = self.settings
        for acceptor in self.acceptors:
            tls = " (TLS)" if acceptor.tls is not None else ""
            log.info("DICOM AE %s listening on %s:%d%s", s.aet, s.host, acceptor.port, tls)

    def drain(self) -> None:
        """Shutdown began: close the port; associations in progress may go on (and store more)."""
        if self.started:
            for acceptor in self.acceptors:
                acceptor.stop_listening()

    async def settle(self, until: float) -> None:
        """Shutdown, before any component stops: storage associations in progress may go on (and
        store more) until ``until`` (``time.monotonic()``) and end by themselves (A-RELEASE)."""
        if self.started:
            await asyncio.to_thread(_join_until, self.dispatcher.storage_threads(), until)

    async def stop(self) -> None:
        """An association still open now has its socket shut: the modality sees it aborted. Every
        C-STORE answered with success before is in the spool, forwarded at the next start."""
        if not self.started:
            return
        if self.dispatcher.active_storage:
            log.warning("aborting %d storage association(s) still open at the shutdown deadline "
                        "(Server:ShutdownTimeoutSeconds)", self.dispatcher.active_storage)
        for acceptor in reversed(self.acceptors):
            await acceptor.stop()
        threads = self.dispatcher.stop()
        await asyncio.to_thread(_join, threads)
        await self.qr.stop()
        for forwarder in self.forwarders.values():
            await forwarder.stop()
        self._launched = False
        self.audit.flush(everything=True)
        await asyncio.to_thread(self.store.close)
        self.spool.close()
        self.started = False

    # -- health ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        s = self.settings
        if s.port == 0:
            return {"ok": True, "enabled": False}
        f = self.forwarder
        listening = all(a.listening for a in self.acceptors) and self.qr.listening
        admission = self.admission
        plain = [a for a in self.acceptors if a.tls is None]
        tls = [a for a in self.acceptors if a.tls is not None]
        return {
            "ok": listening and not any(fw.destination.down for fw in self.forwarders.values()),
            "enabled": True,
            "listening": f"{s.aet}@{s.host}:{plain[0].port}" if listening and plain else "",
            "tlsListening": f"{s.aet}@{s.host}:{tls[0].port}" if listening and tls else "",
            "upstream": self.target.describe(),
            "forwardVia": self.target.via,
            "storeMode": s.store_mode,
            "spoolDepth": self.spool.depth,
            "failed": self.spool.failed_count,
            "forwarded": f.forwarded,
            "retrying": f.retrying > 0,
            "delayed": f.delayed,
            "upstreamReachable": not f.destination.down,
            "lastForwardError": f.last_error,
            "lastForwardErrorAt": _iso(f.last_error_at),
            "activeAssociations": admission.associations,
            "openConnections": admission.connections,
            "destinations": {
                name: {"peer": fw.target.describe(), "reachable": not fw.destination.down, "waiting": fw.pending,
                       "forwarded": fw.forwarded, "failed": fw.failed, "lastError": fw.last_error}
                for name, fw in self.forwarders.items()
            },
        }

    # -- relay callback (an association's thread) ----------------------------------------
    def _relayed(self, session: AssocSession, command: Command, ts: str, status: int,
                 data: Callable[[], bytes | None], seconds: float) -> None:
        """The PACS answered a relayed C-STORE (the modality already has the answer): count it
        and time it; raise ``onInstanceStored`` and the hook (on the loop, not waited for) when
        someone listens."""
        if not statuses.is_stored(status):
            self.counters["relay_refused"].inc()
            return
        self.counters["received"].inc()
        self.m_forwarded.inc()
        self.m_relayed_default.inc()  # only Dicom:Upstream alone is relayed
        self.m_forward_seconds.observe(seconds)
        self.forwarder.forwarded += 1
        listened = self.gateway.lua.defines("onInstanceStored") or self.hook.wanted
        if not (listened or self.audit.on) or self.store.loop is None:
            return
        raw = data() or b""
        try:
            header = datasets.header_uids(raw, ts) if raw else {}
        except Exception:
            header = {}
        entry = SpoolEntry(
            seq=0, path=Path(), sop_class=command.sop_class, sop_instance=command.sop_instance, transfer_syntax=ts,
            study=header.get("StudyInstanceUID", ""), series=header.get("SeriesInstanceUID", ""),
            patient_id=header.get("PatientID", ""), origin=session.table(), received=time.time(), attempts=1,
        )
        result = ForwardResult(status, f"0x{status:04X}", "dimse", peer=self.target.describe())

        async def read() -> bytes:
            return raw

        self.audit.received(session, entry)  # the association's thread, as the spooling path does
        if listened:
            asyncio.run_coroutine_threadsafe(self._delivered(entry, result, read), self.store.loop)
        else:
            self.store.loop.call_soon_threadsafe(self.audit.forwarded, entry)

    # -- forwarder callbacks (event loop) -------------------------------------------------
    async def _on_stored(self, entry: SpoolEntry, result: ForwardResult, read: DatasetReader) -> None:
        self.m_forwarded.inc()
        self.m_dest_forwarded.inc(destination=entry.dest or "default")
        self.m_forward_seconds.observe(max(0.0, time.time() - entry.received))
        await self._delivered(entry, result, read)

    async def _delivered(self, entry: SpoolEntry, result: ForwardResult, read: DatasetReader) -> None:
        """The PACS has the instance (forwarded from the spool, or relayed: counted by the caller)."""
        self.audit.forwarded(entry)
        assoc = {k: entry.origin.get(k, "") for k in ("CallingAE", "CalledAE", "RemoteIp")}
        assoc["RemotePort"] = entry.origin.get("RemotePort", 0)
        if self.gateway.lua.defines("onInstanceStored"):
            info = {
                **entry.info(),
                "Status": result.status,
                "StatusText": result.status_text,
                "ForwardVia": result.via,
                "Upstream": result.peer or self.target.describe(),
                "Attempts": entry.attempts,
                "RetrieveURL": result.retrieve_url,
            }
            try:
                await self.gateway.lua.dispatch("onInstanceStored", info, assoc)
            except Exception as e:
                log.error("onInstanceStored failed: %s", e)
        primary = not entry.dest or entry.dest == entry.destinations[0]  # the hook: once per instance
        if primary and self.hook.wanted:
            await self.hook.emit(StoredInstance(
                sop_instance=entry.sop_instance, sop_class=entry.sop_class, study=entry.study, series=entry.series,
                patient_id=entry.patient_id, transfer_syntax=entry.transfer_syntax, origin=assoc,
                received=entry.received, via=result.via, status=result.status, instance_id=result.instance_id,
                read=read,
            ))

    def _on_failed(self, entry: SpoolEntry, reason: str) -> None:
        self.m_failed.inc()
        self.m_dest_failed.inc(destination=entry.dest or "default")
        self.audit.forwarded(entry, ok=False, reason=reason)
        self.gateway.bus.emit(
            "forward.failed",
            f"Forwarding failed: {entry.sop_instance}" + (f" to {entry.dest}" if entry.dest else ""),
            f"{reason}. From {entry.origin.get('CallingAE', '?')}, study {entry.study}; the instance is kept in "
            f"{self.spool.failed_dir}.",
            "/dicomproxy/ui",
            sop_instance=entry.sop_instance,
            study=entry.study,
            reason=reason,
            destination=entry.dest or "default",
            attempts=entry.attempts,
            calling_ae=entry.origin.get("CallingAE", ""),
        )


def _relay_mode(mode: str) -> bool:
    return mode != "StoreAndForward"


def _join_until(threads: list[Any], until: float) -> None:
    for t in threads:
        t.join(timeout=max(0.0, until - time.monotonic()))


def _join(threads: list[Any]) -> None:
    for t in threads:
        t.join(timeout=5)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""
