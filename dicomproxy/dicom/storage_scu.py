"""The requestor side of the Storage and Verification services (PS3.4 annexes A and B): an
association to a storage SCP (the PACS, a move destination, a ``send`` target) that sends
C-STORE and C-ECHO requests, one operation at a time, on the upper layer of :mod:`.ul`.

Data sets are sent exactly as they are (spooled or on disk), never decoded: from memory, or
read from a file in 1 MiB pieces while they are sent (:class:`FileDataset`), so a 300 MB
instance never sits in memory whole. The association is opened by :func:`.ul.requestor.open_association`
(TCP_NODELAY on), like the relay's.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomproxy.dicom import dimse, presentation
from dicomproxy.dicom.dimse import Command, MessageAssembler, Status
from dicomproxy.dicom.presentation import Pair
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.association import Aborted, DataReceived, ReleaseRequested
from dicomproxy.dicom.ul.errors import AssociationAborted, UpperLayerError
from dicomproxy.dicom.ul.transport import StreamAssociation

DEFAULT_MAX_PDU = 1 << 20
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDataset:
    """A data set stored in a file at ``offset`` (``length`` -1: to the end of the file)."""

    path: Path
    offset: int
    length: int = -1


Dataset = bytes | memoryview | FileDataset


class ResponseKeeper:
    """MessageHandler that keeps the command set of a response (data sets are not expected); the
    relay (relay.py) reads the PACS's C-STORE-RSP with it too."""

    def __init__(self) -> None:
        self.command: Command | None = None

    def on_command(self, context_id: int, command: Command) -> None:
        self.command = command

    def on_data(self, context_id: int, fragment: memoryview, last: bool) -> None:
        return None


