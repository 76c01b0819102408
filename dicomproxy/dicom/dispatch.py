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
other is a storage association, served by :class:`.storage_scp.StorageScp` on a thread of its
own. A thread that cannot be started (the process is out of threads) is an A-ASSOCIATE-RJ
(transient, temporary congestion) for that request; the port keeps listening.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import presentation
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.policy import AssociationPolicy, Refusal
from dicomproxy.dicom.qr.service import QueryRetrieve
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import Spool
from dicomproxy.dicom.storage_scp import StorageScp
from dicomproxy.dicom.store import StoreService
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.acceptor import Limits, Pending, Slot

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0
"""An established association silent this long is aborted."""

PERMANENT_NO_REASON = (1, 1, 1)
PERMANENT_APPLICATION_CONTEXT = (1, 1, 2)
TRANSIENT_CONGESTION = (2, 3, 1)

NOT_DICOM = Refusal(*PERMANENT_APPLICATION_CONTEXT, "not a DICOM application context")
BY_SCRIPT = Refusal(*PERMANENT_NO_REASON, "refused by onDicomAssociation")


class Dispatcher:
    """The acceptor's handler (``await dispatcher(pending)`` for each admitted request)."""

    def __init__(
        self, settings: DicomSettings, limits: Limits, bridge: LuaBridge, store: StoreService, spool: Spool,
        qr: QueryRetrieve, *, max_dataset: int, audit: DicomAudit | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit or DicomAudit(None, settings, "dimse")
        self.limits = limits
        self.bridge = bridge
        self.store = store
        self.spool = spool
        self.qr = qr
        self.max_dataset = max_dataset
        self.policy = AssociationPolicy.of(settings)
        self._live: set[StorageScp] = set()
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
        rq = pending.request
        results = presentation.negotiate(rq.contexts, presentation.serves_storage)
        accepted = {cid: ts for cid, result, ts in results if result == presentation.ACCEPTANCE}
        abstract_of = {cx.context_id: cx.abstract_syntax for cx in rq.contexts}
        ac = pdus.associate_ac(pending.pdu, results, self.limits.max_pdu)
        slot = pending.slot
        scp = StorageScp(
            pending.core, pending.sock, ac, session, self.bridge, self.store, self.spool, accepted, abstract_of,
            idle=IDLE_SECONDS, max_dataset=self.max_dataset, on_end=lambda s: self._ended(s, slot),
        )
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
            return
        pending.take()
        log.debug("association from %s (%s:%d) accepted, %d context(s)", rq.calling, pending.ip, pending.port,
                  len(accepted))

    def _ended(self, scp: StorageScp, slot: Slot) -> None:
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

    def stop(self) -> list[threading.Thread]:
        """Wake every storage association's thread; returns them for the caller to join."""
        with self._lock:
            live, threads = list(self._live), list(self._threads)
        for scp in live:
            scp.shutdown()
        return threads

