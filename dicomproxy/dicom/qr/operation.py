"""One C-FIND, C-GET or C-MOVE of a requester, relayed: the state machine every service shares
(what was sent to the PACS, whether the requester cancelled), the requester's side of it, and
the upstream reads with their deadline.

States (:class:`OpState`; :meth:`Operation._move` is the one place that changes it):

* ``PREPARING``: scripts run, associations open; nothing was sent to the PACS. A C-CANCEL here
  ends the operation with status Cancel before anything is sent.
* ``RELAYING``: the request is with the PACS; its responses are passed on. (A C-MOVE the PACS
  refuses for an unknown destination in ``Auto`` mode goes back to ``PREPARING`` and is fetched.)
* ``CANCELLING``: the requester sent C-CANCEL; it was passed on to the PACS, whose responses
  are read until its final one. No further match or sub-operation is passed on.
* ``DONE``: the final response went to the requester.

An operation the calling AE may not use (``Dicom:AePermissions``, :mod:`..policy`) is answered
at once, before any script runs or anything is opened, with one final response 0x0124 "Refused:
Not Authorized" (zero sub-operations for a retrieve) and one log line; for a C-MOVE this comes
before the destination is looked up, so a refused AE learns nothing about ``Dicom:Modalities``.

An operation that fails answers the requester once with a failure status naming the reason
(0xA700 family when the PACS cannot be reached or stops answering, 0xC000 otherwise) and aborts
the associations it opened; one that is cancelled from outside (the requester aborted, the
gateway stops) aborts them too.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Protocol

from dicomproxy.audit.events import Study
from dicomproxy.config.settings import DicomSettings, ModalityAe
from dicomproxy.dicom import policy
from dicomproxy.dicom.audit import DicomAudit, study_of
from dicomproxy.dicom.dimse import Command, decode_command
from dicomproxy.dicom.qr import messages, upstream
from dicomproxy.dicom.qr.destinations import DestinationBook
from dicomproxy.dicom.qr.hooks import QrHooks
from dicomproxy.dicom.qr.identifier import Identifier
from dicomproxy.dicom.qr.link import DimseLink, Ended, Item, LinkError, Pair, Received
from dicomproxy.dicom.session import AssocSession
from dicomproxy.dicom.transcode import Transcoding
from dicomproxy.dicom.ul.errors import UpperLayerError

log = logging.getLogger(__name__)

MAX_IDENTIFIER = 1 << 20
"""An identifier (query, match, retrieve request) larger than this aborts its association."""


class OpState(enum.Enum):
    PREPARING = "preparing"
    RELAYING = "relaying"
    CANCELLING = "cancelling"
    DONE = "done"


_MOVES: dict[OpState, frozenset[OpState]] = {
    OpState.PREPARING: frozenset({OpState.RELAYING, OpState.CANCELLING, OpState.DONE}),
    # RELAYING -> PREPARING: a C-MOVE relayed in Auto mode whose destination the PACS does not
    # know (0xA801) starts over, served by fetching (see retrieve.py)
    OpState.RELAYING: frozenset({OpState.PREPARING, OpState.CANCELLING, OpState.DONE}),
    OpState.CANCELLING: frozenset({OpState.DONE}),
    OpState.DONE: frozenset(),
}


class OperationServices(Protocol):
    """What an operation needs from :class:`.service.QueryRetrieve` (the association's services,
    :class:`.scp.Services`, are these and more)."""

    settings: DicomSettings
    hooks: QrHooks
    timeout: float
    connect_timeout: float
    pacs: upstream.Peer
    destinations: DestinationBook
    audit: DicomAudit
    query_federated: bool
    query_upstream_name: str
    transcoding: Transcoding
    max_dataset: int

    def query_peers(self) -> list[upstream.Peer]: ...

    def query_members(self) -> list[upstream.Peer]: ...

    def report(self, peer: upstream.Peer, error: UpperLayerError | None) -> None: ...

    def destination(self, aet: str) -> ModalityAe | None: ...


class Association(Protocol):
    """What an operation needs of the association it runs on (:class:`.scp.QrAssociation` is one):
    a protocol here, so that this module does not import the one that runs operations."""

    link: DimseLink
    session: AssocSession
    receives: dict[Pair, int]  # the requester's storage contexts by (SOP class, transfer syntax)

    @property
    def services(self) -> OperationServices: ...


class UpstreamFailed(Exception):
    """The PACS (or a destination) cannot be reached, stopped answering, or broke the protocol;
    ``status`` is what the requester hears."""

    def __init__(self, message: str, status: int = messages.OUT_OF_RESOURCES) -> None:
        super().__init__(message)
        self.status = status


class Operation:
    """Base of the services; subclasses implement :meth:`_run` and set :attr:`response_field`."""

    response_field = 0
    name = "request"
    permission: policy.Operation  # what Dicom:AePermissions must grant the calling AE

    def __init__(self, assoc: Association, context_id: int, command: Command, identifier: bytes) -> None:
        self.assoc = assoc
        self.requester: DimseLink = assoc.link
        self.session = assoc.session
        self.services = assoc.services
        self.context_id = context_id
        self.command = command
        self.identifier = identifier
        self.message_id = command.message_id
        self.model, self.transfer_syntax = assoc.link.contexts[context_id]
        self.state = OpState.PREPARING
        self.timeout = self.services.timeout
        self._upstream: tuple[DimseLink, int, int] | None = None  # link, context, our message id
        self._opened: list[DimseLink] = []
        self._finished: set[int] = set()  # id() of the opened links whose operation completed
        self._audited: tuple[str, Study] | None = None  # a retrieve's destination and study, for its end
        self._candidates: list[upstream.Peer] | None = None  # the PACS side to try (a group's holders)
        self.pacs: upstream.Peer | None = None  # the PACS side that served it (pinned at the first association)

    @property
    def label(self) -> str:
        return f"{self.session.calling} ({self.session.ip})"

    def _move(self, state: OpState) -> None:
        if state not in _MOVES[self.state]:
            raise RuntimeError(f"operation state {self.state.value} -> {state.value}")
        self.state = state

    # -- lifecycle (called by the association) -------------------------------------------------
    async def run(self) -> None:
        if not self.session.permits(self.permission):  # logs the one line
            await self._fail(policy.STATUS_NOT_AUTHORIZED, "not authorized (Dicom:AePermissions)")
            return
        try:
            await self._run()
        except UpstreamFailed as e:
            log.error("%s from %s failed: %s", self.name, self.label, e)
            await self._fail(e.status, str(e))
        except (LinkError, UpperLayerError) as e:
            log.error("%s from %s failed: %s", self.name, self.label, e)
            await self._fail(messages.OUT_OF_RESOURCES, "PACS unreachable")
        except asyncio.CancelledError:
            for link in self._opened:
                link.abort()
            raise
        except Exception:
            log.exception("%s from %s failed", self.name, self.label)
            await self._fail(messages.UNABLE_TO_PROCESS, "gateway error")
        finally:
            await self._close_opened()

    def finished(self, link: DimseLink) -> None:
        """``link``'s operation is complete (its final response was read): release it at the end."""
        self._finished.add(id(link))

    async def close(self, link: DimseLink) -> None:
        """Release ``link`` now (its operation completed) rather than at the end."""
        if link in self._opened:
            self._opened.remove(link)
        await link.release()

    async def _close_opened(self) -> None:
        """Release the associations whose operation completed, abort the others."""
        for link in self._opened:
            if not link.is_open:
                continue
            if id(link) in self._finished:
                await link.release()
            else:
                link.abort()

    def cancel(self) -> None:
        """The requester sent C-CANCEL for this operation."""
        if self.state is OpState.PREPARING:
            self._move(OpState.CANCELLING)
        elif self.state is OpState.RELAYING:
            self._move(OpState.CANCELLING)
            if self._upstream is not None:
                link, context_id, message_id = self._upstream
                log.info("%s from %s cancelled; cancelling upstream", self.name, self.label)
                task = asyncio.get_running_loop().create_task(link.send(context_id, messages.cancel(message_id)))
                task.add_done_callback(_log_failure)

    def on_store_response(self, command: Command) -> None:
        """A C-STORE-RSP from the requester (only a C-GET expects one)."""
        log.warning("%s: C-STORE-RSP %d from %s ignored", self.name, command.us(0x0120), self.label)

    # -- helpers for the services --------------------------------------------------------------
    async def connect(self, peer: upstream.Peer, pairs: list[Pair], roles: list[str] | None = None) -> DimseLink:
        try:
            link = await upstream.associate(
                peer, self.services.settings.aet, pairs, roles=roles or (), timeout=self.timeout,
                connect_timeout=self.services.connect_timeout,
            )
        except UpperLayerError as e:
            self.services.report(peer, e)
            raise UpstreamFailed(f"cannot associate with {peer}: {e}") from None
        self.services.report(peer, None)
        self._opened.append(link)
        return link

    async def connect_pacs(self, pairs: list[Pair], roles: list[str] | None = None) -> DimseLink:
        """An association with the PACS side: ``Dicom:QueryUpstream``'s peers in order (or the
        holders :meth:`locate` found), the next when one cannot be associated with (it is down);
        the one that answers serves the rest of the operation."""
        candidates = [self.pacs] if self.pacs is not None else self._candidates or self.services.query_peers()
        errors: list[str] = []
        for peer in candidates:
            try:
                link = await self.connect(peer, pairs, roles)
            except UpstreamFailed as e:
                if len(candidates) > 1:
                    log.warning("%s from %s: %s; trying the next member", self.name, self.label, e)
                errors.append(str(e))
                continue
            self.pacs = peer
            return link
        raise UpstreamFailed("; ".join(errors))

    async def open_pacs(
        self, model: str, pairs: list[Pair], *, roles: list[str] | None = None, what: str = "",
        refused: int = messages.UNABLE_TO_PROCESS,
    ) -> tuple[DimseLink, int, str]:
        """Associate with the PACS proposing ``pairs``: the link, its context for ``model`` in the
        requester's transfer syntax, and the transfer syntax the PACS accepted on it. A PACS that
        does not accept ``model`` is :class:`UpstreamFailed` (``refused``; ``what`` names it)."""
        up = await self.connect_pacs(pairs, roles=roles)
        context_id = up.context_for(model, self.transfer_syntax)
        if context_id is None:
            raise UpstreamFailed(f"the PACS does not accept {what or model}", refused)
        return up, context_id, up.contexts[context_id][1]

    async def pass_request(
        self, up: DimseLink, context_id: int, identifier: bytes,
        command: Callable[[Command, int], bytes] = messages.request,
    ) -> bool:
        """Send the requester's request (``command(its command, our message id)``) and its
        identifier to the PACS; False (and the operation finished as cancelled) when the
        requester cancelled before it went."""
        message_id = up.next_id()
        if not await self.send_request(up, context_id, message_id, command(self.command, message_id), identifier):
            await self.finish_cancelled()
            return False
        return True

    async def send_request(
        self, link: DimseLink, context_id: int, message_id: int, command: bytes, dataset: bytes
    ) -> bool:
        """Send the request upstream (RELAYING), unless the requester cancelled already (False)."""
        if self.state is OpState.CANCELLING:
            return False
        self._upstream = (link, context_id, message_id)
        await link.send(context_id, command, dataset)
        self._move(OpState.RELAYING)
        return True

    async def next_item(self, link: DimseLink, what: str) -> Item:
        """The next item from ``link`` within the operation timeout; raises :class:`UpstreamFailed`
        (after aborting it) on timeout or when the association ended."""
        try:
            async with asyncio.timeout(self.timeout):
                item = await link.next()
        except TimeoutError:
            link.abort(f"no answer to the {what} within {self.timeout:g} s")
            raise UpstreamFailed(f"{link.label} did not answer the {what} within {self.timeout:g} s") from None
        if isinstance(item, Ended):
            raise UpstreamFailed(f"{link.label} ended the association during the {what} ({item.reason})")
        return item

    async def next_response(self, link: DimseLink, field: int, what: str) -> Received:
        item = await self.next_item(link, what)
        if not isinstance(item, Received) or item.command.field != field:
            link.abort(f"unexpected message during the {what}")
            raise UpstreamFailed(f"{link.label} sent an unexpected message during the {what}")
        return item

    async def respond(self, command: bytes, dataset: bytes | None = None, *, final: bool = False) -> None:
        await self.requester.send(self.context_id, command, dataset)
        if final:
            self._move(OpState.DONE)
            if self._audited is not None:
                self._audit_end(command)

    # -- the audit trail (PS3.15 A.5.3: Begin Transferring, then DICOM Instances Transferred) ----
    def audit_begin(self, request: Identifier, move_to: str = "") -> None:
        """A retrieve the scripts let through: recorded now, and its outcome with the final response."""
        audit = self.services.audit
        if audit.on:
            self._audited = (move_to, study_of(request.get))
            audit.retrieve_started(self.session, *self._audited)

    def _audit_end(self, command: bytes) -> None:
        assert self._audited is not None
        final = decode_command(command)
        # sub-operations with a warning delivered their instance (PS3.4 C.4.2.1.5)
        completed, failed = final.us(messages.COMPLETED) + final.us(messages.WARNING), final.us(messages.FAILED)
        self.services.audit.retrieved(self.session, self._audited[0], self._audited[1], completed, failed)

    async def _fail(self, status: int, comment: str) -> None:
        if self.state is OpState.DONE or not self.requester.is_open:
            return
        counts = (0, 0, 0) if self.response_field != messages.C_FIND_RSP else None
        try:
            await self.respond(
                messages.final(self.response_field, self.message_id, self.model, status, comment, counts), final=True
            )
        except LinkError:
            pass

    async def refuse(self, status: int, comment: str) -> None:
        log.info("%s from %s: %s", self.name, self.label, comment)
        await self._fail(status, comment)

    async def finish_cancelled(self) -> None:
        counts = (0, 0, 0) if self.response_field != messages.C_FIND_RSP else None
        await self.respond(
            messages.final(self.response_field, self.message_id, self.model, messages.CANCEL, "", counts), final=True
        )

    async def _run(self) -> None:
        raise NotImplementedError


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("C-CANCEL could not be passed upstream: %s", task.exception())