class StorageScu:
    """An established association with a storage SCP; build it with :meth:`connect`."""

    def __init__(self, link: StreamAssociation, accepted: dict[Pair, int], rejected: set[Pair]) -> None:
        self.link = link
        self.accepted = accepted
        self.rejected = rejected
        self.contexts = {context_id: pair for pair, context_id in accepted.items()}
        self._response = ResponseKeeper()
        self._assembler = MessageAssembler(self.contexts, self._response)
        self.label = link.label
        self._msg_id = 0
        self._lock = asyncio.Lock()
        self.last_used = asyncio.get_running_loop().time()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        called_aet: str,
        calling_aet: str,
        contexts: Sequence[Pair],
        timeout: float = 10.0,
        max_pdu: int = DEFAULT_MAX_PDU,
        tls: ssl.SSLContext | None = None,
    ) -> StorageScu:
        """Negotiate one presentation context per (SOP class, transfer syntax) pair; over TLS
        with ``tls`` (a client context of :func:`.ul.tls.client_context`)."""
        if not contexts:
            raise ValueError("at least one presentation context is needed")
        proposed = presentation.contexts_of(contexts)
        rq = pdus.associate_rq(called_aet, calling_aet, proposed, max_pdu)
        link, ac = await StreamAssociation.request(host, port, rq, timeout=timeout, tls=tls)
        results = pdus.accepted_contexts(ac)
        accepted: dict[Pair, int] = {}
        rejected: set[Pair] = set()
        for cx, pair in zip(proposed, contexts, strict=True):
            result, chosen = results.get(cx.context_id, (presentation.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
            if result == presentation.ACCEPTANCE and (not chosen or chosen == pair[1]):
                accepted[pair] = cx.context_id
            else:
                rejected.add(pair)
        return cls(link, accepted, rejected)

    @property
    def is_open(self) -> bool:
        return self.link.is_open

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    async def c_store(
        self,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        dataset: Dataset,
        *,
        priority: int = 0,
        originator_aet: str = "",
        originator_msg_id: int = 0,
        timeout: float = 60.0,
    ) -> Status:
        """Send one encoded data set; raises KeyError if no accepted context fits."""
        context_id = self.accepted[(sop_class, transfer_syntax)]
        command = dimse.c_store_rq(
            self._next_id(), sop_class, sop_instance, priority=priority, originator_aet=originator_aet,
            originator_id=originator_msg_id,
        )
        return (await self._request(context_id, command, dataset, timeout)).status()

    async def c_echo(self, timeout: float = 30.0) -> Status:
        context_id = next((c for (a, _), c in self.accepted.items() if a == presentation.VERIFICATION), None)
        if context_id is None:
            raise UpperLayerError(f"{self.label} did not accept the Verification SOP class")
        return (await self._request(context_id, dimse.c_echo_rq(self._next_id()), None, timeout)).status()

    async def _request(self, context_id: int, command: bytes, dataset: Dataset | None, timeout: float) -> Command:
        if not self.is_open:
            raise UpperLayerError(f"association with {self.label} is closed")
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    pdus_out = self._pdata(context_id, command, command=True, last=True)
                    if isinstance(dataset, FileDataset):
                        self.link.send_pdata(pdus_out)
                        await self._send_file(context_id, dataset, timeout)
                    else:
                        if dataset is not None:  # one write for the command and the data set
                            pdus_out += self._pdata(context_id, dataset, command=False, last=True)
                        self.link.send_pdata(pdus_out)
                    await self.link.writer.drain()  # bounded by the timeout around the operation
                    response = await self._read_response()
            except TimeoutError:
                self.abort()
                raise UpperLayerError(f"{self.label} did not answer within {timeout:g} s; aborted") from None
            except OSError as e:
                self.link.close()
                raise UpperLayerError(f"connection to {self.label} lost: {e}") from None
            self.last_used = asyncio.get_running_loop().time()
            return response

    def _pdata(
        self, context_id: int, payload: bytes | memoryview, *, command: bool, last: bool
    ) -> list[bytes | memoryview]:
        max_pdu = self.link.core.peer_max_pdu or DEFAULT_MAX_PDU
        return pdus.p_data(context_id, payload, command=command, max_pdu=max_pdu, last=last)

    async def _send_file(self, context_id: int, dataset: FileDataset, timeout: float) -> None:
        fd = await asyncio.to_thread(os.open, dataset.path, os.O_RDONLY)
        try:
            left = dataset.length if dataset.length >= 0 else os.fstat(fd).st_size - dataset.offset
            offset = dataset.offset
            while True:
                chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, left), offset)
                if len(chunk) < min(READ_CHUNK, left):
                    raise UpperLayerError(f"{dataset.path} is shorter than its spool entry says")
                offset += len(chunk)
                left -= len(chunk)
                self.link.send_pdata(self._pdata(context_id, chunk, command=False, last=left <= 0))
                if left <= 0:
                    return
                await self.link.drain(timeout)  # one piece in flight at a time: memory stays bounded
        finally:
            os.close(fd)

    async def _read_response(self) -> Command:
        handler, assembler = self._response, self._assembler
        handler.command = None
        while True:
            indication = await self.link.receive()
            if isinstance(indication, DataReceived):
                try:
                    assembler.feed(indication.pdvs)
                except dimse.DimseError as e:
                    self.abort()
                    raise UpperLayerError(f"{self.label} sent a malformed response ({e}); aborted") from None
                if handler.command is not None:
                    return handler.command
            elif isinstance(indication, ReleaseRequested):
                self.link.release_response()
                raise UpperLayerError(f"{self.label} released the association during an operation")
            elif isinstance(indication, Aborted):
                raise AssociationAborted(f"{self.label} aborted the association ({indication.detail or 'A-ABORT'})")
            elif self.link.core.closed:
                raise UpperLayerError(f"{self.label} closed the connection")

    async def release(self, timeout: float = 5.0) -> None:
        """A-RELEASE; falls back to closing the socket if the peer does not answer."""
        async with self._lock:
            await self.link.release(timeout)

    def abort(self) -> None:
        self.link.abort()


async def echo(
    host: str, port: int, *, called_aet: str, calling_aet: str, timeout: float = 10.0, tls: ssl.SSLContext | None = None
) -> Status:
    """C-ECHO on a fresh association."""
    scu = await StorageScu.connect(
        host, port, called_aet=called_aet, calling_aet=calling_aet,
        contexts=[(presentation.VERIFICATION, presentation.IMPLICIT)], timeout=timeout, tls=tls,
    )
    try:
        return await scu.c_echo(timeout)
    finally:
        await scu.release()
