"""DIMSE messages on one association driven by asyncio (:class:`.ul.transport.StreamAssociation`),
either role: the requester's association, the one to the PACS, the one to a move destination.

Receiving yields items in arrival order: :class:`Received` (a command set), then, when the
command has one, its data set as :class:`Fragment` items exactly as they came off the wire
(views of the received PDU, never joined unless the caller collects a small identifier with
:meth:`DimseLink.collect`), and :class:`Released` / :class:`Ended` when the peer releases or the
association ends. A relayed instance therefore crosses the gateway one PDU at a time.

Sending: a whole message at once (:meth:`DimseLink.send`), or a data set streamed fragment by
fragment (:meth:`DimseLink.message`), re-fragmented to the peer's maximum PDU length. A message
is written under a lock, so two tasks sending on one association never interleave their PDUs,
and each write waits for the socket to drain (``timeout`` bounds that wait): a peer that stops
reading holds one PDU of ours, not the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dicomproxy.dicom import dimse
from dicomproxy.dicom.dimse import Command, MessageAssembler
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.association import Aborted, DataReceived, ReleaseRequested
from dicomproxy.dicom.ul.errors import UpperLayerError
from dicomproxy.dicom.ul.transport import StreamAssociation

log = logging.getLogger(__name__)

Pair = tuple[str, str]
"""(abstract syntax, transfer syntax) of an accepted presentation context."""


@dataclass(frozen=True, slots=True)
class Received:
    context_id: int
    command: Command


@dataclass(frozen=True, slots=True)
class Fragment:
    context_id: int
    data: memoryview
    last: bool


@dataclass(frozen=True, slots=True)
class Released:
    """The peer asked to release the association (answer with :meth:`DimseLink.release_response`)."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The association is over (aborted, closed, or a protocol error): ``reason`` says which."""

    reason: str


Item = Received | Fragment | Released | Ended


class LinkError(UpperLayerError):
    """A send failed or timed out, or a message broke the rules (the association was aborted)."""


class DimseLink:
    """DIMSE on an established association; ``contexts`` are the accepted ones by context ID."""

    def __init__(self, link: StreamAssociation, contexts: dict[int, Pair], *, timeout: float) -> None:
        self.link = link
        self.contexts = contexts
        self.timeout = timeout
        self.label = link.label
        self._items: deque[Item] = deque()
        self._assembler = MessageAssembler(contexts, self)
        self._send_lock = asyncio.Lock()
        self._message_id = 0
        self.ended: str | None = None

    # -- ids and contexts ---------------------------------------------------------------------
    def next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def context_for(self, abstract: str, transfer_syntax: str = "") -> int | None:
        """The accepted context for ``abstract``: the one in ``transfer_syntax`` if there is one."""
        fallback = None
        for context_id, (a, ts) in self.contexts.items():
            if a == abstract:
                if not transfer_syntax or ts == transfer_syntax:
                    return context_id
                fallback = fallback or context_id
        return fallback

    @property
    def is_open(self) -> bool:
        return self.ended is None and self.link.is_open

    # -- receiving (MessageHandler) -----------------------------------------------------------------
    def on_command(self, context_id: int, command: Command) -> None:
        self._items.append(Received(context_id, command))

    def on_data(self, context_id: int, fragment: memoryview, last: bool) -> None:
        self._items.append(Fragment(context_id, fragment, last))

    async def next(self) -> Item:
        """The next item; :class:`Ended` (again and again) once the association is over."""
        while not self._items:
            if self.ended is not None:
                return Ended(self.ended)
            indication = await self.link.receive()
            if isinstance(indication, DataReceived):
                try:
                    self._assembler.feed(indication.pdvs)
                except dimse.DimseError as e:
                    self.abort(f"malformed message: {e}")
            elif isinstance(indication, ReleaseRequested):
                return Released()
            elif isinstance(indication, Aborted):
                self.ended = "aborted by the peer" if indication.by_peer else (indication.detail or "aborted")
            elif self.link.core.closed:
                self.ended = "connection closed"
        return self._items.popleft()

    async def collect(self, limit: int) -> bytes:
        """The rest of the data set being received (an identifier), at most ``limit`` bytes;
        raises :class:`LinkError` (after aborting) beyond it or if the association ends."""
        parts: list[bytes] = []
        size = 0
        while True:
            item = await self.next()
            if not isinstance(item, Fragment):
                raise LinkError(f"{self.label}: the association ended inside a data set")
            size += len(item.data)
            if size > limit:
                self.abort(f"a data set of more than {limit} bytes where an identifier was expected")
                raise LinkError(f"{self.label}: identifier longer than {limit} bytes")
            parts.append(bytes(item.data))
            if item.last:
                return b"".join(parts)

    async def skip(self) -> None:
        """Read and drop the rest of the data set being received."""
        while True:
            item = await self.next()
            if not isinstance(item, Fragment) or item.last:
                return

    # -- sending ------------------------------------------------------------------------------
    def _pdata(
        self, context_id: int, payload: bytes | memoryview, *, command: bool, last: bool
    ) -> list[bytes | memoryview]:
        return pdus.p_data(context_id, payload, command=command, max_pdu=self.link.core.peer_max_pdu, last=last)

    async def _write(self, encoded: list[bytes | memoryview]) -> None:
        if not self.is_open:
            raise LinkError(f"association with {self.label} is closed ({self.ended or 'closed'})")
        self.link.send_pdata(encoded)
        try:
            await self.link.drain(self.timeout)
        except TimeoutError:
            self.abort(f"not reading for {self.timeout:g} s")
            raise LinkError(f"{self.label} stopped reading for {self.timeout:g} s; aborted") from None
        except OSError as e:
            self.ended = f"connection lost ({e})"
            raise LinkError(f"connection to {self.label} lost: {e}") from None

    async def send(self, context_id: int, command: bytes, dataset: bytes | memoryview | None = None) -> None:
        """One message: its command set and, if any, its whole (small) data set."""
        out = self._pdata(context_id, command, command=True, last=True)
        if dataset is not None:
            out += self._pdata(context_id, dataset, command=False, last=True)
        async with self._send_lock:
            await self._write(out)

    @contextlib.asynccontextmanager
    async def message(self, context_id: int, command: bytes) -> AsyncIterator[_Stream]:
        """Send ``command``, then its data set piece by piece with ``await stream.write(data, last)``;
        nothing else is sent on this association until the last piece."""
        async with self._send_lock:
            await self._write(self._pdata(context_id, command, command=True, last=True))
            yield _Stream(self, context_id)

    # -- ending -------------------------------------------------------------------------------
    def release_response(self) -> None:
        self.link.release_response()
        self.ended = self.ended or "released"

    async def release(self) -> None:
        """A-RELEASE as the requestor (closes the connection whatever the peer does)."""
        if self.ended is None:
            self.ended = "released"
            await self.link.release(min(self.timeout, 10.0))
        else:
            self.link.close()

    def abort(self, why: str = "") -> None:
        if self.ended is None:
            if why:
                log.warning("association with %s aborted: %s", self.label, why)
            self.ended = why or "aborted"
        self.link.abort()


class _Stream:
    def __init__(self, link: DimseLink, context_id: int) -> None:
        self.link = link
        self.context_id = context_id

    async def write(self, data: bytes | memoryview, last: bool) -> None:
        await self.link._write(self.link._pdata(self.context_id, data, command=False, last=last))
