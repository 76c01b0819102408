"""Where an admitted association request goes: the association policy, then its service.

The policy, the same for every association (storage or Query/Retrieve): the application
context must be DICOM's; the address and AE title rules of :mod:`.policy` must pass
(``Dicom:AllowedAddresses``, ``CheckCalledAet``, ``BlockedCallingAets``, ``AllowedCallingAets``);
``onDicomAssociation`` may refuse. The session then carries what the calling AE may do
(``Dicom:AePermissions``), which the services check per message. (The connection and
association limits were applied by the acceptor before; see :mod:`.ul.acceptor`.)

Then: an association that proposes a Query/Retrieve model or SCP/SCU role selection (a C-GET
requester) is served by :mod:`.qr` on the event loop (:meth:`.qr.service.QueryRetrieve.serve`),
on the connection the acceptor took, so every Lua event sees the requester's own address; any
other is a storage association, and ``Dicom:StoreMode`` says how it is served, on a thread of
its own:

* ``Relay`` / ``RelayOrSpool``: the request is put to the PACS first (:mod:`.negotiation`); when
  the PACS accepts, its results are the modality's and :class:`.relay.RelayScp` relays every
  message. A permanent A-ASSOCIATE-RJ from the PACS is passed on as it is (the modality hears what
  it would hear directly). When the PACS cannot be reached (or rejects transiently, or the
  forwarder is backing off from it), ``Relay`` rejects (transient, temporary congestion) and
  ``RelayOrSpool`` serves the association from the spool. With ``Dicom:Transcode``
  ``ToAccepted`` the PACS is also asked about each SOP class the modality proposes only
  compressed (:func:`.negotiation.transcode_probes`): a context the PACS refuses for its syntax
  is accepted when the PACS takes the class uncompressed, and its instances are transcoded on
  the way (:class:`.relay.RelayScp`, or at forward time from the spool);
* ``StoreAndForward`` and the spool fallback: :class:`.storage_scp.StorageScp`, with the PACS's
  last answer to the same proposal (asked with a probe association and cached), or, without one,
  any storage SOP class in any transfer syntax the gateway can read.

A thread that cannot be started (the process is out of threads) is an A-ASSOCIATE-RJ
(transient, temporary congestion) for that request; the port keeps listening.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import negotiation, presentation
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.forwarder import Destination, ForwardTarget
from dicomproxy.dicom.negotiation import NegotiationCache, Results
from dicomproxy.dicom.policy import AssociationPolicy, Operation, Refusal
from dicomproxy.dicom.qr.service import QueryRetrieve
from dicomproxy.dicom.relay import RelayScp, Reporter
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import Spool
from dicomproxy.dicom.storage_scp import StorageScp
from dicomproxy.dicom.store import StoreService
from dicomproxy.dicom.transcode import NO_TRANSCODING, Transcoding
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import requestor
from dicomproxy.dicom.ul.acceptor import Limits, Pending, Slot
from dicomproxy.dicom.ul.errors import AssociationRejected, UpperLayerError
from dicomproxy.dicom.ul.requestor import Opened

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0
"""An established association silent this long is aborted."""

PERMANENT_NO_REASON = (1, 1, 1)
PERMANENT_APPLICATION_CONTEXT = (1, 1, 2)
TRANSIENT_CONGESTION = (2, 3, 1)
RELAY_MODES = ("Relay", "RelayOrSpool")


@dataclass
class PacsSide:
    """What the storage side needs of the PACS: where it is, how it is doing, how to relay."""

    target: ForwardTarget
    destination: Destination
    mode: str  # Dicom:StoreMode
    cache: NegotiationCache
    report: Reporter
    on_refused_context: Any = None
    transcoding: Transcoding = NO_TRANSCODING  # Dicom:Transcode
    background: set[asyncio.Task[None]] = field(default_factory=set)


NOT_DICOM = Refusal(*PERMANENT_APPLICATION_CONTEXT, "not a DICOM application context")
BY_SCRIPT = Refusal(*PERMANENT_NO_REASON, "refused by onDicomAssociation")


class Dispatcher:
    """The acceptor's handler (``await dispatcher(pending)`` for each admitted request)."""

    def __init__(
        self, settings: DicomSettings, limits: Limits, bridge: LuaBridge, store: StoreService, spool: Spool,
        qr: QueryRetrieve, *, max_dataset: int, audit: DicomAudit | None = None, pacs: PacsSide | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit or DicomAudit(None, settings, "dimse")
        self.limits = limits
        self.bridge = bridge
        self.store = store
        self.spool = spool
        self.qr = qr
        self.max_dataset = max_dataset
        self.pacs = pacs
        self.policy = AssociationPolicy.of(settings)
        self._live: set[StorageScp | RelayScp] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    async def __call__(self, pending: Pending) -> None:
        rq = pending.request
        session = AssocSession(self.bridge, rq.calling, rq.called, pending.ip, pending.port,
                               asyncio.get_running_loop())
        refusal = await self._policy(pending, session)
        self.audit.association(session, refusal.why if refusal else "",
                               blocked=refusal is not None and refusal is not NOT_DICOM)
        if refusal is not None:
            session.close()
            await pending.reject(*refusal.rj)
            return
        if rq.proposes_roles or presentation.is_query_retrieve(cx.abstract_syntax for cx in rq.contexts):
            await self.qr.serve(pending, session)
        else:
            await self._serve_storage(pending, session)

    async def _policy(self, pending: Pending, session: AssocSession) -> Refusal | None:
        rq = pending.request
        who = f"{rq.calling} ({pending.ip}:{pending.port})"
        if rq.application_context != pdus.APPLICATION_CONTEXT:
            log.info("association from %s refused: application context %r is not DICOM's", who,
                     rq.application_context)
            return NOT_DICOM
        refusal = self.policy.check(rq.calling, rq.called, pending.ip)
        if refusal is not None:
            log.warning("association from %s to %s refused (A-ASSOCIATE-RJ reason %d): %s", who, rq.called,
                        refusal.reason, refusal.why)
            return refusal
        session.operations = self.policy.operations_of(rq.calling)
        if await self.bridge.refuses(session):
            return BY_SCRIPT
        return None

    # -- storage ------------------------------------------------------------------------------
    async def _serve_storage(self, pending: Pending, session: AssocSession) -> None:
        rq, pacs = pending.request, self.pacs
        if pacs is None or not session.permits(Operation.STORE):  # every C-STORE is 0x0124: the PACS is not asked
            await self._spooled(pending, session, presentation.negotiate(rq.contexts, presentation.serves_storage))
            return
        allowed = pacs.transcoding.allowed
        contexts = negotiation.forwardable(rq.contexts, allowed)
        titles = pacs.target.titles(session.table())
        key = NegotiationCache.key(*titles, contexts)
        # Dicom:Routes that may send this association's instances elsewhere than Dicom:Upstream: served
        # store-and-forward whatever the StoreMode (one relayed answer cannot stand for several peers)
        only_default = self.store.router.only_default(session.calling, session.called)
        if only_default and pacs.mode in RELAY_MODES and not (pacs.mode == "RelayOrSpool" and pacs.destination.down):
            mirror = await self._mirror(pending, titles, contexts)
            if isinstance(mirror, Opened):
                results = negotiation.results_for(rq.contexts, mirror.ac, allowed, contexts)
                pacs.cache.put(key, results)
                via = negotiation.transcoded(rq.contexts, mirror.ac, contexts) if allowed else {}
                await self._relay(pending, session, mirror, results, via)
                return
            if mirror is not None or pacs.mode == "Relay":
                session.close()
                await pending.reject(*(mirror or TRANSIENT_CONGESTION))
                return
            log.info("association from %s (%s:%d): the PACS cannot be reached; served from the spool", rq.calling,
                     pending.ip, pending.port)
        elif only_default and pacs.mode == "StoreAndForward" and pacs.cache.ttl > 0 and pacs.cache.get(key) is None \
                and not pacs.destination.down:
            rejected = await self._probe(pending, titles, contexts, key)
            if rejected is not None:
                session.close()
                await pending.reject(*rejected)
                return
        cached = pacs.cache.get(key) if pacs.cache.ttl > 0 and only_default else None
        await self._spooled(pending, session, cached or presentation.negotiate(rq.contexts,
                                                                               presentation.serves_storage))

    async def _mirror(
        self, pending: Pending, titles: tuple[str, str], contexts: list[pdus.ProposedContext]
    ) -> Opened | tuple[int, int, int] | None:
        """The association with the PACS; a rejection to pass on; None when it cannot be reached."""
        assert self.pacs is not None
        if not contexts:
            return None
        target = self.pacs.target
        rq = pdus.associate_rq(titles[1], titles[0], contexts, self.limits.max_pdu)
        try:
            mirror = await requestor.open_association(target.host, target.port, rq, timeout=target.connect_timeout,
                                                      artim=self.limits.artim, tls=target.tls)
            target.reported(None)
            return mirror
        except AssociationRejected as e:
            target.reported(e)
            if e.result == 1:
                log.info("association from %s (%s:%d) rejected by the PACS: %s", pending.request.calling,
                         pending.ip, pending.port, e)
                return e.result, e.source, e.reason
            return None
        except UpperLayerError as e:
            target.reported(e)
            self.pacs.destination.unreachable(str(e))
            log.warning("association from %s: the PACS cannot be reached (%s)", pending.request.calling, e)
            return None

    async def _probe(
        self, pending: Pending, titles: tuple[str, str], contexts: list[pdus.ProposedContext],
        key: negotiation.CacheKey,
    ) -> tuple[int, int, int] | None:
        """Store-and-forward: ask the PACS what it would accept (cached); a permanent rejection
        to pass on, else None."""
        assert self.pacs is not None
        mirror = await self._mirror(pending, titles, contexts)
        if not isinstance(mirror, Opened):
            return mirror
        self.pacs.cache.put(key, negotiation.results_for(pending.request.contexts, mirror.ac,
                                                         self.pacs.transcoding.allowed, contexts))
        task = asyncio.get_running_loop().create_task(requestor.release(mirror))
        self.pacs.background.add(task)
        task.add_done_callback(self.pacs.background.discard)
        return None

    async def _spooled(self, pending: Pending, session: AssocSession, results: Results) -> None:
        rq = pending.request
        accepted = {cid: ts for cid, result, ts in results if result == presentation.ACCEPTANCE}
        abstract_of = {cx.context_id: cx.abstract_syntax for cx in rq.contexts}
        ac = pdus.associate_ac(pending.pdu, results, self.limits.max_pdu)
        slot = pending.slot
        scp = StorageScp(
            pending.core, pending.sock, ac, session, self.bridge, self.store, self.spool, accepted, abstract_of,
            idle=IDLE_SECONDS, max_dataset=self.max_dataset, on_end=lambda s: self._ended(s, slot),
        )
        await self._start(pending, session, scp, len(accepted))

    async def _relay(
        self, pending: Pending, session: AssocSession, mirror: Opened, results: Results,
        transcoded: dict[int, tuple[int, str]],
    ) -> None:
        assert self.pacs is not None
        rq = pending.request
        accepted = {cid: ts for cid, result, ts in results if result == presentation.ACCEPTANCE}
        abstract_of = {cx.context_id: cx.abstract_syntax for cx in rq.contexts}
        ac = pdus.associate_ac(pending.pdu, results, self.limits.max_pdu)
        slot = pending.slot
        scp = RelayScp(
            pending.core, pending.sock, ac, mirror, session, self.bridge, self.store, self.spool, accepted,
            abstract_of, fallback=self.pacs.mode == "RelayOrSpool", idle=IDLE_SECONDS,
            timeout=self.pacs.target.timeout, max_dataset=self.max_dataset, report=self.pacs.report,
            on_end=lambda s: self._ended(s, slot), transcoded=transcoded, transcoding=self.pacs.transcoding,
        )
        if not await self._start(pending, session, scp, len(accepted)):
            mirror.close()

    async def _start(self, pending: Pending, session: AssocSession, scp: StorageScp | RelayScp, n: int) -> bool:
        rq = pending.request
        thread = threading.Thread(target=scp.run, name=f"dicom-assoc-{rq.calling}", daemon=True)
        with self._lock:
            self._live.add(scp)
            self._threads.add(thread)
        try:
            thread.start()  # from here on the association (core, socket, slot) is the thread's
        except RuntimeError as e:  # "can't start new thread": refuse this one, keep listening
            with self._lock:
                self._live.discard(scp)
                self._threads.discard(thread)
            log.error("association from %s (%s:%d) refused: cannot start its thread (%s)", rq.calling, pending.ip,
                      pending.port, e)
            session.close()
            await pending.reject(*TRANSIENT_CONGESTION)
            return False
        pending.take()
        log.debug("association from %s (%s:%d) accepted, %d context(s), %s", rq.calling, pending.ip, pending.port,
                  n, "relayed" if isinstance(scp, RelayScp) else "spooled")
        return True

    def _ended(self, scp: StorageScp | RelayScp, slot: Slot) -> None:
        """From the association's thread, when it ends."""
        self.audit.ended(scp.session)
        with self._lock:
            self._live.discard(scp)
            self._threads.discard(threading.current_thread())
        slot.close()

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def active_storage(self) -> int:
        with self._lock:
            return len(self._live)

    def storage_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def stop(self) -> list[threading.Thread]:
        """Wake every storage association's thread; returns them for the caller to join."""
        with self._lock:
            live, threads = list(self._live), list(self._threads)
        for scp in live:
            scp.shutdown()
        return threads

