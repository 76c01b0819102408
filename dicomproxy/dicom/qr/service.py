"""Query/Retrieve as a part of the DICOM component: takes over an association the dispatcher
decided (:meth:`QueryRetrieve.serve`), answers its A-ASSOCIATE-RQ (:mod:`.contexts`) and serves
it on the event loop (:class:`.scp.QrAssociation`) until it ends; builds each operation; holds
what outlives one association (the PACS's address and TLS context, the ``Auto`` destination
book). An association of the DICOM TLS port arrives on the ``ssl.SSLSocket`` the acceptor shook
hands on; :mod:`.ul.tls_transport` gives it the same asyncio streams as a plain one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from dicomproxy.config.model import DEFAULT_UPSTREAM
from dicomproxy.config.settings import DicomSettings, ModalityAe
from dicomproxy.dicom.audit import DicomAudit
from dicomproxy.dicom.destinations import Destinations
from dicomproxy.dicom.dimse import Command
from dicomproxy.dicom.qr import contexts, messages
from dicomproxy.dicom.qr.destinations import DestinationBook
from dicomproxy.dicom.qr.find import FindOperation
from dicomproxy.dicom.qr.hooks import QrHooks
from dicomproxy.dicom.qr.link import DimseLink
from dicomproxy.dicom.qr.operation import Operation
from dicomproxy.dicom.qr.retrieve import GetOperation, MoveOperation
from dicomproxy.dicom.qr.scp import QrAssociation
from dicomproxy.dicom.qr.upstream import Peer
from dicomproxy.dicom.session import AssocSession, LuaBridge
from dicomproxy.dicom.spool import Spool
from dicomproxy.dicom.store import StoreService
from dicomproxy.dicom.transcode import NO_TRANSCODING, Transcoding
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import tls_transport
from dicomproxy.dicom.ul.acceptor import Pending
from dicomproxy.dicom.ul.errors import UpperLayerError
from dicomproxy.dicom.ul.transport import StreamAssociation

log = logging.getLogger(__name__)

_OPERATIONS: dict[int, type[Operation]] = {
    messages.C_FIND_RQ: FindOperation,
    messages.C_GET_RQ: GetOperation,
    messages.C_MOVE_RQ: MoveOperation,
}


class QueryRetrieve:
    """``serve()`` each Query/Retrieve association; ``start()``/``stop()`` with the component."""

    def __init__(
        self, settings: DicomSettings, bridge: LuaBridge, store: StoreService, spool: Spool, *, max_pdu: int,
        idle: float, timeout: float, connect_timeout: float, max_dataset: int, audit: DicomAudit | None = None,
        destinations: Destinations | None = None,
        transcoding: Transcoding = NO_TRANSCODING,
    ) -> None:
        self.settings = settings
        self.transcoding = transcoding
        self.audit = audit or DicomAudit(None, settings, "dimse")
        self.store = store
        self.spool = spool
        self.max_pdu = max_pdu
        self.idle = idle
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_dataset = max_dataset
        up = settings.upstream
        self.pacs = Peer.of(up, settings.tls, DEFAULT_UPSTREAM)
        self.names = destinations
        self.query_upstream = settings.query_upstream if destinations is not None else ""
        self.query_upstream_name = self.query_upstream or "Dicom:Upstream"
        self.query_federated = bool(self.query_upstream) and destinations is not None \
            and destinations.federated(self.query_upstream)
        """``Dicom:QueryUpstream`` is a ``Federated`` group: C-FIND asks every member, a retrieve the holders."""
        self._members = [Peer.of(p.ae, settings.tls, p.name) for p in destinations.members(self.query_upstream)] \
            if destinations is not None and self.query_upstream else [self.pacs]
        self.hooks = QrHooks(bridge, up.aet)
        self.destinations = DestinationBook()
        self._live: set[QrAssociation] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False
        for assoc in list(self._live):
            assoc.link.abort("the gateway is stopping")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def query_peers(self) -> list[Peer]:
        """Where C-FIND/C-MOVE/C-GET go, to be tried in this order (the next when one cannot be
        associated with): ``Dicom:Upstream``, the ``Dicom:QueryUpstream`` server, or its group's
        members in the group's mode order (:mod:`..destinations`)."""
        if not self.query_upstream or self.names is None:
            return [self.pacs]
        by_name = dict(zip((p.name for p in self.names.members(self.query_upstream)), self._members, strict=True))
        return [by_name[p.name] for p in self.names.peers(self.query_upstream)]

    def report(self, peer: Peer, error: UpperLayerError | None) -> None:
        """How an association with a PACS-side peer went (the registry's passive ejection,
        :meth:`.destinations.Destinations.report`)."""
        if self.names is not None and peer.name:
            self.names.report(peer.name, error)

    def query_members(self) -> list[Peer]:
        """Every member of ``Dicom:QueryUpstream`` in ``Members`` order (a federated C-FIND asks them all)."""
        return list(self._members)

    @property
    def listening(self) -> bool:
        return self.started

    @property
    def active(self) -> int:
        return len(self._live)

    def destination(self, aet: str) -> ModalityAe | None:
        """The ``Dicom:Modalities`` entry of a move destination (by AE title, else by name)."""
        modalities = self.settings.modalities
        for ae in modalities.values():
            if ae.aet.strip() == aet:
                return ae
        for name, ae in modalities.items():
            if name.lower() == aet.lower():
                return ae
        return None

    def operation(self, assoc: QrAssociation, context_id: int, command: Command, identifier: bytes) -> Operation:
        return _OPERATIONS[command.field](assoc, context_id, command, identifier)

    async def serve(self, pending: Pending, session: AssocSession) -> None:
        """From the dispatcher: accept ``pending`` and serve it until it ends."""
        rq = pending.request
        negotiated = contexts.negotiate(pending.pdu, rq)
        ac = pdus.associate_ac(pending.pdu, negotiated.results, self.max_pdu, negotiated.roles)
        sock = pending.take()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            reader, writer = await tls_transport.open_stream(sock)  # the TLS port's SSLSocket too
        except OSError as e:
            log.warning("association from %s (%s:%d) lost before it was accepted: %s", rq.calling, pending.ip,
                        pending.port, e)
            sock.close()
            self._ended(task, pending, session)
            return
        loop = asyncio.get_running_loop()
        pending.core.accept(ac, loop.time())
        link = StreamAssociation(pending.core, reader, writer, label=f"{rq.calling} ({pending.ip}:{pending.port})")
        link.flush()
        assoc = QrAssociation(DimseLink(link, negotiated.accepted, timeout=self.timeout), negotiated, session, self,
                              idle=self.idle)
        self._live.add(assoc)
        log.debug("Query/Retrieve association from %s (%s:%d) accepted, %d context(s)", rq.calling, pending.ip,
                  pending.port, len(negotiated.accepted))
        try:
            await assoc.run()
        finally:
            self._live.discard(assoc)
            link.close()
            self._ended(task, pending, session)

    def _ended(self, task: asyncio.Task[None] | None, pending: Pending, session: AssocSession) -> None:
        if task is not None:
            self._tasks.discard(task)
        pending.slot.close()
        self.audit.ended(session)
        session.close()
