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
"""

from __future__ import annotations

import logging

from dicomproxy.dicom import policy
from dicomproxy.dicom.dimse import Command
from dicomproxy.dicom.qr import contexts, messages
from dicomproxy.dicom.qr.identifier import Identifier
from dicomproxy.dicom.qr.link import DimseLink
from dicomproxy.dicom.qr.operation import MAX_IDENTIFIER, Operation, OpState, UpstreamFailed

log = logging.getLogger(__name__)


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
