"""One Query/Retrieve association of a requester, on the event loop: its reader, the operations
it asked for, and what it may send besides (C-ECHO, C-CANCEL, the C-STORE-RSPs of C-GET
sub-operations, C-STORE of its own).

The reader task reads every message the requester sends, in order, and never waits on the PACS:
a request's identifier is read whole (at most :data:`.operation.MAX_IDENTIFIER` bytes), then the
operation runs as a task of its own, so a C-CANCEL or the C-STORE-RSP of a sub-operation is seen
while the operation waits for the PACS. Operations run one at a time in the order they came (the
gateway negotiates no asynchronous operations window, PS3.7 D.3.3.3); a requester that queues
more than :data:`MAX_QUEUED` is aborted.

States (:class:`AssocState`, moved only by :meth:`QrAssociation._move`): ``IDLE`` (no operation;
the idle timeout runs), ``BUSY`` (an operation runs), ``ENDED``. An A-RELEASE-RQ while an
operation runs cancels it (its PACS association is aborted) before the release is answered; an
A-ABORT or a lost connection does the same without an answer.

A C-STORE from the requester on this association is stored like any other (the data set is
streamed into the spool, then :class:`dicomproxy.dicom.store.StoreService` decides), with the
disk writes in a worker thread so the loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from typing import Protocol

from dicomproxy.dicom import dimse, presentation
from dicomproxy.dicom.dimse import Command
from dicomproxy.dicom.qr import messages
from dicomproxy.dicom.qr.contexts import Negotiated
from dicomproxy.dicom.qr.link import DimseLink, Ended, Fragment, LinkError, Received, Released
from dicomproxy.dicom.qr.operation import MAX_IDENTIFIER, Operation, OperationServices
from dicomproxy.dicom.session import AssocSession
from dicomproxy.dicom.spool import DatasetTooLarge, Spool, SpoolWriter
from dicomproxy.dicom.store import STATUS_OUT_OF_RESOURCES, StoreService

log = logging.getLogger(__name__)

MAX_QUEUED = 8
"""Requests waiting behind the running one; one more aborts the association."""


class Services(OperationServices, Protocol):
    """What an association needs from :class:`.service.QueryRetrieve`, besides what its operations do."""

    store: StoreService
    spool: Spool

    def operation(self, assoc: QrAssociation, context_id: int, command: Command, identifier: bytes) -> Operation:
        ...


class AssocState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    ENDED = "ended"


class QrAssociation:
    def __init__(
        self, link: DimseLink, negotiated: Negotiated, session: AssocSession, services: Services, *, idle: float
    ) -> None:
        self.link = link
        self.negotiated = negotiated
        self.session = session
        self.services = services
        self.idle = idle
        self.state = AssocState.IDLE
        self.active: Operation | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[Operation] = deque()
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        # storage contexts the requester receives on, by (SOP class, transfer syntax)
        self.receives = {pair: cid for cid, pair in negotiated.storage_contexts().items()}

    @property
    def label(self) -> str:
        return f"{self.session.calling} ({self.session.ip}:{self.session.port})"

    def _move(self, state: AssocState) -> None:
        if self.state is AssocState.ENDED:
            return
        self.state = state
        self._last = self._loop.time()

    # -- the reader ------------------------------------------------------------------------------
    async def run(self) -> None:
        watchdog = self._loop.create_task(self._idle_watch())
        try:
            while self.state is not AssocState.ENDED:
                item = await self.link.next()
                self._last = self._loop.time()
                if isinstance(item, Received):
                    await self._on_command(item.context_id, item.command)
                elif isinstance(item, Released):
                    await self._end_operations()
                    self.link.release_response()
                    break
                elif isinstance(item, Ended):
                    if item.reason not in ("released", "connection closed"):
                        log.info("association from %s ended: %s", self.label, item.reason)
                    break
                elif isinstance(item, Fragment):  # a data set nobody asked for: the assembler's rules prevent it
                    continue
        except LinkError as e:
            log.warning("association from %s aborted: %s", self.label, e)
        finally:
            watchdog.cancel()
            self._move(AssocState.ENDED)
            await self._end_operations()
            if self.link.is_open:
                self.link.abort()

    async def _idle_watch(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle))
            if self.state is AssocState.IDLE and self._loop.time() - self._last > self.idle:
                self.link.abort(f"idle for {self.idle:g} s")
                return

    async def _on_command(self, context_id: int, command: Command) -> None:
        field = command.field
        if field in messages.REQUESTS:
            await self._request(context_id, command)
        elif field == messages.C_STORE_RSP:
            if self.active is not None:
                self.active.on_store_response(command)
        elif field == messages.C_CANCEL_RQ:
            await self._cancel(command.us(dimse.MESSAGE_ID_RESPONDED))
        elif field == messages.C_ECHO_RQ:
            await self.services.hooks.echo(self.session)
            await self.link.send(context_id, dimse.response(messages.C_ECHO_RSP, command.message_id,
                                                             presentation.VERIFICATION, 0x0000))
        elif field == messages.C_STORE_RQ:
            await self._store(context_id, command)
        else:
            log.warning("association from %s: unsupported command 0x%04X", self.label, field)
            if command.has_dataset:
                await self.link.skip()
            await self.link.send(context_id, dimse.response(field | 0x8000, command.message_id, command.sop_class,
                                                             messages.UNRECOGNIZED, comment="unrecognized operation"))

    # -- operations ------------------------------------------------------------------------------
    async def _request(self, context_id: int, command: Command) -> None:
        model = self.link.contexts[context_id][0]
        if not command.has_dataset:
            await self.link.send(context_id, messages.final(command.field | 0x8000, command.message_id, model,
                                                            messages.IDENTIFIER_DOES_NOT_MATCH, "no identifier"))
            return
        identifier = await self.link.collect(MAX_IDENTIFIER)
        operation = self.services.operation(self, context_id, command, identifier)
        if self.active is None:
            self._start(operation)
        elif len(self._queue) < MAX_QUEUED:
            self._queue.append(operation)
        else:
            raise LinkError(f"more than {MAX_QUEUED} requests sent without waiting for the answers")

    def _start(self, operation: Operation) -> None:
        self.active = operation
        self._move(AssocState.BUSY)
        self._task = self._loop.create_task(self._run_operation(operation))

    async def _run_operation(self, operation: Operation) -> None:
        try:
            await operation.run()
        finally:
            self.active = None
            self._task = None
            if self._queue and self.state is not AssocState.ENDED:
                self._start(self._queue.popleft())
            else:
                self._move(AssocState.IDLE)

    async def _cancel(self, message_id: int) -> None:
        if self.active is not None and self.active.message_id == message_id:
            self.active.cancel()
            return
        for queued in list(self._queue):
            if queued.message_id == message_id:
                self._queue.remove(queued)
                await queued.finish_cancelled()
                return

    async def _end_operations(self) -> None:
        self._queue.clear()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- C-STORE on a Query/Retrieve association ------------------------------------------------
    async def _store(self, context_id: int, command: Command) -> None:
        if not command.has_dataset:
            await self._store_response(context_id, command, 0xC000, "no data set")
            return
        sop_class, ts = self.link.contexts[context_id]
        writer = self.services.spool.begin(
            sop_class=command.sop_class or sop_class, sop_instance=command.sop_instance, transfer_syntax=ts,
            origin=self.session.table(), max_bytes=self.services.max_dataset,
        )
        try:
            status, comment = await self._spool(writer)
        except DatasetTooLarge as e:
            writer.discard()
            self.link.abort(str(e))
            raise LinkError(str(e)) from None
        except BaseException:
            writer.discard()
            raise
        await self._store_response(context_id, command, status, comment)

    async def _spool(self, writer: SpoolWriter) -> tuple[int, str]:
        error: OSError | None = None
        while True:
            item = await self.link.next()
            if not isinstance(item, Fragment):
                raise LinkError("the association ended inside a C-STORE data set")
            if error is None:
                try:
                    await asyncio.to_thread(writer.write, item.data)
                except OSError as e:  # disk full...: read the rest, answer "out of resources"
                    error = e
            if item.last:
                break
        if error is not None:
            log.error("C-STORE from %s: spool write failed: %s", self.label, error)
            writer.discard()
            return STATUS_OUT_OF_RESOURCES, "gateway spool write failed"
        return await asyncio.to_thread(self.services.store.store_received, self.session, writer)

    async def _store_response(self, context_id: int, command: Command, status: int, comment: str) -> None:
        sop_class = command.sop_class or self.link.contexts[context_id][0]
        await self.link.send(context_id, dimse.response(messages.C_STORE_RSP, command.message_id, sop_class, status,
                                                         command.sop_instance, comment))
