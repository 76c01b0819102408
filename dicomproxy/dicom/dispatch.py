"""Where an admitted association request goes: the association policy, then its service.

The policy, the same for every association (storage or Query/Retrieve): the application
context must be DICOM's; ``Dicom:AllowedCallingAets`` (when set) must list the calling AE title;
``onDicomAssociation`` may refuse. (The connection and association limits were applied by the
acceptor before; see :mod:`.ul.acceptor`.)

Then: an association that proposes a Query/Retrieve model or SCP/SCU role selection (a C-GET
requester) is spliced, bytes untouched, to the pynetdicom AE of :mod:`.qr` on its loopback port,
two small tasks on the event loop copying each way; any other is a storage association, served
by :class:`.storage_scp.StorageScp` on a thread of its own. A thread that cannot be started
(the process is out of threads) is an A-ASSOCIATE-RJ (transient, temporary congestion) for that
request; the port keeps listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

from dicomproxy.config.settings import DicomSettings
from dicomproxy.dicom import presentation
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.qr.ae import QueryRetrieveAe
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
PERMANENT_CALLING_AE = (1, 1, 3)
PERMANENT_APPLICATION_CONTEXT = (1, 1, 2)
TRANSIENT_CONGESTION = (2, 3, 1)

_REFUSALS = {  # why, for the audit trail
    PERMANENT_CALLING_AE: "not in Dicom:AllowedCallingAets", PERMANENT_NO_REASON: "refused by onDicomAssociation",
    PERMANENT_APPLICATION_CONTEXT: "not a DICOM application context"}


class Dispatcher:
    """The acceptor's handler (``await dispatcher(pending)`` for each admitted request)."""

    def __init__(
        self, settings: DicomSettings, limits: Limits, bridge: LuaBridge, store: StoreService, spool: Spool,
        qr: QueryRetrieveAe, *, max_dataset: int, audit: DicomAudit | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit or DicomAudit(None, settings, "dimse")
        self.limits = limits
        self.bridge = bridge
        self.store = store
        self.spool = spool
        self.qr = qr
        self.max_dataset = max_dataset
        self._allowed = frozenset(a.strip() for a in settings.allowed_calling_aets)
        self._live: set[StorageScp] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    async def __call__(self, pending: Pending) -> None:
        rq = pending.request
        session = AssocSession(self.bridge, rq.calling, rq.called, pending.ip, pending.port,
                               asyncio.get_running_loop())
        refusal = await self._policy(pending, session)
        self.audit.association(session, _REFUSALS.get(refusal, "refused") if refusal else "",
                               blocked=refusal in (PERMANENT_CALLING_AE, PERMANENT_NO_REASON))
        if refusal is not None:
            session.close()
            await pending.reject(*refusal)
            return
        if rq.proposes_roles or presentation.is_query_retrieve(cx.abstract_syntax for cx in rq.contexts):
            await self._splice(pending, session)
        else:
            await self._serve_storage(pending, session)

    async def _policy(self, pending: Pending, session: AssocSession) -> tuple[int, int, int] | None:
        rq = pending.request
        who = f"{rq.calling} ({pending.ip}:{pending.port})"
        if rq.application_context != pdus.APPLICATION_CONTEXT:
            log.info("association from %s refused: application context %r is not DICOM's", who,
                     rq.application_context)
            return PERMANENT_APPLICATION_CONTEXT
        if self._allowed and rq.calling not in self._allowed:
            log.info("association from %s refused: not in Dicom:AllowedCallingAets", who)
            return PERMANENT_CALLING_AE
        if await self.bridge.refuses(session):
            return PERMANENT_NO_REASON
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

    # -- Query/Retrieve -------------------------------------------------------------------------
    async def _splice(self, pending: Pending, session: AssocSession) -> None:
        loop = asyncio.get_running_loop()
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(up, ("127.0.0.1", self.qr.port)), 10)
        except (OSError, TimeoutError) as e:
            up.close()
            session.close()
            log.error("cannot reach the internal Q/R AE: %s", e)
            await pending.reject(*TRANSIENT_CONGESTION)
            return
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = int(up.getsockname()[1])
        self.qr.sessions.expect(local, session)
        sock = pending.take()
        try:
            await loop.sock_sendall(up, pending.raw)
            await _pump_both(loop, sock, up, linger=self.limits.artim)
        except OSError:
            pass
        finally:
            self.qr.sessions.forget(local)
            for s in (up, sock):
                with contextlib.suppress(OSError):
                    s.close()
            pending.slot.close()
            self.audit.ended(session)
            session.close()

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


async def _pump_both(loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket, *, linger: float) -> None:
    """Copy both ways until one side ends; then give the other ``linger`` seconds to finish."""
    tasks = [loop.create_task(_pump(loop, a, b)), loop.create_task(_pump(loop, b, a))]
    try:
        done, rest = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if rest:
            await asyncio.wait(rest, timeout=linger)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await t


async def _pump(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := await loop.sock_recv(src, 1 << 16):
            await loop.sock_sendall(dst, data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
