"""C-FIND through the gateway (Patient Root, Study Root, Modality Worklist): the query passes the
C-FIND events (:mod:`.hooks`), goes to the PACS as one C-FIND of the same model, and every
response comes back as the PACS sent it, with the requester's message ID: its status (pending,
warning, final, failure with Error Comment), and its match as encoded bytes
(:class:`.identifier.Identifier`), decoded only when ``onCFindResult`` is defined.

The query goes to the PACS in the requester's transfer syntax when the PACS accepts it (it is
proposed first, in a context of its own), so neither the query nor a match is re-encoded.

A C-CANCEL from the requester is passed on to the PACS at once, so a cancelled query stops
costing the PACS anything; matches still arriving are dropped and the requester's final
response is Cancel (0xFE00).

Federated (``Dicom:QueryUpstream`` names a group with ``Federated``): the query goes to every
member at once, each on an association of its own; matches are passed on as they arrive from
any member, de-duplicated by the level's unique key (StudyInstanceUID, SeriesInstanceUID,
SOPInstanceUID, PatientID; a worklist item is never merged), and a C-CANCEL goes to every
member. A member that cannot be associated with, stops answering (``Dicom:QueryRetrieveTimeoutSeconds``
per response) or answers with a failure is logged by name and skipped: the final status is
Success with the other members' matches, since PS3.4 C.4.1 defines no Warning status for
C-FIND and an Error Comment is only allowed with a failure; it is a failure (0xA700) only when
no member answered. Bounded: matches wait in a queue of :data:`QUEUE` (members are read no
faster than the requester takes them), and at most :data:`MAX_KEYS` distinct keys are remembered
(past that, duplicates are no longer removed; a line is logged).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dicomproxy.dicom import policy
from dicomproxy.dicom.dimse import Command
from dicomproxy.dicom.qr import contexts, messages
from dicomproxy.dicom.qr.identifier import Identifier
from dicomproxy.dicom.qr.link import DimseLink, LinkError
from dicomproxy.dicom.qr.operation import MAX_IDENTIFIER, Operation, OpState, UpstreamFailed
from dicomproxy.dicom.qr.upstream import Peer
from dicomproxy.dicom.ul.errors import UpperLayerError

log = logging.getLogger(__name__)

QUEUE = 64
MAX_KEYS = 1_000_000
LEVEL_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}


class FindOperation(Operation):
    response_field = messages.C_FIND_RSP
    name = "C-FIND"
    permission = policy.Operation.FIND

    async def _run(self) -> None:
        self.services.audit.query(self.session, self.model, self.identifier, self.transfer_syntax)
        query = Identifier(self.identifier, self.transfer_syntax)
        refused = await self.services.hooks.query(
            query, self.session, worklist=self.model == contexts.MODALITY_WORKLIST_FIND
        )
        if refused:
            await self.refuse(messages.UNABLE_TO_PROCESS, refused)
            return
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return
        if self.services.query_federated:
            await self._federated(query)
            return
        up, context_id, upstream_ts = await self.open_pacs(
            self.model, contexts.model_pairs(self.model, self.transfer_syntax))
        if await self.pass_request(up, context_id, query.encoded(upstream_ts)):
            await self._relay(up, upstream_ts)

    async def _relay(self, up: DimseLink, upstream_ts: str) -> None:
        wants_results = self.services.hooks.wants_results()
        while True:
            received = await self.next_response(up, messages.C_FIND_RSP, "C-FIND")
            data = await up.collect(MAX_IDENTIFIER) if received.command.has_dataset else None
            if messages.is_pending(received.command):
                if self.state is OpState.CANCELLING or data is None:
                    continue  # drain what the PACS still sends until its final response
                match = await self._result(Identifier(data, upstream_ts), wants_results)
                if match is not None:
                    await self.respond(messages.response(received.command, self.message_id), match)
                continue
            self.finished(up)
            await self._final(received.command, data, upstream_ts)
            return

    async def _result(self, match: Identifier, wants_results: bool) -> bytes | None:
        if wants_results:
            try:
                if not await self.services.hooks.result(match, self.session):
                    return None
            except Exception as e:
                log.error("onCFindResult failed: %s", e)
                if not self.services.hooks.fail_open:
                    raise UpstreamFailed("script failed", messages.UNABLE_TO_PROCESS) from None
        return match.encoded(self.transfer_syntax)

    async def _final(self, command: Command, data: bytes | None, upstream_ts: str) -> None:
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return
        status = messages.status_of(command)
        if status != messages.SUCCESS:
            log.warning("C-FIND from %s: the PACS answered 0x%04X %s", self.label, status,
                        command.text(0x0902))
        dataset = Identifier(data, upstream_ts).encoded(self.transfer_syntax) if data is not None else None
        await self.respond(messages.response(command, self.message_id), dataset, final=True)

    # -- federated ------------------------------------------------------------------------------
    _members: list[tuple[DimseLink, int, int]] | None = None  # (link, context, message id) per member asked

    def cancel(self) -> None:
        if self._members is None:
            super().cancel()
            return
        if self.state in (OpState.PREPARING, OpState.RELAYING):
            self._move(OpState.CANCELLING)
            log.info("C-FIND from %s cancelled; cancelling it at %d member(s)", self.label, len(self._members))
            for link, context_id, message_id in self._members:
                asyncio.get_running_loop().create_task(_cancel(link, context_id, message_id))

    async def _federated(self, query: Identifier) -> None:
        peers = self.services.query_members()
        level = query.get("QueryRetrieveLevel").strip().upper()
        key = LEVEL_KEYS.get(level) if self.model != contexts.MODALITY_WORKLIST_FIND else None
        queue: asyncio.Queue[tuple[str, Peer, Any]] = asyncio.Queue(QUEUE)
        self._members = []
        self._move(OpState.RELAYING)
        tasks = [asyncio.get_running_loop().create_task(self._member(peer, query, queue)) for peer in peers]
        wants_results = self.services.hooks.wants_results()
        seen: set[str] = set()
        answered: list[Peer] = []
        missing: list[str] = []
        try:
            for _ in peers:
                while True:
                    kind, peer, payload = await queue.get()
                    if kind != "match":
                        break
                    if self.state is OpState.CANCELLING:
                        continue
                    command, match = payload
                    uid = match.get(key).strip() if key else ""
                    if uid:
                        if uid in seen:
                            continue
                        if len(seen) < MAX_KEYS:
                            seen.add(uid)
                        elif len(seen) == MAX_KEYS:
                            log.warning("C-FIND from %s: more than %d matches; duplicates are no longer removed",
                                        self.label, MAX_KEYS)
                            seen.add(uid)
                    encoded = await self._result(match, wants_results)
                    if encoded is not None:
                        await self.respond(messages.response(command, self.message_id), encoded)
                if kind == "done":
                    answered.append(peer)
                else:
                    missing.append(f"{peer} ({payload})")
        finally:
            for task in tasks:
                task.cancel()
        if missing:
            log.warning("federated C-FIND from %s: %d of %d member(s) did not answer and were skipped: %s",
                        self.label, len(missing), len(peers), "; ".join(missing))
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return
        if not answered:
            raise UpstreamFailed(f"no member of {self.services.query_upstream_name} answered: {'; '.join(missing)}")
        await self.respond(messages.final(messages.C_FIND_RSP, self.message_id, self.model, messages.SUCCESS),
                           final=True)

    async def _member(self, peer: Peer, query: Identifier, queue: asyncio.Queue[tuple[str, Peer, Any]]) -> None:
        """One member's part: its matches, then ``done`` or ``failed`` (never raises)."""
        try:
            link = await self.connect(peer, contexts.model_pairs(self.model, self.transfer_syntax))
            context_id = link.context_for(self.model, self.transfer_syntax)
            if context_id is None:
                raise UpstreamFailed(f"it does not accept {self.model}")
            upstream_ts = link.contexts[context_id][1]
            if self.state is OpState.CANCELLING:
                self.finished(link)
                await queue.put(("done", peer, None))
                return
            message_id = link.next_id()
            assert self._members is not None
            self._members.append((link, context_id, message_id))
            await link.send(context_id, messages.request(self.command, message_id), query.encoded(upstream_ts))
            while True:
                received = await self.next_response(link, messages.C_FIND_RSP, "C-FIND")
                data = await link.collect(MAX_IDENTIFIER) if received.command.has_dataset else None
                if messages.is_pending(received.command):
                    if data is not None:
                        await queue.put(("match", peer, (received.command, Identifier(data, upstream_ts))))
                    continue
                self.finished(link)
                status = messages.status_of(received.command)
                if status in (messages.SUCCESS, messages.CANCEL):
                    await queue.put(("done", peer, None))
                else:
                    await queue.put(("failed", peer, f"answered 0x{status:04X} {received.command.text(0x0902)}"))
                return
        except (UpstreamFailed, LinkError, UpperLayerError) as e:
            await queue.put(("failed", peer, str(e)))


async def _cancel(link: DimseLink, context_id: int, message_id: int) -> None:
    try:
        await link.send(context_id, messages.cancel(message_id))
    except (LinkError, UpperLayerError) as e:
        log.warning("C-CANCEL could not be passed to %s: %s", link.label, e)
